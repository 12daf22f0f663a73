"""Time the attention each key receives (EViT's statistic without [CLS]) on a GPU at the sizes of
Qwen2.5-VL-7B's reducing blocks, batch 8, against the block's own attention.

    python benchmarks/received_attention_kernel.py --out received-attention.json
    python benchmarks/received_attention_kernel.py --compare old_attention_kernels.py  # an older module

Per shape (8 images of ``tokens`` patches, 16 heads of 80 channels, bf16; the sub-token counts of
EViT's three reducing blocks at 1/8 of 4,784 patches) it records, as medians of CUDA-event timings:

- ``attention_ms``: PyTorch's flash attention over the same queries and keys (the block's own
  attention, which also returns the rows' log-sum-exp);
- ``kernel_ms``: ``head_mean_softmax_column_sums`` with that log-sum-exp handed in (the tower's
  path) at the default tiles, and ``kernel_own_lse_ms`` computing it itself;
- ``sweep``: the kernel at other tiles (``ReceivedTiles``), each checked against the default;
- ``compare_ms``: the same call in the module given by ``--compare`` (an earlier version of
  ``ficoco/stages/attention_kernels.py``), for a before/after on one machine;
- ``error``: the default tiles against float32 PyTorch (chunked softmax rows summed).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics

import torch

from ficoco.measure.bench import cuda_times, environment
from ficoco.stages.attention_kernels import RECEIVED_TILES, ReceivedTiles, head_mean_softmax_column_sums

TOKENS = (4784, 3388, 1992)  # EViT's reducing blocks at 1/8 on a 1288x728 image (1196 -> 847 -> 498 groups)
BATCH, HEADS, CHANNELS = 8, 16, 80


def float32_reference(q, k, scale: float) -> torch.Tensor:
    """``[B, L]``: mean over heads of the softmax rows summed over rows, float32, one sample at a time."""
    out = []
    for qb, kb in zip(q, k):
        logits = torch.matmul(qb.float(), kb.float().transpose(-1, -2)) * scale  # [H, R, L]
        out.append(torch.softmax(logits, dim=-1).sum(dim=1).mean(dim=0))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compare", help="path of an earlier attention_kernels.py to time on the same inputs")
    parser.add_argument("--no-sweep", action="store_true", help="time the default tiles only")
    parser.add_argument("--out", default="received-attention.json")
    args = parser.parse_args()
    older = None
    if args.compare:
        spec = importlib.util.spec_from_file_location("older_attention_kernels", args.compare)
        older = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(older)
    sweep = [] if args.no_sweep else [ReceivedTiles(*t) for t in itertools.product(
        (32, 64, 128), (64, 128, 256), (4, 8), (3, 4)) if ReceivedTiles(*t) != RECEIVED_TILES]

    def median(fn) -> float:
        return statistics.median(cuda_times(fn, args.warmup, args.repeats))

    rows, scale = [], CHANNELS ** -0.5
    for n in TOKENS:
        torch.manual_seed(0)
        # [B, L, H, d] as the tower's projections lay them out; the kernel reads head-major views
        q, k, v = (torch.randn(BATCH, n, HEADS, CHANNELS, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        attention = torch.ops.aten._scaled_dot_product_flash_attention
        lse = attention(qh, kh, vh, scale=scale)[1]  # [B, H, L] float32, natural log
        row = {"tokens": n, "batch": BATCH, "heads": HEADS, "channels": CHANNELS, "tiles": RECEIVED_TILES._asdict()}
        row["attention_ms"] = median(lambda: attention(qh, kh, vh, scale=scale))
        fast = head_mean_softmax_column_sums(qh, kh, scale=scale, row_logsumexp=lse)
        row["kernel_ms"] = median(lambda: head_mean_softmax_column_sums(qh, kh, scale=scale, row_logsumexp=lse))
        row["kernel_own_lse_ms"] = median(lambda: head_mean_softmax_column_sums(qh, kh, scale=scale))
        reference = float32_reference(qh, kh, scale)
        row["error"] = (fast - reference).abs().max().item()
        row["relative_error"] = row["error"] / reference.abs().max().item()
        if older is not None:
            row["compare_ms"] = median(lambda: older.head_mean_softmax_column_sums(qh, kh, scale=scale,
                                                                                  row_logsumexp=lse))
            row["compare_error"] = (older.head_mean_softmax_column_sums(qh, kh, scale=scale, row_logsumexp=lse)
                                    - reference).abs().max().item()
        row["sweep"] = []
        for tiles in sweep:
            try:
                out = head_mean_softmax_column_sums(qh, kh, scale=scale, row_logsumexp=lse, tiles=tiles)
                ms = median(lambda t=tiles: head_mean_softmax_column_sums(qh, kh, scale=scale, row_logsumexp=lse,
                                                                          tiles=t))
                row["sweep"].append({**tiles._asdict(), "ms": ms, "difference": (out - fast).abs().max().item()})
            except Exception as error:  # a launch the GPU cannot hold (shared memory): recorded, not fatal
                row["sweep"].append({**tiles._asdict(), "failed": f"{type(error).__name__}: {error}"[:200]})
        best = min((s for s in row["sweep"] if "ms" in s), key=lambda s: s["ms"], default=None)
        rows.append(row)
        extra = f"  before {row['compare_ms']:6.3f} ms" if older is not None else ""
        if best:
            extra += (f"  best tiles {best['rows']}x{best['keys']} w{best['warps']} s{best['stages']} "
                      f"{best['ms']:6.3f} ms")
        print(f"{n:5d} tokens: attention {row['attention_ms']:6.3f} ms  received {row['kernel_ms']:6.3f} ms "
              f"(own lse {row['kernel_own_lse_ms']:6.3f}){extra}  error {row['relative_error']:.1e}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"environment": environment(), "warmup": args.warmup, "repeats": args.repeats, "rows": rows}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
