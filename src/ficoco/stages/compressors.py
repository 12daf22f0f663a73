"""Compress stage: update the kept tokens from the discarded ones and the correlation.

A compressor maps ``(targets, sources, correlation)`` (each a :class:`TokenGroup`) to the surviving
tokens: the targets, updated in place of order, plus a new fused token when the correlation made one.
Arithmetic runs in float32 and is cast back to the features' dtype; only the weighted sum of the
sources in a merge takes half-precision features as they are (float32 accumulation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .tokens import NO_POSITION, Correlation, TokenGroup


class Compress(ABC):
    """Base class of the compress stage."""

    #: whether this compressor can build the new token of a convergent correlation
    accepts_new_token: bool = False
    #: whether it uses the correlation weights (pure dropping does not)
    uses_weights: bool = True

    @abstractmethod
    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup: ...


def _normalized_rows(weights: Tensor) -> Tensor:
    """``alpha_ij = C_ij / sum_j' C_ij'`` over each source's targets (``[B, r, T]``)."""
    w = weights.float()
    return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _merge(targets: TokenGroup, sources: TokenGroup, weights: Tensor, self_weight: Tensor | None,
           share: Tensor) -> TokenGroup:
    """``x_j <- (w_j x_j + sum_i a_ij x_i) / (w_j + sum_i a_ij)``.

    Args:
        weights: ``a``, ``[B, r, T]`` weight of source ``i``'s features in target ``j``.
        self_weight: ``w``, ``[B, T]`` weight of each target's own features; ``None`` for 1.
        share: ``[B, r, T]`` fraction of source ``i`` that target ``j`` absorbs (rows sum to 1);
            sizes grow by ``sum_i share_ij * size_i``.
    """
    x_s = sources.features
    if x_s.dtype in (torch.float16, torch.bfloat16):
        # the product in the features' own precision with float32 accumulation, as the model's
        # matmuls run (float32 operands would make it a float32 GEMM over every target and source,
        # although each source reaches only a few targets); on a GPU its output stays in float32
        # (no rounding to the features' dtype and back), elsewhere it is rounded once
        w_t = weights.transpose(1, 2).to(x_s.dtype)
        incoming = torch.bmm(w_t, x_s, out_dtype=torch.float32) if x_s.is_cuda else (w_t @ x_s).float()  # [B, T, D]
    else:
        incoming = weights.transpose(1, 2).float() @ x_s.float()
    mass = weights.sum(dim=1)  # [B, T]
    # the targets are added into the product's fresh float32 output: no float32 copy of them
    if self_weight is None:
        merged = incoming.add_(targets.features).div_((mass + 1)[..., None])
    else:
        merged = incoming.add_(targets.features.float() * self_weight[..., None]).div_((self_weight + mass)[..., None])
    sizes = targets.sizes + (share.transpose(1, 2) @ sources.sizes[..., None].float())[..., 0]
    return TokenGroup(merged.to(targets.features.dtype), sizes, targets.positions, targets.grid)


@dataclass
class SelfPreservingCompress(Compress):
    """FiCoCo's compression (docs/spec.md §3): with ``alpha_ij = C_ij / sum_{j' in J_i} C_ij'``,
    ``x_j <- (x_j + sum_i alpha_ij x_i) / (1 + sum_i alpha_ij)``: a target keeps weight 1 for itself."""

    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup:
        alpha = _normalized_rows(correlation.weights)
        return _merge(targets, sources, alpha, None, alpha)


@dataclass
class AveragingCompress(Compress):
    """Plain averaging (the paper's ablation): ``x_j <- mean({x_j} + {x_i : j in J_i})``, every
    token with weight 1, whatever the correlation weight."""

    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup:
        chosen = (correlation.weights > 0).float()
        return _merge(targets, sources, chosen, None, _normalized_rows(chosen))


