"""One-launch Triton kernels for the two greedy set selections of :mod:`.diversity`.

Why: DivPrune's farthest-point loop and CDPruner's greedy DPP MAP keep one token per step, and in
PyTorch each step is ~5 (DivPrune) or ~20 (CDPruner) small kernels launched from Python. At
LLaVA-1.5's 64 of 576 tokens that is ~1,300 launches per batch; at Qwen2.5-VL's 299 of 1,196 it is
~6,000, which cost CDPruner 150 ms on an H200 at batch 8, more than the LLM prefill it saves. Here
one launch runs the whole loop on the GPU: the state (each token's distance to the kept set, resp.
its remaining DPP gain) stays in registers, and only CDPruner's Cholesky rows go through memory.
DivPrune runs one program per sample. CDPruner's step reads every earlier Cholesky row, so where
those rows are large (Qwen-VL's 1,196 tokens) one program per sample is bound by its own loads:
there several programs share a sample's columns and meet at every step to agree on the pick
(:func:`column_parts`). The steps and their tie rules are the PyTorch loops' (lowest index wins a tie), so
both backends keep the same tokens up to float rounding of near-ties (tests/test_greedy_kernels.py
compares them in Triton's interpreter on the CPU, tests/test_cuda.py on a GPU).

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
    """Cholesky rows the DPP kernel reads per load: a ``[rows, block]`` float32 tile of at most 64
    values per thread, at most 32 rows (many independent loads in flight per program)."""
    return max(1, min(32, 64 * 32 * _warps(block) // block))


# A program owns at least this many columns: narrower slices would spend each step on the barrier.
MIN_COLUMNS = 64
# Columns are shared only where a sample's Cholesky rows are this large (kept x tokens) and at least
# this many programs share them: each step's wait costs a few microseconds, which pays only where
# one program's step reads many rows (on an H200, docs/benchmarks.md: 2.7x faster at Qwen2.5-VL's
# 598 of 1,196 tokens, slower at LLaVA's 64 of 576 or 40 crops' 128 of 576).
MIN_SHARED_WORK = 96 * 1024
MIN_PARTS = 4


def column_parts(batch: int, n: int, kept: int, processors: int) -> int:
    """Programs that share one sample's DPP columns: 1 where the rows are small
    (``MIN_SHARED_WORK``), else as many as keep every program of the grid resident at once (at most
    ``processors // batch``; they wait for each other at every step, so a program that had to wait
    for a free processor would stall the rest), each at least ``MIN_COLUMNS`` wide, and 1 if that
    leaves fewer than ``MIN_PARTS``."""
    if kept * n < MIN_SHARED_WORK:
        return 1
    parts = min(triton.cdiv(n, MIN_COLUMNS), processors // max(batch, 1))
    return parts if parts >= MIN_PARTS else 1


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


# the empty candidate: below every packed key (a constexpr, so the kernels can read it)
INT64_MIN = tl.constexpr(-(2**63))


@triton.jit
def _ordered(x):
    """``int64`` keys whose signed order is the float order of ``x`` (float32; -0.0 as +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _float_of(key):
    """The float32 whose :func:`_ordered` key is ``key``."""
    bits = key.to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)


@triton.jit
def _index_of(packed):
    """The token index in a :func:`_best` key."""
    low = tl.full((), 4294967295, tl.int64)
    return low - (packed & low)


@triton.jit
def _best(value, index, taken):
    """The largest ``value`` of the lanes not ``taken``, lowest index first among equals, packed in
    one ``int64`` (value key in the high half, ``2**32 - 1 - index`` in the low half) so that one
    integer maximum, also across programs (``atomic_max``), finds it; ``INT64_MIN`` if every lane
    is taken."""
    low = tl.full((), 4294967295, tl.int64)
    packed = (_ordered(value) << 32) + (low - index.to(tl.int64))
    return tl.max(tl.where(taken, tl.full((), INT64_MIN, tl.int64), packed), 0)


