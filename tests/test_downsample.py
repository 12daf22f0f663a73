"""The ``downsample`` control: the image at a lower resolution, so the vision encoder runs on fewer
patches. Against the vanilla model fed a hand-resized image (LLaVA-1.5: the tower interpolating its
position embeddings; Qwen-VL: the smaller image patchified as the processor does), against the
image processor run at the smaller size, exact counts, the tower's own length, FLOPs, errors, and
Qwen-VL's matrix (LLaVA's is in tests/test_models.py)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import ficoco
from ficoco.stages.resolution import exact_grid, grid_within, resize_images

from .conftest import IMAGE_TOKEN, PATCHES, batch_inputs, make_prompt

PATCH = 14


def logits(model, inputs, **kwargs):
    with torch.inference_mode():
        return model(**inputs, **kwargs).logits


# -- the grids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kept, grid", [(144, (12, 12)), (64, (8, 8)), (192, (16, 12)), (128, (16, 8)),
                                        (576, (24, 24)), (1, (1, 1))])
def test_exact_grid_has_the_budget_and_pools_grid(kept, grid):
    from ficoco.stages.pooling import pooled_grid

    assert exact_grid((24, 24), kept, 2.0) == grid == pooled_grid((24, 24), kept)


@pytest.mark.parametrize("kept, max_aspect, near", [(191, 2.0, "187, 190, 192, 195"), (46, 2.0, "42, 45, 48, 49"),
                                                    (192, 1.0, "144, 169, 196, 225"), (577, 2.0, "528, 529, 552, 576")])
def test_exact_grid_refuses_with_the_nearest_budgets(kept, max_aspect, near):
    with pytest.raises(ValueError, match=f"cannot give exactly {kept} tokens.*budgets near it that can: {near}$"):
        exact_grid((24, 24), kept, max_aspect)


def _slow_grid_within(grid, kept):
    """Every rectangle whose sides are the scaled ones rounded either way, the best by hand."""
    import math

    h, w = grid
    s = math.sqrt(kept / (h * w))
    best = None
    for r in range(1, h + 1):
        for c in range(1, w + 1):
            if r * c > kept or abs(r - h * s) >= 1 or abs(c - w * s) >= 1:
                continue
            stretch = max(r * w / (c * h), c * h / (r * w))
            key = (r * c, -stretch, r)
            best = max(best, (key, (r, c))) if best else (key, (r, c))
    return best[1]


@pytest.mark.parametrize("grid", [(6, 8), (4, 4), (10, 6), (26, 46), (3, 17)])
@pytest.mark.parametrize("share", [0.9, 0.5, 0.25, 0.1])
def test_grid_within_keeps_the_aspect_and_the_budget(grid, share):
    kept = max(1, round(share * grid[0] * grid[1]))
    rows, cols = grid_within(grid, kept)
    assert rows * cols <= kept and rows <= grid[0] and cols <= grid[1]
    assert (rows, cols) == _slow_grid_within(grid, kept)


def test_grid_within_thin_images_and_the_whole_grid():
    assert grid_within((1, 40), 3) == (1, 3)  # a side would scale below one cell
    assert grid_within((6, 8), 48) == (6, 8)


# -- LLaVA-1.5: the reference -----------------------------------------------------------------------


def llava_on_small_image(model, prompt: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """``[L, V]`` logits of the vanilla LLaVA on one prompt and one image of any size, written out:
    the tower with its position embeddings interpolated (HF's ``interpolate_pos_encoding``), the
    feature layer's patches projected into the placeholders, the LLM on the embeddings."""
    llava = model.model
    with torch.inference_mode():
        tower = llava.vision_tower(pixels[None], output_hidden_states=True, interpolate_pos_encoding=True)
        features = tower.hidden_states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":  # [CLS] left out
            features = features[:, 1:]
        features = llava.multi_modal_projector(features)
        ids = torch.tensor([prompt])
        embeds = llava.get_input_embeddings()(ids)
        embeds[ids == IMAGE_TOKEN] = features.reshape(-1, features.shape[-1])
        return model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits[0]


@pytest.mark.parametrize("retain", [144, 192, 128, 64])
def test_llava_is_the_vanilla_model_on_a_smaller_image(model, images, prompts, retain):
    """Batched, left-padded: each row's logits are those of the vanilla model given the image resized
    by hand to the grid's pixels and a prompt with that many placeholders (:func:`llava_on_small_image`)."""
    rows, cols = exact_grid((24, 24), retain, 2.0)
    with ficoco.apply(model, "downsample", retain=retain) as handle:
        assert handle.plan.image_grid == (rows, cols) and handle.visual_tokens_per_image == retain
        batched = logits(model, batch_inputs(prompts, images))
    small = torch.nn.functional.interpolate(images, size=(rows * PATCH, cols * PATCH), mode="bicubic",
                                            antialias=True, align_corners=False)
    for row, prompt in enumerate(prompts):
        short = [t for i, t in enumerate(prompt) if t != IMAGE_TOKEN or i - prompt.index(IMAGE_TOKEN) < retain]
        expected = llava_on_small_image(model, short, small[row])
        torch.testing.assert_close(batched[row, -expected.shape[0]:], expected, rtol=1e-5, atol=1e-5)


def test_siglip_tower_without_cls(images, prompts):
    """A SigLIP tower (no [CLS], every patch to the LLM): the same reference holds."""
    from transformers import LlavaForConditionalGeneration, SiglipVisionConfig

    from ficoco.testing import tiny_llava_config

    config = tiny_llava_config(vision_layers=6)
    config.vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                              num_attention_heads=4, image_size=336, patch_size=14)
    config.vision_feature_select_strategy = "full"
    torch.manual_seed(0)
    siglip = LlavaForConditionalGeneration(config).eval()
    with ficoco.apply(siglip, "downsample", retain=192):
        batched = logits(siglip, batch_inputs(prompts[:2], images[:2]))
    small = resize_images(images[:2], (16 * PATCH, 12 * PATCH))
    for row, prompt in enumerate(prompts[:2]):
        short = [t for i, t in enumerate(prompt) if t != IMAGE_TOKEN or i - prompt.index(IMAGE_TOKEN) < 192]
        expected = llava_on_small_image(siglip, short, small[row])
        torch.testing.assert_close(batched[row, -expected.shape[0]:], expected, rtol=1e-5, atol=1e-5)


