"""Why a reduction in the Qwen2.5-VL-7B tower costs more than its oracle: device time or host time?

For each variant (vanilla, a method, its truncation oracle) on the one-call path with compiled
blocks, batch 8, one 1280x720 image per sample:

- wall: median wall-clock milliseconds of a tower call (synchronised);
- kernels: the summed device time of the GPU kernels of one call (profiler, user ranges left out),
  so ``wall - kernels`` is time the GPU waited for the host;
- syncs: the host-device synchronisations of one call (``torch.cuda.set_sync_debug_mode``), by
  source line.

Then the head-averaged softmax rows of a reducing block alone, PyTorch (eager / compiled) against
the Triton kernels of ``stages/attention_kernels.py``: time and largest difference.

    python benchmarks/qwen_reduction_overhead.py --method ficoco-v --retain 0.25 --out overhead.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import ficoco
from ficoco.measure import bench_qwen
from ficoco.measure.bench import cuda_times, environment
from ficoco.measure.flops import preset
from ficoco.methods.baselines import oracle
from ficoco.stages.probe import compiled_head_mean_softmax, head_mean_softmax


def kernel_ms(fn) -> float:
    """Summed device time of the kernels one call of ``fn`` launches (user ranges left out)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith("ficoco."):
            total += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    return total / 1000.0


def sync_sources(fn) -> dict[str, int]:
    """``{source line: count}`` of the synchronising calls one call of ``fn`` makes."""
    counts: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [frame for frame in traceback.extract_stack()[:-1]
                 if ("ficoco" in frame.filename or "transformers" in frame.filename)
                 and "warnings" not in frame.filename]
        where = f"{stack[-1].filename.split('site-packages/')[-1].split('src/')[-1]}:{stack[-1].lineno}" \
            if stack else "?"
        counts[where] += 1

    torch.cuda.synchronize()
    previous = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        warnings.showwarning = previous
    return dict(counts.most_common())


def rows_comparison(batch: int, heads: int, rows: int, keys: int, dim: int, repeats: int) -> dict:
    """The head-averaged softmax rows of ``rows`` queries over ``keys`` keys: eager, compiled, Triton."""
    from ficoco.stages.attention_kernels import head_mean_softmax_rows

    torch.manual_seed(0)
    q = torch.randn(batch, heads, rows, dim, device="cuda", dtype=torch.bfloat16) * dim ** -0.5
    k = torch.randn(batch, heads, keys, dim, device="cuda", dtype=torch.bfloat16)

    def logits():
        return torch.matmul(q, k.transpose(-1, -2)).view(batch, heads, 1, rows, keys)

    eager = lambda: head_mean_softmax(logits())  # noqa: E731
    fused = compiled_head_mean_softmax("inductor")
    compiled_rows = lambda: fused(logits())  # noqa: E731
    triton_rows = lambda: head_mean_softmax_rows(q, k)  # noqa: E731
    reference = head_mean_softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)).view(batch, heads, 1, rows, keys))
    out = {}
    for name, fn in (("eager", eager), ("compiled", compiled_rows), ("triton", triton_rows)):
        times = cuda_times(fn, 3, repeats)
        out[name] = {"ms": statistics.median(times), "max_abs_error_vs_float32": (fn() - reference).abs().max().item()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen2.5-vl-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--method", default="ficoco-v")
    parser.add_argument("--retain", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"environment": environment(), "args": vars(args), "variants": {}}
    model = bench_qwen.random_qwen_model(args.preset)
    shape = preset(args.preset)
    inputs = bench_qwen.make_inputs(shape, args.batch, 64, "cuda", torch.bfloat16)
    method = ficoco.get_method(args.method, retain=args.retain)
    with ficoco.fast_vision_attention(model, compile_blocks=True), torch.inference_mode():
        def tower():
            return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

        for label, variant in (("vanilla", None), (method.name, method), (f"oracle[{method.name}]", oracle(like=method))):
            handle = ficoco.attach(model, variant) if variant is not None else None
            try:
                for _ in range(4):
                    tower()
                torch.cuda.synchronize()
                walls = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    tower()
                    torch.cuda.synchronize()
                    walls.append((time.perf_counter() - start) * 1000)
                row = {"wall_ms": statistics.median(walls), "kernel_ms": kernel_ms(tower), "syncs": sync_sources(tower)}
            finally:
                if handle is not None:
                    handle.remove()
            row["host_wait_ms"] = row["wall_ms"] - row["kernel_ms"]
            result["variants"][label] = row
            print(f"{label}: wall {row['wall_ms']:.1f} ms, kernels {row['kernel_ms']:.1f} ms, "
                  f"syncs {sum(row['syncs'].values())}: {row['syncs']}", flush=True)
        # a reducing block at 1/4: a third of the groups' rows (~1196 sub-token rows) against 4784 keys
        tokens = inputs["image_grid_thw"][0].prod().item()
        result["rows"] = rows_comparison(args.batch, 16, tokens // 4, tokens, 80, args.repeats)
        print("head-mean softmax rows:", json.dumps(result["rows"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
