"""The three stages of the paradigm, each a small swappable component.

- filters: which tokens to discard (:mod:`ficoco.stages.filters`)
- correlates: where their information goes (:mod:`ficoco.stages.correlates`)
- compressors: how kept tokens absorb it (:mod:`ficoco.stages.compressors`)

:class:`TokenReduction` composes one of each; :class:`AttentionProbe` supplies the attention
statistics they read.
"""

from .compressors import AddMeanCompress, AveragingCompress, Compress, DropCompress, FuseCompress, SelfPreservingCompress, SizeWeightedCompress
from .compressors import NeighbourSupplementCompress
from .correlates import (
    ArgmaxSimilarityCorrelate,
    AttentionQuantileCorrelate,
    ConvergentCorrelate,
    Correlate,
    KeyNeighbourCorrelate,
    NeighbourCorrelation,
    NoCorrelate,
    TextMediatedQuantileCorrelate,
    quantile_targets,
    top_k_targets,
)
from .filters import (
    BipartiteSimilarityFilter,
    CLSAttentionFilter,
    DominantContextualFilter,
    DuplicationFilter,
    FiCoCoLanguageFilter,
    FiCoCoVisionFilter,
    Filter,
    LastTokenAttentionFilter,
    OutlierAttentionFilter,
    RandomFilter,
    TruncateFilter,
    local_penalty,
)
from .pipeline import TokenReduction
from .text_guided import NearestReceiverCorrelate, RaterAttentionFilter, TextRaters, density_peaks
from .probe import AttentionProbe, FeatureProbe, GroupedProbe, token_importance
from .tokens import NO_POSITION, Correlation, FilterResult, ReductionResult, TokenGroup

__all__ = [
    "AddMeanCompress", "ArgmaxSimilarityCorrelate", "DominantContextualFilter", "DuplicationFilter", "AttentionProbe", "AttentionQuantileCorrelate", "AveragingCompress",
    "BipartiteSimilarityFilter", "CLSAttentionFilter", "Compress", "ConvergentCorrelate", "Correlate",
    "Correlation", "DropCompress", "FiCoCoLanguageFilter", "FiCoCoVisionFilter", "Filter", "FilterResult",
    "FeatureProbe", "FuseCompress", "GroupedProbe", "LastTokenAttentionFilter", "NO_POSITION", "NoCorrelate", "RandomFilter", "ReductionResult",
    "SelfPreservingCompress", "SizeWeightedCompress", "TextMediatedQuantileCorrelate", "TokenGroup",
    "TokenReduction", "TruncateFilter", "local_penalty", "quantile_targets", "top_k_targets",
    "NearestReceiverCorrelate", "RaterAttentionFilter", "TextRaters", "density_peaks",
    "KeyNeighbourCorrelate", "NeighbourCorrelation", "NeighbourSupplementCompress", "OutlierAttentionFilter",
    "token_importance",
]
