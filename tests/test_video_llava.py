"""Every method inside a real (tiny) HF Video-LLaVA: the LLaVA-1.5 matrix (reduction off == vanilla,
detach restores, batched == one by one with padding on both sides, eager == SDPA, generate() ==
manual prefill + cached decoding, exact token counts) on a batch mixing an image with an 8-frame
video in one prompt and a video alone in another, plus image-only and video-only batches, images of
mixed sizes through the image processor, and the family's refusals.

The checkpoint has Video-LLaVA's geometry: two CLIP-224/14 towers (256 patches + [CLS], 24
layers, features from layer -2), images handing on 256 tokens, frames 257 (their [CLS] too)."""

from __future__ import annotations

import inspect

import pytest
import torch

import ficoco
from ficoco.methods import _REGISTRY
from ficoco.testing import VIDEO_LLAVA_FRAMES, VIDEO_LLAVA_TOKENS, tiny_video_llava

from .test_models import _manual_greedy, hook_count, logits, output_mask

pytestmark = pytest.mark.xdist_group("video-llava")

IMAGE, VIDEO = VIDEO_LLAVA_TOKENS["image"], VIDEO_LLAVA_TOKENS["video"]
PATCHES, FRAMES = 256, VIDEO_LLAVA_FRAMES

# each method at a budget the 8-layer tiny LLM and 24-layer CLIP can hold, per image and per frame
METHODS = {
    "ficoco-v": dict(retain=17),  # the paper's Video-LLaVA setting: 8 x 17 = 136 patch tokens per video
    "ficoco-l": dict(retain=17, start_layer=2),
    "ficoco-vl": dict(retain=17, language_start_layer=2),
    "tome": dict(retain=64),
    "evit": dict(retain=64),
    "fastv": dict(retain=64),
    "random": dict(retain=64),
    "random-llm": dict(retain=64, side="language"),
    "topk": dict(retain=64),
    "visionzip": dict(retain=64),
    "prumerge": dict(retain=64),
    "prumerge+": dict(retain=64),
    "prumerge-adaptive": dict(retain=None),  # each image and frame its own count (newer transformers only)
    "dart": dict(retain=64),
    "pdrop": dict(retain=64, layers=(2, 4, 6)),
    "sparsevlm": dict(retain=64),
    "pool": dict(retain=64),  # 8x8 bins of the 16x16 grid
    "divprune": dict(retain=64),
    "cdpruner": dict(retain=64),
    "zero": dict(),
    "downsample": dict(retain=128),  # a 16x8-patch image: non-square, position embeddings interpolated
}
CAN_KEEP_ALL = [key for key in METHODS if key != "zero" and not key.endswith("-adaptive")]


def takes_encoded() -> bool:
    from transformers import VideoLlavaModel

    return "mm_encoder_outputs" in inspect.signature(VideoLlavaModel.forward).parameters


def runs_here(key: str) -> bool:
    return not key.endswith("-adaptive") or takes_encoded()


RUNNABLE = [key for key in METHODS if runs_here(key)]


def build(key: str, **overrides) -> ficoco.Method:
    name = key.removesuffix("-llm").removesuffix("-adaptive")
    return ficoco.get_method(name, **{**METHODS[key], **overrides})


def image_key() -> str:
    """``pixel_values`` (newer transformers) or ``pixel_values_images`` (5.17)."""
    from transformers import VideoLlavaModel

    return "pixel_values" if "pixel_values" in inspect.signature(VideoLlavaModel.forward).parameters \
        else "pixel_values_images"


def test_every_registered_method_is_in_the_matrix():
    assert {build(key).name for key in METHODS} >= set(_REGISTRY)


# -- the checkpoint and its inputs ------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-video-llava")
    tiny_video_llava(seed=0).save_pretrained(path)
    return path


def _load(path, attn):
    from transformers import VideoLlavaForConditionalGeneration

    return VideoLlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn,
                                                              dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(checkpoint):
    return _load(checkpoint, "sdpa")


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return _load(checkpoint, "eager")


