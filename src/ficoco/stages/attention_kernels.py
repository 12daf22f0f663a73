"""Head-averaged softmax rows without the per-head logits in memory: Triton kernels.

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
   logits head by head and adds ``exp2(s - lse)``; only the ``[B, R, L]`` float32 mean is written
   (or, for :func:`head_mean_softmax_between`, its entries at some key columns, summed over merge
   groups);
3. :func:`_received_columns`, for the attention each key receives (EViT without [CLS],
   :func:`head_mean_softmax_column_sums`): one program per (sample, head, block of keys) keeps its
   keys and streams every row past them, adding ``exp2(s - lse)`` into per-key sums, so that the
   ``[B, R, L]`` map (730 MB per reducing block at Qwen2.5-VL's tower, batch 8) is never written,
   each key is read once and each query row once per 128 keys (a layout of 64 x 64 tiles, as in
   2., reads both for every tile: four times the bytes per probability).

The logits accumulate in float32 from the inputs' dtype, as the attention's own products do, are
scaled in float32 (``scale``) as flash attention scales them, and are not rounded to half
precision before the softmax (the PyTorch path rounds them, as a matmul
in the model's dtype returns them), so the two agree to that rounding. Rows that see no key (all
masked) are zero, as in :meth:`~ficoco.stages.AttentionProbe.softmax_rows`.

This module imports Triton; :mod:`.probe` imports it only for CUDA tensors on the fast statistics
path (or the interpreter in tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 64
BLOCK_KEYS = 64


class ReceivedTiles(NamedTuple):
    """The launch of :func:`_received_columns`: each program holds ``keys`` keys and streams the
    rows past them ``rows`` at a time, with ``warps`` warps and ``stages`` pipelined loads."""

    rows: int = 64
    keys: int = 128
    warps: int = 4
    stages: int = 3


# chosen on an H200 at Qwen2.5-VL-7B's tower sizes (benchmarks/received_attention_kernel.py,
# docs/benchmarks/log/session-8.md)
RECEIVED_TILES = ReceivedTiles()
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
def _received_columns(q_ptr, k_ptr, bias_ptr, valid_ptr, lse_ptr, out_ptr, n_rows, n_keys, head_dim, heads,
                      key_heads, scale, q_batch, q_head, q_row, k_batch, k_head, k_row, HAS_BIAS: tl.constexpr,
                      HAS_VALID: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_REST: tl.constexpr):
    """``out[b, h, l] = sum_r exp2(s[b, h, r, l] - lse[b, h, r])``: the attention key ``l``
    receives from every row, per head. One program per (sample, head, block of keys) holds its
    keys and streams the rows past them, so that each key is read once and each row once per block
    of keys: the transposed loop of flash attention, with a column sum where that has a row sum.
    The products come out ``[keys, rows]``, keys as the product's rows, so that each key's sum
    stays within a few threads as flash attention's row sums do (laid out ``[rows, keys]`` the
    same loop measured 1.2x slower on an H200). Queries and keys are read through their
    strides (``q_batch, q_head, q_row``; channels contiguous), so the probe's ``[B, L, H, d]``
    tensors need no head-major copy."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    keys = tl.program_id(1) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    inside = keys < n_keys
    k_start = k_ptr + b * k_batch + (h // (heads // key_heads)) * k_head
    q_start = q_ptr + b * q_batch + h * q_head
    d_main = tl.arange(0, BLOCK_D)
    keys_main = tl.load(k_start + keys[:, None] * k_row + d_main[None, :],
                        mask=inside[:, None] & (d_main[None, :] < head_dim), other=0.0)  # [BLOCK_KEYS, channels]
    if BLOCK_REST > 0:
        d_rest = BLOCK_D + tl.arange(0, BLOCK_REST)
        keys_rest = tl.load(k_start + keys[:, None] * k_row + d_rest[None, :],
                            mask=inside[:, None] & (d_rest[None, :] < head_dim), other=0.0)
    bias = tl.zeros([BLOCK_KEYS], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b * n_keys + keys, mask=inside, other=0.0) * 1.4426950408889634
    acc = tl.zeros([BLOCK_KEYS], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_inside = rows < n_rows
        lse = tl.load(lse_ptr + bh * n_rows + rows, mask=row_inside, other=float("inf"))  # rows past the end: 0
        q = tl.load(q_start + rows[None, :] * q_row + d_main[:, None],
                    mask=row_inside[None, :] & (d_main[:, None] < head_dim), other=0.0)  # [channels, rows]
        s = tl.dot(keys_main, q, input_precision="ieee")  # "ieee": no TF32 for float32 input
        if BLOCK_REST > 0:
            q = tl.load(q_start + rows[None, :] * q_row + d_rest[:, None],
                        mask=row_inside[None, :] & (d_rest[:, None] < head_dim), other=0.0)
            s += tl.dot(keys_rest, q, input_precision="ieee")
        acc += tl.sum(tl.exp2(s * scale + bias[:, None] - lse[None, :]), 1)
    seen = inside
    if HAS_VALID:  # a masked key gets no attention (its logits were -inf in the softmax)
        seen = seen & (tl.load(valid_ptr + b * n_keys + keys, mask=inside, other=0) != 0)
    tl.store(out_ptr + bh * n_keys + keys, tl.where(seen, acc, 0.0), mask=inside)


@triton.jit
def _head_mean_probs(q_ptr, k_ptr, bias_ptr, valid_ptr, lse_ptr, out_ptr, n_rows, n_keys, head_dim, heads,
                     key_heads, scale, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_REST: tl.constexpr,
                     GROUP: tl.constexpr):
    """``out[b, r, l] = mean_h exp2(s[b, h, r, l] - lse[b, h, r])``; with ``GROUP`` > 1 (rows and keys
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
    if GROUP > 1:  # rows and keys past the end add zero; a block holds whole groups
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
    return _head_mean(queries, keys, key_bias, key_valid, scale, row_logsumexp)


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
    return _head_mean(queries, keys, key_bias, key_valid, scale, row_logsumexp, columns=columns, group=group)


def head_mean_softmax_column_sums(queries: Tensor, keys: Tensor, key_bias: Tensor | None = None,
                                  key_valid: Tensor | None = None, *, scale: float = 1.0,
                                  row_logsumexp: Tensor | None = None,
                                  tiles: ReceivedTiles = RECEIVED_TILES) -> Tensor:
    """``[B, L]`` float32: :func:`head_mean_softmax_rows` summed over its rows (the attention each
    key receives from the query rows, EViT's statistic without [CLS]), with neither the logits nor
    the rows in memory. Each head's sums, ``[B, H, L]``, are written whole by one program per block
    of keys (:func:`_received_columns`) and averaged after in a fixed order (deterministic, unlike
    atomic adds). Arguments as there; queries and keys may be strided views (channels contiguous);
    ``tiles``: the kernel's launch (powers of two; ``rows`` and ``keys`` at least 16).
    """
    queries, keys, options = _checked(queries, keys, key_bias, key_valid, row_logsumexp)
    b, h, r, d = queries.shape
    hk, n_keys = keys.shape[1], keys.shape[2]
    if r == 0 or n_keys == 0 or b == 0:
        return torch.zeros(b, n_keys, dtype=torch.float32, device=queries.device)
    # strided operands, not copies (channels must be contiguous); the row log-sum-exp pass, where it
    # runs, reads contiguous ones
    queries = queries if queries.stride(-1) == 1 and row_logsumexp is not None else queries.contiguous()
    keys = keys if keys.stride(-1) == 1 and row_logsumexp is not None else keys.contiguous()
    bias, valid, lse = _key_terms(queries, keys, key_bias, key_valid, scale, row_logsumexp, options)
    out = torch.empty(b, h, n_keys, dtype=torch.float32, device=queries.device)
    _received_columns[(b * h, triton.cdiv(n_keys, tiles.keys))](
        queries, keys, bias, valid, lse, out, r, n_keys, d, h, hk, float(scale) * LOG2_E,
        queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        **dict(options, BLOCK_ROWS=tiles.rows, BLOCK_KEYS=tiles.keys), num_warps=tiles.warps, num_stages=tiles.stages)
    return out.sum(dim=1) / h


def _operands(queries: Tensor, keys: Tensor, key_bias: Tensor | None, key_valid: Tensor | None,
              row_logsumexp: Tensor | None) -> tuple[Tensor, Tensor, dict]:
    """The checked, contiguous ``(queries, keys)`` in one dtype and the kernels' shared options."""
    queries, keys, options = _checked(queries, keys, key_bias, key_valid, row_logsumexp)
    return queries.contiguous(), keys.contiguous(), options


def _checked(queries: Tensor, keys: Tensor, key_bias: Tensor | None, key_valid: Tensor | None,
             row_logsumexp: Tensor | None) -> tuple[Tensor, Tensor, dict]:
    """``(queries, keys)`` in one dtype after the shape checks, and the kernels' shared options."""
    b, h, r, d = queries.shape
    hk = keys.shape[1]
    if h % hk or keys.shape[0] != b or keys.shape[3] != d:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match")
    if row_logsumexp is not None and tuple(row_logsumexp.shape) != (b, h, r):
        raise ValueError(f"row_logsumexp {tuple(row_logsumexp.shape)} is not [B, H, R] = {(b, h, r)}")
    if queries.dtype != keys.dtype:
        keys = keys.to(queries.dtype)
    main, rest = channel_blocks(d)
    options = dict(HAS_BIAS=key_bias is not None, HAS_VALID=key_valid is not None, BLOCK_D=main, BLOCK_REST=rest)
    return queries, keys, options


def _key_terms(queries: Tensor, keys: Tensor, key_bias: Tensor | None, key_valid: Tensor | None, scale: float,
               row_logsumexp: Tensor | None, options: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(bias, valid, lse)`` as the kernels read them: the key bias in float32 and the key mask in
    int8 (a one-element placeholder where absent), and each row's log-sum-exp in base 2, ``[B, H, R]``,
    computed by :func:`_row_logsumexp` unless the caller handed it in."""
    b, h, r, d = queries.shape
    hk, n_keys = keys.shape[1], keys.shape[2]
    dummy = torch.empty(1, device=queries.device)
    bias = dummy if key_bias is None else key_bias.float().contiguous()
    valid = dummy if key_valid is None else key_valid.to(torch.int8).contiguous()
    if row_logsumexp is None:
        lse = torch.empty(b, h, r, dtype=torch.float32, device=queries.device)
        _row_logsumexp[(b * h, triton.cdiv(r, BLOCK_ROWS))](
            queries, keys, bias, valid, lse, r, n_keys, d, h, hk, float(scale) * LOG2_E, BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_KEYS=BLOCK_KEYS, **options)
    else:  # base 2, as the kernels take it; a row that saw no key (-inf) gives zero probabilities
        lse = (row_logsumexp.float() * LOG2_E).nan_to_num(nan=float("inf"), neginf=float("inf")).contiguous()
    return bias, valid, lse


def _head_mean(queries: Tensor, keys: Tensor, key_bias: Tensor | None, key_valid: Tensor | None, scale: float,
               row_logsumexp: Tensor | None, columns: Tensor | None = None, group: int = 1) -> Tensor:
    queries, keys, options = _operands(queries, keys, key_bias, key_valid, row_logsumexp)
    b, h, r, d = queries.shape
    hk, n_keys = keys.shape[1], keys.shape[2]
    out_keys = n_keys if columns is None else columns.shape[1]
    if group < 1 or r % group or out_keys % group or BLOCK_ROWS % group or BLOCK_KEYS % group:
        raise ValueError(f"{r} rows and {out_keys} columns do not form groups of {group}")
    out = torch.empty(b, r // group, out_keys // group, dtype=torch.float32, device=queries.device)
    if r == 0 or out_keys == 0 or b == 0:
        return out.zero_()
    bias, valid, lse = _key_terms(queries, keys, key_bias, key_valid, scale, row_logsumexp, options)
    if columns is not None:  # the second kernel reads the chosen keys only (the softmax's sum had them all)
        keys = keys.gather(2, columns[:, None, :, None].expand(-1, hk, -1, d))
        bias = bias if key_bias is None else bias.gather(1, columns)
        valid = valid if key_valid is None else valid.gather(1, columns)
    _head_mean_probs[(b, triton.cdiv(r, BLOCK_ROWS), triton.cdiv(out_keys, BLOCK_KEYS))](
        queries, keys, bias, valid, lse, out, r, out_keys, d, h, hk, float(scale) * LOG2_E, GROUP=group,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_KEYS=BLOCK_KEYS, **options)
    return out
