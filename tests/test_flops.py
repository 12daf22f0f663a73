"""Tests for ficoco.measure.flops: paper numbers, agreement with torch's FlopCounterMode, bad inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ficoco.measure.flops import (
    LanguageModelShape,
    LlavaShape,
    VisionTowerShape,
    kv_cache_bytes,
    llava_1_5_7b,
    llava_1_5_13b,
    llm_layer_flops,
    llm_prefill_flops,
    preset,
    preset_names,
    reduced_tokens,
    solve_largest,
    uniform_tokens,
    vision_flops,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

TFLOP = 1e12
MB = 1e6


# --------------------------------------------------------------------------------------------
# Paper numbers (docs/spec.md §8)
# --------------------------------------------------------------------------------------------


def _llm_tflops(shape, visual, text):
    return llm_prefill_flops(shape, uniform_tokens(shape.language.num_layers, visual + text)) / TFLOP


def test_7b_full_576_plus_60_text():
    t = _llm_tflops(llava_1_5_7b(), 576, 60)
    assert t == pytest.approx(8.45, abs=0.01)
    assert t == pytest.approx(8.4496, abs=1e-4)


def test_7b_reduced_token_counts():
    s = llava_1_5_7b()
    t192, t128, t64 = (_llm_tflops(s, v, 60) for v in (192, 128, 64))
    # Values of this formula (tight), then the paper's rounded figures.
    assert t192 == pytest.approx(3.297, abs=1e-3)
    assert t128 == pytest.approx(2.454, abs=1e-3)
    assert t64 == pytest.approx(1.614, abs=1e-3)
    assert t192 == pytest.approx(3.3, abs=0.01)
    assert t128 == pytest.approx(2.4, abs=0.06)
    # Paper's 1.5 TFLOPs corresponds to ~55 visual tokens; 64 tokens give 1.61.
    assert t64 == pytest.approx(1.5, abs=0.12)


def test_7b_budget_inverse():
    s = llava_1_5_7b()

    def cost(n):
        return llm_prefill_flops(s, uniform_tokens(32, n + 60))

    assert solve_largest(3.3 * TFLOP, cost, 0, 576) == 192
    assert solve_largest(2.4 * TFLOP, cost, 0, 576) == 123
    assert solve_largest(1.5 * TFLOP, cost, 0, 576) == 55
    assert solve_largest(100 * TFLOP, cost, 0, 576) == 576


def test_13b_full_576_plus_512_text():
    t = _llm_tflops(llava_1_5_13b(), 576, 512)
    assert t == pytest.approx(28.578, abs=1e-3)
    assert round(t, 1) == 28.6


def test_kv_cache_7b_fp16():
    s = llava_1_5_7b()
    per_token = kv_cache_bytes(s, uniform_tokens(32, 1))
    assert per_token == 2 * 32 * 4096 * 2 == 524288
    assert per_token / MB == pytest.approx(0.524, abs=1e-3)
    assert kv_cache_bytes(s, uniform_tokens(32, 636)) / MB == pytest.approx(333.4, abs=0.05)
    assert kv_cache_bytes(s, uniform_tokens(32, 636), bytes_per_value=1) == 636 * per_token // 2


def test_paper_formula_explicit_7b():
    # 8 P D^2 + 6 P D H + 4 P^2 D per layer, 32 layers
    p, d, h = 636, 4096, 11008
    expected = 32 * (8 * p * d * d + 6 * p * d * h + 4 * p * p * d)
    assert llm_prefill_flops(llava_1_5_7b(), uniform_tokens(32, p)) == expected


def test_lm_head():
    s = llava_1_5_7b()
    toks = uniform_tokens(32, 100)
    base = llm_prefill_flops(s, toks)
    assert llm_prefill_flops(s, toks, include_lm_head=True) - base == 2 * 100 * 4096 * 32064
    assert llm_prefill_flops(s, toks, include_lm_head=True, lm_head_tokens=1) - base == 2 * 4096 * 32064
    assert llm_prefill_flops(s, toks, include_lm_head=True, lm_head_tokens=0) == base


def test_reduction_inside_llm_counts_first_layers_full():
    s = llava_1_5_7b()
    toks = reduced_tokens(32, 636, 252, at_layer=2)
    assert toks == [636] * 2 + [252] * 30
    expected = 2 * llm_layer_flops(s, 636) + 30 * llm_layer_flops(s, 252)
    assert llm_prefill_flops(s, toks) == expected
    assert reduced_tokens(4, 10, 5, 0) == [5] * 4
    assert reduced_tokens(4, 10, 5, 4) == [10] * 4


def test_vision_preset_terms():
    s = llava_1_5_7b()
    assert s.num_patches == 576
    v = vision_flops(s)
    assert v.patch_embedding == 2 * 576 * 3 * 14 * 14 * 1024
    p, d, h = 577, 1024, 4096
    assert v.encoder == 24 * (8 * p * d * d + 4 * p * d * h + 4 * p * p * d)
    assert v.projector == 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert v.total == v.patch_embedding + v.encoder + v.projector
    assert v.as_dict()["total"] == v.total
    assert vision_flops(s, None, 64).projector == 2 * 64 * (1024 * 4096 + 4096 * 4096)


def test_presets_are_fresh_and_named():
    assert preset("llava-1.5-7b") == llava_1_5_7b()
    assert preset(" LLaVA-1.5-13B ") == llava_1_5_13b()
    assert set(preset_names()) == {"llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "video-llava-7b", "qwen2-vl-7b",
                                  "qwen2.5-vl-7b", "qwen3-vl-8b"}
    s = llava_1_5_13b().language
    assert (s.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, s.vocab_size) == (
        40,
        5120,
        13824,
        40,
        32064,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_layers = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# from_config
# --------------------------------------------------------------------------------------------


def test_language_from_config_defaults():
    cfg = LlamaConfig(
        num_hidden_layers=3, hidden_size=64, intermediate_size=176, num_attention_heads=4, vocab_size=50
    )
    cfg.num_key_value_heads = None
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = None
    s = LanguageModelShape.from_config(cfg)
    assert s == LanguageModelShape(3, 64, 176, 4, 4, 16, 50)

    class Bare:  # no head_dim / num_key_value_heads attributes at all
        num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, vocab_size = 2, 32, 64, 4, 10

    assert LanguageModelShape.from_config(Bare()) == LanguageModelShape(2, 32, 64, 4, 4, 8, 10)


def test_llava_from_config():
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=336,
            patch_size=14,
            num_hidden_layers=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
        ).to_dict(),
        text_config=LlamaConfig(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        ).to_dict(),
    )
    s = LlavaShape.from_config(cfg)
    assert s == llava_1_5_7b()
    assert s.num_patches == 576


# --------------------------------------------------------------------------------------------
# Agreement with torch.utils.flop_counter.FlopCounterMode
# --------------------------------------------------------------------------------------------

TINY_LLAMA = dict(
    num_hidden_layers=3,
    hidden_size=64,
    intermediate_size=176,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: D_kv = 32 != D
    vocab_size=50,
)


def _tiny_llama(impl):
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA, attn_implementation=impl)
    return LlamaModel(cfg).eval(), cfg


def _count(fn, math_sdpa=True):
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        if math_sdpa:
            with sdpa_kernel(SDPBackend.MATH):
                fn()
        else:
            fn()
    return fc


def _counted(fc):
    """Total FLOPs less the rotary-embedding module's: some transformers versions (5.17) build
    RoPE angles with a matmul (``head_dim * P`` FLOPs), which the paper's model does not count."""
    rotary = sum(sum(ops.values()) for name, ops in fc.get_flop_counts().items() if name.endswith("rotary_emb"))
    return fc.get_total_flops() - rotary


