"""Every method inside a real (tiny) HF LLaVA: equivalences, budgets, order, generation, errors."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import ficoco
from ficoco.schedule import tokens_entering_layers

from .conftest import IMAGE_TOKEN, PATCHES, batch_inputs

# each method at a budget the 8-layer tiny LLM and 24-layer CLIP can hold
METHODS = {
    "ficoco-v": dict(retain=100),
    "ficoco-v-prop": dict(retain=100, proportional_attention=True),
    "ficoco-v-k1": dict(retain=100, fixed_k=1),  # the paper's fixed-K ablation
    "ficoco-l": dict(retain=100, start_layer=2),
    "ficoco-l-k2": dict(retain=100, start_layer=2, fixed_k=2),
    "ficoco-vl": dict(retain=64, language_start_layer=2),
    "tome": dict(retain=100),
    "evit": dict(retain=100),
    "fastv": dict(retain=100),
    "random": dict(retain=100),
    "random-llm": dict(retain=100, side="language"),
    "topk": dict(retain=100),
    "visionzip": dict(retain=100),
    "prumerge": dict(retain=100),
    "prumerge+": dict(retain=100),
    "prumerge-adaptive": dict(retain=None),  # each image its own count: the three hand on 11, 10 and 13 tokens
    "prumerge+-adaptive": dict(retain=None),
    "dart": dict(retain=100),
    "pdrop": dict(retain=100, layers=(2, 4, 6)),
    "sparsevlm": dict(retain=100),
    "pool": dict(retain=144),
    "divprune": dict(retain=100),
    "cdpruner": dict(retain=100),
    "zero": dict(),
    "downsample": dict(retain=192),  # a 16x12-patch image: non-square, position embeddings interpolated
}
#: methods that can keep every token (``retain`` = all patches is then the vanilla model)
CAN_KEEP_ALL = [key for key in METHODS if key != "zero" and not key.endswith("-adaptive")]


def takes_encoded() -> bool:
    """Whether this transformers' LLaVA takes encoded images (``mm_encoder_outputs``), which
    adaptive PruMerge needs (transformers 5.17 does not: there it is refused)."""
    from transformers import LlavaModel

    return "mm_encoder_outputs" in inspect.signature(LlavaModel.forward).parameters


#: the methods that run on this transformers
RUNNABLE = [key for key in METHODS if not key.endswith("-adaptive") or takes_encoded()]


def build(key: str, **overrides) -> ficoco.Method:
    name = key.removesuffix("-prop").removesuffix("-llm").removesuffix("-k1").removesuffix("-k2")
    name = name.removesuffix("-adaptive")
    return ficoco.get_method(name, **{**METHODS[key], **overrides})


def logits(model, inputs, **kwargs):
    with torch.inference_mode():
        return model(**inputs, **kwargs).logits


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def vanilla_logits(model, images, prompts):
    return logits(model, batch_inputs(prompts[:2], images[:2]))


@pytest.mark.parametrize("key", CAN_KEEP_ALL)
def test_reduction_disabled_is_vanilla(model, images, prompts, vanilla_logits, key):
    overrides = {"retain": PATCHES}
    with ficoco.apply(model, build(key, **overrides)):
        out = logits(model, batch_inputs(prompts[:2], images[:2]))
    torch.testing.assert_close(out, vanilla_logits, rtol=0, atol=0)


@pytest.mark.parametrize("key", RUNNABLE)
def test_detach_restores_model(model, images, prompts, vanilla_logits, key):
    before = hook_count(model)
    with ficoco.apply(model, build(key)) as handle:
        reduced = logits(model, batch_inputs(prompts[:2], images[:2]))
        assert hook_count(model) > before
    assert reduced.shape[1] < vanilla_logits.shape[1]
    assert hook_count(model) == before
    assert "generate" not in model.__dict__ and not hasattr(model, "_ficoco_handle")
    torch.testing.assert_close(logits(model, batch_inputs(prompts[:2], images[:2])), vanilla_logits, rtol=0, atol=0)
    handle.remove()  # removing twice is harmless


def _valid_rows(out, mask_len, side):
    return out[-mask_len:] if side == "left" else out[:mask_len]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("key", RUNNABLE)
def test_batched_equals_one_by_one(model, images, prompts, key, side):
    with ficoco.apply(model, build(key)):
        batched = logits(model, batch_inputs(prompts, images, side))
        for row, prompt in enumerate(prompts):
            single = logits(model, batch_inputs([prompt], images[row:row + 1], side))[0]
            got = _valid_rows(batched[row], single.shape[0], side)
            torch.testing.assert_close(got, single, rtol=1e-4, atol=1e-4)


def output_mask(handle, inputs):
    """``[B, L']`` which output positions are real tokens (padding rows differ between kernels)."""
    if handle.kept_index is not None:
        return inputs["attention_mask"].gather(1, handle.kept_index).bool()
    return handle.prepare_inputs(**inputs)["attention_mask"].bool()


@pytest.mark.parametrize("key", RUNNABLE)
def test_eager_equals_sdpa(model, eager_model, images, prompts, key):
    inputs = batch_inputs(prompts, images)
    with ficoco.apply(model, build(key)) as handle:
        sdpa = logits(model, inputs)
        real = output_mask(handle, inputs)
    with ficoco.apply(eager_model, build(key)):
        eager = logits(eager_model, inputs)
    torch.testing.assert_close(sdpa[real], eager[real], rtol=1e-4, atol=1e-4)


def _cache_of(output):
    return output.past_key_values if getattr(output, "past_key_values", None) is not None else output.cache


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers 5.x (which
    deprecates ``past_key_values``), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _manual_greedy(model, inputs, steps):
    """Prefill, then feed one token at a time with the cache, as generate() does (rows that emitted
    EOS (id 2) go on with padding (id 0))."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    finished = torch.zeros(ids.shape[0], 1, dtype=torch.bool, device=ids.device)
    position = mask.long().cumsum(-1) - 1
    out = model(**inputs, use_cache=True, position_ids=position.clamp_min(0))
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1].argmax(-1, keepdim=True).masked_fill(finished, 0)
        finished |= nxt == 2
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        position = position[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, use_cache=True, position_ids=position,
                    **{_cache_argument(model): _cache_of(out)})
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


@pytest.mark.parametrize("key", ["vanilla", *RUNNABLE])
def test_generate_equals_manual_prefill_and_decode(model, images, prompts, key):
    inputs = batch_inputs(prompts, images, "left")
    steps = 5
    handle = ficoco.attach(model, build(key)) if key != "vanilla" else None
    try:
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            prepared = handle.prepare_inputs(**inputs) if handle else inputs
            tokens, step_logits = _manual_greedy(model, prepared, steps)
    finally:
        if handle:
            handle.remove()
    # the caller's prompt comes back in front of the new tokens, as without reduction
    assert torch.equal(gen.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, -steps:], tokens)


@pytest.mark.parametrize("key", ["vanilla", *RUNNABLE])
def test_static_cache_generates_the_same_tokens_or_refuses_clearly(model, images, prompts, key):
    """Encoder-side methods only shorten the LLM's input, so a static KV cache works and gives the
    dynamic cache's tokens; decoder-side ones keep a different length per layer and refuse."""
    inputs = batch_inputs(prompts, images, "left")
    method = build(key) if key != "vanilla" else None
    handle = ficoco.attach(model, method) if method is not None else None
    try:
        with torch.inference_mode():
            dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
            if method is not None and method.language is not None:
                with pytest.raises(ValueError, match="needs a dynamic KV cache.*StaticCache"):
                    model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                   cache_implementation="static")
                return
            static = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                    cache_implementation="static")
    finally:
        if handle:
            handle.remove()
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize(
    "key, schedule",
    [("ficoco-v", {12: 100, 15: 1, 22: 275}), ("tome", {0: 200, 5: 100, 20: 76}), ("evit", {12: 300, 13: 75}),
     ("ficoco-l", {2: 300, 3: 0, 6: 76}), ("fastv", {1: 376})],
)
def test_exact_token_counts_per_schedule(model, images, prompts, key, schedule):
    method = build(key, retain=None, schedule=schedule)
    inputs = batch_inputs(prompts[:2], images[:2])
    with ficoco.apply(model, method) as handle, torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    clean = {k: v for k, v in schedule.items() if v}
    removed = sum(clean.values())

    def layer_outputs(num_layers, start):  # tokens leaving each layer
        return [n - clean.get(i, 0) for i, n in enumerate(tokens_entering_layers(clean, num_layers, start))]

    if method.vision is not None:
        assert handle.plan.vision == clean
        with ficoco.apply(model, method), torch.inference_mode():
            tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        lengths = [h.shape[1] for h in tower.hidden_states[1:]]
        assert lengths == layer_outputs(24, PATCHES + 1)
        assert handle.vision_trace.positions.shape == (2, PATCHES - removed)
        assert out.logits.shape[1] == inputs["input_ids"].shape[1] - removed
        assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 2 * PATCHES  # caller's inputs untouched
    else:
        assert handle.plan.language == clean
        text = inputs["input_ids"].shape[1] - PATCHES
        lengths = [h.shape[1] for h in out.hidden_states[1:]]
        assert lengths == [n + text for n in layer_outputs(8, PATCHES)]
        assert handle.kept_index.shape == (2, PATCHES - removed + text)