@triton.jit
def _greedy_dpp(kernel_ptr, relevance_ptr, floor_ptr, factors_ptr, chosen_ptr, best_ptr, arrived_ptr, state_ptr,
                taken_ptr, n, kept, cols, fresh, start, stop, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                SHARED: tl.constexpr, SYNC: tl.constexpr):
    """Chen et al.'s incremental-Cholesky greedy MAP of ``kernel`` (``[B, n, n]`` float32), gains at
    most ``floor`` falling back to ``relevance`` order, steps ``start .. stop - 1``.

    Program ``(sample, part)`` owns columns ``part * cols .. + cols - 1`` of its sample: their
    remaining gains (registers), their entries of each Cholesky row (``factors``, ``[B, kept, n]``
    float32, read ``ROWS`` rows at a time) and their candidates for the next pick. With ``SHARED``
    the parts meet in ``best`` (``[2, B, kept]`` int64, ``INT64_MIN``-filled): step ``s``'s best gain
    and best relevance among the untaken columns, each part's folded in by ``atomic_max`` (see
    :func:`_best`). With ``SYNC`` (one launch for all steps, every program resident) the parts then
    wait for each other on ``arrived`` (``[B]`` int32 counters); without it each launch runs one
    step and the launch boundary is the wait, the gains and taken flags kept in ``state`` and
    ``taken`` (``[B, n]``) between launches (``fresh`` = 1 starts them from the kernel's diagonal).
    """
    sample = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    lane = tl.arange(0, BLOCK)
    offs = part * cols + lane
    inside = (lane < cols) & (offs < n)
    base = kernel_ptr + sample * n * n
    rows = factors_ptr + sample * kept * n
    best_gain = best_ptr + sample * kept
    best_relevance = best_ptr + (tl.num_programs(0) + sample) * kept
    relevance = tl.load(relevance_ptr + sample * n + offs, mask=inside, other=0.0)
    floor = tl.load(floor_ptr + sample)
    floor_key = _ordered(floor)
    if fresh:
        gain = tl.load(base + offs * (n + 1), mask=inside, other=0.0)  # the diagonal
        taken = offs >= n  # padding lanes count as taken: never picked
        taken = taken | (lane >= cols)
        if SHARED:
            tl.atomic_max(best_gain, _best(gain, offs, taken))
            tl.atomic_max(best_relevance, _best(relevance, offs, taken))
    else:
        gain = tl.load(state_ptr + sample * n + offs, mask=inside, other=0.0)
        taken = tl.load(taken_ptr + sample * n + offs, mask=inside, other=1) != 0
    for step in range(start, stop):
        if SHARED:
            if SYNC:
                # every part has folded in its candidates for this step (and written its entries
                # of the earlier rows: the barrier orders them before the release)
                tl.debug_barrier()
                tl.atomic_add(arrived_ptr + sample, 1, sem="release")
                while tl.atomic_add(arrived_ptr + sample, 0, sem="acquire") < (step + 1) * parts:
                    pass
            nothing = tl.full((), INT64_MIN, tl.int64)
            top_gain = tl.atomic_max(best_gain + step, nothing)  # reads, changes nothing
            top_relevance = tl.atomic_max(best_relevance + step, nothing)
        else:
            top_gain = _best(gain, offs, taken)
            top_relevance = _best(relevance, offs, taken)
        exhausted = (top_gain >> 32) <= floor_key
        pick = _index_of(tl.where(exhausted, top_relevance, top_gain))
        tl.store(chosen_ptr + sample * kept + step, pick, mask=part == 0)
        pick_gain = tl.where(exhausted, floor, _float_of(top_gain >> 32))
        taken = taken | (offs == pick)
        projection = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(0, step, ROWS):
            ks = first + tl.arange(0, ROWS)
            earlier = ks < step
            # L1 bypassed: entries of other parts' columns were written by other programs
            at_pick = tl.load(rows + ks * n + pick, mask=earlier, other=0.0, cache_modifier=".cg")  # [ROWS]
            factor_rows = tl.load(rows + ks[:, None] * n + offs[None, :], mask=earlier[:, None] & inside[None, :],
                                  other=0.0, cache_modifier=".cg")  # [ROWS, BLOCK]
            projection += tl.sum(at_pick[:, None] * factor_rows, 0)
        e = (tl.load(base + pick * n + offs, mask=inside, other=0.0) - projection) / tl.sqrt(
            tl.maximum(pick_gain, floor))
        tl.store(rows + step * n + offs, e, mask=inside)
        # the next steps read single entries of this row that other threads of the program wrote
        tl.debug_barrier()
        gain = gain - e * e
        if SHARED:
            if step + 1 < kept:
                tl.atomic_max(best_gain + step + 1, _best(gain, offs, taken))
                tl.atomic_max(best_relevance + step + 1, _best(relevance, offs, taken))
    if SHARED and not SYNC:  # one launch per step: the next launch starts from here
        tl.store(state_ptr + sample * n + offs, gain, mask=inside)
        tl.store(taken_ptr + sample * n + offs, taken.to(tl.int8), mask=inside)


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


def greedy_dpp(kernel: Tensor, relevance: Tensor, floor: Tensor, kept: int, parts: int | None = None,
               stepwise: bool = False) -> Tensor:
    """``[B, kept]`` indices: CDPruner's greedy MAP on ``kernel`` (``[B, N, N]``), ``relevance``
    (``[B, N]``) and ``floor`` (``[B]``).

    ``parts`` programs share each sample's columns (default: :func:`column_parts` for the device's
    processors on a GPU, 1 elsewhere). They run all steps in one launch, waiting for each other at
    every step, unless ``stepwise``: one launch per step, for Triton's interpreter, which runs the
    programs of a launch one after another (a wait would never end)."""
    b, n, _ = kernel.shape
    kernel = kernel.float().contiguous()
    chosen = torch.empty(b, kept, dtype=torch.int64, device=kernel.device)
    if parts is None:
        processors = torch.cuda.get_device_properties(kernel.device).multi_processor_count if kernel.is_cuda else 1
        parts = column_parts(b, n, kept, processors)
    cols = triton.cdiv(n, parts)
    parts = triton.cdiv(n, cols)  # none empty
    shared = parts > 1 or stepwise
    slots = max(kept, 1)
    factors = torch.empty(b, slots, n, dtype=torch.float32, device=kernel.device)
    # scratch that only shared columns read (one program per sample passes placeholders)
    best = (torch.full((2, b, slots), torch.iinfo(torch.int64).min, dtype=torch.int64, device=kernel.device)
            if shared else chosen)
    arrived = torch.zeros(b, dtype=torch.int32, device=kernel.device) if parts > 1 and not stepwise else chosen
    state = torch.empty(b, n, dtype=torch.float32, device=kernel.device) if stepwise else factors
    taken = torch.empty(b, n, dtype=torch.int8, device=kernel.device) if stepwise else chosen
    block = block_size(cols)
    args = (kernel, relevance.float().contiguous(), floor.float().contiguous(), factors, chosen, best, arrived, state,
            taken, n, kept, cols)
    options = dict(BLOCK=block, ROWS=factor_rows_per_load(block), SHARED=shared, num_warps=_warps(block))
    if not stepwise:
        _greedy_dpp[(b, parts)](*args, 1, 0, kept, SYNC=parts > 1, **options)
        return chosen
    _greedy_dpp[(b, parts)](*args, 1, 0, 0, SYNC=False, **options)
    for step in range(kept):
        _greedy_dpp[(b, parts)](*args, 0, step, step + 1, SYNC=False, **options)
    return chosen
