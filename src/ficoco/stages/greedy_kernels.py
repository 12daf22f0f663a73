"""One-launch Triton kernels for the two greedy set selections of :mod:`.diversity`.

Why: DivPrune's farthest-point loop and CDPruner's greedy DPP MAP keep one token per step, and in
PyTorch each step is ~5 (DivPrune) or ~20 (CDPruner) small kernels launched from Python. At
LLaVA-1.5's 64 of 576 tokens that is ~1,300 launches per batch; at Qwen2.5-VL's 299 of 1,196 it is
~6,000, which cost CDPruner 150 ms on an H200 at batch 8, more than the LLM prefill it saves. Here
one program per sample runs the whole loop on the GPU: the state (each token's distance to the
kept set, resp. its remaining DPP gain) stays in registers, and only CDPruner's Cholesky rows go
through memory. The steps and their tie rules are the PyTorch loops' (lowest index wins a tie), so
both backends keep the same tokens up to float rounding of near-ties (tests/test_greedy_kernels.py
compares them in Triton's interpreter on the CPU, tests/test_cuda_greedy.py on a GPU).

This module imports Triton; :mod:`.diversity` imports it only when a CUDA tensor (or the
interpreter) asks for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Past this many tokens per sample one program's registers spill badly: the PyTorch loop is used.
MAX_TOKENS = 8192


def block_size(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def factor_rows_per_load(block: int) -> int:
    """Cholesky rows the DPP kernel reads per load: 8, fewer for wide rows (a ``[rows, block]``
    float32 tile held in registers, at most 16K values)."""
    return max(1, min(8, 16384 // block))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def _farthest_points(distance_ptr, first_ptr, chosen_ptr, n, kept, BLOCK: tl.constexpr):
    """Per sample (program): ``chosen[0] = first``; then each step keeps the token whose smallest
    distance to the kept set is largest. ``distance``: ``[B, n, n]`` float32, contiguous."""
    sample = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    base = distance_ptr + sample * n * n
    pick = tl.load(first_ptr + sample)
    tl.store(chosen_ptr + sample * kept, pick)
    nearest = tl.load(base + pick * n + offs, mask=inside, other=float("-inf"))
    nearest = tl.where(offs == pick, float("-inf"), nearest)
    for step in range(1, kept):
        pick = tl.argmax(nearest, 0, tie_break_left=True).to(tl.int64)
        tl.store(chosen_ptr + sample * kept + step, pick)
        row = tl.load(base + pick * n + offs, mask=inside, other=float("-inf"))
        nearest = tl.minimum(nearest, row)
        nearest = tl.where(offs == pick, float("-inf"), nearest)


@triton.jit
def _greedy_dpp(kernel_ptr, relevance_ptr, floor_ptr, factors_ptr, chosen_ptr, n, kept, BLOCK: tl.constexpr,
                ROWS: tl.constexpr):
    """Per sample (program): Chen et al.'s incremental-Cholesky greedy MAP of ``kernel``
    (``[B, n, n]`` float32), gains at most ``floor`` falling back to ``relevance`` order.
    ``factors``: ``[B, kept, n]`` float32 scratch for the Cholesky rows, read ``ROWS`` at a time
    (independent loads in flight rather than one dependent load per earlier step)."""
    sample = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    base = kernel_ptr + sample * n * n
    rows = factors_ptr + sample * kept * n
    gain = tl.load(base + offs * (n + 1), mask=inside, other=0.0)  # the diagonal
    relevance = tl.load(relevance_ptr + sample * n + offs, mask=inside, other=0.0)
    floor = tl.load(floor_ptr + sample)
    taken = offs >= n  # padding lanes count as taken: never picked
    for step in range(0, kept):
        best = tl.max(tl.where(taken, float("-inf"), gain), 0)
        exhausted = best <= floor
        key = tl.where(exhausted, relevance, gain)
        pick = tl.argmax(tl.where(taken, float("-inf"), key), 0, tie_break_left=True).to(tl.int64)
        tl.store(chosen_ptr + sample * kept + step, pick)
        taken = taken | (offs == pick)
        projection = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(0, step, ROWS):
            ks = first + tl.arange(0, ROWS)
            earlier = ks < step
            at_pick = tl.load(rows + ks * n + pick, mask=earlier, other=0.0)  # [ROWS]
            factor_rows = tl.load(rows + ks[:, None] * n + offs[None, :], mask=earlier[:, None] & inside[None, :],
                                  other=0.0)  # [ROWS, BLOCK]
            projection += tl.sum(at_pick[:, None] * factor_rows, 0)
        pick_gain = tl.sum(tl.where(offs == pick, gain, 0.0), 0)
        e = (tl.load(base + pick * n + offs, mask=inside, other=0.0) - projection) / tl.sqrt(
            tl.maximum(pick_gain, floor))
        tl.store(rows + step * n + offs, e, mask=inside)
        # the next steps read single entries of this row that other threads of the program wrote
        tl.debug_barrier()
        gain = gain - e * e


def farthest_points(distance: Tensor, first: Tensor, kept: int) -> Tensor:
    """``[B, kept]`` indices: DivPrune's greedy selection on ``distance`` (``[B, N, N]``) from
    ``first`` (``[B]``)."""
    b, n, _ = distance.shape
    distance = distance.float().contiguous()
    chosen = torch.empty(b, kept, dtype=torch.int64, device=distance.device)
    block = block_size(n)
    _farthest_points[(b,)](distance, first.to(torch.int64).contiguous(), chosen, n, kept, BLOCK=block,
                           num_warps=_warps(block))
    return chosen


def greedy_dpp(kernel: Tensor, relevance: Tensor, floor: Tensor, kept: int) -> Tensor:
    """``[B, kept]`` indices: CDPruner's greedy MAP on ``kernel`` (``[B, N, N]``), ``relevance``
    (``[B, N]``) and ``floor`` (``[B]``)."""
    b, n, _ = kernel.shape
    kernel = kernel.float().contiguous()
    chosen = torch.empty(b, kept, dtype=torch.int64, device=kernel.device)
    factors = torch.empty(b, max(kept, 1), n, dtype=torch.float32, device=kernel.device)
    block = block_size(n)
    _greedy_dpp[(b,)](kernel, relevance.float().contiguous(), floor.float().contiguous(), factors, chosen, n,
                      kept, BLOCK=block, ROWS=factor_rows_per_load(block), num_warps=_warps(block))
    return chosen