@pytest.mark.parametrize("key", ["ficoco-v", "ficoco-v-prop", "tome", "evit", "random"])
def test_raster_order_and_cls_preserved(model, images, key):
    tower = model.model.vision_tower
    with torch.inference_mode():
        vanilla = tower(images[:2], output_hidden_states=True).hidden_states
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        reduced = tower(images[:2], output_hidden_states=True).hidden_states
        positions = handle.vision_trace.positions
    first = min(handle.plan.vision)
    # the [CLS] row leaving the first reducing layer is untouched by the reduction
    torch.testing.assert_close(reduced[first + 1][:, 0], vanilla[first + 1][:, 0], rtol=1e-5, atol=1e-5)
    for row in positions.tolist():
        fused = [p for p in row if p == -1]
        on_grid = row[: len(row) - len(fused)]
        assert on_grid == sorted(set(on_grid)), "kept tokens must stay in raster order"
        assert row[len(on_grid):] == fused, "fused tokens (EViT) come after every grid token"
        assert (key == "evit") == bool(fused)
    assert positions.shape[1] == 100
    sizes = handle.vision_trace.sizes
    if key != "random":  # merging methods conserve the total number of patches
        torch.testing.assert_close(sizes.sum(1), torch.full((2,), float(PATCHES)))


@pytest.mark.parametrize("key", [k for k in ("prumerge", "prumerge+", "prumerge-adaptive", "prumerge+-adaptive")
                                 if k in RUNNABLE])
