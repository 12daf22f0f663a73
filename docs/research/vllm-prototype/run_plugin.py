"""LLM(...) with the prototype plugin: checks prompt length = text tokens + kept tokens."""
import json, os, sys, time


def main():
    t0 = time.time()
    from PIL import Image
    from vllm import LLM, SamplingParams

    model = sys.argv[1]
    ficoco = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {"method": "random", "retain": 64}
    extra = json.loads(os.environ.get("LLM_KW", "{}"))
    t1 = time.time()
    llm = LLM(model=model, dtype=os.environ.get("DTYPE", "float32"), max_model_len=1024, enforce_eager=True,
              limit_mm_per_prompt={"image": 1},
              hf_overrides={"architectures": ["FicocoLlavaForConditionalGeneration"], "ficoco": ficoco}, **extra)
    print("LLM init: %.1fs" % (time.time() - t1), flush=True)
    img = Image.open("/tmp/vllm-proto/scene.png").convert("RGB")
    qs = json.load(open("/tmp/vllm-proto/scene.json"))
    tok = llm.get_tokenizer()
    prompts, text_lens = [], []
    for q in qs["questions"]:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        p = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        prompts.append({"prompt": p, "multi_modal_data": {"image": img}})
        text_lens.append(len(tok(p)["input_ids"]) - 1)  # the one <image> token is replaced
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    t2 = time.time()
    outs = llm.generate(prompts, sp)
    print("generate(6): %.2fs" % (time.time() - t2))
    n_img = [len(o.prompt_token_ids) - t for o, t in zip(outs, text_lens)]
    ok = 0
    for o, a, t, n in zip(outs, qs["answers"], text_lens, n_img):
        ok += o.outputs[0].text.strip() == a
        print(f"prompt_len={len(o.prompt_token_ids)} text={t} image_tokens={n} answer={o.outputs[0].text!r} expected={a!r}")
    print("RESULT", json.dumps({"ficoco": ficoco, "image_tokens": sorted(set(n_img)), "correct": ok, "of": len(outs)}))
    print("total %.1fs" % (time.time() - t0))


if __name__ == "__main__":
    main()