def _global(fc):
    """FLOPs per operator over the whole run, less the rotary-embedding module's (see :func:`_counted`)."""
    counts = {str(k): v for k, v in fc.get_flop_counts().get("Global", {}).items()}
    for name, ops in fc.get_flop_counts().items():
        if name.endswith("rotary_emb"):
            for op, flops in ops.items():
                counts[str(op)] -= flops
    return counts


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("p", [1, 7, 23])
def test_llama_matches_flop_counter(impl, p):
    model, cfg = _tiny_llama(impl)
    shape = LanguageModelShape.from_config(cfg)
    assert shape.kv_dim == 32
    fc = _count(lambda: model(inputs_embeds=torch.randn(1, p, 64)))
    expected = llm_prefill_flops(shape, uniform_tokens(3, p))
    assert _counted(fc) == expected
    counts = _global(fc)
    # Math SDPA is a composite: its attention FLOPs show up as aten.bmm, not an sdpa op;
    # the full P x P score matrix is computed (causal mask applied afterwards).
    assert counts["aten.bmm"] == 3 * 4 * p * p * 64
    assert not any("attention" in k for k in counts)


def test_llama_batch_scales_linearly():
    model, cfg = _tiny_llama("sdpa")
    shape = LanguageModelShape.from_config(cfg)
    fc = _count(lambda: model(inputs_embeds=torch.randn(3, 9, 64)))
    assert _counted(fc) == 3 * llm_prefill_flops(shape, uniform_tokens(3, 9))


