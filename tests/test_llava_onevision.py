"""Every method inside a real (tiny) LLaVA-OneVision with LLaVA-OneVision-7B's geometry (SigLIP-384/14
crops of 729 patches and no [CLS], features from layer -1 with the ``full`` strategy, its 36 grid
pinpoints, ``anyres_max_9``), saved and loaded as a checkpoint: LLaVA-NeXT's matrix (reduction off
== vanilla, detach restores, batched == one by one with mixed image sizes and padding on both sides,
eager == SDPA, generate() == manual prefill + cached decoding, exact token counts, clear refusals;
its helpers are imported from tests/test_llava_next.py) plus what is OneVision's own: the layout
against transformers' processor arithmetic and the model's packing (the ``anyres_max_9`` resize
included), and the refusals of videos and multi-image samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ficoco
from ficoco.adapters.anyres import onevision_layout
from ficoco.testing import (
    LLAVA_ONEVISION_PINPOINTS,
    tiny_llava_onevision,
    tiny_llava_onevision_image_processor,
    tiny_llava_processor,
)
from tests.test_llava_next import METHODS as NEXT_METHODS
from tests.test_llava_next import REFUSED, _manual_greedy, _valid_rows, batch, hook_count, image, logits, output_mask

pytestmark = pytest.mark.xdist_group("llava-onevision")

IMAGE_TOKEN = 95
CROP_PATCHES = 729
# per crop, as on LLaVA-NeXT;
# pooling takes a 27 x 27 crop to 9 x 9; PruMerge scores with the layer after the feature layer by
# default, and OneVision's feature layer is the tower's last (the default's refusal is tested)
# ToMe merges at most half the tokens per layer: its default layers take a 729-patch crop to 400
METHODS = {**NEXT_METHODS, "pool": dict(retain=81), "tome": dict(retain=400),
           "prumerge": dict(retain=100, score_with_next_layer=False),
           "prumerge+": dict(retain=100, score_with_next_layer=False)}
BEFORE_LLM = ("ficoco-v", "tome", "evit", "random", "topk", "visionzip", "prumerge", "prumerge+", "pool", "divprune",
              "cdpruner", "zero", "ficoco-v-share", "ficoco-vl")
CAN_KEEP_ALL = [key for key in METHODS if key != "zero"]
# (height, width): 1x1 tile (rows unpadded: 2 crops, 925 tokens), 2x1 tiles (columns unpadded: 3 crops, 1,269)
SIZES = [(100, 384), (640, 100)]
# the tower's depth is cut to 16 layers (OneVision keeps 26; FiCoCo-V starts at layer 12) to keep the
# matrix fast on CPU
VISION_LAYERS = 16
# 4x3 tiles, 108 x 81 patches > 1.1² x 9 crops: resized to 93 x 70 by anyres_max_9 (7,332 tokens)
SCALED = (1536, 1152)


def build(key: str, **overrides) -> ficoco.Method:
    name = key.removesuffix("-llm").removesuffix("-share").removesuffix("-adaptive")
    options = {**(METHODS[key] if key in METHODS else REFUSED[key]["options"]), **overrides}
    return ficoco.get_method(name, **options)


def layout_of(size):
    return onevision_layout(tuple(size), LLAVA_ONEVISION_PINPOINTS, 384, 14, 9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava-onevision")
    tiny_llava_onevision(seed=0, vision_layers=VISION_LAYERS).save_pretrained(path)
    return path


def _load(path, attn):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation=attn,
                                                                  dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(checkpoint):
    return _load(checkpoint, "sdpa")


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return _load(checkpoint, "eager")


@pytest.fixture(scope="module")
def processors():
    return tiny_llava_onevision_image_processor(), tiny_llava_processor()


def placeholders(size) -> int:
    """Image tokens of one image as transformers' ``LlavaOnevisionProcessor`` counts them (its
    arithmetic called on a bare instance: building the processor needs torchvision)."""
    from transformers import LlavaOnevisionProcessor

    counter = object.__new__(LlavaOnevisionProcessor)
    counter.image_processor = tiny_llava_onevision_image_processor()
    counter.num_image_tokens, counter.vision_aspect_ratio = CROP_PATCHES, "anyres_max_9"
    return counter._get_number_of_features(*size, 384, 384)


def encode(processors, sizes, question: str, seed: int = 0) -> dict:
    """One sample: its image, then the question, in the chat template, ``<image>`` expanded to the
    processor's count. A little pixel noise breaks the ties of a thin image's padded crops."""
    images, words = processors
    parts = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": question}]
    text = words.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    for size in sizes:
        text = text.replace("<image>", "<IMG>" * placeholders(size), 1)
    ids = words.tokenizer(text.replace("<IMG>", "<image>"), return_tensors="pt")["input_ids"]
    out = dict(images(images=[image(size, seed + i) for i, size in enumerate(sizes)], return_tensors="pt"))
    out.pop("batch_num_images")
    noise = torch.randn(out["pixel_values"].shape, generator=torch.Generator().manual_seed(seed))
    out["pixel_values"] = out["pixel_values"] + 0.05 * noise
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **out}


@pytest.fixture(scope="module")
def samples(processors):
    return [encode(processors, [SIZES[0]], "what is the color of the shape ?", seed=1),
            encode(processors, [SIZES[1]], "how many ?", seed=2)]


@pytest.fixture(scope="module")
def vanilla_logits(model, samples):
    return logits(model, batch(samples))


# -- the layout ----------------------------------------------------------------------------------


def test_every_registered_method_runs_or_is_refused():
    names = {key.removesuffix("-llm").removesuffix("-share").removesuffix("-adaptive") for key in [*METHODS, *REFUSED]}
    assert names == set(ficoco.methods.available_methods())


@pytest.mark.parametrize("size", [*SIZES, SCALED])
def test_layout_matches_processor_and_model_packing(model, processors, size):
    layout = layout_of(size)
    pixels = processors[0](images=[image(size, 0)], return_tensors="pt")
    assert pixels["pixel_values"].shape[1] == layout.crops
    assert placeholders(size) == layout.full_tokens
    with torch.inference_mode():
        packed = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"]).pooler_output[0]
    assert packed.shape[0] == layout.full_tokens
    assert torch.equal((packed == model.model.image_newline).all(dim=-1), layout.newlines())
    assert layout.patch_positions().unique().numel() == layout.patch_tokens
    expected = {SIZES[0]: (1, 1, 7, 27), SIZES[1]: (2, 1, 54, 9), SCALED: (4, 3, 93, 70)}[size]
    assert (layout.tile_rows, layout.tile_cols, layout.out_rows, layout.out_cols) == expected
    assert layout.scaled == (size == SCALED)


# -- the matrix ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CAN_KEEP_ALL)
def test_reduction_disabled_is_vanilla(model, samples, vanilla_logits, key):
    retain = 1.0 if key.endswith("-share") else CROP_PATCHES
    with ficoco.apply(model, build(key, retain=retain)):
        out = logits(model, batch(samples))
    torch.testing.assert_close(out, vanilla_logits, rtol=0, atol=0)


@pytest.mark.parametrize("key", list(METHODS))
def test_detach_restores_model(model, samples, vanilla_logits, key):
    before = hook_count(model)
    with ficoco.apply(model, build(key)) as handle:
        assert handle.family == "llava-onevision"
        reduced = logits(model, batch(samples))
        assert hook_count(model) > before
    assert reduced.shape[1] < vanilla_logits.shape[1]
    assert hook_count(model) == before and "generate" not in model.__dict__
    assert not {"get_image_features", "pack_image_features"} & set(model.model.__dict__)
    torch.testing.assert_close(logits(model, batch(samples)), vanilla_logits, rtol=0, atol=0)


@pytest.mark.parametrize("key", list(METHODS))
def test_batched_equals_one_by_one(model, samples, key):
    with ficoco.apply(model, build(key)):
        singles = [logits(model, batch([sample]))[0] for sample in samples]
        for side in ("left", "right"):
            batched = logits(model, batch(samples, side))
            for row, single in enumerate(singles):
                torch.testing.assert_close(_valid_rows(batched[row], single.shape[0], side), single, rtol=1e-4,
                                           atol=1e-4)


@pytest.mark.parametrize("key", list(METHODS))
def test_eager_equals_sdpa(model, eager_model, samples, key):
    inputs = batch(samples)
    with ficoco.apply(model, build(key)) as handle:
        sdpa = logits(model, inputs)
        real = output_mask(handle, inputs)
    with ficoco.apply(eager_model, build(key)):
        eager = logits(eager_model, inputs)
    torch.testing.assert_close(sdpa[real], eager[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["vanilla", *METHODS])
def test_generate_equals_manual_prefill_and_decode(model, samples, key):
    inputs = batch(samples, "left")
    steps = 3
    handle = ficoco.attach(model, build(key)) if key != "vanilla" else None
    try:
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            prepared = handle.prepare_inputs(**inputs) if handle else inputs
            tokens, step_logits = _manual_greedy(model, prepared, steps)
    finally:
        if handle:
            handle.remove()
    assert torch.equal(gen.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, -steps:], tokens)


def _kept_visual(handle, inputs, prepared, key):
    ids = (prepared if key in BEFORE_LLM else inputs)["input_ids"]
    return ((ids.gather(1, handle.kept_index) == IMAGE_TOKEN) & handle.kept_valid).sum(1).tolist()


@pytest.mark.parametrize("key", list(METHODS))
def test_exact_token_counts(model, samples, key):
    """Before the LLM: crops x k placeholders per image, exactly; inside it: min(crops x k, its
    patches) of each image's patch tokens, and every newline token."""
    inputs = batch(samples, "right")
    layouts = [layout_of(s) for s in inputs["image_sizes"].tolist()]
    method = build(key)
    with ficoco.apply(model, method) as handle, torch.inference_mode():
        out = model(**inputs)
        prepared = handle.prepare_inputs(**inputs)
    per_crop = handle.plan.llm_input_visual
    if key in BEFORE_LLM:
        if key != "ficoco-vl":
            assert per_crop == {"zero": 0, "pool": 81, "tome": 400,
                                "ficoco-v-share": round(0.25 * CROP_PATCHES)}.get(key, 100)
        shown = (prepared["input_ids"] == IMAGE_TOKEN) & prepared["attention_mask"].bool()
        assert shown.sum(1).tolist() == [x.crops * per_crop for x in layouts]
        if method.language is None:
            assert out.logits.shape[1] == prepared["input_ids"].shape[1]
    if method.language is None:
        assert handle.kept_index is None
        return
    expected = [handle.kept_tokens(tuple(s)) for s in inputs["image_sizes"].tolist()]
    if key in BEFORE_LLM:
        assert expected == [x.crops * handle.plan.llm_final_visual for x in layouts]
    else:  # (SparseVLM's own stage counts leave fewer than its budget: docs/methods.md)
        assert key == "sparsevlm" or expected == [min(x.patch_tokens, x.crops * 100) for x in layouts]
        expected = [e + x.out_rows for e, x in zip(expected, layouts)]  # every newline token stays
    assert _kept_visual(handle, inputs, prepared, key) == expected


