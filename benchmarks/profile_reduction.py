"""Profile one method's prefill on the random-weight LLaVA-1.5-7B: top CPU and GPU ops, host syncs.

    python benchmarks/profile_reduction.py --methods ficoco-v,ficoco-l --retain 192 --batch 8
    python benchmarks/profile_reduction.py --methods ficoco-l --sort device   # where the GPU time goes

With ``--sort device`` the table ranks operations by their own GPU time, which shows what a
reduction step costs on the device once its launches are out of the way (``--graph-steps``).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

import ficoco
from ficoco.measure import bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="ficoco-v,ficoco-l")
    parser.add_argument("--retain", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", choices=["cpu", "device"], default="cpu",
                        help="rank operations by their own CPU time or their own GPU time")
    parser.add_argument("--graph-steps", action="store_true",
                        help="replay decoder-side reduction steps as CUDA graphs (ficoco.graph_language_steps)")
    args = parser.parse_args()
    model = bench.random_model("llava-1.5-7b")
    inputs = bench.make_inputs(args.batch, 64, "cuda", torch.bfloat16)
    for name in args.methods.split(","):
        with ficoco.apply(model, name, retain=args.retain) as handle, torch.inference_mode(), \
                (ficoco.graph_language_steps(handle) if args.graph_steps and handle.language else nullcontext()):
            for _ in range(3):
                model(**inputs, logits_to_keep=1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(**inputs, logits_to_keep=1)
                torch.cuda.synchronize()
        events = prof.key_averages()
        syncs = [e for e in events if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::item"
                 or e.key == "aten::_local_scalar_dense"]
        print(f"==== {name} retain={args.retain} batch={args.batch} graph_steps={args.graph_steps}")
        for e in syncs:
            print(f"sync-ish {e.key}: {e.count} calls, cpu {e.cpu_time_total / 1e3:.2f} ms")
        for e in events:
            if e.key.startswith("ficoco."):
                print(f"range {e.key}: {e.count} calls, cpu {e.cpu_time_total / 1e3:.2f} ms, "
                      f"device {e.device_time_total / 1e3:.2f} ms")
        key = "self_cpu_time_total" if args.sort == "cpu" else "self_device_time_total"
        print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
