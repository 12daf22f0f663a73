"""What a method costs on a model: per-layer token counts → TFLOPs and KV cache, and a solver that
finds the schedule meeting a TFLOPs budget.

Counting matches what the adapters execute: a layer that reduces still runs its attention *and*
MLP on its input length; later layers run on the reduced length (SPEC §8's "a reduction at layer l
counts the first l layers at full length" with ``l`` = reducing layer + 1). LLM prefill and the
vision side are reported separately; the LM head is not counted (as in the paper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .flops import LlavaShape, kv_cache_bytes, llm_prefill_flops, solve_largest, vision_flops
from .methods import Method, ModelGeometry, ResolvedPlan, get_method


def counted_decoder_flops(per_module: dict) -> float:
    """Sum of ``FlopCounterMode.get_flop_counts()`` over the LLM's decoder layers (``...language_model.layers.N``),
    the quantity the calculator's LLM prefill figure describes."""
    return float(sum(sum(ops.values()) for key, ops in per_module.items()
                     if "language_model.layers." in key and key.split(".")[-2] == "layers"))


def geometry(shape: LlavaShape) -> ModelGeometry:
    """The layer/patch geometry a method plan needs, from a FLOPs shape."""
    layer = shape.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"ficoco needs one vision_feature_layer, got {layer!r}")
    layers = shape.vision.num_layers
    feature = (layer if layer >= 0 else layers + 1 + layer) - 1
    return ModelGeometry(layers, feature, shape.num_patches, shape.language.num_layers)


@dataclass(frozen=True)
class MethodCost:
    """Cost of one method on one model for one image and ``text_tokens`` text tokens.

    Attributes:
        llm_input_visual / llm_final_visual: visual tokens entering the LLM / after its last reduction.
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


def plan_cost(shape: LlavaShape, plan: ResolvedPlan, text_tokens: int, name: str = "") -> MethodCost:
    """Cost of a resolved plan."""
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be non-negative, got {text_tokens}")
    llm_tokens = [v + text_tokens for v in plan.llm_visual_per_layer()]
    vision = vision_flops(shape, plan.vision_tokens_per_layer(with_cls=True), plan.llm_input_visual)
    return MethodCost(
        method=name,
        llm_input_visual=plan.llm_input_visual,
        llm_final_visual=plan.llm_final_visual,
        llm_tflops=llm_prefill_flops(shape, llm_tokens) / 1e12,
        vision_tflops=vision.total / 1e12,
        kv_cache_mb=kv_cache_bytes(shape, llm_tokens) / 1e6,
        llm_tokens_per_layer=tuple(llm_tokens),
    )


def method_cost(shape: LlavaShape, method: Method, text_tokens: int = 60) -> MethodCost:
    """Cost of ``method`` on ``shape`` with ``text_tokens`` text tokens."""
    return plan_cost(shape, method.plan(geometry(shape)), text_tokens, method.name)


def vanilla_cost(shape: LlavaShape, text_tokens: int = 60) -> MethodCost:
    """Cost with no reduction."""
    geo = geometry(shape)
    return plan_cost(shape, ResolvedPlan(geo, {}, {}, geo.num_patches), text_tokens, "vanilla")


def _with_end_layer(method: Method, end_layer: int) -> Method:
    return replace(method, language=replace(method.language, end_layer=end_layer))


def solve_for_tflops(
    shape: LlavaShape, name: str, target_tflops: float, text_tokens: int = 60, *, retain: int | None = None, **options
) -> tuple[Method, MethodCost]:
    """The method ``name`` with the schedule whose LLM prefill fits ``target_tflops``.

    Without ``retain``: the largest ``retain`` that fits, with the method's layers; for a
    decoder-side method whose spread cannot fit, all removals move to its first reducing layer.
    With ``retain`` (decoder-side methods): the latest ``end_layer`` that fits, i.e. the gentlest
    spread of the removals. Raises ``ValueError`` naming the cheapest reachable cost when the target
    cannot be met.
    """

    def cost(method: Method) -> float:
        return method_cost(shape, method, text_tokens).llm_tflops

    def largest_retain(make) -> Method:
        return make(solve_largest(target_tflops, lambda n: cost(make(n)), 1, shape.num_patches))

    base = get_method(name, **{**options, "retain": retain or shape.num_patches})
    try:
        if retain is None:
            try:
                method = largest_retain(lambda n: get_method(name, **{**options, "retain": n}))
            except ValueError:
                if base.language is None:
                    raise
                start = base.language.start_layer
                method = largest_retain(lambda n: _with_end_layer(get_method(name, **{**options, "retain": n}), start))
        else:
            if base.language is None:
                raise ValueError("an encoder-side method's cost is fixed by retain; leave retain out")
            start = base.language.start_layer
            last = shape.language.num_layers - 2
            spread = solve_largest(target_tflops, lambda s: cost(_with_end_layer(base, start + s)), 0, last - start)
            method = _with_end_layer(base, start + spread)
    except ValueError as err:
        raise ValueError(f"{name} cannot meet {target_tflops} TFLOPs with {text_tokens} text tokens: {err}") from None
    return method, method_cost(shape, method, text_tokens)
