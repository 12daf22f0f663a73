"""What a method costs on a model: per-layer token counts → TFLOPs and KV cache, and a solver that
finds the schedule meeting a TFLOPs budget.

Counting matches what the adapters execute: a layer that reduces still runs its attention *and*
MLP on its input length; later layers run on the reduced length (docs/spec.md §8's "a reduction at layer l
counts the first l layers at full length" with ``l`` = reducing layer + 1). LLM prefill and the
vision side are reported separately; the LM head is not counted (as in the paper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..adapters.families import QWEN_MODEL_TYPES
from ..methods import Method, ModelGeometry, ResolvedPlan, get_method
from .flops import LlavaShape, kv_cache_bytes, llm_prefill_flops, solve_largest, vision_flops
from .qwen import QwenVLShape, qwen_vision_flops

#: a model the calculator costs: LLaVA-1.5 (one fixed grid) or Qwen-VL (at one image size)
Shape = LlavaShape | QwenVLShape


def is_qwen(config) -> bool:
    """Whether a model config is a Qwen-VL one (its images differ in token count)."""
    return getattr(config, "model_type", None) in QWEN_MODEL_TYPES


#: ``model_type`` values the calculator models (LLaVA-NeXT's anyres images are not modelled yet)
COSTED_MODEL_TYPES = ("llava", *QWEN_MODEL_TYPES)


def is_costed(config) -> bool:
    """Whether the calculator models a model config's family."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return model_type in COSTED_MODEL_TYPES


