"""Qwen-VL on a GPU (skipped without CUDA): every method batched == one by one, the one-call
tower attention (PyTorch's varlen kernels in bf16) equal to the stock path, bf16 runs with exact
budgets."""

from __future__ import annotations

import pytest
import torch

import ficoco
from ficoco.testing import QWEN_GENERATIONS, tiny_qwen_vl

from .qwen_inputs import image_batch, sample_of
from .test_qwen_vl import METHODS, build, output_valid

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(inputs, device, dtype=None):
    return {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))
            for k, v in inputs.items()}


@pytest.fixture(scope="module", params=QWEN_GENERATIONS)
def cuda_model(request):
    # Two key/value heads shared by four query heads, as in the released checkpoints (28/4, 16/8...).
    # With one key/value head, transformers' repeat_kv hands SDPA a stride-0 head axis, and torch's
    # memory-efficient kernel (2.11 at least) returns wrong rows for such keys whenever the key
    # length is 1 mod 32 under a mask: pytorch/pytorch#191937, fixed by #191984. The vanilla model
    # hits it too (benchmarks/sdpa_stride0_check.py); it is not a reduction's doing.
    return request.param, tiny_qwen_vl(request.param, llm_heads=(4, 2)).cuda()


@pytest.mark.parametrize("key", list(METHODS))
def test_cuda_batched_equals_one_by_one(cuda_model, key):
    generation, model = cuda_model
    inputs = image_batch(generation)
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        batched = model(**_to(inputs, "cuda")).logits
        valid = output_valid(handle, _to(inputs, "cuda"))
        for row in range(3):
            single = model(**_to(sample_of(inputs, row, generation), "cuda")).logits[0]
            torch.testing.assert_close(batched[row][valid[row]], single, rtol=1e-3, atol=1e-3)


def test_cuda_one_call_attention_in_bf16(cuda_model):
    """PyTorch's varlen attention kernels (bf16) against the stock per-segment loop, no reduction:
    in bf16 a reduction's choices can flip on rounding, so reductions are compared in float32."""
    generation, _ = cuda_model
    model = tiny_qwen_vl(generation).to("cuda", torch.bfloat16)
    inputs = _to(image_batch(generation), "cuda", torch.bfloat16)
    with torch.inference_mode():
        stock = model(**inputs).logits.float()
        with ficoco.fast_vision_attention(model):
            fast = model(**inputs).logits.float()
    torch.testing.assert_close(fast, stock, rtol=0.05, atol=0.05)
    assert (fast - stock).abs().mean() < 0.01


@pytest.mark.parametrize("key", ["ficoco-v", "tome", "ficoco-vl"])
def test_cuda_one_call_attention_with_reductions(cuda_model, key):
    generation, model = cuda_model
    inputs = _to(image_batch(generation), "cuda")
    with ficoco.apply(model, build(key)), torch.inference_mode():
        stock = model(**inputs).logits
        with ficoco.fast_vision_attention(model):
            fast = model(**inputs).logits
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", list(METHODS))
def test_cuda_bfloat16_generates_with_exact_budget(cuda_model, key):
    generation, _ = cuda_model
    model = tiny_qwen_vl(generation).to("cuda", torch.bfloat16)
    inputs = _to(image_batch(generation), "cuda", torch.bfloat16)
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        plans = [handle.plan_for(n) for n in (48, 16, 60)]
    assert torch.isfinite(out).all() and gen.shape[1] == inputs["input_ids"].shape[1] + 3
    if handle.vision_trace is not None:
        assert [k.numel() for k in handle.vision_trace.kept] == [p.llm_input_visual for p in plans]


def test_cuda_compiled_head_mean_softmax_equals_eager():
    """The compiled statistics (``compile_blocks=True``) are the eager ones, masked rows included."""
    from ficoco.stages.probe import compiled_head_mean_softmax, head_mean_softmax

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 2, 37, 301, device="cuda", dtype=torch.bfloat16) * 4
    logits[1, ..., 250:] = float("-inf")  # padding keys of the second sample
    logits[0, :, :, 5] = float("-inf")  # a row that sees no key
    eager = head_mean_softmax(logits)
    torch.testing.assert_close(compiled_head_mean_softmax("inductor")(logits), eager, rtol=1e-5, atol=1e-6)
    assert bool((eager[0, 5] == 0).all())