def _text(gen, n):
    return torch.randint(3, 90, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def samples():
    """Prompts as ``(ids, images, videos)``: an image then a video; a video alone; an image alone;
    another video alone (different text lengths)."""
    gen = torch.Generator().manual_seed(2)
    video = [VIDEO] * (FRAMES * (PATCHES + 1))
    image = [IMAGE] * PATCHES
    return [
        ([1, *_text(gen, 3), *image, *_text(gen, 2), *video, *_text(gen, 6)], 1, 1),
        ([1, *_text(gen, 2), *video, *_text(gen, 4)], 0, 1),
        ([1, *_text(gen, 5), *image, *_text(gen, 3)], 1, 0),
        ([1, *_text(gen, 4), *video, *_text(gen, 7)], 0, 1),
    ]


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(4, 3, 224, 224), torch.randn(4, FRAMES, 3, 224, 224)


def batch(samples, pixels, rows, side="left") -> dict:
    """Samples ``rows`` padded on ``side`` with id 0, their images and videos in prompt order."""
    chosen = [samples[r] for r in rows]
    length = max(len(ids) for ids, _, _ in chosen)
    input_ids = torch.zeros(len(chosen), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    images, videos = [], []
    for row, (ids, n_images, n_videos) in enumerate(chosen):
        span = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        mask[row, span] = 1
        images += [pixels[0][rows[row]]] * n_images
        videos += [pixels[1][rows[row]]] * n_videos
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if images:
        inputs[image_key()] = torch.stack(images)
    if videos:
        inputs["pixel_values_videos"] = torch.stack(videos)
    return inputs


MIXED = (0, 1)  # an image and a video in one prompt, a video alone in the other: 9 and 8 units
IMAGES_ONLY = (2, 2)
VIDEOS_ONLY = (1, 3)


@pytest.fixture(scope="module")
def runs():
    """Reduced runs shared between tests: ``(key, side) -> (logits, real output positions, real
    tokens per row at the last layer)``."""
    return {}


def reduced(runs, model, samples, pixels, key, side="left", rows=MIXED):
    if (key, side, rows) not in runs:
        inputs = batch(samples, pixels, rows, side)
        with ficoco.apply(model, build(key)) as handle:
            out = logits(model, inputs)
            # real tokens: neither padding nor (decoder side) dead rows, which keep the batch rectangular
            real = output_mask(handle, inputs) if handle.kept_valid is None else handle.kept_valid.clone()
        runs[key, side, rows] = out, real, real.sum(dim=1)
    return runs[key, side, rows]


def single(runs, model, samples, pixels, key, row):
    """``[L, V]`` logits of sample ``row`` run alone with ``key`` attached (shared between tests)."""
    if (key, row) not in runs:
        with ficoco.apply(model, build(key)):
            runs[key, row] = logits(model, batch(samples, pixels, (row,)))[0]
    return runs[key, row]


@pytest.fixture(scope="module")
def vanilla(model, samples, pixels):
    """Vanilla logits of the image-and-video sample alone."""
    return logits(model, batch(samples, pixels, (0,)))


# -- the equivalence matrix -----------------------------------------------------------------------

@pytest.mark.parametrize("key", CAN_KEEP_ALL)
def test_reduction_disabled_is_vanilla(model, samples, pixels, vanilla, key):
    with ficoco.apply(model, build(key, retain=PATCHES)):
        out = logits(model, batch(samples, pixels, (0,)))
    torch.testing.assert_close(out, vanilla, rtol=0, atol=0)


def test_detach_restores_model(model, samples, pixels, vanilla):
    """Every method's hooks and instance wrappers go on attaching and off detaching; afterwards the
    model computes exactly what it did before any was attached."""
    before = hook_count(model)
    for key in RUNNABLE:
        handle = ficoco.attach(model, build(key))
        assert hook_count(model) > before, key
        handle.remove()
        assert hook_count(model) == before, key
        assert "generate" not in model.__dict__ and not hasattr(model, "_ficoco_handle"), key
        assert not {"get_image_features", "get_video_features"} & set(model.model.__dict__), key
        handle.remove()  # removing twice is harmless
    torch.testing.assert_close(logits(model, batch(samples, pixels, (0,))), vanilla, rtol=0, atol=0)


@pytest.mark.parametrize("key", RUNNABLE)
def test_batched_equals_one_by_one(model, samples, pixels, runs, key):
    """The two samples remove different numbers of tokens (9 and 8 images and frames): with a
    decoder-side method the batch stays rectangular through dead rows, left out here."""
    for side in ("left", "right"):
        batched, real, _ = reduced(runs, model, samples, pixels, key, side)
        assert batched.shape[1] < 2 * len(samples[0][0]) // 3  # really reduced
        for row, sample in enumerate(MIXED):
            alone = single(runs, model, samples, pixels, key, sample)
            torch.testing.assert_close(batched[row][real[row]], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [IMAGES_ONLY, VIDEOS_ONLY], ids=["images", "videos"])
@pytest.mark.parametrize("key", ["ficoco-vl", "cdpruner", "zero"])
def test_image_only_and_video_only_batches(model, samples, pixels, runs, key, rows):
    batched, real, counts = reduced(runs, model, samples, pixels, key, "right", rows)
    for row, sample in enumerate(rows):
        alone = single(runs, model, samples, pixels, key, sample)
        torch.testing.assert_close(batched[row][real[row]], alone, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == [expected_tokens(samples[r], key) for r in rows]


@pytest.mark.parametrize("key", RUNNABLE)
def test_eager_equals_sdpa(model, eager_model, samples, pixels, runs, key):
    """On the video-alone sample (2,064 tokens). On the image-and-video one, CDPruner's greedy DPP
    picks a different token in one frame under the two kernels (features equal to 1e-8): a near
    tie of random weights, not a difference of the adapters."""
    with ficoco.apply(eager_model, build(key)):
        eager = logits(eager_model, batch(samples, pixels, (1,)))[0]
    torch.testing.assert_close(single(runs, model, samples, pixels, key, 1), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["vanilla", *RUNNABLE])
def test_generate_equals_manual_prefill_and_decode(model, samples, pixels, key):
    inputs = batch(samples, pixels, MIXED, "left")
    steps = 2
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


# -- exact token counts ---------------------------------------------------------------------------

def kept_per_image(key: str) -> int:
    """Patch tokens an image (or a frame, whose [CLS] goes on top) hands the LLM's last layers."""
    return 0 if key == "zero" else METHODS[key]["retain"]


def expected_tokens(sample, key: str) -> int:
    """Real tokens of a sample at the LLM's last layer: its text, ``retain`` per image and
    ``retain`` + [CLS] per frame (``zero``: the text alone)."""
    ids, images, videos = sample
    text = len(ids) - images * PATCHES - videos * FRAMES * (PATCHES + 1)
    kept = kept_per_image(key)
    return text + images * kept + videos * FRAMES * (kept + (kept > 0))


# SparseVLM keeps as many as its recycling of deleted tokens gives (docs/methods.md), not a fixed count
@pytest.mark.parametrize("key", [key for key in RUNNABLE if not key.endswith("-adaptive") and key != "sparsevlm"])
def test_exact_token_counts(model, samples, pixels, runs, key):
    _, _, counts = reduced(runs, model, samples, pixels, key)
    assert counts.tolist() == [expected_tokens(samples[r], key) for r in MIXED]
    with ficoco.apply(model, build(key)) as handle:
        assert handle.visual_tokens_per_image == kept_per_image(key)
        assert handle.visual_tokens_per_frame == kept_per_image(key) + (key != "zero")


def test_papers_video_budget_keeps_17_patches_per_frame_in_raster_order(model, pixels):
    """FiCoCo-V at Video-LLaVA's setting in the paper (Table 4): 2,048 patch tokens of 8 frames cut
    to 136, 17 per frame, each frame reduced in the video tower on its own; its [CLS] stays first."""
    tower = model.model.video_tower
    frames = pixels[1][0]
    with torch.inference_mode():
        vanilla = tower(frames, output_hidden_states=True).hidden_states
    with ficoco.apply(model, build("ficoco-v")) as handle, torch.inference_mode():
        reduced_states = tower(frames, output_hidden_states=True).hidden_states
        trace = handle.video_trace
        assert handle.vision_trace is None  # the image tower saw nothing
    assert trace.positions.shape == (FRAMES, 17)
    assert 8 * 17 == 136
    for row in trace.positions.tolist():
        assert row == sorted(set(row)), "kept tokens stay in raster order"
    torch.testing.assert_close(trace.sizes.sum(1), torch.full((FRAMES,), float(PATCHES)))
    first = min(handle.plan.vision)
    torch.testing.assert_close(reduced_states[first + 1][:, 0], vanilla[first + 1][:, 0], rtol=1e-5, atol=1e-5)
    # one frame alone is reduced as it is among the others
    with ficoco.apply(model, build("ficoco-v")) as handle, torch.inference_mode():
        tower(frames[3:4])
        assert handle.video_trace.positions.tolist() == trace.positions[3:4].tolist()


@pytest.mark.skipif(not takes_encoded(), reason="adaptive counts need mm_encoder_outputs (transformers > 5.17)")
def test_adaptive_prumerge_cuts_each_image_and_frame_to_its_own_count(model, samples, pixels):
    inputs = batch(samples, pixels, MIXED, "right")
    with ficoco.apply(model, build("prumerge-adaptive")) as handle:
        prepared = handle.prepare_inputs(**inputs)
        images, frames = handle.vision_trace.counts, handle.video_trace.counts
    assert images.shape == (1,) and frames.shape == (2 * FRAMES,)
    assert len(set(frames.tolist())) > 1  # the frames really keep different counts
    per_row = prepared["attention_mask"].sum(1).tolist()
    text = [expected_tokens(samples[r], "zero") for r in MIXED]
    assert per_row == [text[0] + int(images[0]) + int((frames[:FRAMES] + 1).sum()),
                       text[1] + int((frames[FRAMES:] + 1).sum())]
    assert "pixel_values_videos" not in prepared and set(prepared["mm_encoder_outputs"]) == {"image", "video"}


# -- inputs through the processor ------------------------------------------------------------------

def test_images_of_mixed_sizes_through_the_image_processor(model):
    """Video-LLaVA's image processor brings every image to 224x224 (shortest edge, centre crop), so
    images of any size give 256 tokens each, which the method cuts to its budget."""
    from PIL import Image
    from transformers import VideoLlavaImageProcessor

    rng = torch.Generator().manual_seed(3)
    images = [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
              for h, w in ((100, 150), (300, 200), (224, 224))]
    processed = VideoLlavaImageProcessor()(images=images, return_tensors="pt")
    pixel_values = next(iter(processed.values()))
    assert pixel_values.shape == (3, 3, 224, 224)
    ids = torch.tensor([[1, 5, *[IMAGE] * PATCHES, 7], [1, 6, *[IMAGE] * PATCHES, 8], [1, 9, *[IMAGE] * PATCHES, 4]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), image_key(): pixel_values}
    with ficoco.apply(model, build("ficoco-v")) as handle:
        out = logits(model, inputs)
        assert handle.vision_trace.positions.shape == (3, 17)
    assert out.shape == (3, 3 + 17, 96)


def test_both_image_argument_names(model, samples, pixels):
    """transformers 5.17 names the images ``pixel_values_images``, newer ones ``pixel_values`` (and
    still take the old name): the prompt is cut whichever the caller uses."""
    inputs = batch(samples, pixels, IMAGES_ONLY)
    names = ["pixel_values_images"] if image_key() == "pixel_values_images" else ["pixel_values", "pixel_values_images"]
    outs = []
    for name in names:
        given = {k: v for k, v in inputs.items() if k != image_key()}
        given[name] = inputs[image_key()]
        with ficoco.apply(model, build("ficoco-v")):
            outs.append(logits(model, given))
    assert outs[0].shape[1] == len(samples[2][0]) - PATCHES + 17
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.skipif(takes_encoded(), reason="this transformers takes mm_encoder_outputs")
def test_adaptive_prumerge_refused_without_encoded_inputs(model):
    with pytest.raises(ValueError, match="needs a transformers whose Video-LLaVA takes mm_encoder_outputs; give "
                                         "retain="):
        ficoco.attach(model, build("prumerge-adaptive"))
    assert not hasattr(model, "_ficoco_handle")


def test_wrong_placeholder_count_refused(model, samples, pixels):
    inputs = batch(samples, pixels, (1,))
    inputs["input_ids"] = inputs["input_ids"][:, 1:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    inputs["input_ids"][0, 3] = 7  # one frame token short
    with ficoco.apply(model, build("ficoco-v")), pytest.raises(
            ValueError, match=r"the prompt has 2055 video placeholders for 1 video\(s\) of 8 frames; expected 257 per "
                              r"frame"):
        logits(model, inputs)


def test_video_without_frame_axis_refused(model, samples, pixels):
    inputs = batch(samples, pixels, (1,))
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"][0]
    with ficoco.apply(model, build("ficoco-v")), pytest.raises(ValueError, match="pixel_values_videos must be"):
        logits(model, inputs)


def test_decoder_side_without_input_ids_refused(model, samples, pixels):
    inputs = batch(samples, pixels, (2,))
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with ficoco.apply(model, build("fastv")), pytest.raises(ValueError, match="needs input_ids in the prefill call"):
        model.model(inputs_embeds=embeds, **inputs)


def test_decoder_side_refuses_a_static_cache(model, samples, pixels):
    inputs = batch(samples, pixels, (2,))
    with ficoco.apply(model, build("fastv")), pytest.raises(ValueError, match="needs a dynamic KV cache"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
