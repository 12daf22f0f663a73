"""Every method inside a real (tiny) LLaVA-OneVision with LLaVA-OneVision-7B's geometry (SigLIP-384/14
crops of 729 patches and no [CLS], features from the tower's last layer with the ``full`` strategy,
its 36 grid pinpoints, ``anyres_max_9``, videos pooled to 14 x 14 per frame, a Qwen2 decoder), saved
and loaded as a checkpoint.

The matrix runs once per method (one test, so that each forward serves several checks): reduction
off == vanilla (exactly), detach restores the model, batched == one by one (mixed image sizes,
padding on both sides), eager == SDPA, generate() == manual prefill + cached decoding, exact token
counts. Videos and image + video batches and samples run the same matrix for the decoder-side
methods; methods reducing before the LLM are refused for videos. OneVision's own: the layout
against transformers' processor arithmetic and the model's packing (the ``anyres_max_9`` resize
included), the frames' pooled grid, and the refusals."""

from __future__ import annotations

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
from tests.anyres_matrix import kept, matrix
from tests.test_llava_next import METHODS as NEXT_METHODS
from tests.test_llava_next import (
    REFUSED,
    _manual_greedy,
    hook_count,
    image,
    logits,
)

pytestmark = pytest.mark.xdist_group("llava-onevision")

IMAGE_TOKEN, VIDEO_TOKEN = 95, 94
CROP_PATCHES = 729
FRAME_TOKENS = 196  # a frame's 27 x 27 patches pooled to 14 x 14
# the tower's depth is cut to 8 layers (OneVision keeps 26 of SigLIP's 27) to keep the matrix fast on
# CPU, so the methods that start at encoder layer 12 by default start at layer 4
VISION_LAYERS, VISION_START = 8, 4
# per crop (per frame for videos), as on LLaVA-NeXT; pooling takes a 27 x 27 crop to 9 x 9; ToMe
# merges at most half the tokens per layer; PruMerge scores with the layer after the feature layer
# by default, and OneVision's feature layer is the tower's last (the default's refusal is tested)
METHODS = {**NEXT_METHODS, "pool": dict(retain=81), "tome": dict(retain=400, start_layer=VISION_START),
           "evit": dict(retain=100, start_layer=VISION_START),
           "ficoco-v": dict(retain=100, start_layer=VISION_START),
           "ficoco-v-share": dict(retain=0.25, start_layer=VISION_START),
           "ficoco-vl": dict(retain=64, language_start_layer=2, vision_start_layer=VISION_START),
           "prumerge": dict(retain=100, score_with_next_layer=False),
           "prumerge+": dict(retain=100, score_with_next_layer=False)}
BEFORE_LLM = ("ficoco-v", "tome", "evit", "random", "topk", "visionzip", "prumerge", "prumerge+", "pool", "divprune",
              "cdpruner", "zero", "ficoco-v-share", "ficoco-vl")
DECODER = [key for key in METHODS if key not in BEFORE_LLM]
CAN_KEEP_ALL = [key for key in METHODS if key != "zero"]
# (height, width): 1x1 tile (rows unpadded: 2 crops, 925 tokens), 2x1 tiles (columns unpadded: 3 crops, 1,269)
SIZES = [(100, 384), (640, 100)]
# 4x3 tiles, 108 x 81 patches > 1.1² x 9 crops: resized to 93 x 70 by anyres_max_9 (7,332 tokens)
SCALED = (1536, 1152)
FRAMES = 2
# pixel noise on the crops: a thin image's tiles are mostly the processor's constant padding, whose
# near-identical patches leave near-ties (ToMe's matching, CDPruner's greedy DPP) that kernel
# rounding (eager against SDPA, a batch against one sample) would break either way
PIXEL_NOISE = 0.2


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


