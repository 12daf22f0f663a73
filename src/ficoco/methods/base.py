"""A method = stage composition(s) + where they run + a per-layer schedule.

:class:`VisionReduction` runs a :class:`~ficoco.stages.TokenReduction` inside the vision encoder,
:class:`LanguageReduction` inside the LLM decoder; a :class:`Method` holds one or both. Budgets are
given as ``retain`` (tokens left after the last reduction) or an explicit ``schedule`` and are
resolved against the model's geometry when the method is attached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..schedule import spread_evenly, tokens_entering_layers, validate_schedule
from ..stages import BipartiteSimilarityFilter, TokenReduction


def _check_retain(retain: int | None, available: int, where: str) -> None:
    if retain is None:
        return
    if not isinstance(retain, int) or isinstance(retain, bool):
        raise ValueError(f"retain must be an integer, got {retain!r}")
    if retain <= 0:
        raise ValueError(f"retain must be positive, got {retain}")
    if retain > available:
        raise ValueError(f"retain={retain} exceeds the {available} visual tokens available to the {where}")


@dataclass
class _Reduction:
    reduction: TokenReduction
    retain: int | None = None
    start_layer: int | None = None
    end_layer: int | None = None
    schedule: Mapping[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.retain is None) == (self.schedule is None):
            raise ValueError("give exactly one of retain= or schedule=")
        if self.retain is not None and (not isinstance(self.retain, int) or self.retain <= 0):
            raise ValueError(f"retain must be a positive integer, got {self.retain!r}")

    def _resolve(self, reducible: range, default_start: int, available: int, where: str) -> dict[int, int]:
        if self.schedule is not None:
            plan = validate_schedule(self.schedule, reducible, available, where)
        else:
            _check_retain(self.retain, available, where)
            start = default_start if self.start_layer is None else self.start_layer
            end = reducible.stop - 1 if self.end_layer is None else self.end_layer
            # negative layers count back from the last reducible layer (-1 = the last one)
            start, end = (x + reducible.stop if x < 0 else x for x in (start, end))
            if start not in reducible or end not in reducible or end < start:
                raise ValueError(
                    f"{where} reduction layers {start}..{end} must lie within "
                    f"{reducible.start}..{reducible.stop - 1}"
                )
            plan = spread_evenly(available - self.retain, range(start, end + 1))
        if isinstance(self.reduction.filter, BipartiteSimilarityFilter):
            _check_bipartite_limit(plan, available, self.reduction.extra_sources)
        return plan


def _check_bipartite_limit(plan: Mapping[int, int], available: int, extra: int) -> None:
    current = available
    for layer, removed in sorted(plan.items()):
        if removed + extra > (current + 1) // 2:
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
    """

    proportional_attention: bool = False

    def resolve(self, num_layers: int, feature_layer: int, num_patches: int, default_start: int = 12) -> dict[int, int]:
        """``{layer: removed}`` for an encoder of ``num_layers`` whose layer ``feature_layer`` (index)
        output feeds the LLM, with ``num_patches`` patch tokens per image."""
        return self._resolve(range(0, feature_layer + 1), min(default_start, feature_layer), num_patches, "vision encoder")


@dataclass
class LanguageReduction(_Reduction):
    """Token reduction inside the LLM decoder.

    Attributes:
        reduction: the stage composition.
        retain: visual tokens left (per image) after the last reduction.
        start_layer / end_layer: decoder layers the removals are spread over (``end_layer`` defaults
            to the second-to-last layer, the last whose reduction a later layer sees).
        schedule: explicit ``{layer: removed}`` instead of ``retain``.
    """

    def resolve(self, num_layers: int, num_visual: int, default_start: int = 5) -> dict[int, int]:
        """``{layer: removed}`` per image for a decoder of ``num_layers`` fed ``num_visual`` visual
        tokens per image."""
        if num_layers < 2:
            raise ValueError("the LLM needs at least two layers for a reduction inside it to matter")
        return self._resolve(range(0, num_layers - 1), min(default_start, num_layers - 2), num_visual, "LLM")


@dataclass
class Method:
    """A named token-reduction method: a vision-side and/or a language-side reduction."""

    name: str
    vision: VisionReduction | None = None
    language: LanguageReduction | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.vision is None and self.language is None:
            raise ValueError(f"method {self.name!r} reduces nowhere: give a vision or a language reduction")

    def plan(self, geometry: "ModelGeometry") -> "ResolvedPlan":
        """Resolve budgets into per-layer schedules for a model of this geometry."""
        vision_plan: dict[int, int] = {}
        llm_visual = geometry.num_patches
        if self.vision is not None:
            vision_plan = self.vision.resolve(geometry.vision_layers, geometry.feature_layer, geometry.num_patches)
            llm_visual = geometry.num_patches - sum(vision_plan.values())
        language_plan: dict[int, int] = {}
        if self.language is not None:
            language_plan = self.language.resolve(geometry.llm_layers, llm_visual)
        return ResolvedPlan(geometry, vision_plan, language_plan, llm_visual)


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes a plan depends on (read from a LLaVA config by the adapter or the FLOPs table)."""

    vision_layers: int
    feature_layer: int  # index of the encoder layer whose output the LLM reads
    num_patches: int
    llm_layers: int


@dataclass(frozen=True)
class ResolvedPlan:
    """Per-layer removals (per image) for one model.

    Attributes:
        vision: ``{encoder layer: removed}``.
        language: ``{decoder layer: removed}``.
        llm_input_visual: visual tokens per image the LLM receives.
    """

    geometry: ModelGeometry
    vision: dict[int, int]
    language: dict[int, int]
    llm_input_visual: int

    @property
    def llm_final_visual(self) -> int:
        return self.llm_input_visual - sum(self.language.values())

    def vision_tokens_per_layer(self, with_cls: bool = True) -> list[int]:
        start = self.geometry.num_patches + int(with_cls)
        return tokens_entering_layers(self.vision, self.geometry.vision_layers, start)

    def llm_visual_per_layer(self) -> list[int]:
        return tokens_entering_layers(self.language, self.geometry.llm_layers, self.llm_input_visual)