@dataclass
class SizeWeightedCompress(Compress):
    """ToMe's compression: a size-weighted average, ``x_j <- (s_j x_j + sum_i a_ij s_i x_i) /
    (s_j + sum_i a_ij s_i)``, with ``a`` the row-normalised correlation (one-hot for ToMe)."""

    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup:
        share = _normalized_rows(correlation.weights)
        return _merge(targets, sources, share * sources.sizes[..., None], targets.sizes, share)


@dataclass
class FuseCompress(Compress):
    """EViT's compression: the sources become one new token, appended after the targets.

    Attributes:
        fused: ``"average"`` (default, docs/spec.md §7): the weighted average
            ``sum_i w_i x_i / sum_i w_i`` (``w`` = [CLS] attention), a token on the scale of the
            others; ``"sum"``: the unnormalised ``sum_i w_i x_i``, as EViT's official code builds it
            (docs/methods.md), whose scale is the [CLS] attention the sources held.
    """

    accepts_new_token = True
    fused: Literal["average", "sum"] = "average"

    def __post_init__(self) -> None:
        if self.fused not in ("average", "sum"):
            raise ValueError(f"fused must be 'average' or 'sum', got {self.fused!r}")

    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup:
        w = correlation.weights[..., 0].float()  # [B, r]
        if self.fused == "average":
            w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = (w[:, None, :] @ sources.features.float()).to(targets.features.dtype)  # [B, 1, D]
        size = sources.sizes.sum(dim=1, keepdim=True)
        position = torch.full_like(size, NO_POSITION, dtype=torch.long)
        return TokenGroup(
            torch.cat([targets.features, fused], dim=1),
            torch.cat([targets.sizes, size], dim=1),
            torch.cat([targets.positions, position], dim=1),
            targets.grid,
        )


@dataclass
class NeighbourSupplementCompress(Compress):
    """PruMerge's compression: every kept token adds its neighbours' features weighted by the
    attention they get, ``x_t <- x_t + sum_j w_tj x_j`` (the features before this step, and no
    denominator: the official code divides by nothing), and the sources become one new token, their
    attention-weighted *sum* appended after the targets (:class:`FuseCompress` with ``"sum"``).
    Sizes count every patch once: a kept token stands for itself, the new token for the sources
    (what a kept token adds from its neighbours are copies of their features)."""

    accepts_new_token = True

    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup:
        from_targets, from_sources = (getattr(correlation, name, None) for name in ("from_targets", "from_sources"))
        if from_targets is None or from_sources is None:
            raise TypeError(f"{type(self).__name__} adds each kept token's neighbours: it needs the neighbours of "
                            f"a KeyNeighbourCorrelate, not {type(correlation).__name__}")
        x_t = targets.features.float()
        supplemented = x_t + from_targets.float() @ x_t + from_sources.float() @ sources.features.float()
        kept = TokenGroup(supplemented.to(targets.features.dtype), targets.sizes, targets.positions, targets.grid)
        return FuseCompress(fused="sum")(kept, sources, correlation)


@dataclass
class DropCompress(Compress):
    """Pruning: the targets are returned unchanged."""

    uses_weights = False

    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup:
        return targets


@dataclass
class AddMeanCompress(Compress):
    """VisionZip's contextual tokens: ``x_j <- x_j + mean_{i -> j} x_i``, the target *plus* the
    plain mean of the sources assigned to it (a sum, not an average: the official code adds them;
    a target that receives nothing stays as it is). Sizes add up."""

    def __call__(self, targets: TokenGroup, sources: TokenGroup, correlation: Correlation) -> TokenGroup:
        assigned = (correlation.weights > 0).float()  # [B, r, T]
        count = assigned.sum(dim=1)  # [B, T]
        mean = (assigned.transpose(1, 2) @ sources.features.float()) / count.clamp_min(1)[..., None]
        share = _normalized_rows(assigned)
        sizes = targets.sizes + (share.transpose(1, 2) @ sources.sizes[..., None].float())[..., 0]
        merged = (targets.features.float() + mean).to(targets.features.dtype)
        return TokenGroup(merged, sizes, targets.positions, targets.grid)