def encode(processors, sizes, question: str, seed: int = 0, frames: int = 0) -> dict:
    """One sample: its images (``sizes``), then a video of ``frames`` frames if any, then the
    question, in the chat template; ``<image>`` expanded to the processor's count, the video to
    ``frames x 196`` placeholders and its newline token (the processor's ``num_video_tokens``
    arithmetic). Crops get PIXEL_NOISE."""
    images, words = processors
    parts = [{"type": "image"}] * (len(sizes) + bool(frames)) + [{"type": "text", "text": question}]
    text = words.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    for size in sizes:
        text = text.replace("<image>", "<IMG>" * placeholders(size), 1)
    ids = words.tokenizer(text.replace("<IMG>", "<image>"), return_tensors="pt")["input_ids"][0].tolist()
    out: dict = {}
    if frames:  # the video's part is the last ``<image>``, not expanded: its run of placeholders goes there
        at = len(ids) - 1 - ids[::-1].index(IMAGE_TOKEN)
        ids[at:at + 1] = [VIDEO_TOKEN] * (frames * FRAME_TOKENS + 1)
        out["pixel_values_videos"] = torch.randn(1, frames, 3, 384, 384, generator=torch.Generator().manual_seed(seed))
    if sizes:
        out.update(images(images=[image(size, seed + i) for i, size in enumerate(sizes)], return_tensors="pt"))
        out.pop("batch_num_images")
        noise = torch.randn(out["pixel_values"].shape, generator=torch.Generator().manual_seed(seed))
        out["pixel_values"] = out["pixel_values"] + PIXEL_NOISE * noise
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **out}


def batch(samples: list[dict], side: str = "left") -> dict:
    """Samples padded on ``side`` (id 0); their images' crops padded to the most crops, their videos
    stacked (every sample without images or videos adds none)."""
    length = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        span = slice(length - n, length) if side == "left" else slice(0, n)
        ids[row, span], mask[row, span] = sample["input_ids"][0], 1
    out = {"input_ids": ids, "attention_mask": mask}
    pictures = [s for s in samples if "pixel_values" in s]
    if pictures:
        crops = max(s["pixel_values"].shape[1] for s in pictures)
        pad = [(0,) * 6 + (0, crops - s["pixel_values"].shape[1]) for s in pictures]
        out["pixel_values"] = torch.cat([torch.nn.functional.pad(s["pixel_values"], p) for s, p in zip(pictures, pad)])
        out["image_sizes"] = torch.cat([s["image_sizes"] for s in pictures])
    videos = [s["pixel_values_videos"] for s in samples if "pixel_values_videos" in s]
    if videos:
        out["pixel_values_videos"] = torch.cat(videos)
    return out


@pytest.fixture(scope="module")
def samples(processors):
    """Two images of different sizes with questions of different lengths (925 and 1,269 image tokens)."""
    return [encode(processors, [SIZES[0]], "what is the color of the shape ?", seed=1),
            encode(processors, [SIZES[1]], "how many ?", seed=2)]


@pytest.fixture(scope="module")
def video_samples(processors):
    """A video alone, and an image and a video in one sample."""
    return [encode(processors, [], "what is the color of the shape ?", seed=3, frames=FRAMES),
            encode(processors, [SIZES[0]], "how many ?", seed=5, frames=FRAMES)]


@pytest.fixture(scope="module")
def vanilla(model, samples, video_samples):
    """Vanilla logits of each batch padded on the right, and of its first sample alone."""
    return {"images": logits(model, batch(samples, "right")), "videos": logits(model, batch(video_samples, "right")),
            "images0": logits(model, batch(samples[:1])), "videos0": logits(model, batch(video_samples[:1]))}


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


def test_video_placeholders_match_the_model(model, video_samples):
    """A video of F frames: F x 196 pooled tokens and one newline token, as the model scatters them
    (its own forward accepts the prompt), the newline being ``image_newline`` itself."""
    with ficoco.apply(model, "fastv", retain=100) as handle:
        assert handle.frame_grid == (14, 14) and handle.video_tokens(FRAMES) == FRAMES * FRAME_TOKENS + 1
        sample = video_samples[0]
        assert int((sample["input_ids"] == VIDEO_TOKEN).sum()) == handle.video_tokens(FRAMES)
    with torch.inference_mode():
        model(**sample)  # transformers checks the placeholders against the features
        model.model.language_model.register_forward_pre_hook(_grab, with_kwargs=True)
        try:
            model(**sample)
        finally:
            model.model.language_model._forward_pre_hooks.clear()
    run = (sample["input_ids"][0] == VIDEO_TOKEN).nonzero().flatten()
    embeds = _grab.last[0, run]
    assert torch.equal(embeds[-1], model.model.image_newline.detach())
    assert not (embeds[:-1] == model.model.image_newline).all(dim=-1).any()


