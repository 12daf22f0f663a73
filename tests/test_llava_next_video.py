"""Every method inside a real (tiny) LLaVA-NeXT-Video with LLaVA-NeXT-Video-7B's geometry (CLIP-336/14
crops of 576 patches plus [CLS] dropped, LLaVA-NeXT's pinpoints and packing, videos average-pooled
2x2 to 12 x 12 tokens per frame before the projector, no video newline), saved and loaded as a
checkpoint.

Images are LLaVA-NeXT's (tests/test_llava_next.py holds their layout); here every method runs the
matrix on images once more through this family's handle, in one test per method: exact counts,
batched == one by one (mixed image sizes, padding on both sides), generate() == manual prefill +
cached decoding, detach restores the model, eager == SDPA. Videos and image + video samples run
the same matrix for the decoder-side methods; methods reducing before the LLM are refused for
videos in one line."""

from __future__ import annotations

import pytest
import torch

import ficoco
from ficoco.adapters.anyres import anyres_layout
from ficoco.testing import LLAVA_NEXT_PINPOINTS, tiny_llava_next_processor, tiny_llava_next_video
from tests.anyres_matrix import kept, matrix
from tests.test_llava_next import METHODS as NEXT_METHODS
from tests.test_llava_next import REFUSED, _manual_greedy, hook_count, image, logits

pytestmark = pytest.mark.xdist_group("llava-next-video")

IMAGE_TOKEN, VIDEO_TOKEN = 95, 94
CROP_PATCHES = 576
FRAME_TOKENS = 144  # a frame's 24 x 24 patches average-pooled to 12 x 12
# the tower is cut to 8 layers to keep the matrix fast on CPU (features from layer 6), so the
# methods that start at encoder layer 12 by default start at layer 3
VISION_LAYERS, VISION_START = 8, 3
METHODS = {**NEXT_METHODS, "tome": dict(retain=300, start_layer=VISION_START),
           "evit": dict(retain=100, start_layer=VISION_START),
           "ficoco-v": dict(retain=100, start_layer=VISION_START),
           "ficoco-v-share": dict(retain=0.25, start_layer=VISION_START),
           "ficoco-vl": dict(retain=64, language_start_layer=2, vision_start_layer=VISION_START)}
BEFORE_LLM = ("ficoco-v", "tome", "evit", "random", "topk", "visionzip", "prumerge", "prumerge+", "pool", "divprune",
              "cdpruner", "zero", "ficoco-v-share", "ficoco-vl")
DECODER = [key for key in METHODS if key not in BEFORE_LLM]
CAN_KEEP_ALL = [key for key in METHODS if key != "zero"]
# (height, width): 1x2 tiles (rows unpadded, 968 tokens), 2x1 tiles (columns unpadded, 1,008)
SIZES = [(100, 640), (640, 100)]
FRAMES = 2
# pixel noise on the crops: a thin image's tiles are mostly the processor's constant padding, whose
# near-identical patches leave near-ties that kernel rounding (a batch against one sample, eager
# against SDPA) breaks either way; ToMe's matching needs more noise than the rest, and CDPruner's
# greedy DPP and FiCoCo-VL less (at 0.2 their ties fall elsewhere), so ToMe's matrix gets its own samples
PIXEL_NOISE, TOME_NOISE = 0.05, 0.2


def build(key: str, **overrides) -> ficoco.Method:
    name = key.removesuffix("-llm").removesuffix("-share").removesuffix("-adaptive")
    options = {**(METHODS[key] if key in METHODS else REFUSED[key]["options"]), **overrides}
    return ficoco.get_method(name, **options)


def layout_of(size):
    return anyres_layout(tuple(size), LLAVA_NEXT_PINPOINTS, 336, 14)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava-next-video")
    tiny_llava_next_video(seed=0, vision_layers=VISION_LAYERS).save_pretrained(path)
    return path


