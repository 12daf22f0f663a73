"""Tracing reductions back to patches, and the picture of it."""

from __future__ import annotations

import torch
from PIL import Image

import ficoco
from ficoco.visualize import patch_destinations, reduction_panels, render_reduction

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


def test_panels_show_kept_patches_and_merge_map(model, images, prompts):
    trace = _trace(model, images, prompts, "ficoco-v", retain=64)
    share = patch_destinations(trace.steps, PATCHES)
    image = Image.new("RGB", (336, 336), (200, 100, 50))
    base, kept_panel, merge_panel = reduction_panels(image, trace.positions[0].cpu(), share[0])
    assert base.size == kept_panel.size == merge_panel.size == (336, 336)
    kept = set(trace.positions[0].tolist())
    for position in range(PATCHES):
        r, c = divmod(position, 24)
        colour = kept_panel.getpixel((c * 14 + 7, r * 14 + 7))
        # kept patches keep the image colour, the others are dimmed
        assert (colour == (200, 100, 50)) == (position in kept)
    first = int(trace.positions[0, 0])
    r, c = divmod(first, 24)
    assert merge_panel.getpixel((c * 14, r * 14)) == (255, 255, 255)  # a kept token's own patch is outlined


def test_figure_explains_itself(model, images, prompts, tmp_path):
    """Titles on every panel, a colour key, and the answers: readable without the README."""
    trace = _trace(model, images, prompts, "ficoco-v", retain=64)
    share = patch_destinations(trace.steps, PATCHES)
    image = Image.new("RGB", (336, 336), (200, 100, 50))
    path = tmp_path / "r.png"
    fig = render_reduction(image, trace.positions[0].cpu(), share[0], path=str(path), method="FiCoCo-V at 64 tokens",
                           questions=["what colour?", "how many?"], expected=["red", "two"],
                           answers={"vanilla": ["red", "two"], "ficoco-v": ["red", "three"]})
    assert path.read_bytes()[:4] == b"\x89PNG"
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["input image", "kept: 64 of 576 patches", "where the 512 discarded patches went",
                      "every method's answers (red: wrong)"]
    assert "FiCoCo-V at 64 tokens" in fig._suptitle.get_text()
    keys = [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]
    assert "kept patch (full colour)" in keys and any(k.startswith("black: dropped") for k in keys)
    merged = int((share[0].sum(dim=1) > 1e-6).sum()) - 64
    assert f"colour: the kept token a patch went to ({merged} merged)" in keys
    (table,) = [child for ax in fig.axes for child in ax.tables]
    cells = table.get_celld()
    assert cells[0, 0].get_text().get_text() == "question" and cells[2, 3].get_text().get_text() == "three"
    assert cells[2, 3].get_text().get_color() == "tab:red"  # a wrong answer stands out
    assert cells[1, 3].get_text().get_color() != "tab:red"