def test_llama_cpu_default_sdpa_counts_no_attention():
    """Without forcing the math backend, CPU SDPA (flash-for-cpu kernel) contributes 0 FLOPs."""
    model, cfg = _tiny_llama("sdpa")
    shape = LanguageModelShape.from_config(cfg)
    p = 11
    fc = _count(lambda: model(inputs_embeds=torch.randn(1, p, 64)), math_sdpa=False)
    attention = 3 * 4 * p * p * shape.q_dim
    assert _counted(fc) == llm_prefill_flops(shape, uniform_tokens(3, p)) - attention


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_varying_tokens_per_layer_matches(impl):
    """Drop tokens before each layer with pre-hooks (like in-LLM pruning) and compare."""
    model, cfg = _tiny_llama(impl)
    shape = LanguageModelShape.from_config(cfg)
    tokens = [13, 8, 3]

    def make_hook(n):
        def hook(module, args, kwargs):
            hidden = args[0][:, :n]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[:, :n], sin[:, :n])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][:, :n]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = mask[..., :n, :n]
            return (hidden, *args[1:]), kwargs

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(n), with_kwargs=True) for layer, n in zip(model.layers, tokens)
    ]
    try:
        out = {}
        fc = _count(lambda: out.setdefault("y", model(inputs_embeds=torch.randn(1, tokens[0], 64))))
    finally:
        for h in handles:
            h.remove()
    assert out["y"].last_hidden_state.shape[1] == tokens[-1]
    assert _counted(fc) == llm_prefill_flops(shape, tokens)
    assert _counted(fc) != llm_prefill_flops(shape, uniform_tokens(3, tokens[0]))


@pytest.mark.parametrize("causal", [False, True])
def test_flop_counter_sdpa_formula_ignores_causality(causal):
    """FlopCounterMode's own SDPA formula (used for fused kernels) counts the full P x P, as we do."""
    b, h, hkv, p, hd = 1, 4, 2, 9, 16
    q = torch.empty(b, h, p, hd, device="meta")
    k = torch.empty(b, hkv, p, hd, device="meta").repeat_interleave(h // hkv, dim=1)
    fc = FlopCounterMode(display=False)
    with fc:
        torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, False, is_causal=causal)
    shape = LanguageModelShape(1, h * hd, 8, h, hkv, hd, 10)
    attention = llm_layer_flops(shape, p) - llm_layer_flops(shape, 0)
    attention -= 4 * p * shape.hidden_size * (shape.q_dim + shape.kv_dim) + 6 * p * shape.hidden_size * 8
    assert attention == 4 * p * p * h * hd
    assert fc.get_total_flops() == attention