def test_prumerge_counts_order_and_extra_token(model, images, prompts, key):
    """PruMerge hands the LLM exactly ``retain`` tokens per image with a budget, or each image its
    own outlier count without one (here three different counts in one batch): kept tokens in raster
    order, then the extra token, which stands for every discarded patch."""
    inputs = batch_inputs(prompts, images, "right")
    with ficoco.apply(model, build(key)) as handle:
        out = logits(model, inputs)
        trace = handle.vision_trace
        prepared = handle.prepare_inputs(**inputs)
    adaptive = key.endswith("-adaptive")
    counts = trace.counts.tolist() if adaptive else [100] * 3
    assert (trace.counts is None) != adaptive
    assert len(set(counts)) == (3 if adaptive else 1)
    assert trace.positions.shape == (3, max(counts))
    for row, count in enumerate(counts):
        positions = trace.positions[row, :count].tolist()
        assert positions[:-1] == sorted(set(positions[:-1])) and min(positions[:-1]) >= 0 and positions[-1] == -1
        assert trace.sizes[row, :count].sum() == PATCHES and not trace.sizes[row, count:].any()
    lengths = inputs["attention_mask"].sum(1) - PATCHES + torch.tensor(counts)
    assert prepared["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert out.shape[1] == inputs["input_ids"].shape[1] - PATCHES + max(counts)
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 3 * PATCHES  # caller's inputs untouched
    if adaptive:
        with pytest.raises(ValueError, match="decides each image's count"):
            handle.visual_tokens_per_image


def test_decoder_loss_uses_kept_positions(model, images, prompts):
    inputs = batch_inputs(prompts[:2], images[:2])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    with ficoco.apply(model, build("fastv")) as handle, torch.inference_mode():
        out = model(**inputs, labels=labels)
        kept_labels = labels.gather(1, handle.kept_index)
    shift_logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(shift_logits, kept_labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_text_only_prompt_passes_through(model):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.inference_mode():
        vanilla = model(input_ids=ids).logits
    for key in ("ficoco-v", "ficoco-l"):
        with ficoco.apply(model, build(key)), torch.inference_mode():
            torch.testing.assert_close(model(input_ids=ids).logits, vanilla, rtol=0, atol=0)


# -- errors -------------------------------------------------------------------------------------


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'nope'.*ficoco-v"):
        ficoco.get_method("nope")


@pytest.mark.parametrize("retain", [0, -3])
def test_non_positive_retain(retain):
    with pytest.raises(ValueError, match="retain must be a positive"):
        ficoco.get_method("ficoco-v", retain=retain)


@pytest.mark.parametrize("key", ["ficoco-v", "ficoco-l", "fastv"])
def test_retain_above_available(model, key):
    with pytest.raises(ValueError, match="exceeds the 576 visual tokens"):
        ficoco.attach(model, build(key, retain=PATCHES + 1))


def test_tome_half_limit(model):
    with pytest.raises(ValueError, match="at most half"):
        ficoco.attach(model, build("tome", retain=10, start_layer=22))


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=50))
    with pytest.raises(TypeError, match="ficoco supports LLaVA-1.5 .*Qwen2-VL.*; got LlamaForCausalLM"):
        ficoco.attach(llm, "ficoco-v")


