"""Profile one method's prefill on the random-weight LLaVA-1.5-7B: top CUDA/CPU ops, host syncs.

    python benchmarks/profile_reduction.py --method ficoco-v --retain 192 --batch 8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import ficoco
from ficoco import bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="ficoco-v,ficoco-l")
    parser.add_argument("--retain", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = bench.random_model("llava-1.5-7b")
    inputs = bench.make_inputs(args.batch, 64, "cuda", torch.bfloat16)
    for name in args.methods.split(","):
        with ficoco.apply(model, name, retain=args.retain), torch.inference_mode():
            for _ in range(3):
                model(**inputs, logits_to_keep=1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(**inputs, logits_to_keep=1)
                torch.cuda.synchronize()
        events = prof.key_averages()
        syncs = [e for e in events if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::item"
                 or e.key == "aten::_local_scalar_dense"]
        print(f"==== {name} retain={args.retain} batch={args.batch}")
        for e in syncs:
            print(f"sync-ish {e.key}: {e.count} calls, cpu {e.cpu_time_total / 1e3:.2f} ms")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
