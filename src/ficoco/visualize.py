"""Where did each patch go? Trace an encoder-side reduction back to the image.

With ``attach(..., record=True)`` every reduction step is kept. :func:`patch_destinations`
composes them: for each original patch, the share of it that ends up in each surviving token
(merges spread a discarded token over its targets by the correlation weights; pruning loses it).
:func:`render_reduction` draws the kept patches and the merge map next to the image, with titles,
a colour key and (optionally) the answers::

    with ficoco.apply(model, "ficoco-v", retain=64, record=True) as handle:
        model.generate(**inputs, max_new_tokens=8)
        trace = handle.vision_trace            # what the encoder did to this batch
    shares = patch_destinations(trace.steps, num_patches=576)          # [B, 576, 64]
    render_reduction(image, trace.positions[0].cpu(), shares[0], path="reduction.png",
                     method="FiCoCo-V, 64 tokens")
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .stages import ReductionResult


def patch_destinations(steps: list[tuple[int, ReductionResult]], num_patches: int, batch: int = 1) -> Tensor:
    """``[B, P, N']``: share of original patch ``p`` held by surviving token ``j`` after ``steps``.

    Rows of pruned patches are all zero; merged patches spread over their targets with the
    correlation's row-normalised weights (the same shares the compressors use for sizes).
    """
    layers = [layer for layer, _ in steps]
    if len(set(layers)) != len(layers):
        raise ValueError("these steps hold one entry per image of the same layer (an adaptive reduction whose images "
                         "keep different counts): pass one image's steps at a time, e.g. [trace.steps[i]]")
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


#: how dark the discarded patches are drawn in the kept-patches panel
DIMMED = 0.7


def reduction_panels(
    image: Image.Image,
    positions: Tensor,
    destinations: Tensor,
    grid: tuple[int, int] = (24, 24),
    side: int = 336,
) -> tuple[Image.Image, Image.Image, Image.Image]:
    """The three pictures of one image's reduction, each ``side`` x ``side`` pixels: the input, the
    kept patches (the others dimmed), and the merge map (every patch coloured like the token that
    holds most of it, each surviving token's own patch outlined in white, pruned patches black).

    Args:
        image: the (processed) input image.
        positions: ``[N']`` raster position of each surviving token (-1 for fused tokens).
        destinations: ``[P, N']`` shares from :func:`patch_destinations` for this image.
        grid: the patch grid ``(rows, columns)``.
    """
    gh, gw = grid
    base = image.convert("RGB").resize((side, side))
    cell_w, cell_h = side / gw, side / gh
    kept_panel = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), DIMMED)
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
    for pos in positions.tolist():
        if pos < 0:
            continue
        r, c = divmod(pos, gw)
        box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w), round((r + 1) * cell_h))
        kept_panel.paste(base.crop(box), box[:2])
        draw_merge.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
    return base, kept_panel, merge_panel


def render_reduction(
    image: Image.Image,
    positions: Tensor,
    destinations: Tensor,
    grid: tuple[int, int] = (24, 24),
    path: str | None = None,
    *,
    method: str = "the method",
    questions: Sequence[str] = (),
    answers: Mapping[str, Sequence[str]] | None = None,
    expected: Sequence[str] | None = None,
):
    """A figure a reader understands without the README: the three panels of
    :func:`reduction_panels` with titles and a colour key, and, when given, a table of the
    questions with each method's answers (and the expected ones).

    Args:
        method: the name shown in the titles (e.g. ``"FiCoCo-V, 64 tokens"``).
        questions / answers / expected: ``answers`` maps a method name to its answers, one per
            question; ``expected``, the right answers when known.
        path: save the figure there (PNG) and close it.
    Returns:
        the matplotlib ``Figure``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = reduction_panels(image, positions, destinations, grid)
    total = destinations.shape[0]
    kept = int((positions >= 0).sum())
    fused = int((positions < 0).sum())
    alive = int((destinations.sum(dim=1) > 1e-6).sum())  # patches whose information survives somewhere
    merged, dropped = alive - kept, total - alive
    rows = len(questions) if answers else 0
    panel_height, key_height, row_height = 4.1, 0.65, 0.26
    heights = [panel_height, key_height] + ([row_height * (rows + 1) + 0.15] if rows else [])
    fig = plt.figure(figsize=(12, sum(heights) + 0.4))
    grid_spec = fig.add_gridspec(len(heights), 3, height_ratios=heights, left=0.02, right=0.98, top=0.93,
                                 bottom=0.01, hspace=0.04, wspace=0.08)
    fig.suptitle(f"{method}: which of the {total} image patches reach the LLM", fontsize=12)
    titles = (
        "input image",
        f"kept: {kept} of {total} patches" + (f" + {fused} fused token" if fused else ""),
        f"where the {total - kept} discarded patches went",
    )
    keys = (
        [],
        [Patch(facecolor="0.6", label="kept patch (full colour)"),
         Patch(facecolor="0.15", label="discarded patch (dimmed)")],
        [Patch(facecolor=(0.95, 0.55, 0.33), label=f"colour: the kept token a patch went to ({merged} merged)"),
         Patch(facecolor="white", edgecolor="0.3", label="white outline: a kept token's own patch"),
         Patch(facecolor="black", label=f"black: dropped, merged nowhere ({dropped})")],
    )
    for i, (panel, title, key) in enumerate(zip(panels, titles, keys)):
        ax = fig.add_subplot(grid_spec[0, i])
        ax.imshow(panel)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if key:
            key_ax = fig.add_subplot(grid_spec[1, i])
            key_ax.axis("off")
            key_ax.legend(handles=key, loc="upper center", fontsize=8, frameon=False)
    if rows:
        ax = fig.add_subplot(grid_spec[2, :])
        ax.axis("off")
        ax.set_title("every method's answers" + (" (red: wrong)" if expected else ""), fontsize=10)
        names = list(answers)
        header = ["question"] + (["expected"] if expected else []) + names
        cells = []
        for i, question in enumerate(questions):
            row = [question] + ([expected[i]] if expected else [])
            cells.append(row + [answers[name][i] for name in names])
        table = ax.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="left", colLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.auto_set_column_width(list(range(len(header))))
        if expected:  # wrong answers in red
            first = 2
            for r, row in enumerate(cells, start=1):
                for c in range(first, len(header)):
                    if row[c].strip().lower() != str(row[1]).strip().lower():
                        table[r, c].get_text().set_color("tab:red")
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
