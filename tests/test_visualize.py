"""Tracing reductions back to patches, and the picture of it."""

from __future__ import annotations

import torch
from PIL import Image

import ficoco
from ficoco.visualize import patch_destinations, render_reduction

from .conftest import PATCHES, batch_inputs


def _trace(model, images, prompts, name, **options):
    with ficoco.apply(model, name, record=True, **options) as handle, torch.inference_mode():
        model(**batch_inputs(prompts[:2], images[:2]))
        return handle.vision_trace


def test_merging_conserves_every_patch(model, images, prompts):
    trace = _trace(model, images, prompts, "ficoco-v", retain=100)
    share = patch_destinations(trace.steps, PATCHES)
    assert share.shape == (2, PATCHES, 100)
    torch.testing.assert_close(share.sum(dim=2), torch.ones(2, PATCHES))  # nothing lost
    torch.testing.assert_close(share.sum(dim=1), trace.sizes.cpu())  # token sizes = patches they hold
    for b in range(2):  # a kept token holds all of its own patch
        kept = trace.positions[b]
        assert torch.all(share[b, kept, torch.arange(100)] > 0.5)


def test_pruning_loses_patches_and_fused_tokens_gather_them(model, images, prompts):
    pruned = patch_destinations(_trace(model, images, prompts, "random", retain=100).steps, PATCHES)
    assert int((pruned.sum(dim=2) > 0).sum()) == 2 * 100
    evit = _trace(model, images, prompts, "evit", retain=100)
    share = patch_destinations(evit.steps, PATCHES)
    torch.testing.assert_close(share.sum(dim=2), torch.ones(2, PATCHES))
    torch.testing.assert_close(share.sum(dim=1), evit.sizes.cpu())


def test_render_writes_three_panels(model, images, prompts, tmp_path):
    trace = _trace(model, images, prompts, "ficoco-v", retain=64)
    share = patch_destinations(trace.steps, PATCHES)
    image = Image.new("RGB", (336, 336), (200, 100, 50))
    out = render_reduction(image, trace.positions[0].cpu(), share[0], path=str(tmp_path / "r.png"))
    assert out.size == (3 * 336 + 20, 336)
    assert (tmp_path / "r.png").exists()
    kept_panel = out.crop((346, 0, 682, 336))
    # kept patches keep the image colour, the others are dimmed
    first = int(trace.positions[0, 0])
    r, c = divmod(first, 24)
    assert kept_panel.getpixel((c * 14 + 7, r * 14 + 7)) == (200, 100, 50)