TINY_CLIP = dict(
    image_size=56,
    patch_size=14,
    num_hidden_layers=3,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_clip_vision_matches_flop_counter(impl):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(**TINY_CLIP, attn_implementation=impl)
    model = CLIPVisionModel(cfg).eval()
    shape = VisionTowerShape.from_config(cfg)
    assert (shape.num_patches, shape.num_positions) == (16, 17)
    fc = _count(lambda: model(pixel_values=torch.randn(1, 3, 56, 56)))
    v = vision_flops(shape, uniform_tokens(3, 17), num_llm_tokens=16)
    assert v.projector == 0  # bare tower: no projector
    counts = _global(fc)
    # Layer norms, GELU, softmax, position-embedding adds are not counted; conv and linears are.
    assert counts["aten.convolution"] == v.patch_embedding
    assert fc.get_total_flops() == v.patch_embedding + v.encoder == v.tower


def test_tiny_llava_end_to_end_matches_flop_counter():
    torch.manual_seed(0)
    text = LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 2, "vocab_size": 60})
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_CLIP).to_dict(),
        text_config=text.to_dict(),
        image_token_id=59,
        attn_implementation="sdpa",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    shape = LlavaShape.from_config(cfg)
    assert shape.vision_feature_layer == -2
    n_img = shape.num_patches
    ids = torch.tensor([[1, 2] + [59] * n_img + [3, 4, 5]])
    p = ids.shape[1]
    fc = _count(lambda: model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56)))
    v = vision_flops(shape, uniform_tokens(3, shape.vision.num_positions), n_img)
    llm = llm_prefill_flops(shape, uniform_tokens(2, p), include_lm_head=True)
    # All encoder layers run even though features come from layer -2.
    assert _counted(fc) == v.total + llm
    per_module = fc.get_flop_counts()
    proj = sum(c for k, d in per_module.items() if k.endswith("multi_modal_projector") for c in d.values())
    assert proj == v.projector


# --------------------------------------------------------------------------------------------
# solve_largest
# --------------------------------------------------------------------------------------------


def test_solve_largest_basic():
    assert solve_largest(10, lambda n: n, 0, 100) == 10
    assert solve_largest(10.5, lambda n: n * n, 0, 100) == 3
    assert solve_largest(0, lambda n: n, 0, 5) == 0
    assert solve_largest(1e9, lambda n: n, 3, 5) == 5
    assert solve_largest(4, lambda n: n, 4, 4) == 4
    # step function with plateaus
    assert solve_largest(2, lambda n: n // 10, 0, 1000) == 29


def test_solve_largest_infeasible():
    with pytest.raises(ValueError, match=r"target 5.*minimum cost.*n=10.*10"):
        solve_largest(5, lambda n: n, 10, 20)
    with pytest.raises(ValueError, match="lo"):
        solve_largest(5, lambda n: n, 3, 2)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_bad_tokens_per_layer():
    s = llava_1_5_7b()
    with pytest.raises(ValueError, match="31 entries.*32 layers"):
        llm_prefill_flops(s, [10] * 31)
    with pytest.raises(ValueError, match="non-negative"):
        llm_prefill_flops(s, [10] * 31 + [-1])
    with pytest.raises(ValueError, match="integer"):
        llm_prefill_flops(s, [10] * 31 + [1.5])
    with pytest.raises(ValueError, match="sequence"):
        llm_prefill_flops(s, 100)
    with pytest.raises(ValueError, match="entries"):
        kv_cache_bytes(s, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        kv_cache_bytes(s, [-1] * 32)
    with pytest.raises(ValueError, match="entries"):
        vision_flops(s, [577] * 23)
    with pytest.raises(ValueError, match="non-negative"):
        vision_flops(s, None, -5)
    with pytest.raises(ValueError, match="non-negative"):
        llm_prefill_flops(s, [1] * 32, include_lm_head=True, lm_head_tokens=-1)
    with pytest.raises(ValueError, match="non-negative"):
        uniform_tokens(4, -1)
    with pytest.raises(ValueError, match="at_layer"):
        reduced_tokens(4, 10, 5, 5)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"llava-1\.5-7b.*llava-1\.5-13b"):
        preset("llava-1.6-34b")


def test_bad_shapes():
    with pytest.raises(ValueError, match="hidden_size"):
        LanguageModelShape(1, 0, 4, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="multiple"):
        LanguageModelShape(1, 8, 4, 3, 2, 1, 1)
    with pytest.raises(ValueError, match="projector_out"):
        VisionTowerShape(1, 8, 8, 28, 14, 3, 8, -1)
