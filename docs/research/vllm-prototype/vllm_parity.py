"""vLLM side of the parity check: in the worker (LLM.apply_model), run vLLM's CLIP + projector on
the HF pixel values with each ficoco method attached through the bridge; compare with hf_ref.pt."""
import os, sys


from parity_worker import worker_fn


def main():
    from vllm import LLM
    llm = LLM(model=sys.argv[1], dtype=os.environ.get("DTYPE", "float32"), max_model_len=1024, enforce_eager=True,
              limit_mm_per_prompt={"image": 1},
              hf_overrides={"architectures": ["FicocoLlavaForConditionalGeneration"], "ficoco": {"method": "first", "retain": 64}})
    for name, r in llm.apply_model(worker_fn)[0].items():
        print("PARITY", name, r)


if __name__ == "__main__":
    main()
