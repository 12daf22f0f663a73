"""A token reduction = filter + correlate + compress, checked for compatibility once."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor
from torch.profiler import record_function

from .compressors import Compress
from .correlates import Correlate, NoCorrelate
from .filters import Filter
from .probe import AttentionProbe
from .tokens import ReductionResult, TokenGroup


@dataclass
class TokenReduction:
    """One composition of the three stages.

    Calling it removes ``num_remove`` candidates: the filter picks ``num_remove`` sources (one more
    when the correlate fuses them into a new token, so the count still drops by ``num_remove``),
    the correlate maps them to targets and the compressor updates the targets.
    """

    filter: Filter
    correlate: Correlate
    compress: Compress

    def __post_init__(self) -> None:
        if self.correlate.creates_token and not self.compress.accepts_new_token:
            raise ValueError(
                f"{type(self.correlate).__name__} fuses tokens into a new one; "
                f"{type(self.compress).__name__} cannot build it (use FuseCompress)"
            )
        if self.compress.accepts_new_token and not self.correlate.creates_token:
            raise ValueError(f"{type(self.compress).__name__} needs a convergent correlate (ConvergentCorrelate)")
        if isinstance(self.correlate, NoCorrelate) and self.compress.uses_weights:
            raise ValueError(f"{type(self.compress).__name__} needs correlation weights; NoCorrelate gives none")

    def without_cls(self) -> "TokenReduction":
        """This composition for an encoder without [CLS]: each stage's stand-in (docs/spec.md §6)."""
        return replace(self, filter=self.filter.without_cls(), correlate=self.correlate.without_cls())

    @property
    def needs_cls(self) -> bool:
        return self.without_cls() != self

    @property
    def keeps_order(self) -> bool:
        """Whether survivors keep their sequence order (see :attr:`Filter.keeps_order`)."""
        return self.filter.keeps_order

    @property
    def decides_removals(self) -> bool:
        """Whether the filter decides per sample how many tokens go (see :attr:`Filter.decides_removals`)."""
        return self.filter.decides_removals

    @property
    def extra_sources(self) -> int:
        return 1 if self.correlate.creates_token else 0

    @property
    def adaptive(self) -> bool:
        """Whether the filter decides how many tokens each sample keeps (PruMerge's outliers)."""
        return self.filter.adaptive

    def adaptive_removals(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        """``[B]`` long: the ``num_remove`` of each sample under an adaptive filter (the new token,
        if the correlate makes one, counted among what is left). Samples with the same count can
        be reduced in one call; others one at a time."""
        return tokens.num_tokens - self.filter.kept_counts(tokens, probe) - self.extra_sources

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, num_remove: int) -> ReductionResult:
        num_sources = num_remove + self.extra_sources
        if not 0 < num_sources <= tokens.num_tokens:
            raise ValueError(f"cannot remove {num_remove} of {tokens.num_tokens} tokens")
        # named ranges, so that a profile of a model run splits a reduction's cost by stage
        with record_function("ficoco.filter"):
            split = self.filter(tokens, probe, num_sources)
        with record_function("ficoco.correlate"):
            correlation = self.correlate(tokens, probe, split)
        with record_function("ficoco.compress"):
            survivors = self.compress(tokens.select(split.targets), tokens.select(split.sources), correlation)
        slot = split.sources[:, 0] if correlation.into_new_token else None
        return ReductionResult(survivors, split.targets, split.sources, slot, split, correlation)
