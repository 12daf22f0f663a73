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
        features = llava.multi_modal_projector(tower.hidden_states[model.config.vision_feature_layer][:, 1:])
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
