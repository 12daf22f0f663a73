"""The Qwen-VL vision tower alone on each attention path (random bf16 weights, one 1280x720 image
per sample): milliseconds at each batch, the speed-up over transformers' stock path, and how far
each path's image features lie from the stock path's (bf16 rounding, reported, not hidden).

Paths: ``stock`` (one SDPA call per window, in a Python loop), ``varlen`` (ficoco's one call per
block, MLP as the checkpoint has it), ``varlen+aligned`` (and the MLP width padded to a multiple of
64, :func:`ficoco.fast_vision_attention`'s default), ``compiled`` (and every block compiled).

Usage: python benchmarks/qwen_tower_paths.py [--batches 1,8] [--out tower.json] [--profile-batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import ficoco
from ficoco.measure import bench_qwen
from ficoco.measure.bench import cuda_times, environment
from ficoco.measure.flops import preset as flops_preset

PATHS = {  # name -> fast_vision_attention options (None: the stock path)
    "stock": None,
    "varlen": dict(align_mlp=False),
    "varlen+aligned": dict(align_mlp=True),
    "compiled": dict(align_mlp=True, compile_blocks=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen2.5-vl-7b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile-batch", type=int, default=0, help="profile the last path at this batch")
    args = parser.parse_args()
    model = bench_qwen.random_qwen_model(args.preset)
    shape = flops_preset(args.preset).with_image(1280, 720)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = bench_qwen.make_inputs(shape, batch, 64, "cuda", torch.bfloat16)
        reference = None
        for name in args.paths.split(","):
            options = PATHS[name]
            fast = ficoco.fast_vision_attention(model, **options) if options is not None else None
            try:
                with torch.inference_mode():
                    def tower():
                        return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

                    started = time.time()
                    out = tower()
                    out = getattr(out, "pooler_output", out)  # an output object in newer transformers
                    features = torch.cat(list(out)).float()
                    first = time.time() - started
                    times = cuda_times(tower, 3, args.repeats)
                    if args.profile_batch == batch and name == args.paths.split(",")[-1]:
                        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                            tower()
                            torch.cuda.synchronize()
                        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
            finally:
                if fast is not None:
                    fast.remove()
            if reference is None:
                reference = features
            error = ((features - reference).norm() / reference.norm()).item()
            row = dict(path=name, batch=batch, ms=statistics.median(times), first_call_s=first,
                       relative_error_vs_first=error, max_abs_diff=(features - reference).abs().max().item())
            rows.append(row)
            base = next(r["ms"] for r in rows if r["batch"] == batch)
            print(f"batch {batch} {name:>15}: {row['ms']:8.2f} ms  {base / row['ms']:5.2f}x  rel.err {error:.2e}  "
                  f"max|diff| {row['max_abs_diff']:.3g}  first call {first:.1f}s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "image": [1280, 720], "environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
