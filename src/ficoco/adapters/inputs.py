"""Prompt rewriting for encoder-side methods: fewer image features need fewer placeholders.

The LLaVA processor writes one ``<image>`` placeholder per visual feature (576 per image for
LLaVA-1.5). When the vision encoder hands the LLM ``retain`` features per image, each image's run of
placeholders is cut to its first ``retain`` entries, and every per-token tensor (attention mask,
labels, position ids, token type ids) is cut the same way. Rows whose lengths then differ are
re-padded on the side the batch was padded on.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

#: fill values for per-token tensors when rows must be re-padded
PAD_VALUES = MappingProxyType({"attention_mask": 0, "labels": -100, "position_ids": 0})


def padding_side(attention_mask: Tensor | None, default: str = "right") -> str:
    """``"left"`` if some row starts with padding, ``"right"`` if some row ends with it, else
    ``default`` (an unpadded batch: generation wants new padding on the left)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        if bool((attention_mask[:, 0] == 0).any()):
            return "left"
        if bool((attention_mask[:, -1] == 0).any()):
            return "right"
    return default


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
