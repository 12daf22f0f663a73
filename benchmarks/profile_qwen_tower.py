"""Where the Qwen2.5-VL-7B vision tower spends its GPU time (random bf16 weights, one 1280x720
image per sample): the top operators by device time, stock attention vs the one-call path, and
with FiCoCo-V attached. Usage: python benchmarks/profile_qwen_tower.py [--batch 8] [--method ficoco-v]"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import ficoco
from ficoco.measure import bench_qwen
from ficoco.measure.flops import preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen2.5-vl-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--method", default=None)
    parser.add_argument("--retain", type=float, default=0.25)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = bench_qwen.random_qwen_model(args.preset)
    shape = preset(args.preset)
    inputs = bench_qwen.make_inputs(shape, args.batch, 64, "cuda", torch.bfloat16)
    handle = ficoco.attach(model, args.method, retain=args.retain) if args.method else None
    with ficoco.fast_vision_attention(model), torch.inference_mode():
        def tower():
            return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

        for _ in range(3):
            tower()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            tower()
            torch.cuda.synchronize()
    if handle:
        handle.remove()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