def _load(path, attn):
    from transformers import LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration.from_pretrained(path, attn_implementation=attn,
                                                                  dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(checkpoint):
    return _load(checkpoint, "sdpa")


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return _load(checkpoint, "eager")


@pytest.fixture(scope="module")
def processor():
    return tiny_llava_next_processor()


def encode(processor, sizes, question: str, seed: int = 0, frames: int = 0, noise: float = PIXEL_NOISE) -> dict:
    """One sample: its images (``sizes``, through LLaVA-NeXT's processor), then a video of ``frames``
    frames if any (``frames x 144`` placeholders where the chat template puts its part), then the
    question. Crops get ``noise``."""
    parts = [{"type": "image"}] * (len(sizes) + bool(frames)) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    if frames:  # the video's part is the last <image>: swap it for a marker the tokenizer keeps whole
        at = text.rindex("<image>")
        text = text[:at] + "<video-here>" + text[at + len("<image>"):]
    pictures = [image(size, seed + i) for i, size in enumerate(sizes)]
    if pictures:
        out = dict(processor(images=pictures, text=[text.replace("<video-here>", "")], return_tensors="pt"))
        out["pixel_values"] = out["pixel_values"] + noise * torch.randn(
            out["pixel_values"].shape, generator=torch.Generator().manual_seed(seed))
    else:
        out = dict(processor.tokenizer([text.replace("<video-here>", "")], return_tensors="pt"))
    if frames:
        before = processor.tokenizer(text[:text.index("<video-here>")], return_tensors="pt")["input_ids"].shape[1]
        if pictures:  # the images' expanded placeholders come before the video
            before += int((out["input_ids"][0] == IMAGE_TOKEN).sum()) - len(pictures)
        ids = out["input_ids"][0].tolist()
        ids[before:before] = [VIDEO_TOKEN] * (frames * FRAME_TOKENS)
        out["input_ids"] = torch.tensor([ids])
        out["pixel_values_videos"] = torch.randn(1, frames, 3, 336, 336, generator=torch.Generator().manual_seed(seed))
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def batch(samples: list[dict], side: str = "left") -> dict:
    """Samples padded on ``side`` (id 0); their images' crops padded to the most crops, their videos stacked."""
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


def _image_samples(processor, noise: float = PIXEL_NOISE) -> list[dict]:
    return [encode(processor, [SIZES[0]], "what is the color of the shape ?", seed=1, noise=noise),
            encode(processor, [SIZES[1]], "how many ?", seed=2, noise=noise)]


@pytest.fixture(scope="module")
def samples(processor):
    return _image_samples(processor)


@pytest.fixture(scope="module")
def tome_samples(model, processor):
    """ToMe's images (more pixel noise) and their vanilla logits, padded right and the first alone."""
    chosen = _image_samples(processor, TOME_NOISE)
    return chosen, (logits(model, batch(chosen, "right")), logits(model, batch(chosen[:1])))


@pytest.fixture(scope="module")
def video_samples(processor):
    """A video alone, and an image and a video in one sample."""
    return [encode(processor, [], "what is the color of the shape ?", seed=3, frames=FRAMES),
            encode(processor, [SIZES[0]], "how many ?", seed=5, frames=FRAMES)]


@pytest.fixture(scope="module")
def vanilla(model, samples, video_samples):
    return {"images": logits(model, batch(samples, "right")), "videos": logits(model, batch(video_samples, "right")),
            "images0": logits(model, batch(samples[:1])), "videos0": logits(model, batch(video_samples[:1]))}


def test_every_registered_method_runs_or_is_refused():
    names = {key.removesuffix("-llm").removesuffix("-share").removesuffix("-adaptive") for key in [*METHODS, *REFUSED]}
    assert names == set(ficoco.methods.available_methods())


def test_video_placeholders_match_the_model(model, video_samples):
    """A video of F frames is F x 144 pooled tokens and nothing else (the model's own forward
    accepts the prompts), the image's placeholders beside it LLaVA-NeXT's count."""
    with ficoco.apply(model, "fastv", retain=100) as handle:
        assert handle.frame_grid == (12, 12) and handle.video_tokens(FRAMES) == FRAMES * FRAME_TOKENS
    for sample in video_samples:
        assert int((sample["input_ids"] == VIDEO_TOKEN).sum()) == FRAMES * FRAME_TOKENS
    assert int((video_samples[1]["input_ids"] == IMAGE_TOKEN).sum()) == layout_of(SIZES[0]).full_tokens
    with torch.inference_mode():
        for sample in video_samples:
            model(**sample)  # transformers checks the placeholders against the features


# -- the matrix ------------------------------------------------------------------------------------


def _image_counts(key, method):
    """Before the LLM: crops x k placeholders per image, exactly; inside it: min(crops x k, its
    patches) of each image's patch tokens, and every newline token."""
    def check(handle, inputs, prepared, out):
        layouts = [layout_of(s) for s in inputs["image_sizes"].tolist()]
        per_crop = handle.plan.llm_input_visual
        if key in BEFORE_LLM:
            if key != "ficoco-vl":
                assert per_crop == {"zero": 0, "pool": 144, "tome": 300,
                                    "ficoco-v-share": round(0.25 * CROP_PATCHES)}.get(key, 100)
            shown = (prepared["input_ids"] == IMAGE_TOKEN) & prepared["attention_mask"].bool()
            assert shown.sum(1).tolist() == [x.crops * per_crop for x in layouts]
        if method.language is None:
            assert handle.kept_index is None
            return
        expected = [handle.kept_tokens(tuple(s)) for s in inputs["image_sizes"].tolist()]
        if key not in BEFORE_LLM:
            assert key == "sparsevlm" or expected == [min(x.patch_tokens, x.crops * 100) for x in layouts]
            expected = [e + x.rows for e, x in zip(expected, layouts)]  # every newline token stays
        ids = (prepared if key in BEFORE_LLM else inputs)["input_ids"]
        assert kept(handle, ids, (IMAGE_TOKEN,)) == expected

    return check


def _video_counts(key):
    """Rows [video], [image, video]: a video keeps F x min(k, 144) of its pooled tokens, a sample of
    an image and a video the sum of both budgets (ranked together)."""
    def check(handle, inputs, prepared, out):
        video = handle.kept_video_tokens(FRAMES)
        assert key == "sparsevlm" or video == FRAMES * 100
        picture = handle.kept_tokens(SIZES[0])
        newlines = layout_of(SIZES[0]).rows
        assert kept(handle, inputs["input_ids"], (IMAGE_TOKEN, VIDEO_TOKEN)) == [video, picture + newlines + video]

    return check


@pytest.mark.parametrize("key", list(METHODS))
def test_matrix_images(model, eager_model, samples, tome_samples, vanilla, key):
    chosen, reference = tome_samples if key == "tome" else (samples, (vanilla["images"], vanilla["images0"]))
    matrix(model, eager_model, chosen, reference, build(key), _image_counts(key, build(key)), family="llava-next-video",
           batch=batch)


@pytest.mark.parametrize("key", DECODER)
def test_matrix_videos_and_images(model, eager_model, video_samples, vanilla, key):
    matrix(model, eager_model, video_samples, (vanilla["videos"], vanilla["videos0"]), build(key), _video_counts(key),
           family="llava-next-video", batch=batch)


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
    """``retain=0.25`` keeps a quarter of each frame's 144 pooled tokens (36), not of its 576 patches."""
    with ficoco.apply(model, "fastv", retain=0.25) as handle:
        logits(model, batch(video_samples[:1]))
        assert handle.kept_video_tokens(FRAMES) == FRAMES * 36
        assert kept(handle, video_samples[0]["input_ids"], (VIDEO_TOKEN,)) == [FRAMES * 36]


# -- refusals and the family ----------------------------------------------------------------------


@pytest.mark.parametrize("key", list(REFUSED))
def test_refused_methods_say_why_in_one_line(model, key):
    before = hook_count(model)
    with pytest.raises(ValueError, match=REFUSED[key]["match"]) as err:
        ficoco.attach(model, build(key))
    assert "\n" not in str(err.value) and "LLaVA-NeXT-Video" in str(err.value)
    assert hook_count(model) == before


@pytest.mark.parametrize("key", ["ficoco-v", "divprune"])
def test_videos_are_refused_before_the_llm(model, video_samples, key):
    """In the tower (FiCoCo-V) or on the projector's output (DivPrune): one line, from the model's
    forward, from generate() and from the encoder itself; the model is left as it was."""
    inputs = batch(video_samples[:1])
    before = hook_count(model)
    match = ("reduces before the LLM, which LLaVA-NeXT-Video's videos do not take: each frame is pooled 2x2 "
             "before the projector on its full 24x24 grid")
    with ficoco.apply(model, build(key)):
        with pytest.raises(ValueError, match=match) as err:
            logits(model, inputs)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=match):
            model.generate(**inputs, max_new_tokens=1)
        with pytest.raises(ValueError, match=match), torch.inference_mode():
            model.model.get_video_features(inputs["pixel_values_videos"])
    assert hook_count(model) == before


def test_family_from_model_and_checkpoint(model, checkpoint):
    from ficoco.adapters.families import family_of
    from ficoco.checkpoint import check_supported, checkpoint_config

    assert family_of(model).name == "LLaVA-NeXT-Video" == check_supported(checkpoint_config(checkpoint),
                                                                           checkpoint).name
    with ficoco.apply(model.model, build("ficoco-v", retain=64)) as handle:  # the bare LlavaNextVideoModel too
        assert handle.family == "llava-next-video" and handle.visual_tokens_per_crop == 64
        assert [handle.prompt_tokens(size) for size in SIZES] == [3 * 64, 3 * 64]