def _grab(module, args, kwargs):
    _grab.last = kwargs["inputs_embeds"]


def test_vanilla_eager_and_sdpa_agree(model, eager_model, samples, vanilla):
    """The premise of eager == SDPA below: the tiny tower's own gap is float32 rounding. (With
    SigLIP's query and key weights sharpened like the decoder's, near-argmax attention grew it to
    ~7e-3 over 16 layers: ficoco.testing.tiny_llava_onevision.)"""
    pixels = samples[0]["pixel_values"][0]
    with torch.inference_mode():
        tower = [m.model.vision_tower(pixels).last_hidden_state for m in (model, eager_model)]
        eager = logits(eager_model, batch(samples, "right"))
    assert (tower[0] - tower[1]).abs().max() < 1e-5
    real = batch(samples, "right")["attention_mask"].bool()
    torch.testing.assert_close(vanilla["images"][real], eager[real], rtol=1e-5, atol=1e-5)


# -- the matrix ------------------------------------------------------------------------------------


def _image_counts(key, method):
    """Before the LLM: crops x k placeholders per image, exactly; inside it: min(crops x k, its
    patches) of each image's patch tokens, and every newline token."""
    def check(handle, inputs, prepared, out):
        layouts = [layout_of(s) for s in inputs["image_sizes"].tolist()]
        per_crop = handle.plan.llm_input_visual
        if key in BEFORE_LLM:
            if key != "ficoco-vl":
                assert per_crop == {"zero": 0, "pool": 81, "tome": 400,
                                    "ficoco-v-share": round(0.25 * CROP_PATCHES)}.get(key, 100)
            shown = (prepared["input_ids"] == IMAGE_TOKEN) & prepared["attention_mask"].bool()
            assert shown.sum(1).tolist() == [x.crops * per_crop for x in layouts]
            if method.language is None:
                assert out.shape[1] == prepared["input_ids"].shape[1]
        if method.language is None:
            assert handle.kept_index is None
            return
        expected = [handle.kept_tokens(tuple(s)) for s in inputs["image_sizes"].tolist()]
        if key in BEFORE_LLM:
            assert expected == [x.crops * handle.plan.llm_final_visual for x in layouts]
        else:  # (SparseVLM's own stage counts leave fewer than its budget: docs/methods.md)
            assert key == "sparsevlm" or expected == [min(x.patch_tokens, x.crops * 100) for x in layouts]
            expected = [e + x.out_rows for e, x in zip(expected, layouts)]  # every newline token stays
        ids = (prepared if key in BEFORE_LLM else inputs)["input_ids"]
        assert kept(handle, ids, (IMAGE_TOKEN,)) == expected

    return check


def _video_counts(key):
    """Rows [video], [image, video]: a video keeps F x min(k, 196) of its pooled tokens, a sample of
    an image and a video the sum of both budgets (ranked together); every newline token stays."""
    def check(handle, inputs, prepared, out):
        video = handle.kept_video_tokens(FRAMES)
        assert key == "sparsevlm" or video == FRAMES * 100
        image = handle.kept_tokens(SIZES[0])
        newlines = layout_of(SIZES[0]).out_rows
        assert kept(handle, inputs["input_ids"], (IMAGE_TOKEN, VIDEO_TOKEN)) == [
            video + 1, image + newlines + video + 1]
        ids = inputs["input_ids"]
        for row in (0, 1):  # the video's newline token (its last placeholder) survives
            last = (ids[row] == VIDEO_TOKEN).nonzero().flatten()[-1]
            assert bool((handle.kept_index[row] == last).any())

    return check


