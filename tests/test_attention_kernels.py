"""The Triton head-averaged softmax rows (stages/attention_kernels.py) against PyTorch's softmax of
the full logits, in Triton's interpreter on the CPU (a subprocess: ``TRITON_INTERPRET`` must be set
before Triton is imported). tests/test_cuda_qwen.py repeats the check on a GPU in bf16 at the
Qwen2.5-VL tower's sizes and through the probe."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from .triton_interpreter import run_interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

CHECK = textwrap.dedent('''
    import json, sys
    import torch
    from ficoco.stages.attention_kernels import (ReceivedTiles, head_mean_softmax_between,
                                                 head_mean_softmax_column_sums, head_mean_softmax_rows)
    from ficoco.stages.probe import head_mean_softmax

    def logits_of(q, k, key_bias, key_valid, b, h, hk, r, l, d):
        """[B, Hk, G, R, L] float32 logits of float32 queries, with bias and mask."""
        logits = torch.matmul(q.view(b, hk, h // hk * r, d), k.float().transpose(-1, -2)).view(b, hk, h // hk, r, l)
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, None, :]
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid[:, None, None, None, :], float("-inf"))
        return logits

    out = []
    for seed, (b, h, hk, r, l, d, dtype, bias, valid) in enumerate(json.loads(sys.argv[1])):
        torch.manual_seed(seed)
        dtype = getattr(torch, dtype)
        q = (torch.randn(b, h, r, d) * 0.6).to(dtype)
        k = (torch.randn(b, hk, l, d) * 0.6).to(dtype)
        key_bias = torch.rand(b, l).log() if bias else None
        key_valid = None
        if valid:
            key_valid = torch.rand(b, l) > 0.3
            key_valid[-1] = False  # a sample whose rows see no key: zero rows
        fast = head_mean_softmax_rows(q, k, key_bias, key_valid)
        slow = head_mean_softmax(logits_of(q.float(), k, key_bias, key_valid, b, h, hk, r, l, d))
        columns = head_mean_softmax_column_sums(q, k, key_bias, key_valid)  # [B, L]: the rows' sums
        # other tiles: the same sums
        other_tiles = head_mean_softmax_column_sums(q, k, key_bias, key_valid, tiles=ReceivedTiles(rows=32, keys=64))
        # some key columns only (per sample, unsorted), in groups of 4 where the rows form groups
        group = 4 if r % 4 == 0 else 1
        chosen = torch.stack([torch.randperm(l // 4)[: max(1, l // 8)] for _ in range(b)])  # [B, C / 4] groups
        cols = (chosen[:, :, None] * 4 + torch.arange(4)).flatten(1) if group == 4 else chosen * 4 + 1
        between = head_mean_softmax_between(q, k, cols, key_bias, key_valid, group)
        # the scale applied in the kernel (unscaled queries), and the rows' log-sum-exp handed in
        # (natural log, as flash attention returns it): the first pass skipped, the same rows
        scale = 0.37
        scaled = logits_of(q.float() / scale * scale, k, key_bias, key_valid, b, h, hk, r, l, d)
        lse = torch.logsumexp(scaled, dim=-1).flatten(1, 2)  # [B, H, R]; -inf for rows that see nothing
        given = head_mean_softmax_rows((q.float() / scale).to(dtype), k, key_bias, key_valid, scale=scale,
                                       row_logsumexp=lse)
        # as the probe passes them: strided views of [B, R, H, d] queries and [B, L, Hk, d] keys
        sequence_major = (q.float() / scale).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
        given_columns = head_mean_softmax_column_sums(sequence_major, k.transpose(1, 2).contiguous().transpose(1, 2),
                                                      key_bias, key_valid, scale=scale, row_logsumexp=lse)
        expected_given = head_mean_softmax(logits_of((q.float() / scale).to(dtype).float() * scale, k, key_bias,
                                                     key_valid, b, h, hk, r, l, d))
        picked = slow.gather(2, cols[:, None, :].expand(-1, r, -1))
        if group > 1:
            picked = picked.reshape(b, r // group, group, -1, group).mean(dim=2).sum(dim=-1)
        out.append({"shape": list(fast.shape), "dtype": str(fast.dtype), "error": (fast - slow).abs().max().item(),
                    "row_sums": fast.sum(-1).flatten().tolist(), "finite": bool(fast.isfinite().all()),
                    "columns_shape": list(columns.shape),
                    "columns_error": (columns - slow.sum(dim=1)).abs().max().item(),
                    "other_tiles_error": (other_tiles - slow.sum(dim=1)).abs().max().item(),
                    "between_shape": list(between.shape), "expected_shape": list(picked.shape), "group": group,
                    "between_error": (between - picked).abs().max().item(),
                    "given_error": (given - expected_given).abs().max().item(),
                    "given_columns_error": (given_columns - expected_given.sum(dim=1)).abs().max().item()})
    print(json.dumps(out))
''')

# (B, H, Hk, R, L, d, dtype, key bias, key mask)
CASES = [
    (2, 4, 4, 70, 130, 80, "float32", False, False),  # rows and keys past one block, d not a power of two
    (1, 6, 2, 5, 40, 16, "float32", True, False),  # grouped-query heads, proportional attention's bias
    (3, 2, 2, 64, 64, 64, "float32", False, True),  # masked keys; the last sample sees none
    (2, 2, 1, 33, 100, 72, "float16", True, True),  # half precision in, float32 out
    (1, 2, 2, 20, 70, 96, "float32", False, False),  # channels in two products: 64 + 32
    (2, 4, 2, 136, 400, 80, "float16", True, False),  # groups of 4 over three row blocks and two key blocks
    (1, 2, 2, 200, 300, 80, "float32", False, True),  # received attention: keys past one block of 128, rows of 64
]


@needs_triton
def test_triton_head_mean_softmax_rows_equal_pytorch_softmax():
    """The rows; their sums over rows (the attention each key receives) without the rows; and the
    rows at some key columns only, summed over groups of 4 rows and columns where they form them."""
    rows = run_interpreted(CHECK, CASES)
    for (b, h, hk, r, l, d, dtype, bias, valid), row in zip(CASES, rows):
        assert row["shape"] == [b, r, l] and row["dtype"] == "torch.float32" and row["finite"]
        assert row["error"] < (1e-6 if dtype == "float32" else 1e-3), (dtype, row["error"])
        assert row["columns_shape"] == [b, l]
        assert row["columns_error"] < r * (1e-6 if dtype == "float32" else 1e-3), (dtype, row["columns_error"])
        assert row["other_tiles_error"] < r * (1e-6 if dtype == "float32" else 1e-3), (dtype, row["other_tiles_error"])
        assert row["between_shape"] == row["expected_shape"]
        assert row["between_error"] < row["group"] * (1e-6 if dtype == "float32" else 1e-3), row["between_error"]
        assert row["given_error"] < (1e-5 if dtype == "float32" else 1e-3), (dtype, row["given_error"])
        assert row["given_columns_error"] < r * (1e-5 if dtype == "float32" else 1e-3), row["given_columns_error"]
        sums = row["row_sums"]
        if valid:  # the last sample's rows see no key: zero, the others sum to one
            assert all(abs(x) < 1e-6 for x in sums[-r:]) and all(abs(x - 1) < 1e-4 for x in sums[:-r])
        else:
            assert all(abs(x - 1) < 1e-4 for x in sums)