@pytest.mark.parametrize("key", ["fastv", "ficoco-v"])
def test_resized_image_budget_and_newlines(model, processors, key):
    """An image that anyres_max_9 resizes (13 crops): k per crop before the LLM; inside it the
    resized tokens are the candidates and its 93 newline tokens stay."""
    sample = encode(processors, [SCALED], "what ?", seed=4)
    layout = layout_of(SCALED)
    with ficoco.apply(model, build(key, retain=16)) as handle, torch.inference_mode():
        out = model(**sample)
        prepared = handle.prepare_inputs(**sample)
        assert handle.prompt_tokens(SCALED) == (13 * 16 if key == "ficoco-v" else layout.full_tokens)
        if key == "ficoco-v":
            assert out.logits.shape[1] == prepared["input_ids"].shape[1]
            assert int((prepared["input_ids"] == IMAGE_TOKEN).sum()) == 13 * 16
            return
        assert _kept_visual(handle, sample, prepared, key) == [13 * 16 + 93]
        columns = (sample["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()
        assert set(columns[layout.newlines()].tolist()) <= set(handle.kept_index[0].tolist())


# -- refusals and the family ----------------------------------------------------------------------


@pytest.mark.parametrize("key", list(REFUSED))
def test_refused_methods_say_why_in_one_line(model, key):
    before = hook_count(model)
    with pytest.raises(ValueError, match=REFUSED[key]["match"]) as err:
        ficoco.attach(model, build(key))
    assert "\n" not in str(err.value) and "LLaVA-OneVision" in str(err.value)
    assert hook_count(model) == before


@pytest.mark.parametrize("key", ["ficoco-v", "fastv"])
def test_videos_and_multi_image_samples_are_refused(model, samples, key):
    inputs = batch(samples[:1])
    with ficoco.apply(model, build(key)):
        videos = {**inputs, "pixel_values_videos": torch.zeros(1, 2, 3, 384, 384)}
        with pytest.raises(ValueError, match="takes images only; videos") as err:
            logits(model, videos)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=r"one image per sample; batch_num_images=\[2\]"):
            logits(model, {**inputs, "batch_num_images": torch.tensor([2])})
        with pytest.raises(ValueError, match="takes images only; videos"):
            model.generate(**videos, max_new_tokens=1)


def test_prumerge_scoring_with_the_layer_after_the_last_is_refused(model):
    before = hook_count(model)
    with pytest.raises(ValueError, match="scores with the encoder layer after layer 15, which is the last one here"):
        ficoco.attach(model, "prumerge", retain=100)
    assert hook_count(model) == before


def test_default_strategy_and_unknown_aspect_ratio_are_refused(checkpoint):
    model = _load(checkpoint, "sdpa")
    before = hook_count(model)
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="drops the first of each crop's patches .*use 'full'"):
        ficoco.attach(model, "ficoco-v")
    model.config.vision_feature_select_strategy = "full"
    model.config.vision_aspect_ratio = "anyres"
    with pytest.raises(ValueError, match="vision_aspect_ratio='anyres' is not 'anyres_max_N'"):
        ficoco.attach(model, "ficoco-v")
    assert hook_count(model) == before


def test_family_from_model_and_checkpoint(model, checkpoint):
    from ficoco.adapters.families import family_of
    from ficoco.checkpoint import check_supported, checkpoint_config

    assert family_of(model).name == "LLaVA-OneVision" == check_supported(checkpoint_config(checkpoint),
                                                                          checkpoint).name
    with ficoco.apply(model.model, "ficoco-v", retain=64) as handle:  # the bare LlavaOnevisionModel too
        assert handle.family == "llava-onevision" and handle.visual_tokens_per_crop == 64
        assert [handle.prompt_tokens(size) for size in (*SIZES, SCALED)] == [128, 192, 13 * 64]
