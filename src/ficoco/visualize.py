"""Where did each patch go? Trace an encoder-side reduction back to the image.

With ``attach(..., record=True)`` every reduction step is kept. :func:`patch_destinations`
composes them: for each original patch, the share of it that ends up in each surviving token
(merges spread a discarded token over its targets by the correlation weights; pruning loses it).
:func:`render_reduction` draws the kept patches and the merge map next to the image.
"""

from __future__ import annotations

import colorsys

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .stages import ReductionResult


def patch_destinations(steps: list[tuple[int, ReductionResult]], num_patches: int, batch: int = 1) -> Tensor:
    """``[B, P, N']``: share of original patch ``p`` held by surviving token ``j`` after ``steps``.

    Rows of pruned patches are all zero; merged patches spread over their targets with the
    correlation's row-normalised weights (the same shares the compressors use for sizes).
    """
    if steps:
        batch = steps[0][1].kept.shape[0]
    share = torch.eye(num_patches).expand(batch, num_patches, num_patches).clone()
    for _, result in steps:
        kept = share.gather(2, result.kept[:, None, :].expand(-1, num_patches, -1).cpu())
        from_sources = share.gather(2, result.sources[:, None, :].expand(-1, num_patches, -1).cpu())
        weights = result.correlation.weights
        if weights is None:  # pruning: the sources' share is lost
            share = kept
            continue
        w = weights.float().cpu()
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        moved = from_sources @ w  # [B, P, T] or [B, P, 1] for a new fused token
        share = torch.cat([kept, moved], dim=2) if result.correlation.into_new_token else kept + moved
    return share


def _palette(n: int) -> list[tuple[int, int, int]]:
    golden = 0.618033988749895
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * golden) % 1.0, 0.65, 0.95)) for i in range(n)]


def render_reduction(
    image: Image.Image,
    positions: Tensor,
    destinations: Tensor,
    grid: tuple[int, int] = (24, 24),
    path: str | None = None,
) -> Image.Image:
    """Three panels for one image: the input, the kept patches (others dimmed), and the merge map
    (every patch coloured like the token that holds most of it; pruned patches black).

    Args:
        image: the (processed) input image.
        positions: ``[N']`` raster position of each surviving token (-1 for fused tokens).
        destinations: ``[P, N']`` shares from :func:`patch_destinations` for this image.
    """
    gh, gw = grid
    side = 336
    base = image.convert("RGB").resize((side, side))
    cell_w, cell_h = side / gw, side / gh
    kept_panel = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.7)
    merge_panel = Image.new("RGB", base.size, (0, 0, 0))
    draw_merge = ImageDraw.Draw(merge_panel)
    colours = _palette(destinations.shape[1])
    owner = destinations.argmax(dim=1)
    alive = destinations.sum(dim=1) > 1e-6
    for p in range(gh * gw):
        r, c = divmod(p, gw)
        box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w) - 1, round((r + 1) * cell_h) - 1)
        if bool(alive[p]):
            draw_merge.rectangle(box, fill=colours[int(owner[p])])
    for j, pos in enumerate(positions.tolist()):
        if pos < 0:
            continue
        r, c = divmod(pos, gw)
        box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w), round((r + 1) * cell_h))
        kept_panel.paste(base.crop(box), box[:2])
        draw_merge.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
    canvas = Image.new("RGB", (3 * side + 20, side), (255, 255, 255))
    for i, panel in enumerate((base, kept_panel, merge_panel)):
        canvas.paste(panel, (i * (side + 10), 0))
    if path is not None:
        canvas.save(path)
    return canvas