def test_patch_grid_follows_the_patch_convolution():
    """An image size that is not a multiple of the patch gives the floor grid, as the patch
    convolution does (SigLIP-384/14: 27 x 27); a rectangular image size is refused in one line."""
    from transformers import LlavaForConditionalGeneration

    from ficoco.testing import tiny_llava_config

    model = LlavaForConditionalGeneration(tiny_llava_config(vision_layers=14))
    model.config.vision_config.image_size = 340  # 340 / 14 = 24.3: 24 x 24 patches
    with ficoco.apply(model, "ficoco-v") as handle:
        assert tuple(handle.grid) == (24, 24)
    model.config.vision_config.image_size = (336, 280)
    with pytest.raises(ValueError, match="non-square patch grid: image size \\(336, 280\\) with patch 14"):
        ficoco.attach(model, "ficoco-v")


def test_resized_image_rejected(model, prompts):
    from .conftest import batch_inputs as make

    with ficoco.apply(model, build("ficoco-v")):
        small = make([prompts[0]], torch.randn(1, 3, 336, 336))
        small["pixel_values"] = torch.randn(1, 3, 336, 336)
        small["input_ids"] = small["input_ids"][:, :10]  # wrong placeholder count
        small["attention_mask"] = small["attention_mask"][:, :10]
        with pytest.raises(ValueError, match="image placeholders"):
            logits(model, small)


def test_instruction_reading_filter_refuses_an_image_ending_its_prompt(model, prompts, images):
    """CDPruner weighs each image's tokens by the text after it: a prompt that ends with its image
    gets one error naming that prompt, raised before the encoder runs."""
    from .conftest import batch_inputs as make
    from .conftest import make_prompt

    cut = make_prompt([5, 6], [])
    inputs = make([prompts[0], cut], images[:2], side="right")
    calls = []
    probe = model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    with ficoco.apply(model, build("cdpruner")):
        with pytest.raises(ValueError, match="the image in prompt 1 has no instruction text after it"):
            logits(model, inputs)
        assert not calls  # refused before the encoder ran
        probe.remove()
        out = logits(model, make([prompts[0], prompts[1]], images[:2]))  # the handle is still usable
        assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_double_attach_rejected(model):
    with ficoco.apply(model, "ficoco-v"):
        with pytest.raises(RuntimeError, match="already attached"):
            ficoco.attach(model, "fastv")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("key", ["fastv", "ficoco-l", "ficoco-vl", "random-llm"])
