"""Time DivPrune's and CDPruner's greedy selections on a GPU: the PyTorch loop against the Triton
kernel (stages/greedy_kernels.py), at the token counts of the bench presets, batch 8.

    python benchmarks/greedy_selection.py --out greedy-selection.json

Each row: the ``select`` call alone (similarity/kernel matrix + greedy loop), median of
``--repeats`` CUDA-event timings after ``--warmup`` calls. CDPruner's rows add its DPP kernel alone
with one program per sample (``parts=1``, the kernel before the columns were shared) and with the
columns shared by several programs (the default).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ficoco.measure.bench import cuda_times, environment
from ficoco.stages import FeatureProbe
from ficoco.stages.diversity import ConditionalDPPFilter, MaxMinDiversityFilter
from ficoco.stages.greedy_kernels import greedy_dpp
from ficoco.stages.tokens import TokenGroup

# (what, samples, tokens per sample, kept, feature width): the selection runs on the LLM's input
SHAPES = [
    ("llava-1.5-7b 192", 8, 576, 192, 4096),
    ("llava-1.5-7b 64", 8, 576, 64, 4096),
    ("llava-1.5-7b 192, batch 32", 32, 576, 192, 4096),
    ("llava-next-7b 128/crop", 40, 576, 128, 4096),
    ("video-llava-7b 64/frame", 64, 256, 64, 4096),
    ("qwen2.5-vl-7b 1/2", 8, 1196, 598, 3584),
    ("qwen2.5-vl-7b 1/4", 8, 1196, 299, 3584),
    ("qwen2.5-vl-7b 1/8", 8, 1196, 150, 3584),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="greedy-selection.json")
    args = parser.parse_args()
    rows = []
    for what, b, n, kept, d in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16)
        text = torch.randn(b, 32, d, device="cuda", dtype=torch.bfloat16)
        tokens = TokenGroup.fresh(x, (1, n))
        probe = FeatureProbe(lambda: (text, torch.ones(b, 32, dtype=torch.bool, device="cuda")))
        for method, make in (("divprune", MaxMinDiversityFilter), ("cdpruner", ConditionalDPPFilter)):
            times = {}
            for backend in ("torch", "triton"):
                stage = make(backend=backend)
                times[backend] = statistics.median(cuda_times(lambda: stage.select(tokens, probe, kept), args.warmup,
                                                              args.repeats))
            same = torch.equal(make(backend="torch").select(tokens, probe, kept),
                               make(backend="triton").select(tokens, probe, kept))
            row = dict(shape=what, method=method, batch=b, tokens=n, kept=kept, torch_ms=times["torch"],
                       triton_ms=times["triton"], same_tokens=same)
            extra = ""
            if method == "cdpruner":
                kernel, r, floor = make().dpp_inputs(tokens, probe)
                for parts in (1, None):
                    row[f"dpp_kernel_ms_parts_{parts or 'auto'}"] = statistics.median(cuda_times(
                        lambda: greedy_dpp(kernel, r, floor, kept, parts=parts), args.warmup, args.repeats))
                row["same_tokens_parts_1"] = torch.equal(greedy_dpp(kernel, r, floor, kept, parts=1),
                                                         greedy_dpp(kernel, r, floor, kept))
                extra = (f"  DPP kernel alone: one program per sample {row['dpp_kernel_ms_parts_1']:6.2f} ms, "
                         f"shared columns {row['dpp_kernel_ms_parts_auto']:6.2f} ms (same tokens: "
                         f"{row['same_tokens_parts_1']})")
            rows.append(row)
            print(f"{what:>26} {method:>8}: torch {times['torch']:8.2f} ms  triton {times['triton']:7.2f} ms  "
                  f"x{times['torch'] / times['triton']:5.1f}  same tokens: {same}{extra}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"environment": environment(), "warmup": args.warmup, "repeats": args.repeats, "rows": rows}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
