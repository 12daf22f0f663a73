"""Check the oracle of the speed benchmark in isolation (issue 3).

``ficoco bench`` twice measured the 7B truncation oracle at 64 tokens and batch 8 with a slower
LLM part than FiCoCo-V's (43-49 ms against 34 ms) although both hand the LLM the same shapes, so
FiCoCo-V looked faster than its own oracle (0.83x, 0.93x). This script times the oracle, FiCoCo-V
and random dropping at 64 tokens (and the oracle at 128) in three interleaved rounds, with and
without the vision tower replayed as CUDA graphs, prints what the LLM receives (shape, strides,
mask) and times the bare LLM on random embeddings of the same lengths.

    python benchmarks/oracle_check.py      # a CUDA GPU; LLaVA-1.5-7B shapes with random weights
"""

from __future__ import annotations

import statistics

import torch

import ficoco
from ficoco.adapters.cuda_graph import graph_vision_tower
from ficoco.measure.bench import cuda_times, make_inputs, random_model
from ficoco.methods.baselines import oracle


def main() -> None:
    model = random_model("llava-1.5-7b")
    inputs = make_inputs(8, 64, "cuda", torch.bfloat16)
    seen: dict = {}

    def describe_llm_inputs(module, args, kwargs) -> None:
        embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        seen.update(shape=tuple(embeds.shape), stride=embeds.stride(), contiguous=embeds.is_contiguous(),
                    mask=None if mask is None else (tuple(mask.shape), str(mask.dtype), bool(mask.bool().all())))

    hook = model.model.language_model.register_forward_pre_hook(describe_llm_inputs, with_kwargs=True)
    variants = {"oracle@64": oracle(64), "ficoco-v@64": ficoco.get_method("ficoco-v", retain=64),
                "random@64": ficoco.get_method("random", retain=64), "oracle@128": oracle(128)}
    results: dict = {}
    for graphed in (False, True):
        for round_index in range(3):
            for name, method in variants.items():
                handle = ficoco.attach(model, method)
                graphs = graph_vision_tower(model) if graphed else None
                try:
                    with torch.inference_mode():
                        total = cuda_times(lambda: model(**inputs, use_cache=True, logits_to_keep=1), 2, 5)
                        vision = cuda_times(
                            lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"]), 2, 5)
                finally:
                    if graphs is not None:
                        graphs.remove()
                    handle.remove()
                results.setdefault((graphed, name), []).append((statistics.median(total), statistics.median(vision)))
                if round_index == 0:
                    print(f"graphs={graphed} {name}: LLM input {seen}", flush=True)
    hook.remove()
    print("median prefill / vision ms per round (batch 8):")
    for (graphed, name), rounds in results.items():
        print(f"  graphs={graphed!s:5} {name:12}", "  ".join(f"{t:.1f}/{v:.1f}" for t, v in rounds))
    llm = model.model.language_model
    for length in (128, 192):  # 64 + 64 and 128 + 64 tokens
        embeds = torch.randn(8, length, llm.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            ms = statistics.median(cuda_times(lambda: llm(inputs_embeds=embeds, use_cache=True), 2, 9))
        print(f"LLM alone, {length} tokens: {ms:.1f} ms")


if __name__ == "__main__":
    main()