def test_samples_with_different_image_counts_batch_like_one_by_one(model, images, prompts, key, side):
    """One sample with one image, one with two: they remove different numbers of visual tokens per
    decoder layer; the batch stays rectangular through dead rows, masked out of attention and of
    the outputs, and each sample's logits equal running it alone."""
    from .conftest import make_prompt

    two = make_prompt([4], [5], images=2)
    inputs = batch_inputs([prompts[0], two], images[:3], side)
    with ficoco.apply(model, build(key)) as handle:
        batched = logits(model, inputs)
        valid = handle.kept_valid.clone()
        assert handle.kept_dead is not None and bool(handle.kept_dead.any())
        singles = [logits(model, batch_inputs([prompt], pixels, side))[0]
                   for prompt, pixels in ((prompts[0], images[:1]), (two, images[1:3]))]
    for row, single in enumerate(singles):
        torch.testing.assert_close(batched[row][valid[row]], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["fastv", "ficoco-l"])
def test_generation_with_dead_rows_equals_one_by_one(model, images, prompts, key):
    """Decoding after a prefill with dead rows: every step's logits as for each sample alone."""
    from .conftest import make_prompt

    two = make_prompt([4], [5], images=2)
    with ficoco.apply(model, build(key)), torch.inference_mode():
        options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                       pad_token_id=0)
        batched = model.generate(**batch_inputs([prompts[0], two], images[:3], "left"), **options)
        singles = [model.generate(**batch_inputs([prompt], pixels, "left"), **options)
                   for prompt, pixels in ((prompts[0], images[:1]), (two, images[1:3]))]
    for row, single in enumerate(singles):
        steps = len(single.logits)  # a sample alone stops at its end-of-sequence token
        torch.testing.assert_close(torch.stack(batched.logits[:steps], dim=1)[row], torch.stack(single.logits, dim=1)[0],
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def siglip_llava():
    """A tiny LLaVA whose vision tower has no [CLS] (SigLIP, 336 px / patch 14, all 576 tokens used)."""
    from transformers import LlavaForConditionalGeneration, SiglipVisionConfig

    from ficoco.testing import tiny_llava_config

    config = tiny_llava_config(vision_layers=14)
    config.vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=14,
                                              num_attention_heads=4, image_size=336, patch_size=14)
    config.vision_feature_select_strategy = "full"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def test_encoder_without_cls_uses_the_stand_ins(siglip_llava, images, prompts):
    """Without [CLS], FiCoCo-V's [CLS] term becomes the mean-key stand-in (docs/spec.md §6) and
    EViT ranks and weights by attention received: the same as asking for them explicitly."""
    explicit = ficoco.get_method("ficoco-v", retain=100, semantic_term="key_proxy", start_layer=6)
    with ficoco.apply(siglip_llava, "ficoco-v", retain=100, start_layer=6) as handle:
        assert handle.method == explicit
        default = logits(siglip_llava, batch_inputs(prompts, images))
    with ficoco.apply(siglip_llava, explicit) as handle:
        batched = logits(siglip_llava, batch_inputs(prompts, images))
        positions = handle.vision_trace.positions
        single = logits(siglip_llava, batch_inputs(prompts[:1], images[:1]))[0]
    torch.testing.assert_close(default, batched, rtol=0, atol=0)
    assert handle.plan.vision and max(handle.plan.vision) == 12  # features from layer -2 of 14
    assert positions.shape == (3, 100) and bool((positions[:, 1:] > positions[:, :-1]).all())
    torch.testing.assert_close(batched[0, -single.shape[0]:], single, rtol=1e-4, atol=1e-4)
    with ficoco.apply(siglip_llava, "evit", retain=100) as handle:
        reduction = handle.method.vision.reduction
        assert reduction.filter.importance == "received" and reduction.correlate.weights == "received"
        assert logits(siglip_llava, batch_inputs(prompts[:1], images[:1])).isfinite().all()


def test_readme_stage_swap_composition(model, images, prompts):
    """The README's example: FiCoCo-V's filter with ToMe's correlate and compression."""
    from ficoco import Method, TokenReduction, VisionReduction
    from ficoco.stages import ArgmaxSimilarityCorrelate, FiCoCoVisionFilter, SizeWeightedCompress

    hybrid = Method("ficoco-filter+tome-merge", vision=VisionReduction(
        TokenReduction(FiCoCoVisionFilter(), ArgmaxSimilarityCorrelate(), SizeWeightedCompress()), retain=128,
        start_layer=12))
    with ficoco.apply(model, hybrid, record=True) as handle:
        out = logits(model, batch_inputs(prompts[:2], images[:2]))
        steps = handle.vision_trace.steps
    assert out.shape[1] == batch_inputs(prompts[:2], images[:2])["input_ids"].shape[1] - (PATCHES - 128)
    assert [layer for layer, _ in steps] == list(range(12, 23))
    assert all(result.correlation.weights.sum(-1).eq(1).all() for _, result in steps)  # K = 1 per source