def test_cuda_triton_softmax_rows_at_the_tower_size():
    """The Triton head-averaged softmax rows (the fast statistics path) against float32 PyTorch at
    Qwen2.5-VL-7B's tower size, in bf16, and through the probe against its eager rows (which round
    the logits to bf16 first: the kernel's error must be the smaller one)."""
    from ficoco.stages import AttentionProbe
    from ficoco.stages.attention_kernels import head_mean_softmax_rows
    from ficoco.stages.probe import head_mean_softmax
    from ficoco.stages.tokens import gather_rows

    torch.manual_seed(0)
    b, l, h, d = 2, 4784, 16, 80
    q = torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16)
    valid = torch.ones(b, l, dtype=torch.bool, device="cuda")
    valid[1, 4000:] = False
    bias = torch.rand(b, l, device="cuda").log()
    rows = torch.randint(0, l, (b, 300), device="cuda")
    scale = d ** -0.5
    exact_logits = torch.einsum("brhd,blhd->bhrl", gather_rows(q.float(), rows) * scale, k.float())
    exact_logits = (exact_logits + bias[:, None, None]).masked_fill(~valid[:, None, None], float("-inf"))
    exact = head_mean_softmax(exact_logits[:, :, None])
    direct = head_mean_softmax_rows((gather_rows(q, rows) * scale).transpose(1, 2),
                                    k.transpose(1, 2), bias, valid)
    assert (direct - exact).abs().max().item() < 1e-4
    candidates = torch.arange(l, device="cuda").expand(b, -1)
    fused = AttentionProbe(q, k, scale, candidates, key_bias=bias, key_valid=valid, compile_backend="inductor")
    eager = AttentionProbe(q, k, scale, candidates, key_bias=bias, key_valid=valid)
    fast, slow = fused.softmax_rows(rows), eager.softmax_rows(rows)
    assert (fast - exact).abs().max() <= (slow - exact).abs().max()
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-3)
    # the attention each key receives from every row (EViT without [CLS]): column sums on the fused
    # path, no [B, L, L] map; against float32 rows summed chunk by chunk
    received = torch.zeros(b, l, device="cuda")
    for chunk in candidates.split(512, dim=1):
        logits = torch.einsum("brhd,blhd->bhrl", gather_rows(q.float(), chunk) * scale, k.float())
        logits = (logits + bias[:, None, None]).masked_fill(~valid[:, None, None], float("-inf"))
        received += head_mean_softmax(logits[:, :, None]).sum(dim=1)
    torch.testing.assert_close(fused.received_attention, received / l, rtol=1e-3, atol=1e-8)
    assert (fused.received_attention - received / l).abs().max() <= (eager.received_attention - received / l).abs().max()
    # merge groups' attention to some groups only (FiCoCo-V's correlation on Qwen): the float32
    # rows at those columns, summed over groups, against the kernel's grouped columns
    from ficoco.stages import GroupedProbe

    groups = torch.stack([torch.randperm(l // 4, device="cuda") for _ in range(b)])
    sources, targets = groups[:, :150], groups[:, 150:750]
    expected = GroupedProbe(eager, 4).attention_rows(sources).gather(2, targets[:, None, :].expand(-1, 150, -1))
    between = GroupedProbe(fused, 4).attention_between(sources, targets)
    torch.testing.assert_close(between, expected, rtol=0, atol=4e-3)
    exact_rows = torch.cat([head_mean_softmax(torch.einsum(
        "brhd,blhd->bhrl", gather_rows(q.float(), (sources[:, c:c + 30, None] * 4 + torch.arange(4, device="cuda"))
                                       .flatten(1)) * scale, k.float()).add(bias[:, None, None])
        .masked_fill(~valid[:, None, None], float("-inf"))[:, :, None]) for c in range(0, 150, 30)], dim=1)
    exact_between = exact_rows.reshape(b, 150, 4, l // 4, 4).mean(dim=2).sum(dim=-1).gather(
        2, targets[:, None, :].expand(-1, 150, -1))
    assert (between - exact_between).abs().max() <= (expected - exact_between).abs().max() + 1e-6


def test_cuda_one_call_attention_hands_over_row_logsumexp():
    """Asked through its keyword, the one-call attention hands the caller its queries and keys
    ([S, H, d], as it used them) and each row's log-sum-exp over its segment ([H, S], natural log,
    the scale included), and its output is unchanged."""
    from ficoco.adapters.varlen import ATTENTION_INPUTS_KWARG, varlen_attention

    torch.manual_seed(2)
    h, d, cuts = 4, 80, [0, 100, 137, 201]
    q, k, v = (torch.randn(1, h, cuts[-1], d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor(cuts, device="cuda", dtype=torch.int32)
    scale = d ** -0.5
    given = []
    out, _ = varlen_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=100, scaling=scale,
                              **{ATTENTION_INPUTS_KWARG: lambda *inputs: given.append(inputs)})
    plain, _ = varlen_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=100, scaling=scale)
    assert torch.equal(out, plain)
    assert len(given) == 1
    query, key, lse = given[0]
    assert torch.equal(query, q[0].transpose(0, 1)) and torch.equal(key, k[0].transpose(0, 1))
    assert lse.shape == (h, cuts[-1]) and lse.dtype == torch.float32
    expected = torch.cat([torch.logsumexp(q[0, :, a:b].float() @ k[0, :, a:b].float().transpose(-1, -2) * scale, dim=-1)
                          for a, b in zip(cuts[:-1], cuts[1:])], dim=1)
    torch.testing.assert_close(lse, expected, rtol=0, atol=1e-3)


def test_cuda_statistics_from_the_attentions_row_logsumexp():
    """A probe handed the attention's row log-sum-exp skips the kernels' first pass and gives the
    rows, the grouped columns and the received attention of a probe that computes it."""
    from ficoco.stages import AttentionProbe, GroupedProbe

    torch.manual_seed(3)
    b, l, h, d = 2, 1600, 16, 80
    q = torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    lse = torch.logsumexp(torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * scale, dim=-1)  # [B, H, L]
    given = AttentionProbe(q, k, scale, None, row_logsumexp=lse, compile_backend="inductor")
    computed = AttentionProbe(q, k, scale, None, compile_backend="inductor")
    rows = torch.stack([torch.randperm(l, device="cuda")[:300] for _ in range(b)])
    torch.testing.assert_close(given.softmax_rows(rows), computed.softmax_rows(rows), rtol=0, atol=2e-4)
    torch.testing.assert_close(given.received_attention, computed.received_attention, rtol=1e-3, atol=1e-7)
    groups = torch.stack([torch.randperm(l // 4, device="cuda") for _ in range(b)])
    torch.testing.assert_close(GroupedProbe(given, 4).attention_between(groups[:, :100], groups[:, 100:300]),
                               GroupedProbe(computed, 4).attention_between(groups[:, :100], groups[:, 100:300]),
                               rtol=0, atol=4e-4)


@pytest.mark.parametrize("key", ["ficoco-v", "evit"])
def test_cuda_reductions_reuse_the_blocks_row_logsumexp(key, monkeypatch):
    """In bf16 on the compiled one-call path, every reducing block hands its attention's rotated
    queries and keys and its row log-sum-exp to the reduction, and the budget holds."""
    from ficoco.adapters.packed_vision import PackedVisionSide

    handed = []
    keep = PackedVisionSide._keep_attention_inputs
    monkeypatch.setattr(PackedVisionSide, "_keep_attention_inputs",
                        lambda self, q, k, lse: (handed.append(tuple(lse.shape)), keep(self, q, k, lse))[1])
    model = tiny_qwen_vl("qwen2_5_vl").to("cuda", torch.bfloat16)
    inputs = _to(image_batch("qwen2_5_vl"), "cuda", torch.bfloat16)
    with ficoco.apply(model, build(key), record=True) as handle, torch.inference_mode(), \
            ficoco.fast_vision_attention(model, compile_blocks=True):
        logits = model(**inputs).logits
        reducing = len(handle.vision_trace.steps)
        blocks = len(handle.vision.blocks)
    heads = model.config.vision_config.num_heads
    assert reducing >= 1 and len(handed) == blocks and all(shape[0] == heads for shape in handed)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("key", ["ficoco-v", "evit", "tome"])
def test_cuda_compiled_blocks_with_reductions(cuda_model, key):
    """Compiled blocks (and the reductions' compiled statistics) give what the eager one-call path gives."""
    generation, model = cuda_model
    inputs = _to(image_batch(generation), "cuda")
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        with ficoco.fast_vision_attention(model):
            eager = model(**inputs).logits
            kept = [k.clone() for k in handle.vision_trace.kept] if handle.vision_trace is not None else None
        with ficoco.fast_vision_attention(model, compile_blocks=True):
            compiled = model(**inputs).logits
            if kept is not None:
                assert all(torch.equal(a, b) for a, b in zip(kept, handle.vision_trace.kept))
    assert not hasattr(model.model.visual, "_ficoco_statistics_backend")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
