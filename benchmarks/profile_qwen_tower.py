"""Where the Qwen2.5-VL-7B vision tower spends its GPU time (random bf16 weights, one 1280x720
image per sample): the top operators by device time on the one-call path (compiled blocks with
``--compile``), vanilla, with a method attached, or with its truncation oracle (``--oracle``); the
``ficoco.filter / correlate / compress`` ranges split a reduction's cost by stage, and ``--stages``
lists the operators inside each of those ranges by their own device time.
Usage: python benchmarks/profile_qwen_tower.py [--batch 8] [--method ficoco-v] [--compile] [--oracle] [--stages]"""

from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import ficoco
from ficoco.measure import bench_qwen
from ficoco.measure.flops import preset
from ficoco.methods.baselines import oracle


STAGE_RANGES = ("ficoco.filter", "ficoco.correlate", "ficoco.compress")


def stage_breakdown(events, rows: int = 12) -> str:
    """The operators under each ``ficoco.*`` stage range (the CPU-side ranges and everything they
    call), ranked by their own device time summed over the range's calls (CPU time where no device
    ran them)."""
    lines = []
    for stage in STAGE_RANGES:
        totals: dict[str, float] = {}
        calls = 0
        for event in events:
            if event.name != stage or event.device_type != DeviceType.CPU:
                continue
            calls += 1
            todo = list(event.cpu_children)
            while todo:
                op = todo.pop()
                todo.extend(op.cpu_children)
                own = op.self_device_time_total or (0.0 if torch.cuda.is_available() else op.self_cpu_time_total)
                if own:
                    totals[op.name] = totals.get(op.name, 0.0) + own
        if not calls:
            continue
        total = sum(totals.values())
        lines.append(f"{stage}: {calls} calls, {total / 1e3:.2f} ms of operators' own time")
        for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:rows]:
            lines.append(f"    {us / 1e3:8.3f} ms  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen2.5-vl-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--method", default=None)
    parser.add_argument("--retain", type=float, default=0.25)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="compile each block's forward (compile_blocks)")
    parser.add_argument("--oracle", action="store_true", help="the method's truncation oracle instead of it")
    parser.add_argument("--sort", default="cuda_time_total", help="profiler table column to sort by")
    parser.add_argument("--stages", action="store_true", help="also the operators inside each stage's range")
    args = parser.parse_args()
    model = bench_qwen.random_qwen_model(args.preset)
    shape = preset(args.preset)
    inputs = bench_qwen.make_inputs(shape, args.batch, 64, "cuda", torch.bfloat16)
    method = ficoco.get_method(args.method, retain=args.retain) if args.method else None
    if method is not None and args.oracle:
        method = oracle(like=method)
    handle = ficoco.attach(model, method) if method is not None else None
    with ficoco.fast_vision_attention(model, compile_blocks=args.compile), torch.inference_mode():
        def tower():
            return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

        for _ in range(5 if args.compile else 3):
            tower()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            tower()
            torch.cuda.synchronize()
    if handle:
        handle.remove()
    label = "vanilla" if method is None else method.name
    print(f"{label} at batch {args.batch}{', compiled blocks' if args.compile else ''}")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))
    if args.stages:
        print(stage_breakdown(prof.events()))


if __name__ == "__main__":
    main()