@pytest.mark.parametrize("key", ["ficoco-v", "ficoco-l"])
def test_fixed_k_ablation_inside_the_model(model, images, prompts, key):
    """The paper's fixed-K ablation (docs/spec.md §10): K = 3 sends every discarded token to exactly three
    kept tokens (the token-adaptive quantile picks one or two here); K = 0 drops them, the same as
    the filter followed by plain dropping."""
    inputs = batch_inputs(prompts[:2], images[:2])
    with ficoco.apply(model, build(key, fixed_k=3), record=True) as handle:
        logits(model, inputs)
        steps = handle.vision_trace.steps if key == "ficoco-v" else handle.language_steps
    assert steps and all(((r.correlation.weights > 0).sum(-1) == 3).all() for _, r in steps)
    dropped = build(key, fixed_k=0)
    side = "vision" if key == "ficoco-v" else "language"
    reduction = getattr(dropped, side)
    hand_made = ficoco.TokenReduction(reduction.reduction.filter, ficoco.stages.NoCorrelate(),
                                      ficoco.stages.DropCompress())
    by_hand = ficoco.Method("by hand", **{side: dataclasses.replace(reduction, reduction=hand_made)})
    with ficoco.apply(model, dropped):
        out = logits(model, inputs)
    with ficoco.apply(model, by_hand):
        torch.testing.assert_close(logits(model, inputs), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fixed_k must be None"):
        build(key, fixed_k=-1)


def test_record_language_steps(model, images, prompts):
    with ficoco.apply(model, build("ficoco-l"), record=True) as handle:
        logits(model, batch_inputs(prompts[:2], images[:2]))
        steps = handle.language_steps
    assert [layer for layer, _ in steps] == sorted(handle.plan.language)
    assert sum(r.sources.shape[1] for _, r in steps) == PATCHES - 100


def test_graphed_tower_runs_cpu_inputs_eagerly_and_detaches(model, images, prompts):
    """Graph capture needs CUDA; CPU inputs (and autograd) take the ordinary forward."""
    inputs = batch_inputs(prompts[:1], images[:1])
    expected = logits(model, inputs)
    with ficoco.graph_vision_tower(model) as graphed:
        assert "forward" in model.model.vision_tower.__dict__
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        assert not graphed.captured
        with pytest.raises(RuntimeError, match="already replaced"):
            ficoco.graph_vision_tower(model)
    assert "forward" not in model.model.vision_tower.__dict__


def test_graphed_language_steps_run_cpu_inputs_eagerly_and_detach(model, images, prompts):
    """Graph capture needs CUDA; on CPU inputs the graphed steps run the same eager step."""
    inputs = batch_inputs(prompts[:2], images[:2])
    with ficoco.apply(model, build("ficoco-l")) as handle:
        expected = logits(model, inputs)
        with ficoco.graph_language_steps(handle) as graphed:
            assert handle.language.step_graphs is graphed.calls
            torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
            assert not graphed.captured
            with pytest.raises(RuntimeError, match="already graphed"):
                ficoco.graph_language_steps(handle)
        assert handle.language.step_graphs is None
    with ficoco.apply(model, build("ficoco-v")) as handle:
        with pytest.raises(ValueError, match="does not reduce inside the LLM decoder"):
            ficoco.graph_language_steps(handle)


@pytest.mark.skipif(takes_encoded(), reason="this transformers' LLaVA takes mm_encoder_outputs")
@pytest.mark.parametrize("key", ["prumerge-adaptive", "prumerge+-adaptive"])
def test_adaptive_prumerge_refused_without_encoded_inputs(model, key):
    before = hook_count(model)
    with pytest.raises(ValueError, match="mm_encoder_outputs; give retain="):
        ficoco.attach(model, build(key))
    assert hook_count(model) == before and not hasattr(model, "_ficoco_handle")