def shape_of(config, image_size: tuple[int, int] | None = None, image_processor=None) -> Shape:
    """The FLOPs shape of a loaded model's config: LLaVA-1.5's fixed grid (``image_size`` does not
    change it: its processor resizes every image to 336 px), or a Qwen-VL model at ``image_size``
    (``(width, height)``; default 1280x720) resized within ``image_processor``'s pixel bounds when
    given (else the shape's defaults)."""
    if not is_costed(config):
        raise ValueError(f"the FLOPs calculator models LLaVA-1.5 and Qwen-VL, not {config.model_type!r} models")
    if is_qwen(config):
        shape = QwenVLShape.from_config(config, image_size or (1280, 720))
        size = getattr(image_processor, "size", None) or {}
        if "shortest_edge" in size and "longest_edge" in size:
            shape = replace(shape, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return shape
    return LlavaShape.from_config(config)


def counted_decoder_flops(per_module: dict) -> float:
    """Sum of ``FlopCounterMode.get_flop_counts()`` over the LLM's decoder layers (``...language_model.layers.N``),
    the quantity the calculator's LLM prefill figure describes."""
    return float(sum(sum(ops.values()) for key, ops in per_module.items()
                     if "language_model.layers." in key and key.split(".")[-2] == "layers"))


def geometry(shape: Shape) -> ModelGeometry:
    """The layer/patch geometry a method plan needs, from a FLOPs shape."""
    if isinstance(shape, QwenVLShape):
        v = shape.vision
        full = frozenset(v.full_attention_blocks) if v.window_size else None
        rows, cols = shape.grid
        return ModelGeometry(v.num_layers, v.num_layers - 1, shape.num_patches, shape.language.num_layers, full,
                             grid=(rows // v.merge_size, cols // v.merge_size), dynamic_resolution=True)
    layer = shape.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"ficoco needs one vision_feature_layer, got {layer!r}")
    layers = shape.vision.num_layers
    feature = (layer if layer >= 0 else layers + 1 + layer) - 1
    return ModelGeometry(layers, feature, shape.num_patches, shape.language.num_layers)


@dataclass(frozen=True)
class MethodCost:
    """Cost of one method on one model for one sample (one image, or every view of a multi-view
    :class:`~ficoco.measure.flops.LlavaShape`) and ``text_tokens`` text tokens.

    Attributes:
        llm_input_visual / llm_final_visual: visual tokens entering the LLM / after its last reduction
            (all views).
        llm_tflops: LLM prefill TFLOPs (decoder layers).
        vision_tflops: vision tower + projector TFLOPs.
        kv_cache_mb: fp16 KV cache after prefill, MB (1e6 bytes).
        llm_tokens_per_layer: tokens each decoder layer processes.
    """

    method: str
    llm_input_visual: int
    llm_final_visual: int
    llm_tflops: float
    vision_tflops: float
    kv_cache_mb: float
    llm_tokens_per_layer: tuple[int, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def plan_cost(shape: Shape, plan: ResolvedPlan, text_tokens: int, name: str = "") -> MethodCost:
    """Cost of a resolved plan (for one view; a multi-view shape repeats it over its views)."""
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be non-negative, got {text_tokens}")
    # LLaVA-NeXT's crops and Video-LLaVA's frames are each planned alike, so the LLM holds that many times
    # each count and the tower runs that many times
    views = 1 if isinstance(shape, QwenVLShape) else shape.num_views
    llm_tokens = [views * v + text_tokens for v in plan.llm_visual_per_layer()]
    # the projector (merger) runs before an LLM-input reduction, on every token the encoder hands on
    projected = plan.llm_input_visual + plan.input_removed
    if isinstance(shape, QwenVLShape):
        tower = shape
        if plan.image_grid is not None:  # downsample: the tower (its windows too) sees the smaller image
            factor = shape.vision.factor
            rows, cols = plan.image_grid
            tower = replace(shape, image_size=(cols * factor, rows * factor), min_pixels=factor * factor,
                            max_pixels=max(shape.max_pixels, rows * cols * factor * factor))
        vision = qwen_vision_flops(tower, plan.vision_tokens_per_layer(with_cls=False), projected)
    else:
        vision = vision_flops(shape, plan.vision_tokens_per_layer(with_cls=True), projected,
                              num_patches=plan.encoded_tokens)
    return MethodCost(
        method=name,
        llm_input_visual=views * plan.llm_input_visual,
        llm_final_visual=views * plan.llm_final_visual,
        llm_tflops=llm_prefill_flops(shape, llm_tokens) / 1e12,
        vision_tflops=views * vision.total / 1e12,
        kv_cache_mb=kv_cache_bytes(shape, llm_tokens) / 1e6,
        llm_tokens_per_layer=tuple(llm_tokens),
    )


def method_cost(shape: Shape, method: Method, text_tokens: int = 60) -> MethodCost:
    """Cost of ``method`` on ``shape`` with ``text_tokens`` text tokens."""
    return plan_cost(shape, method.plan(geometry(shape)), text_tokens, method.name)


def vanilla_cost(shape: Shape, text_tokens: int = 60) -> MethodCost:
    """Cost with no reduction."""
    geo = geometry(shape)
    return plan_cost(shape, ResolvedPlan(geo, {}, {}, geo.num_patches), text_tokens, "vanilla")


def _with_end_layer(method: Method, end_layer: int) -> Method:
    return replace(method, language=replace(method.language, end_layer=end_layer))


#: how a decoder-side method's removals are laid out when :func:`solve_for_tflops` picks ``retain``:
#: ``"method"`` spreads them over the method's own layers, ``"first_layer"`` makes them all at its
#: first reducing layer (cheaper per kept token, but a different method in effect)
SPREADS = ("method", "first_layer")


def describe_schedule(method: Method | None, geometry_or_plan) -> str:
    """A short human reading of where a method removes tokens: ``"encoder L12-22"``,
    ``"LLM L5-30"``, ``"LLM L5"``, ``"LLM input"``, ``"encoder L12-22 + LLM L5-30"``,
    ``"image at 16x12 tokens"`` (downsample), ``"-"`` for none."""
    if method is None:
        return "-"
    plan = geometry_or_plan if isinstance(geometry_or_plan, ResolvedPlan) else method.plan(geometry_or_plan)
    if plan.image_grid is not None:
        return f"image at {plan.image_grid[0]}x{plan.image_grid[1]} tokens"
    parts = []
    for where, layers in (("encoder", plan.vision), ("LLM", plan.language)):
        if layers:
            first, last = min(layers), max(layers)
            parts.append(f"{where} L{first}" + (f"-{last}" if last != first else ""))
        if where == "encoder" and plan.input_removed:
            parts.append("LLM input")
    return " + ".join(parts) or "-"


def solve_for_tflops(
    shape: Shape, name: str, target_tflops: float, text_tokens: int = 60, *, retain: int | None = None,
    spread: str = "method", **options,
) -> tuple[Method, MethodCost]:
    """The method ``name`` with the schedule whose LLM prefill fits ``target_tflops``.

    Without ``retain``: the largest ``retain`` that fits. ``spread`` (decoder-side methods, see
    :data:`SPREADS`) says where the removals go: over the method's own layers (default), or all at
    its first reducing layer. Within one ``spread`` the kept tokens never grow as the target
    shrinks; compare targets under one ``spread``.
    With ``retain`` (decoder-side methods): the latest ``end_layer`` that fits, i.e. the gentlest
    spread of a fixed number of removals.

    Raises ``ValueError`` saying why the target cannot be met and what the cheapest schedule of
    that shape costs.
    """
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(SPREADS)}; got {spread!r}")

    def cost(method: Method) -> float:
        return method_cost(shape, method, text_tokens).llm_tflops

    def unreachable(why: str) -> ValueError:
        return ValueError(f"{name} cannot meet {target_tflops:g} TFLOPs with {text_tokens} text tokens: {why}")

    base = get_method(name, **{**options, "retain": retain or shape.num_patches})
    if base.language is None and (retain is not None or spread != "method"):
        raise ValueError(f"{name} reduces only in the encoder: its cost is fixed by retain alone "
                         f"(leave retain and spread out)")
    if retain is None:
        def make(n: int) -> Method:
            method = get_method(name, **{**options, "retain": n})
            return _with_end_layer(method, method.language.start_layer) if spread == "first_layer" else method

        cheapest = make(1)
        floor = method_cost(shape, cheapest, text_tokens)
        if floor.llm_tflops > target_tflops:
            plan = cheapest.plan(geometry(shape))
            if not plan.language:
                raise unreachable(f"even 1 visual token costs {floor.llm_tflops:.4g} TFLOPs")
            first = min(plan.language)
            raise unreachable(
                f"keeping even 1 visual token with its removals in {describe_schedule(cheapest, plan)} costs "
                f"{floor.llm_tflops:.4g} TFLOPs, since LLM layers 0-{first} run on all "
                f"{floor.llm_tokens_per_layer[0]} tokens that enter the LLM")
        method = make(solve_largest(target_tflops, lambda n: cost(make(n)), 1, shape.num_patches))
        return method, method_cost(shape, method, text_tokens)
    start = base.language.start_layer
    last = shape.language.num_layers - 2
    earliest = _with_end_layer(base, start)
    if cost(earliest) > target_tflops:
        raise unreachable(f"keeping {retain} visual tokens costs at least {cost(earliest):.4g} TFLOPs, with every "
                          f"removal at LLM layer {start}")
    steps = solve_largest(target_tflops, lambda s: cost(_with_end_layer(base, start + s)), 0, last - start)
    method = _with_end_layer(base, start + steps)
    return method, method_cost(shape, method, text_tokens)
