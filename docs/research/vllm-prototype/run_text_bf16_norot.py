def main():
    from vllm import LLM, SamplingParams
    llm = LLM(model="/tmp/vllm-proto/hd64-norot", dtype="bfloat16", max_model_len=1024, enforce_eager=True, limit_mm_per_prompt={"image": 0})
    o = llm.generate(["user : what shape is the pink object? assistant :"], SamplingParams(temperature=0, max_tokens=4))
    print("TEXT OK", repr(o[0].outputs[0].text))
if __name__ == "__main__":
    main()
