"""Head-averaged softmax rows without the per-head logits in memory: two Triton kernels.

Why: the probe's most common statistic, ``mean_h softmax(q_h K_h^T)`` for some query rows
(FiCoCo-V's correlation of the discarded tokens, EViT's received attention), formed in PyTorch
writes the ``[B, H, R, L]`` logits and reads them twice more (row maxima and sums, then the
probabilities). At Qwen2.5-VL-7B's tower, batch 8, a quarter of 4,784 patches discarded in a block,
that tensor is 1.5 GB in bf16 and those passes cost ~4.8 ms per reducing block, against ~0.2 ms
of matmul work. Here, as flash attention does, the logits live only in registers:

1. :func:`_row_logsumexp`: one program per (sample, head, block of rows) streams the keys and
   keeps a running maximum and sum: ``lse[b, h, r]`` (base 2), ``[B, H, R]`` float32. Skipped
   where the caller hands the statistic in (``row_logsumexp``): the layer's own flash attention
   computed it for every row (Qwen-VL's towers on ficoco's one-call attention hand it over);
2. :func:`_head_mean_probs`: one program per (sample, block of rows, block of keys) recomputes the
   logits head by head and adds ``exp2(s - lse)``; only the ``[B, R, L]`` float32 mean is written,
   or, for the attention each key receives (EViT without [CLS]), only its sum over the block's
   rows (:func:`head_mean_softmax_column_sums`: at Qwen2.5-VL's tower, batch 8, that skips writing
   and re-reading a 730 MB ``[B, R, L]`` map per reducing block).

The logits accumulate in float32 from the inputs' dtype, as the attention's own products do, are
scaled in float32 (``scale``) as flash attention scales them, and are not rounded to half
precision before the softmax (the PyTorch path rounds them, as a matmul
in the model's dtype returns them), so the two agree to that rounding. Rows that see no key (all
masked) are zero, as in :meth:`~ficoco.stages.AttentionProbe.softmax_rows`.

This module imports Triton; :mod:`.probe` imports it only for CUDA tensors on the fast statistics
path (or the interpreter in tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 64
BLOCK_KEYS = 64
LOG2_E = 1.4426950408889634


@triton.jit
def _partial_dot(q_ptr, k_ptr, rows, keys, d_offs, n_rows, n_keys, head_dim):
    """``q . k`` over the channels ``d_offs`` (those past ``head_dim`` read as zero)."""
    q = tl.load(q_ptr + rows[:, None] * head_dim + d_offs[None, :],
                mask=(rows[:, None] < n_rows) & (d_offs[None, :] < head_dim), other=0.0)
    k = tl.load(k_ptr + keys[:, None] * head_dim + d_offs[None, :],
                mask=(keys[:, None] < n_keys) & (d_offs[None, :] < head_dim), other=0.0)
    # "ieee": no TF32 for float32 input
    return tl.dot(q, tl.trans(k), input_precision="ieee")


@triton.jit
def _logits_tile(q_ptr, k_ptr, bias_ptr, valid_ptr, rows, keys, n_rows, n_keys, head_dim, scale,
                 HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_REST: tl.constexpr):
    """``[BLOCK_ROWS, BLOCK_KEYS]`` float32 logits in base 2 (``(q . k * scale + bias) * log2(e)``,
    ``scale`` given already multiplied by ``log2(e)``), masked
    keys and keys past the end at ``-inf``. ``q_ptr`` / ``k_ptr`` point at this sample's head.
    The channels go in two products, ``BLOCK_D`` then ``BLOCK_REST`` (powers of two; 64 + 16 for
    Qwen's 80-wide heads), rather than one padded to the next power of two (128: 60% more work)."""
    s = _partial_dot(q_ptr, k_ptr, rows, keys, tl.arange(0, BLOCK_D), n_rows, n_keys, head_dim)
    if BLOCK_REST > 0:
        s += _partial_dot(q_ptr, k_ptr, rows, keys, BLOCK_D + tl.arange(0, BLOCK_REST), n_rows, n_keys, head_dim)
    s = s * scale  # in float32, as flash attention scales its products (the softmax runs in base 2)
    inside = keys < n_keys
    if HAS_BIAS:
        s += tl.load(bias_ptr + keys, mask=inside, other=0.0)[None, :] * 1.4426950408889634
    if HAS_VALID:
        inside = inside & (tl.load(valid_ptr + keys, mask=inside, other=0) != 0)
    return tl.where(inside[None, :], s, float("-inf"))


@triton.jit
def _row_logsumexp(q_ptr, k_ptr, bias_ptr, valid_ptr, lse_ptr, n_rows, n_keys, head_dim, heads, key_heads, scale,
                   HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_REST: tl.constexpr):
    """``lse[b, h, r] = log2 sum_l exp2(s[b, h, r, l])``; ``+inf`` for a row that sees no key (so
    that its probabilities come out zero)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    q_head = q_ptr + bh * n_rows * head_dim
    k_head = k_ptr + (b * key_heads + h // (heads // key_heads)) * n_keys * head_dim
    bias_row, valid_row = bias_ptr + b * n_keys, valid_ptr + b * n_keys
    m = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_KEYS):
        keys = start + tl.arange(0, BLOCK_KEYS)
        s = _logits_tile(q_head, k_head, bias_row, valid_row, rows, keys, n_rows, n_keys, head_dim, scale,
                         HAS_BIAS, HAS_VALID, BLOCK_D, BLOCK_REST)
        new_m = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)  # no key seen yet: nothing to rescale
        total = total * tl.exp2(m - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m = new_m
    lse = tl.where(m == float("-inf"), float("inf"), m + tl.log2(total))
    tl.store(lse_ptr + bh * n_rows + rows, lse, mask=rows < n_rows)


@triton.jit
def _head_mean_probs(q_ptr, k_ptr, bias_ptr, valid_ptr, lse_ptr, out_ptr, n_rows, n_keys, head_dim, heads,
                     key_heads, scale, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_REST: tl.constexpr,
                     COLUMN_SUMS: tl.constexpr, GROUP: tl.constexpr):
    """``out[b, r, l] = mean_h exp2(s[b, h, r, l] - lse[b, h, r])``; with ``COLUMN_SUMS`` only each
    block of rows' sum of them, ``out[b, r // BLOCK_ROWS, l]``; with ``GROUP`` > 1 (rows and keys
    in consecutive groups of ``GROUP``) the mean over each row group of the sum over each key
    group, ``out[b, r // GROUP, l // GROUP]``."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    keys = tl.program_id(2) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    group = heads // key_heads
    bias_row, valid_row = bias_ptr + b * n_keys, valid_ptr + b * n_keys
    acc = tl.zeros([BLOCK_ROWS, BLOCK_KEYS], dtype=tl.float32)
    for h in range(0, heads):
        q_head = q_ptr + (b * heads + h) * n_rows * head_dim
        k_head = k_ptr + (b * key_heads + h // group) * n_keys * head_dim
        s = _logits_tile(q_head, k_head, bias_row, valid_row, rows, keys, n_rows, n_keys, head_dim, scale,
                         HAS_BIAS, HAS_VALID, BLOCK_D, BLOCK_REST)
        lse = tl.load(lse_ptr + (b * heads + h) * n_rows + rows, mask=rows < n_rows, other=float("inf"))
        acc += tl.exp2(s - lse[:, None])
    if COLUMN_SUMS:  # rows past the end have lse = +inf: they add zero
        tl.store(out_ptr + (b * tl.num_programs(1) + tl.program_id(1)) * n_keys + keys, tl.sum(acc, 0) / heads,
                 mask=keys < n_keys)
    elif GROUP > 1:  # rows and keys past the end add zero; a block holds whole groups
        grouped = tl.sum(tl.sum(tl.reshape(acc, [BLOCK_ROWS // GROUP, GROUP, BLOCK_KEYS // GROUP, GROUP]), 3), 1)
        group_rows = tl.program_id(1) * (BLOCK_ROWS // GROUP) + tl.arange(0, BLOCK_ROWS // GROUP)
        group_keys = tl.program_id(2) * (BLOCK_KEYS // GROUP) + tl.arange(0, BLOCK_KEYS // GROUP)
        n_group_rows, n_group_keys = n_rows // GROUP, n_keys // GROUP
        tl.store(out_ptr + b * n_group_rows * n_group_keys + group_rows[:, None] * n_group_keys + group_keys[None, :],
                 grouped / (heads * GROUP),
                 mask=(group_rows[:, None] < n_group_rows) & (group_keys[None, :] < n_group_keys))
    else:
        tl.store(out_ptr + b * n_rows * n_keys + rows[:, None] * n_keys + keys[None, :], acc / heads,
                 mask=(rows[:, None] < n_rows) & (keys[None, :] < n_keys))


def channel_blocks(d: int) -> tuple[int, int]:
    """``(main, rest)``: a head's ``d`` channels as two products of power-of-two widths (at least
    16, as ``tl.dot`` needs), ``main <= d`` and ``rest`` covering what is left (0 if nothing):
    80 -> (64, 16), 64 -> (64, 0), 72 -> (64, 16), 8 -> (16, 0)."""
    if d <= 16:
        return 16, 0
    main = 1 << (d.bit_length() - 1)  # the largest power of two <= d
    left = d - main
    return main, (0 if left == 0 else max(16, triton.next_power_of_2(left)))


def head_mean_softmax_rows(queries: Tensor, keys: Tensor, key_bias: Tensor | None = None,
                           key_valid: Tensor | None = None, *, scale: float = 1.0,
                           row_logsumexp: Tensor | None = None) -> Tensor:
    """The mean over heads of each head's softmax row, without the logits in memory.

    Args:
        queries: ``[B, H, R, d]`` query rows.
        keys: ``[B, Hk, L, d]`` keys (``H`` a multiple of ``Hk``: grouped-query attention).
        key_bias: ``[B, L]`` added to every logit of a key (proportional attention's ``log size``).
        key_valid: ``[B, L]`` bool, ``False`` for keys no query may see.
        scale: the softmax scale, applied to each product in float32 (1: queries already scaled).
        row_logsumexp: ``[B, H, R]`` float32, each row's ``log sum_l exp(logit)`` (natural log,
            over every key, as the attention itself computed it: flash attention returns it); given,
            the first kernel is skipped.
    Returns:
        ``[B, R, L]`` float32; rows that see no key are zero.
    """
    return _head_mean(queries, keys, key_bias, key_valid, scale, row_logsumexp, column_sums=False)


def head_mean_softmax_between(queries: Tensor, keys: Tensor, columns: Tensor, key_bias: Tensor | None = None,
                              key_valid: Tensor | None = None, group: int = 1, *, scale: float = 1.0,
                              row_logsumexp: Tensor | None = None) -> Tensor:
    """:func:`head_mean_softmax_rows` at the key columns ``columns`` only, optionally summed over
    groups: the softmax still runs over every key (the row log-sum-exp), but the probabilities are
    formed for the chosen keys alone, so their cost scales with ``C``, not ``L``.

    Args:
        queries, keys, key_bias, key_valid, scale, row_logsumexp: as :func:`head_mean_softmax_rows`.
        columns: ``[B, C]`` key indices.
        group: with ``g`` > 1, rows and columns come in consecutive groups of ``g`` (``R`` and ``C``
            multiples of ``g``; BLOCK sizes too): the mean over each row group of the sum over each
            column group (the attention of one merged token to another, Qwen-VL's 2x2 merge
            groups), with no ``[B, R, C]`` map in memory.
    Returns:
        ``[B, R / g, C / g]`` float32.
    """
    return _head_mean(queries, keys, key_bias, key_valid, scale, row_logsumexp, column_sums=False, columns=columns,
                      group=group)


def head_mean_softmax_column_sums(queries: Tensor, keys: Tensor, key_bias: Tensor | None = None,
                                  key_valid: Tensor | None = None, *, scale: float = 1.0,
                                  row_logsumexp: Tensor | None = None) -> Tensor:
    """``[B, L]`` float32: :func:`head_mean_softmax_rows` summed over its rows (the attention each
    key receives from the query rows, EViT's statistic without [CLS]), with neither the logits nor
    the rows in memory: each block of rows writes its sums, ``[B, R / 64, L]``, added up after in
    a fixed order (deterministic, unlike atomic adds). Arguments as there."""
    return _head_mean(queries, keys, key_bias, key_valid, scale, row_logsumexp, column_sums=True).sum(dim=1)


def _head_mean(queries: Tensor, keys: Tensor, key_bias: Tensor | None, key_valid: Tensor | None, scale: float,
               row_logsumexp: Tensor | None, column_sums: bool, columns: Tensor | None = None,
               group: int = 1) -> Tensor:
    b, h, r, d = queries.shape
    hk, n_keys = keys.shape[1], keys.shape[2]
    if h % hk or keys.shape[0] != b or keys.shape[3] != d:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match")
    if row_logsumexp is not None and tuple(row_logsumexp.shape) != (b, h, r):
        raise ValueError(f"row_logsumexp {tuple(row_logsumexp.shape)} is not [B, H, R] = {(b, h, r)}")
    out_keys = n_keys if columns is None else columns.shape[1]
    if group < 1 or r % group or out_keys % group or BLOCK_ROWS % group or BLOCK_KEYS % group:
        raise ValueError(f"{r} rows and {out_keys} columns do not form groups of {group}")
    if queries.dtype != keys.dtype:
        keys = keys.to(queries.dtype)
    queries, keys = queries.contiguous(), keys.contiguous()
    row_blocks = triton.cdiv(r, BLOCK_ROWS)
    shape = (b, row_blocks, out_keys) if column_sums else (b, r // group, out_keys // group)
    out = torch.empty(shape, dtype=torch.float32, device=queries.device)
    if r == 0 or out_keys == 0 or b == 0:
        return out.zero_()
    dummy = torch.empty(1, device=queries.device)
    bias = dummy if key_bias is None else key_bias.float().contiguous()
    valid = dummy if key_valid is None else key_valid.to(torch.int8).contiguous()
    main, rest = channel_blocks(d)
    options = dict(HAS_BIAS=key_bias is not None, HAS_VALID=key_valid is not None, BLOCK_ROWS=BLOCK_ROWS,
                   BLOCK_KEYS=BLOCK_KEYS, BLOCK_D=main, BLOCK_REST=rest)
    scale2 = float(scale) * LOG2_E
    if row_logsumexp is None:
        lse = torch.empty(b, h, r, dtype=torch.float32, device=queries.device)
        _row_logsumexp[(b * h, row_blocks)](queries, keys, bias, valid, lse, r, n_keys, d, h, hk, scale2, **options)
    else:  # base 2, as the kernels take it; a row that saw no key (-inf) gives zero probabilities
        lse = (row_logsumexp.float() * LOG2_E).nan_to_num(nan=float("inf"), neginf=float("inf")).contiguous()
    if columns is not None:  # the second kernel reads the chosen keys only (the softmax's sum had them all)
        keys = keys.gather(2, columns[:, None, :, None].expand(-1, hk, -1, d))
        bias = bias if key_bias is None else bias.gather(1, columns)
        valid = valid if key_valid is None else valid.gather(1, columns)
    _head_mean_probs[(b, row_blocks, triton.cdiv(out_keys, BLOCK_KEYS))](
        queries, keys, bias, valid, lse, out, r, out_keys, d, h, hk, scale2, COLUMN_SUMS=column_sums, GROUP=group,
        **options)
    return out
