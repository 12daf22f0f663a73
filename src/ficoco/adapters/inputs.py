"""Prompt rewriting for encoder-side methods: fewer image features need fewer placeholders.

The LLaVA processor writes one ``<image>`` placeholder per visual feature (576 per image for
LLaVA-1.5). When the vision encoder hands the LLM ``retain`` features per image, each image's run of
placeholders is cut to its first ``retain`` entries, and every per-token tensor (attention mask,
labels, position ids, token type ids) is cut the same way. Rows whose lengths then differ are
re-padded on the side the batch was padded on.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch
from torch import Tensor

#: fill values for per-token tensors when rows must be re-padded
PAD_VALUES = MappingProxyType({"attention_mask": 0, "labels": -100, "position_ids": 0, "mm_token_type_ids": 0})
#: model inputs that hold one value per prompt token (cut with the prompt)
PER_TOKEN_INPUTS = ("attention_mask", "labels", "position_ids", "token_type_ids", "mm_token_type_ids")


def padding_side(attention_mask: Tensor | None, default: str = "right") -> str:
    """``"left"`` if some row starts with padding, ``"right"`` if some row ends with it, else
    ``default`` (an unpadded batch: generation wants new padding on the left)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        if bool((attention_mask[:, 0] == 0).any()):
            return "left"
        if bool((attention_mask[:, -1] == 0).any()):
            return "right"
    return default


def run_keep_mask(input_ids: Tensor, token_id: int, full: Sequence[int], kept: Sequence[int]) -> Tensor:
    """``[B, L]``: which tokens stay when the ``i``-th run of ``token_id`` placeholders (counted over
    the batch, row by row) is cut from ``full[i]`` to its first ``kept[i]`` tokens. Other tokens stay."""
    is_token = input_ids == token_id
    total = int(sum(full))
    found = int(is_token.sum())
    if found != total:
        raise ValueError(f"the prompt has {found} placeholders (token {token_id}) for visual inputs that need {total}")
    if total == 0:
        return torch.ones_like(is_token)
    device = input_ids.device
    ends = torch.tensor(list(full), device=device).cumsum(0)
    index = is_token.flatten().long().cumsum(0) - 1  # running count of placeholders over the batch
    item = torch.searchsorted(ends, index.clamp_min(0), right=True).clamp_max(len(full) - 1)
    within = index - (ends - torch.tensor(list(full), device=device))[item]
    keep = within < torch.tensor(list(kept), device=device)[item]
    return (~is_token.flatten() | keep).view_as(is_token)


def cut_tokens(input_ids: Tensor, per_token: dict[str, Tensor], keep: Tensor, *, pad_token_id: int,
               default_side: str = "right") -> tuple[Tensor, dict[str, Tensor]]:
    """``input_ids`` and the ``[B, L]`` (or ``[1, L]``) tensors of ``per_token`` without the tokens
    where ``keep`` (``[B, L]``) is false; rows that end up shorter are re-padded on the side the
    batch was padded on (``default_side`` when it had no padding)."""
    counts = keep.sum(dim=1)
    new_len = int(counts.max())
    b, l = input_ids.shape
    side = padding_side(per_token.get("attention_mask"), default_side)
    # destination column of each kept token: left-aligned, or right-aligned for left padding
    dest = keep.cumsum(dim=1) - 1
    if side == "left":
        dest = dest + (new_len - counts)[:, None]
    dest = torch.where(keep, dest, new_len)  # dropped tokens go to a scratch column

    def cut(x: Tensor, fill: int) -> Tensor:
        if x.shape[0] != b:
            x = x.expand(b, *x.shape[1:])
        out = torch.full((b, new_len + 1, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        index = dest.reshape(b, l, *([1] * (x.dim() - 2))).expand_as(x)
        return out.scatter_(1, index, x)[:, :new_len]

    new_ids = cut(input_ids, pad_token_id)
    return new_ids, {name: cut(t, PAD_VALUES.get(name, 0)) for name, t in per_token.items()}


def cut_prompt_inputs(inputs: dict, keep: Tensor, *, pad_token_id: int, default_side: str = "right") -> dict:
    """``inputs`` (model keyword arguments) with the prompt tokens where ``keep`` (``[B, L]``) is
    false removed from ``input_ids`` and from every ``[B, L]`` tensor of :data:`PER_TOKEN_INPUTS`,
    rows re-padded as :func:`cut_tokens` does. ``inputs`` is updated in place and returned."""
    input_ids = inputs["input_ids"]
    per_token = {k: inputs[k] for k in PER_TOKEN_INPUTS if isinstance(inputs.get(k), Tensor)
                 and inputs[k].dim() == 2 and inputs[k].shape[-1] == input_ids.shape[-1]}
    new_ids, cut = cut_tokens(input_ids, per_token, keep, pad_token_id=pad_token_id, default_side=default_side)
    inputs.update(cut)
    inputs["input_ids"] = new_ids
    return inputs


def shrink_placeholders(
    input_ids: Tensor,
    per_token: dict[str, Tensor],
    *,
    image_token_id: int,
    full_per_image: int,
    kept_per_image: int,
    pad_token_id: int,
    default_side: str = "right",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cut every image's placeholder run from ``full_per_image`` to its first ``kept_per_image`` tokens.

    Args:
        input_ids: ``[B, L]`` prompt ids with runs of ``full_per_image`` placeholders per image.
        per_token: other ``[B, L]`` (or ``[1, L]``) tensors aligned with ``input_ids``.
        default_side: where new padding goes when the batch had none (``"left"`` for generation).
    Returns:
        ``input_ids`` ``[B, L']`` and the same dict, cut alike.
    """
    is_image = input_ids == image_token_id
    index_in_image = (is_image.cumsum(dim=1) - 1) % full_per_image
    keep = ~is_image | (index_in_image < kept_per_image)
    return cut_tokens(input_ids, per_token, keep, pad_token_id=pad_token_id, default_side=default_side)


def resized_tower_call(args: tuple, kwargs: dict, patch: int, grid: tuple[int, int], native: tuple[int, int]):
    """The arguments of a CLIP or SigLIP tower call (pixels ``[I, C, H, W]`` first or as
    ``pixel_values``) with the pixels resized to ``grid`` patches of ``patch`` pixels and the
    position embeddings interpolated to it, as a forward pre-hook returns them; ``None`` (leave
    the call alone) at the tower's ``native`` grid, so that keeping every token is bit-identical
    to vanilla, or when the call has no pixels."""
    from ..stages.resolution import resize_images

    pixels = args[0] if args else kwargs.get("pixel_values")
    if pixels is None:
        return None
    size = (grid[0] * patch, grid[1] * patch)
    if tuple(pixels.shape[-2:]) == size and tuple(grid) == tuple(native):
        return None
    pixels = resize_images(pixels, size)
    kwargs = {**kwargs, "interpolate_pos_encoding": True}
    if args:
        return (pixels, *args[1:]), kwargs
    return args, {**kwargs, "pixel_values": pixels}