def test_resize_is_the_image_processor_at_the_smaller_size():
    """The processor's 336-px pixels resized in its normalised space equal the processor run at the
    smaller size on the same (336-px) image, up to its rounding to 8 bits (one level, ~0.016)."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    y, x = np.mgrid[0:336, 0:336] / 336
    field = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))], -1) * 110 + 128
    image = Image.fromarray(field.astype("uint8"))
    full = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixels = full(images=image, return_tensors="pt")["pixel_values"]
    for height, width in [(168, 168), (224, 168), (224, 112)]:
        small = CLIPImageProcessor(size={"height": height, "width": width}, do_center_crop=False)
        expected = small(images=image, return_tensors="pt")["pixel_values"]
        got = resize_images(pixels, (height, width))
        assert got.shape == expected.shape
        level = 1.5 / 255 / min(full.image_std)
        assert float((got - expected).abs().max()) < level


def test_llava_counts_and_the_tower_runs_on_fewer_patches(model, images, prompts):
    """The tower's every layer holds rows x cols patches + [CLS]; the prompt holds exactly the
    budget's placeholders per image; the caller's inputs are left alone."""
    inputs = batch_inputs(prompts, images)
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2]))) for layer in layers]
    try:
        with ficoco.apply(model, "downsample", retain=128) as handle:
            out = logits(model, inputs)
            prepared = handle.prepare_inputs(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {(3, 16 * 8 + 1)}
    assert (prepared["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist() == [128] * 3
    assert out.shape[1] == inputs["input_ids"].shape[1] - (PATCHES - 128)
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 3 * PATCHES


def test_llava_full_budget_is_vanilla_and_two_images_per_prompt(model, images, prompts):
    inputs = batch_inputs(prompts, images)
    vanilla = logits(model, inputs)
    for retain in (1.0, PATCHES):
        with ficoco.apply(model, "downsample", retain=retain):
            torch.testing.assert_close(logits(model, inputs), vanilla, rtol=0, atol=0)
    two = make_prompt([4], [5], images=2)
    with ficoco.apply(model, "downsample", retain=64):
        batched = logits(model, batch_inputs([prompts[0], two], images[:3]))
        single = logits(model, batch_inputs([two], images[1:3]))[0]
    torch.testing.assert_close(batched[1, -single.shape[0]:], single, rtol=1e-4, atol=1e-4)


def test_llava_errors(model):
    with pytest.raises(ValueError, match="cannot give exactly 191 tokens.*187, 190, 192, 195"):
        ficoco.attach(model, "downsample", retain=191)
    with pytest.raises(ValueError, match="exceeds the 576 visual tokens"):
        ficoco.attach(model, "downsample", retain=PATCHES + 1)
    with pytest.raises(ValueError, match="retain must be a positive"):
        ficoco.get_method("downsample", retain=0)
    with pytest.raises(ValueError, match="max_aspect must be a number >= 1"):
        ficoco.get_method("downsample", max_aspect=0.5)
    method = ficoco.get_method("downsample")
    with pytest.raises(ValueError, match="a resolution reduction runs alone"):
        ficoco.Method("both", vision=ficoco.get_method("tome").vision, resolution=method.resolution)
    assert not hasattr(model, "_ficoco_handle")


def test_llava_flops_count_the_smaller_tower():
    from ficoco.measure import budget
    from ficoco.measure.flops import llava_1_5_7b, vision_flops

    shape = llava_1_5_7b()
    vanilla = budget.vanilla_cost(shape)
    pool = budget.method_cost(shape, ficoco.get_method("pool", retain=144))
    down = budget.method_cost(shape, ficoco.get_method("downsample", retain=144))
    assert down.llm_tflops == pool.llm_tflops and down.llm_input_visual == 144
    assert pool.vision_tflops == vanilla.vision_tflops
    expected = vision_flops(shape, [145] * 24, 144, num_patches=144).total / 1e12
    assert down.vision_tflops == pytest.approx(expected) and down.vision_tflops < vanilla.vision_tflops / 3.9
    assert budget.method_cost(shape, ficoco.get_method("downsample", retain=576)) == \
        budget.MethodCost(**{**vanilla.as_dict(), "method": "downsample"})


# -- Qwen-VL ------------------------------------------------------------------------------------------

QWEN_SHARE = 0.5
#: the test images' merge grids (rows, cols) and the grids 0.5 of their tokens gives (by hand:
#: each side x sqrt(0.5) rounded either way, the most tokens within the budget): 48 -> 24, 16 -> 6, 60 -> 28
QWEN_SMALLER = {(6, 8): (4, 6), (4, 4): (3, 2), (10, 6): (7, 4)}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def generation(request):
    return request.param


@pytest.fixture(scope="module")
def qwen_models():
    from ficoco.testing import QWEN_GENERATIONS, tiny_qwen_vl

    return {name: {attn: tiny_qwen_vl(name, seed=0, attn_implementation=attn) for attn in ("sdpa", "eager")}
            for name in QWEN_GENERATIONS}


def qwen_slow_inputs(generation: str, image, grid: tuple[int, int], before: list[int], after: list[int],
                     image_token: int) -> dict:
    """One prompt ``before + placeholders + after`` with ``image`` resized to ``grid`` merge groups,
    written out: the image normalised as the processor does, resized (bicubic, antialiased), each
    patch copied out of it in the processor's order (merge group by merge group, ``T`` copies of
    each patch) by a Python loop."""
    from ficoco.testing import qwen_image_processor, qwen_patch_size

    from .qwen_inputs import batch

    processor = qwen_image_processor(generation)
    patch, merge, temporal = qwen_patch_size(generation), 2, 2
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    pixels = torch.from_numpy(((array - mean) / std).astype(np.float32)).permute(2, 0, 1)
    rows, cols = grid
    small = torch.nn.functional.interpolate(pixels[None], size=(rows * merge * patch, cols * merge * patch),
                                            mode="bicubic", antialias=True, align_corners=False)[0]
    patches = []
    for i in range(rows):
        for j in range(cols):
            for a in range(merge):
                for b in range(merge):
                    y, x = (i * merge + a) * patch, (j * merge + b) * patch
                    one = small[:, y:y + patch, x:x + patch]
                    patches.append(torch.stack([one] * temporal, dim=1).reshape(-1))
    ids = [*before, *[image_token] * (rows * cols), *after]
    types = [0] * len(before) + [1] * (rows * cols) + [0] * len(after)
    return {**batch([(ids, types)]), "pixel_values": torch.stack(patches),
            "image_grid_thw": torch.tensor([[1, rows * merge, cols * merge]])}


def test_qwen_is_the_vanilla_model_on_a_smaller_image(qwen_models, generation):
    """Each sample of a padded batch of three sizes answers as the vanilla model given its image
    resized by hand to the smaller grid (:func:`qwen_slow_inputs`): the same logits, so the same
    M-RoPE positions of a genuinely smaller image."""
    from .qwen_inputs import SHAPES, image_batch, images_for

    model = qwen_models[generation]["sdpa"]
    inputs = image_batch(generation)
    with ficoco.apply(model, "downsample", retain=QWEN_SHARE) as handle:
        batched = logits(model, inputs)
        valid = handle.prepare_inputs(**image_batch(generation))["attention_mask"].bool()
    image_token = model.config.image_token_id
    for row, (image, (w, h)) in enumerate(zip(images_for(generation), SHAPES)):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        first, last = ids.index(image_token), len(ids) - ids[::-1].index(image_token)
        slow = qwen_slow_inputs(generation, image, QWEN_SMALLER[(h, w)], ids[:first], ids[last:], image_token)
        expected = logits(model, slow)[0]
        torch.testing.assert_close(batched[row][valid[row]], expected, rtol=1e-4, atol=1e-4)


def test_qwen_resize_is_the_image_processor_at_the_smaller_size(generation):
    """The handle's patches of the smaller image equal the processor's patches of the image resized
    (PIL, bicubic) to that size, up to their rounding to 8 bits."""
    from PIL import Image

    from ficoco.adapters.qwen_resolution import patchify, unpatchify
    from ficoco.testing import qwen_image_processor, qwen_patch_size

    processor = qwen_image_processor(generation)
    patch = qwen_patch_size(generation)
    unit = 2 * patch
    y, x = np.mgrid[0:6 * unit, 0:10 * unit] / (10 * unit)
    field = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))], -1) * 110 + 128
    image = Image.fromarray(field.astype("uint8"))
    full = processor(images=[image], return_tensors="pt")
    grid = tuple(int(v) for v in full["image_grid_thw"][0])
    layout = dict(channels=3, temporal=2, patch=patch, merge=2)
    assert torch.equal(patchify(unpatchify(full["pixel_values"], grid, **layout), patch=patch, merge=2),
                       full["pixel_values"])
    rows, cols = 4, 7
    ours = patchify(resize_images(unpatchify(full["pixel_values"], grid, **layout), (rows * unit, cols * unit)),
                    patch=patch, merge=2)
    by_pil = processor(images=[image.resize((cols * unit, rows * unit), Image.Resampling.BICUBIC)],
                       return_tensors="pt")
    assert by_pil["image_grid_thw"][0].tolist() == [1, 2 * rows, 2 * cols]
    assert float((ours - by_pil["pixel_values"]).abs().max()) < 1.5 / 255 / min(processor.image_std)


def qwen_valid(handle, inputs):
    return handle.prepare_inputs(**inputs)["attention_mask"].bool()


@pytest.mark.parametrize("side", ["left", "right"])
def test_qwen_batched_equals_one_by_one(qwen_models, generation, side):
    from .qwen_inputs import image_batch, sample_of

    model = qwen_models[generation]["sdpa"]
    inputs = image_batch(generation, side=side)
    with ficoco.apply(model, "downsample", retain=QWEN_SHARE) as handle:
        batched = logits(model, inputs)
        valid = qwen_valid(handle, image_batch(generation, side=side))
        for row in range(3):
            single = logits(model, sample_of(inputs, row, generation))[0]
            torch.testing.assert_close(batched[row][valid[row]], single, rtol=1e-4, atol=1e-4)


def test_qwen_eager_equals_sdpa(qwen_models, generation):
    from .qwen_inputs import image_batch

    outputs = {}
    for attn, model in qwen_models[generation].items():
        with ficoco.apply(model, "downsample", retain=QWEN_SHARE) as handle:
            outputs[attn] = logits(model, image_batch(generation))
            valid = qwen_valid(handle, image_batch(generation))
    torch.testing.assert_close(outputs["sdpa"][valid], outputs["eager"][valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("retain", [QWEN_SHARE, 8, 1.0])
def test_qwen_counts_detach_and_full_budget(qwen_models, generation, retain):
    """Each image gets its smaller grid's tokens, at most the budget (a share of its own tokens or a
    count); the caller's inputs are untouched; the whole budget is the vanilla model; detaching
    restores the model."""
    from .qwen_inputs import image_batch, tokens_of

    model = qwen_models[generation]["sdpa"]
    inputs = image_batch(generation)
    vanilla = logits(model, inputs)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    counts = [tokens_of(g) for g in inputs["image_grid_thw"]]  # 48, 16, 60
    with ficoco.apply(model, "downsample", retain=retain) as handle:
        reduced = logits(model, inputs)
        prepared = handle.prepare_inputs(**image_batch(generation))
    found = (prepared["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in image_batch(generation)["image_grid_thw"]]
    budgets = [min(n, retain) if isinstance(retain, int) else max(1, round(retain * n)) for n in counts]
    assert found == [handle.kept_tokens((1, 2 * r, 2 * c)) for r, c in grids]
    assert all(f <= b for f, b in zip(found, budgets))
    assert [tuple(g) for g in prepared["image_grid_thw"].tolist()] == \
        [(1, *(2 * s for s in grid_within(grid, budget))) for grid, budget in zip(grids, budgets)]
    if retain == QWEN_SHARE:
        assert [tuple(v) for v in prepared["image_grid_thw"][:, 1:].div(2).long().tolist()] == \
            [QWEN_SMALLER[g] for g in grids]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(counts)  # caller's inputs kept
    if retain == 1.0:
        torch.testing.assert_close(reduced, vanilla, rtol=0, atol=0)
    else:
        assert reduced.shape[1] < vanilla.shape[1]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert "generate" not in vars(model)
    torch.testing.assert_close(logits(model, inputs), vanilla, rtol=0, atol=0)


def test_qwen_generate_equals_manual_prefill_and_decode(qwen_models, generation):
    from .qwen_inputs import image_batch

    model = qwen_models[generation]["sdpa"]
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with ficoco.apply(model, "downsample", retain=QWEN_SHARE) as handle, torch.inference_mode():
        gen = model.generate(**image_batch(generation), max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        prepared = handle.prepare_inputs(**image_batch(generation))
        mask = prepared["attention_mask"]
        out = model(**prepared, use_cache=True)
        tokens, steps = [], []
        for _ in range(4):
            steps.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
            position = (mask.long().cumsum(-1) - 1)[:, -1:] + model.model.rope_deltas
            out = model(input_ids=token, attention_mask=mask, use_cache=True,
                        position_ids=position[None].expand(3, -1, -1), **{cache_name: cache})
    original = image_batch(generation)["input_ids"]
    assert torch.equal(gen.sequences[:, :original.shape[1]], original)
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), torch.stack(steps, dim=1), rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, -4:], torch.cat(tokens, dim=1))


def test_qwen_videos_and_several_images_batch_like_one_by_one(qwen_models, generation):
    """A video (two temporal patches, each frame resized alike) then an image in one sample, two
    images in the other: every frame gets its smaller grid's tokens, and the batch answers as each
    sample alone."""
    from .qwen_inputs import video_and_images

    model = qwen_models[generation]["sdpa"]
    inputs = video_and_images(generation)
    video_token, image_token = model.config.video_token_id, model.config.image_token_id
    with ficoco.apply(model, "downsample", retain=QWEN_SHARE) as handle:
        batched = logits(model, inputs)
        prepared = handle.prepare_inputs(**video_and_images(generation))
        valid = prepared["attention_mask"].bool()
        # the video's 4x6 merge grid per frame -> 3x4 (12 of 24 tokens), both frames
        assert prepared["video_grid_thw"].tolist() == [[2, 6, 8]]
        assert int((prepared["input_ids"] == video_token).sum()) == 2 * 12
        assert (prepared["input_ids"] == image_token).sum(dim=1).tolist() == \
            [handle.kept_tokens(tuple(inputs["image_grid_thw"][0].tolist())),
             sum(handle.kept_tokens(tuple(g.tolist())) for g in inputs["image_grid_thw"][1:])]
        image_rows = [0, 1, 2]
        sample = {k: v for k, v in video_and_images(generation).items()}
        ids = sample["input_ids"]
        for row, (pixels, grids) in enumerate([(slice(0, 1), slice(0, 1)), (slice(1, 3), slice(1, 3))]):
            patches = [int(g.prod()) for g in inputs["image_grid_thw"]]
            starts = [sum(patches[:i]) for i in image_rows] + [sum(patches)]
            single = {"input_ids": ids[row][sample["attention_mask"][row].bool()][None],
                      "mm_token_type_ids": sample["mm_token_type_ids"][row][sample["attention_mask"][row].bool()][None],
                      "pixel_values": sample["pixel_values"][starts[pixels.start]:starts[pixels.stop]],
                      "image_grid_thw": sample["image_grid_thw"][grids]}
            single["attention_mask"] = torch.ones_like(single["input_ids"])
            if row == 0:
                single.update(pixel_values_videos=sample["pixel_values_videos"],
                              video_grid_thw=sample["video_grid_thw"])
            alone = logits(model, single)[0]
            torch.testing.assert_close(batched[row][valid[row]], alone, rtol=1e-4, atol=1e-4)


def test_qwen_flops_count_the_smaller_image():
    from ficoco.measure import budget
    from ficoco.measure.qwen import qwen2_5_vl_7b, qwen_vision_flops

    shape = qwen2_5_vl_7b()  # a 1280x720 image: 26x46 merge groups, 1196 tokens
    down = budget.method_cost(shape, ficoco.get_method("downsample", retain=0.25))
    assert down.llm_input_visual == 13 * 23 == 299
    smaller = shape.with_image(23 * 28, 13 * 28)
    assert smaller.grid == (26, 46) and smaller.num_patches == 299
    assert down.vision_tflops == pytest.approx(qwen_vision_flops(smaller).total / 1e12)
    assert down.vision_tflops < budget.vanilla_cost(shape).vision_tflops / 3.9
    assert budget.method_cost(shape, ficoco.get_method("downsample", retain=192)).llm_input_visual == 10 * 19
