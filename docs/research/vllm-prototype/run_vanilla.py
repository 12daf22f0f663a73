import os, sys, time, json, resource
def main():
    t0 = time.time()
    from PIL import Image
    from vllm import LLM, SamplingParams
    print("import vllm: %.1fs" % (time.time() - t0), flush=True)
    model = sys.argv[1] if len(sys.argv) > 1 else "/tmp/vllm-proto/proxy-llava"
    dtype = os.environ.get("DTYPE", "float32")
    extra = json.loads(os.environ.get("LLM_KW", "{}"))
    t1 = time.time()
    llm = LLM(model=model, dtype=dtype, max_model_len=1024, enforce_eager=True, limit_mm_per_prompt={"image": 1}, **extra)
    print("LLM init: %.1fs" % (time.time() - t1), flush=True)
    img = Image.open("/tmp/vllm-proto/scene.png").convert("RGB")
    qs = json.load(open("/tmp/vllm-proto/scene.json"))
    tok = llm.get_tokenizer()
    prompts = []
    for q in qs["questions"]:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        p = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        prompts.append({"prompt": p, "multi_modal_data": {"image": img}})
    print("prompt[0]:", repr(prompts[0]["prompt"]))
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    t2 = time.time()
    outs = llm.generate(prompts, sp)
    print("generate(6): %.2fs" % (time.time() - t2))
    for o, a in zip(outs, qs["answers"]):
        print(len(o.prompt_token_ids), repr(o.outputs[0].text), "expected", a)
    print("maxrss MiB self: %.0f children: %.0f" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024))
    print("total %.1fs" % (time.time() - t0))


if __name__ == '__main__':
    main()