@pytest.mark.parametrize("key", list(METHODS))
def test_matrix_images(model, eager_model, samples, vanilla, key):
    matrix(model, eager_model, samples, (vanilla["images"], vanilla["images0"]), build(key), _image_counts(key, build(key)),
           family="llava-onevision", batch=batch)


@pytest.mark.parametrize("key", DECODER)
def test_matrix_videos_and_images(model, eager_model, video_samples, vanilla, key):
    matrix(model, eager_model, video_samples, (vanilla["videos"], vanilla["videos0"]), build(key), _video_counts(key),
           family="llava-onevision", batch=batch)


def test_vanilla_generate_equals_manual_decoding(model, video_samples):
    inputs = batch(video_samples, "left")
    with torch.inference_mode():
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        tokens, step_logits = _manual_greedy(model, inputs, 3)
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, -3:], tokens)


@pytest.mark.parametrize("key", CAN_KEEP_ALL)
def test_reduction_disabled_is_vanilla(model, samples, video_samples, vanilla, key):
    retain = 1.0 if key.endswith("-share") else CROP_PATCHES
    with ficoco.apply(model, build(key, retain=retain)):
        torch.testing.assert_close(logits(model, batch(samples, "right")), vanilla["images"], rtol=0, atol=0)
        if key in DECODER:
            torch.testing.assert_close(logits(model, batch(video_samples, "right")), vanilla["videos"], rtol=0,
                                       atol=0)


def test_video_budget_share_counts_a_frames_pooled_tokens(model, video_samples):
    """``retain=0.25`` keeps a quarter of each frame's 196 pooled tokens (49), not of its 729 patches."""
    with ficoco.apply(model, "fastv", retain=0.25) as handle:
        logits(model, batch(video_samples[:1]))
        assert handle.kept_video_tokens(FRAMES) == FRAMES * 49
        assert kept(handle, video_samples[0]["input_ids"], (VIDEO_TOKEN,)) == [FRAMES * 49 + 1]


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
        assert kept(handle, sample["input_ids"], (IMAGE_TOKEN,)) == [13 * 16 + 93]
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


@pytest.mark.parametrize("key", ["ficoco-v", "divprune"])
def test_videos_are_refused_before_the_llm(model, video_samples, key):
    """In the tower (FiCoCo-V) or on the projector's output (DivPrune): one line, from the model's
    forward, from generate() and from the encoder itself; the model is left as it was."""
    inputs = batch(video_samples[:1])
    before = hook_count(model)
    match = "reduces before the LLM, which LLaVA-OneVision's videos do not take: each frame is pooled 2x2"
    with ficoco.apply(model, build(key)):
        with pytest.raises(ValueError, match=match) as err:
            logits(model, inputs)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=match):
            model.generate(**inputs, max_new_tokens=1)
        with pytest.raises(ValueError, match=match), torch.inference_mode():
            model.model.get_video_features(inputs["pixel_values_videos"])
    assert hook_count(model) == before


@pytest.mark.parametrize("key", ["ficoco-v", "fastv"])
def test_multi_image_samples_are_refused(model, samples, key):
    with ficoco.apply(model, build(key)):
        with pytest.raises(ValueError, match=r"one image per sample; batch_num_images=\[2\]") as err:
            logits(model, {**batch(samples[:1]), "batch_num_images": torch.tensor([2])})
        assert "\n" not in str(err.value)


def test_prumerge_scoring_with_the_layer_after_the_last_is_refused(model):
    before = hook_count(model)
    with pytest.raises(ValueError, match="scores with the encoder layer after layer 7, which is the last one here"):
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
    with ficoco.apply(model.model, build("ficoco-v", retain=64)) as handle:  # the bare LlavaOnevisionModel too
        assert handle.family == "llava-onevision" and handle.visual_tokens_per_crop == 64
        assert [handle.prompt_tokens(size) for size in (*SIZES, SCALED)] == [128, 192, 13 * 64]
