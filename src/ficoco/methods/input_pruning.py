"""Methods that act on the visual tokens the LLM receives (after the projector, before the first
decoder layer), reading the tokens' features rather than attention: spatial pooling, DivPrune,
CDPruner and the ``zero`` control. docs/methods.md gives each one's source and deviations."""

from __future__ import annotations

from ..stages import AveragingCompress, DropCompress, NoCorrelate, TokenReduction, TruncateFilter
from ..stages.diversity import ConditionalDPPFilter, MaxMinDiversityFilter
from ..stages.pooling import GridPartitionCorrelate, GridPartitionFilter
from .base import InputReduction, Method, check_retain_value


def _retain(retain, name: str):
    if retain == 0 and not isinstance(retain, bool):
        raise ValueError(f"{name} with retain=0 keeps no visual token: that is the 'zero' control")
    check_retain_value(retain)
    return retain


def pool(retain: int | float = 144) -> Method:
    """Spatial average pooling of the projected tokens into ``retain`` bins (2x2 on LLaVA-1.5's
    24x24 grid gives 144; 192 = 16x12 and 128 = 16x8 bins of alternating sizes;
    :mod:`ficoco.stages.pooling`), after the projector as LLaVA-NeXT pools. On Qwen-VL each
    frame's grid of merged tokens is pooled on its own, a bin at its top-left token's M-RoPE position."""
    reduction = TokenReduction(GridPartitionFilter(), GridPartitionCorrelate(), AveragingCompress())
    return Method("pool", input=InputReduction(reduction, _retain(retain, "pool")),
                  description="spatial average pooling of the projected visual tokens")


def divprune(retain: int | float = 192, *, greedy_backend: str = "auto") -> Method:
    """DivPrune: keep the max-min diverse set of the projected tokens (cosine distance, greedy).
    ``greedy_backend``: ``"auto"`` (one Triton kernel on a GPU where Triton is installed, the
    PyTorch loop otherwise; the same tokens), ``"torch"`` (always the loop) or ``"triton"``."""
    reduction = TokenReduction(MaxMinDiversityFilter(backend=greedy_backend), NoCorrelate(), DropCompress())
    return Method("divprune", input=InputReduction(reduction, _retain(retain, "divprune")),
                  description="DivPrune: max-min diverse subset of the projected visual tokens")


def cdpruner(retain: int | float = 192, *, theta: float | None = None, greedy_backend: str = "auto") -> Method:
    """CDPruner: the greedy MAP of a DPP over the projected tokens, its kernel weighted by each
    token's relevance to the instruction (here the instruction's LLM input embeddings stand in for
    CLIP's text tower, which LLaVA checkpoints do not carry; docs/methods.md). ``greedy_backend``:
    as for :func:`divprune`."""
    reduction = TokenReduction(ConditionalDPPFilter(theta=theta, backend=greedy_backend), NoCorrelate(),
                               DropCompress())
    return Method("cdpruner", input=InputReduction(reduction, _retain(retain, "cdpruner")),
                  description="CDPruner: instruction-conditioned DPP selection of the projected visual tokens")


def zero() -> Method:
    """The text-only floor: the LLM gets no visual token at all (the image placeholders are cut; on
    Qwen-VL the text left is numbered as a text-only prompt)."""
    reduction = TokenReduction(TruncateFilter(), NoCorrelate(), DropCompress())
    return Method("zero", input=InputReduction(reduction, 0), description="no visual tokens (a floor)")
