"""A method = stage composition(s) + where they run + a per-layer schedule.

:class:`VisionReduction` runs a :class:`~ficoco.stages.TokenReduction` inside the vision encoder,
:class:`InputReduction` once on the projected visual tokens the LLM receives (after the projector,
before the first decoder layer), :class:`LanguageReduction` inside the LLM decoder; a
:class:`Method` holds any of them, or a :class:`ResolutionReduction`: the image itself at a lower
resolution, before the encoder (the ``downsample`` control). Budgets are
given as ``retain`` (tokens left after the last reduction) or an explicit ``schedule`` and are
resolved against the model's geometry when the method is attached.

``retain`` is a count (``int``: visual tokens kept per image) or a share (``float`` in (0, 1]:
``round(share x tokens)`` of each image's own tokens, at least one; ``1.0`` keeps every token).
A share is what models with dynamic resolution need, whose images bring different token counts;
plans are then resolved per token count (:meth:`Method.plan`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..schedule import spread_evenly, spread_geometrically, tokens_entering_layers, validate_schedule
from ..stages import BipartiteSimilarityFilter, TextRaters, TokenReduction
from ..stages.resolution import exact_grid, grid_within


def check_retain_value(retain) -> None:
    """``retain`` is a positive integer (a count) or a float in (0, 1] (a share of the tokens)."""
    if isinstance(retain, bool) or not isinstance(retain, (int, float)):
        raise ValueError(f"retain must be a positive integer (tokens kept) or a float in (0, 1] (their share), "
                         f"got {retain!r}")
    if isinstance(retain, int) and retain <= 0:
        raise ValueError(f"retain must be a positive integer (tokens kept), got {retain}")
    if isinstance(retain, float) and not 0.0 < retain <= 1.0:
        raise ValueError(f"retain as a share of the tokens must lie in (0, 1], got {retain}")


def kept_count(retain: int | float, available: int, where: str, *, allow_zero: bool = False) -> int:
    """Tokens kept of ``available`` under ``retain`` (a count, or a share rounded, at least 1);
    ``allow_zero``: ``retain=0`` keeps none (the ``zero`` control)."""
    if allow_zero and retain == 0 and not isinstance(retain, bool):
        return 0
    check_retain_value(retain)
    if isinstance(retain, float):
        return max(1, min(available, round(retain * available)))
    if retain > available:
        raise ValueError(f"retain={retain} exceeds the {available} visual tokens available to the {where}")
    return retain


@dataclass
class _Reduction:
    reduction: TokenReduction
    retain: int | None = None
    start_layer: int | None = None
    end_layer: int | None = None
    schedule: Mapping[int, int] | None = None
    #: ``"attention"`` (ToMe's, FiCoCo's and FastV's place): between a layer's attention and its
    #: MLP, so merged tokens go through the MLP; ``"output"``: on the layer's output, after the MLP
    #: (VisionZip merges the features the LLM reads, DART compares layer outputs). Scores come
    #: from the layer's own attention either way.
    reduce_at: str = "attention"
    #: explicit reducing layers with a geometric schedule instead of ``start_layer..end_layer``
    #: spread evenly: each keeps the same share of what it gets, ``(retain / tokens) ** (1 / stages)``
    #: (PyramidDrop's pyramid). A float ``f`` is a share of the depth: the reduction lands before
    #: layer ``round(f x layers)`` (0.25 / 0.5 / 0.75 of a 32-layer LLM: before layers 8 / 16 / 24)
    stages: tuple[int | float, ...] | None = None
    #: score with the *next* layer's queries and keys, computed from this layer's output (with
    #: ``reduce_at="output"``): PyramidDrop ranks tokens by the attention of the layer it prunes for
    score_with_next_layer: bool = False
    #: with ``stages``: ``stage_counts(available, keep, stages)`` -> the candidates left after each
    #: stage (non-increasing, the schedule's own rule), instead of the geometric pyramid (SparseVLM's
    #: per-budget table)
    stage_counts: Callable[[int, int, int], list[int]] | None = None

    def __post_init__(self) -> None:
        if self.stage_counts is not None and self.stages is None:
            raise ValueError("stage_counts gives the counts after each of the stages: it needs stages=")
        if self.score_with_next_layer and self.reduce_at != "output":
            raise ValueError("score_with_next_layer reads the next layer's input: it needs reduce_at='output'")
        if self.reduce_at not in ("attention", "output"):
            raise ValueError(f"reduce_at must be 'attention' or 'output', got {self.reduce_at!r}")
        if self.retain is not None and self.schedule is not None:
            raise ValueError("give one of retain= or schedule=, not both")
        if self.adaptive and (self.retain is not None or self.schedule is not None):
            raise ValueError(f"{type(self.reduction.filter).__name__} decides how many tokens each image keeps: "
                             f"give neither retain= nor schedule=")
        if self.retain is not None:
            check_retain_value(self.retain)

    @property
    def adaptive(self) -> bool:
        """Whether the filter decides each image's count (PruMerge's outliers): the plan then
        holds the one reducing layer with ``0`` removals, and the adapter asks the filter."""
        return self.reduction.adaptive

    @property
    def has_budget(self) -> bool:
        return self.retain is not None or self.schedule is not None or self.adaptive

    def _resolve(self, reducible: range, default_start: int, available: int, where: str,
                 allowed: frozenset[int] | None = None, keep: int | None = None) -> dict[int, int]:
        """``{layer: removed}`` over the layers of ``reducible`` (only those in ``allowed``, when
        given: e.g. the full-attention blocks of a windowed encoder), keeping ``keep`` tokens
        (default: ``retain`` resolved against ``available``)."""
        if self.schedule is not None:
            plan = validate_schedule(self.schedule, reducible, available, where)
            if allowed is not None and not set(plan) <= allowed:
                raise ValueError(f"schedule layers {sorted(set(plan) - allowed)} cannot reduce in this {where}; "
                                 f"it reduces in layers {sorted(allowed)}")
        else:
            if keep is None and not self.adaptive:
                if self.retain is None:
                    raise ValueError(f"the {where} reduction has no budget: give retain= or schedule=")
                keep = kept_count(self.retain, available, where)
            start = default_start if self.start_layer is None else self.start_layer
            end = reducible.stop - 1 if self.end_layer is None else self.end_layer
            # negative layers count back from the last reducible layer (-1 = the last one)
            start, end = (x + reducible.stop if x < 0 else x for x in (start, end))
            if start not in reducible or end not in reducible or end < start:
                raise ValueError(
                    f"{where} reduction layers {start}..{end} must lie within "
                    f"{reducible.start}..{reducible.stop - 1}"
                )
            layers = [layer for layer in range(start, end + 1) if allowed is None or layer in allowed]
            if self.stages is not None:
                depth = reducible.stop + 1  # the LLM's layers (the last one cannot reduce)
                layers = sorted({round(x * depth) - 1 if isinstance(x, float) else x for x in self.stages})
                if any(layer not in reducible for layer in layers):
                    raise ValueError(f"{where} reduction stages {layers} (from {list(self.stages)}) must lie within "
                                     f"{reducible.start}..{reducible.stop - 1}")
            if self.adaptive:  # the count is decided per image at run time, in one layer
                if len(layers) != 1 or self.stages is not None:
                    raise ValueError(f"an adaptive {where} reduction decides its count in one layer, not in layers "
                                     f"{layers}")
                return {layers[0]: 0}
            if not layers and keep < available:
                raise ValueError(f"no {where} layer between {start} and {end} can reduce; it reduces in layers "
                                 f"{sorted(allowed)}")
            if self.stage_counts is not None:
                plan = _stage_plan(layers, available, self.stage_counts(available, keep, len(layers)), where)
            elif self.stages is not None:
                plan = spread_geometrically(available, keep, layers)
            else:
                plan = spread_evenly(available - keep, layers)
        if isinstance(self.reduction.filter, BipartiteSimilarityFilter):
            _check_bipartite_limit(plan, available, self.reduction.extra_sources, self.reduction.filter.max_sources)
        return plan


def _stage_plan(layers: list[int], available: int, counts: list[int], where: str) -> dict[int, int]:
    """``{layer: removed}`` from the candidates left after each stage of ``layers`` (``counts``)."""
    left = [available, *counts]
    if len(counts) != len(layers) or any(b > a for a, b in zip(left, left[1:])) or left[-1] < 1:
        raise ValueError(f"the {where} stages {layers} cannot leave {counts} of {available} tokens: one "
                         f"non-increasing count per stage, at least one token")
    return {layer: left[i] - left[i + 1] for i, layer in enumerate(layers) if left[i] > left[i + 1]}


def _check_bipartite_limit(plan: Mapping[int, int], available: int, extra: int, limit: Callable[[int], int]) -> None:
    """Refuse a schedule in which some layer discards more than ``limit(tokens)`` (ToMe's half)."""
    current = available
    for layer, removed in sorted(plan.items()):
        if removed + extra > limit(current):
            raise ValueError(
                f"ToMe merges at most half the tokens per layer, but layer {layer} would remove {removed} of "
                f"{current}; spread the removals over more layers (start_layer=) or keep more tokens"
            )
        current -= removed


@dataclass
class VisionReduction(_Reduction):
    """Token reduction inside the vision encoder.

    Attributes:
        reduction: the stage composition.
        retain: patch tokens that reach the LLM (per image).
        start_layer / end_layer: encoder layers the removals are spread over; ``end_layer`` defaults
            to the layer whose output the LLM reads (22 of 24 for ``vision_feature_layer=-2``).
        schedule: explicit ``{layer: removed}`` instead of ``retain``.
        proportional_attention: add ``log(size)`` of each key to the attention logits of the layers
            after the first reduction (ToMe's proportional attention).
        reduce_at: see :class:`_Reduction` (VisionZip merges the layer's output).
    """

    proportional_attention: bool = False

    def without_cls(self) -> "VisionReduction":
        return replace(self, reduction=self.reduction.without_cls())

    def resolve(self, num_layers: int, feature_layer: int, num_patches: int, default_start: int = 12, *,
                reducible: frozenset[int] | None = None, keep: int | None = None) -> dict[int, int]:
        """``{layer: removed}`` for an encoder of ``num_layers`` whose layer ``feature_layer`` (index)
        output feeds the LLM, with ``num_patches`` candidate tokens per image; ``reducible``: the
        only layers that may reduce (``None``: every layer); ``keep``: overrides ``retain``."""
        return self._resolve(range(0, feature_layer + 1), min(default_start, feature_layer), num_patches,
                             "vision encoder", reducible, keep)


@dataclass
class LanguageReduction(_Reduction):
    """Token reduction inside the LLM decoder.

    Attributes:
        reduction: the stage composition.
        retain: visual tokens left (per image) after the last reduction.
        start_layer / end_layer: decoder layers the removals are spread over (``end_layer`` defaults
            to the second-to-last layer, the last whose reduction a later layer sees).
        schedule: explicit ``{layer: removed}`` instead of ``retain``.
        raters: chooses, once per prompt from the LLM's input embeddings, the text tokens whose
            attention the stages read as ``AttentionProbe.rater_attention`` (SparseVLM).
    """

    raters: TextRaters | None = None

    def resolve(self, num_layers: int, num_visual: int, default_start: int = 5, *, keep: int | None = None
                ) -> dict[int, int]:
        """``{layer: removed}`` per image for a decoder of ``num_layers`` fed ``num_visual`` visual
        tokens per image; ``keep`` overrides ``retain``."""
        if num_layers < 2:
            raise ValueError("the LLM needs at least two layers for a reduction inside it to matter")
        return self._resolve(range(0, num_layers - 1), min(default_start, num_layers - 2), num_visual, "LLM",
                             keep=keep)


@dataclass
class InputReduction:
    """Token reduction on the visual tokens the LLM receives: the projector's output, before the
    first decoder layer, in one step per image. Its stages read the tokens' features (and the
    instruction's embeddings, :class:`~ficoco.stages.FeatureProbe`), not attention: DivPrune,
    CDPruner, spatial pooling and the ``zero`` control act here.

    Attributes:
        reduction: the stage composition.
        retain: visual tokens per image handed to the LLM (a count or a share; ``0`` keeps none).
    """

    reduction: TokenReduction
    retain: int | float = 192

    def __post_init__(self) -> None:
        if not (self.retain == 0 and not isinstance(self.retain, bool)):
            check_retain_value(self.retain)

    def resolve(self, available: int) -> int:
        """Tokens removed of the ``available`` ones the encoder hands on."""
        return available - kept_count(self.retain, available, "LLM input", allow_zero=True)


@dataclass
class ResolutionReduction:
    """The image itself at a lower resolution: the processor's pixels are resized before the vision
    encoder, which then runs on fewer patches, and the LLM receives one token per patch (or merge
    group) of the smaller grid, at the positions of a genuinely smaller image. No token is chosen,
    pooled or merged: the ``downsample`` control.

    Attributes:
        retain: visual tokens per image (a count or a share of the image's tokens). A fixed-grid
            model (LLaVA-1.5) gets exactly this many: a ``rows x cols`` grid with that product
            (:func:`~ficoco.stages.resolution.exact_grid`); a dynamic-resolution model (Qwen-VL) gets
            the aspect-keeping grid with the most tokens within it
            (:func:`~ficoco.stages.resolution.grid_within`), so at most this many.
        max_aspect: fixed-grid models: how far a non-square budget may stretch the image (rows/cols
            against the grid's; 2.0 lets 128 = 16x8 through, 1.0 allows squares only).
    """

    retain: int | float = 144
    max_aspect: float = 2.0

    def __post_init__(self) -> None:
        check_retain_value(self.retain)
        if isinstance(self.max_aspect, bool) or not isinstance(self.max_aspect, (int, float)) or self.max_aspect < 1:
            raise ValueError(f"max_aspect must be a number >= 1 (rows/cols against the grid's), "
                             f"got {self.max_aspect!r}")

    def resolve(self, grid: tuple[int, int], *, exact: bool = True) -> tuple[int, int]:
        """``(rows, cols)`` of the smaller grid of tokens for an image of ``grid`` tokens: exactly
        ``retain`` of them (``exact``, fixed-grid models) or at most ``retain`` keeping the aspect."""
        kept = kept_count(self.retain, grid[0] * grid[1], "LLM")
        return exact_grid(grid, kept, self.max_aspect) if exact else grid_within(grid, kept)


@dataclass
class Method:
    """A named token-reduction method: a vision-side, an LLM-input and/or a language-side reduction,
    or the image at a lower resolution (``resolution``, which runs alone)."""

    name: str
    vision: VisionReduction | None = None
    language: LanguageReduction | None = None
    description: str = ""
    #: with both reductions and ``vision.retain is None``: the share of the removals (down to
    #: ``language.retain``) that the encoder makes, resolved per token count (FiCoCo-VL's split)
    vision_fraction: float | None = None
    input: InputReduction | None = None
    resolution: ResolutionReduction | None = None

    def __post_init__(self) -> None:
        reductions = (self.vision, self.language, self.input)
        if self.resolution is not None and any(side is not None for side in reductions):
            # the token reductions' plans and hooks assume the model's own patch grid
            raise ValueError(f"method {self.name!r}: a resolution reduction runs alone, not with token reductions")
        if self.resolution is None and all(side is None for side in reductions):
            raise ValueError(f"method {self.name!r} reduces nowhere: give a vision, an input or a language reduction")
        for side in (self.vision, self.language):
            if side is not None and not side.has_budget and (side is self.language or self.vision_fraction is None):
                raise ValueError("give exactly one of retain= or schedule=")
        if self.vision_fraction is not None:
            if not 0.0 <= self.vision_fraction <= 1.0:
                raise ValueError(f"vision_fraction must be in [0, 1], got {self.vision_fraction}")
            if self.vision is None or self.language is None or self.language.retain is None:
                raise ValueError("vision_fraction splits a final retain between an encoder and a decoder reduction")

    def without_cls(self) -> "Method":
        """This method for a vision encoder without [CLS] (SigLIP, Qwen-VL): FiCoCo-V's [CLS] term
        becomes the mean-key stand-in (docs/spec.md §6), EViT's [CLS] attention becomes attention
        received; methods that read no [CLS] are returned as they are."""
        return self if self.vision is None else replace(self, vision=self.vision.without_cls())

    def plan(self, geometry: "ModelGeometry") -> "ResolvedPlan":
        """Resolve budgets into per-layer schedules for a model of this geometry (one image of
        ``geometry.num_patches`` tokens; dynamic-resolution models resolve one plan per size)."""
        if self.resolution is not None:
            rows, cols = self.resolution.resolve(geometry.token_grid, exact=not geometry.dynamic_resolution)
            return ResolvedPlan(geometry, {}, {}, rows * cols, image_grid=(rows, cols))
        vision_plan: dict[int, int] = {}
        llm_visual = geometry.num_patches
        if self.vision is not None:
            keep = None
            if self.vision_fraction is not None:
                final = kept_count(self.language.retain, geometry.num_patches, "LLM")
                keep = geometry.num_patches - round(self.vision_fraction * (geometry.num_patches - final))
            vision_plan = self.vision.resolve(geometry.vision_layers, geometry.feature_layer, geometry.num_patches,
                                              reducible=geometry.vision_reducible, keep=keep)
            llm_visual = geometry.num_patches - sum(vision_plan.values())
        input_removed = self.input.resolve(llm_visual) if self.input is not None else 0
        llm_visual -= input_removed
        language_plan: dict[int, int] = {}
        if self.language is not None:
            keep = None
            if self.vision_fraction is not None or isinstance(self.language.retain, float):
                # a share counts the image's own tokens, not what the encoder left of them
                keep = kept_count(self.language.retain, geometry.num_patches, "LLM")
                if keep > llm_visual:
                    raise ValueError(f"the LLM cannot keep {keep} tokens: the encoder hands it {llm_visual}")
            language_plan = self.language.resolve(geometry.llm_layers, llm_visual, keep=keep)
        return ResolvedPlan(geometry, vision_plan, language_plan, llm_visual, input_removed)


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes a plan depends on (read from a model config by the adapter or the FLOPs table).

    Attributes:
        vision_layers: encoder layers.
        feature_layer: index of the encoder layer whose output the LLM reads.
        num_patches: candidate tokens of one image (patches, or merge groups of patches).
        llm_layers: decoder layers.
        vision_reducible: the only encoder layers that may reduce (``None``: any), e.g. the
            full-attention blocks of a windowed encoder.
        grid: ``(rows, cols)`` of the ``num_patches`` tokens (``None``: a square).
        dynamic_resolution: the model takes images of any size keeping their aspect (Qwen-VL), so
            a lower resolution keeps the aspect and gets at most the budget; a fixed-grid model's
            gets exactly the budget.
    """

    vision_layers: int
    feature_layer: int
    num_patches: int
    llm_layers: int
    vision_reducible: frozenset[int] | None = None
    grid: tuple[int, int] | None = None
    dynamic_resolution: bool = False

    @property
    def token_grid(self) -> tuple[int, int]:
        """``grid``, or the square of ``num_patches`` tokens."""
        if self.grid is not None:
            return self.grid
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ValueError(f"{self.num_patches} tokens are no square grid: give the geometry its grid")
        return side, side


@dataclass(frozen=True)
class ResolvedPlan:
    """Per-layer removals (per image) for one model.

    Attributes:
        vision: ``{encoder layer: removed}``.
        language: ``{decoder layer: removed}``.
        llm_input_visual: visual tokens per image the LLM receives.
        input_removed: tokens per image removed between the projector and the LLM
            (:class:`InputReduction`), already subtracted from ``llm_input_visual``.
        image_grid: ``(rows, cols)`` of tokens of the image at a lower resolution
            (:class:`ResolutionReduction`), ``None`` at the model's own resolution.
    """

    geometry: ModelGeometry
    vision: dict[int, int]
    language: dict[int, int]
    llm_input_visual: int
    input_removed: int = 0
    image_grid: tuple[int, int] | None = None

    @property
    def llm_final_visual(self) -> int:
        return self.llm_input_visual - sum(self.language.values())

    @property
    def encoded_tokens(self) -> int:
        """Tokens (patches, or merge groups) of one image the encoder runs on."""
        return self.geometry.num_patches if self.image_grid is None else self.image_grid[0] * self.image_grid[1]

    def vision_tokens_per_layer(self, with_cls: bool = True) -> list[int]:
        start = self.encoded_tokens + int(with_cls)
        return tokens_entering_layers(self.vision, self.geometry.vision_layers, start)

    def llm_visual_per_layer(self) -> list[int]:
        return tokens_entering_layers(self.language, self.geometry.llm_layers, self.llm_input_visual)
