"""What a served model reduces, from its config alone (no vLLM import: the front end, the
processor and the tests read it the same way).

vLLM carries the plugin's settings in the model's HF config, set with ``--hf-overrides``::

    {"architectures": ["FicocoLlavaForConditionalGeneration"],
     "ficoco": {"method": "ficoco-v", "retain": 64}}

``method`` is a ficoco method name as :func:`ficoco.methods.parse_method_spec` reads it
(``NAME`` or ``NAME[KEY=VALUE,...]``), ``retain`` a count or a share, and any other key a keyword
option of the method (``{"method": "tome", "retain": 64, "proportional_attention": false}``).
:func:`hf_overrides` builds that dictionary, checked.

Only methods that finish before the LLM can run inside vLLM: the prompt's image placeholders
(and so the scheduler's token budget, the paged KV cache and the positions) are fixed when vLLM
builds the prompt, before any layer runs, and a reduction inside the decoder would have to cut
cached blocks mid-prefill (chunked prefill runs a prompt in pieces). Everything else is refused
here with one line, when the engine starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..methods import Method, ModelGeometry, ResolvedPlan, get_method, parse_method_spec

#: the override key under which the plugin's settings travel in the HF config
OVERRIDE_KEY = "ficoco"
#: the method name that serves the model as it is (the plugin's class, no reduction: a baseline
#: for the same checkpoint)
VANILLA = "vanilla"
#: the architecture name the plugin registers with vLLM, per model type of the checkpoint
ARCHITECTURES: Mapping[str, str] = MappingProxyType({"llava": "FicocoLlavaForConditionalGeneration",
                                                     "qwen2_5_vl": "FicocoQwen2_5_VLForConditionalGeneration"})
#: model types ficoco reduces in transformers but not yet in vLLM, and why (docs/serving.md)
NOT_YET: Mapping[str, str] = MappingProxyType({
    model_type: "ficoco's vLLM plugin serves LLaVA-1.5 and Qwen2.5-VL; Qwen2-VL and Qwen3-VL need their own "
                "towers hooked in vLLM (Qwen3-VL also its DeepStack features and per-frame timestamps)"
    for model_type in ("qwen2_vl", "qwen3_vl")
})


#: the shapes of LLaVA-1.5 (7B and 13B alike, as far as a plan is concerned), to check overrides
#: before a checkpoint is at hand
_LLAVA_15 = MappingProxyType({
    "model_type": "llava", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "num_hidden_layers": 24},
    "text_config": {"num_hidden_layers": 32},
})


#: the shapes of Qwen2.5-VL-7B, to check overrides before a checkpoint is at hand
_QWEN_25 = MappingProxyType({
    "model_type": "qwen2_5_vl",
    "vision_config": {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "spatial_merge_size": 2},
    "text_config": {"num_hidden_layers": 28},
})
#: the merge groups of the frame a Qwen plan is first checked on (a large one: every layer the
#: method names gets removals, as the Qwen adapter checks on attaching)
_NOMINAL_FRAME = 1 << 16


class _NeedsInstruction(Exception):
    """Raised by the start-up dry run when an input reduction asks for the instruction's text."""


@dataclass(frozen=True)
class ServedReduction:
    """A method resolved for one served model.

    Attributes:
        method: the ficoco method.
        plan: its per-layer schedule for this model.
        grid: the patch grid of one image (rows, columns).
        has_cls: whether the tower has a [CLS] token (CLIP) at row 0.
        tokens_per_image: image placeholders per image in the prompt (the visual tokens the LLM
            gets, plus [CLS] when the model's feature strategy is ``"full"``).
    """

    method: Method
    plan: ResolvedPlan
    grid: tuple[int, int]
    has_cls: bool
    tokens_per_image: int


@dataclass(frozen=True)
class ServedQwenReduction:
    """A method resolved for one served Qwen2.5-VL model, whose images differ in size: a plan per
    frame size, as the Qwen-VL adapter makes them (:class:`~ficoco.adapters.qwen_vl.QwenVLHandle`).

    Attributes:
        method: the ficoco method, with its stand-ins for [CLS] (the tower has none).
        depth: vision blocks; the merger reads the last one's output.
        full_attention: the blocks that attend over the whole image (reductions run there).
        llm_layers: decoder layers.
        merge: the merger's spatial size (2: every 2x2 patches make one LLM token).
    """

    method: Method
    depth: int
    full_attention: frozenset[int] | None
    llm_layers: int
    merge: int
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    def plan_for(self, tokens: int) -> ResolvedPlan:
        """The per-layer schedule for one image (frame) of ``tokens`` merge groups, or one line
        saying why there is none (e.g. a count ``retain`` above ``tokens``)."""
        if tokens not in self._plans:
            geometry = ModelGeometry(self.depth, self.depth - 1, tokens, self.llm_layers, self.full_attention)
            try:
                self._plans[tokens] = self.method.plan(geometry)
            except ValueError as err:
                raise ValueError(f"ficoco: {self.method.name}: {err}") from None
        return self._plans[tokens]

    def kept_tokens(self, tokens: int) -> int:
        """Image placeholders (LLM tokens) of an image of ``tokens`` merge groups."""
        return self.plan_for(tokens).llm_input_visual


def _get(config, key: str, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def options_of(config) -> dict | None:
    """The plugin's settings in an HF config (object or dict), or ``None`` when it has none."""
    options = _get(config, OVERRIDE_KEY)
    if options is None:
        return None
    if isinstance(options, str):  # a JSON string, e.g. from a shell that quoted the whole object
        options = json.loads(options)
    if not isinstance(options, Mapping):
        raise ValueError(f"ficoco: the {OVERRIDE_KEY!r} override must be a JSON object like "
                         f'{{"method": "ficoco-v", "retain": 64}}, got {options!r}')
    return dict(options)


def build_method(options: Mapping) -> Method:
    """The method named by ``options`` (``method``, ``retain``, its keyword options), refused in
    one line if it is unknown, badly written, or reduces inside the LLM."""
    options = dict(options)
    spec = options.pop("method", None)
    if not isinstance(spec, str):
        raise ValueError(f'ficoco: the override needs "method", a ficoco method name, e.g. {{"method": "ficoco-v", '
                         f'"retain": 64}}; got {spec!r}')
    try:
        name, _ = parse_method_spec(spec)
        method = get_method(spec, **options)
    except ValueError as err:
        raise ValueError(f"ficoco: {err}") from None
    if method.language is not None:
        raise ValueError(
            f"ficoco: {name} reduces inside the LLM, which vLLM's paged KV cache and chunked prefill do not allow "
            f"(the prompt's length is fixed before the first layer runs); serve a method that reduces before the "
            f"LLM: ficoco-v, tome, evit, random, topk, visionzip, pool, divprune")
    if getattr(method, "resolution", None) is not None:
        raise ValueError(f"ficoco: {name} resizes the image before the encoder, which this plugin does not do inside "
                         f"vLLM yet; send the smaller image instead")
    if method.vision is not None and (method.vision.adaptive or method.vision.score_with_next_layer):
        raise ValueError(f"ficoco: {name} scores with the encoder layer after the feature layer (or keeps an adaptive "
                         f"count per image), which vLLM's fused CLIP layers and fixed placeholder counts do not allow "
                         f"in this plugin yet")
    return method


def _llava_geometry(config) -> tuple[ModelGeometry, tuple[int, int], bool, int]:
    """``(geometry, grid, has_cls, leading)`` of a LLaVA-1.5 config (object or dict)."""
    vision, text = _get(config, "vision_config"), _get(config, "text_config")
    kinds = {"clip_vision_model": True, "siglip_vision_model": False}
    vision_type = _get(vision, "model_type")
    if vision_type not in kinds:
        raise ValueError(f"ficoco: unsupported vision tower {vision_type!r}; ficoco supports CLIP and SigLIP")
    image_size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
    if isinstance(image_size, (list, tuple)) or image_size % patch:
        raise ValueError(f"ficoco: non-square patch grid: image size {image_size} with patch {patch}")
    side = image_size // patch
    layers = _get(vision, "num_hidden_layers")
    feature_layer = _get(config, "vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(f"ficoco: needs one vision_feature_layer, got {feature_layer!r}")
    # hidden_states[0] is the embedding output, so hidden_states[i] is the output of layer i - 1
    feature = (feature_layer if feature_layer >= 0 else layers + 1 + feature_layer) - 1
    if not 0 <= feature < layers:
        raise ValueError(f"ficoco: vision_feature_layer={feature_layer} selects no encoder layer output")
    has_cls = kinds[vision_type]
    strategy = _get(config, "vision_feature_select_strategy", "default")
    leading = int(has_cls and strategy == "full")
    geometry = ModelGeometry(layers, feature, side * side, _get(text, "num_hidden_layers"))
    return geometry, (side, side), has_cls, leading


def _dry_run_input(method: Method, plan: ResolvedPlan, grid: tuple[int, int]) -> None:
    """Run the LLM-input reduction once on random features, refusing one that reads the
    instruction: vLLM's vision path sees the image alone, and its encoder cache hands one image's
    tokens to every prompt that holds the image."""
    import torch

    from ..stages import FeatureProbe, TokenGroup

    def instruction():
        raise _NeedsInstruction

    features = torch.randn(1, plan.llm_input_visual + plan.input_removed, 8, generator=torch.Generator().manual_seed(0))
    try:
        method.input.reduction(TokenGroup.fresh(features, grid), FeatureProbe(instruction), plan.input_removed)
    except _NeedsInstruction:
        raise ValueError(f"ficoco: {method.name} weighs the visual tokens by the prompt's text, which vLLM's vision "
                         f"path never sees (its encoder cache shares an image's tokens across prompts)") from None


def _served_qwen(method: Method, config) -> ServedQwenReduction:
    """The Qwen2.5-VL side of :func:`served_reduction`."""
    vision, text = _get(config, "vision_config"), _get(config, "text_config")
    full = _get(vision, "fullatt_block_indexes")
    served = ServedQwenReduction(method.without_cls(), _get(vision, "depth"), frozenset(full) if full else None,
                                 _get(text, "num_hidden_layers"), _get(vision, "spatial_merge_size", 2))
    plan = served.plan_for(_NOMINAL_FRAME)  # impossible layers or options fail here, before any image
    if plan.llm_input_visual == 0:
        raise ValueError(f"ficoco: {method.name} keeps no visual token; send the prompt without its image instead")
    if plan.input_removed:
        # on the smallest square frame the budget fits (the nominal one would make DivPrune's
        # pairwise distances of 65536 tokens)
        for side in (16, 32, 64, 128, 256):
            try:
                small = served.plan_for(side * side)
            except ValueError:
                continue
            _dry_run_input(served.method, small, (side, side))
            break
    return served


def served_reduction(config) -> ServedReduction | ServedQwenReduction | None:
    """The reduction the plugin runs for a model whose HF config (object or dict) is ``config``:
    ``None`` without the ``ficoco`` override, else the resolved method (LLaVA: one plan; Qwen2.5-VL:
    a plan per image size), or one line saying why it cannot be served."""
    options = options_of(config)
    if options is None or options == {"method": VANILLA}:
        return None
    model_type = _get(config, "model_type")
    if model_type in NOT_YET:
        raise ValueError(f"ficoco: {NOT_YET[model_type]}")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"ficoco: a {model_type!r} model cannot be served with ficoco; the plugin serves "
                         f"{', '.join(ARCHITECTURES)}")
    method = build_method(options)
    if model_type == "qwen2_5_vl":
        return _served_qwen(method, config)
    geometry, grid, has_cls, leading = _llava_geometry(config)
    if not has_cls:
        method = method.without_cls()
    try:
        plan = method.plan(geometry)
    except ValueError as err:
        raise ValueError(f"ficoco: {method.name}: {err}") from None
    if plan.llm_input_visual == 0:
        raise ValueError(f"ficoco: {method.name} keeps no visual token; send the prompt without its image instead")
    if plan.input_removed:
        _dry_run_input(method, plan, grid)
    return ServedReduction(method, plan, grid, has_cls, plan.llm_input_visual + leading)


def hf_overrides(method: str, retain: int | float | None = None, *, model_type: str = "llava", **options) -> dict:
    """The ``hf_overrides`` that serve ``method`` (a ficoco method name, options in brackets
    allowed; ``"vanilla"``: the plugin's class without a reduction) with ``retain`` visual tokens per image (a count or a share; ``None``: the method's
    default) and keyword ``options``, checked against the geometry of LLaVA-1.5 or, with
    ``model_type="qwen2_5_vl"``, Qwen2.5-VL-7B (whose images differ in size: a count above an
    image's tokens is refused for that image, when it comes)::

        LLM(model=path, hf_overrides=hf_overrides("ficoco-v", 64))
        vllm serve PATH --hf-overrides "$(ficoco vllm-overrides ficoco-v --retain 64)"
    """
    if method == VANILLA and retain is None and not options:
        return {"architectures": [ARCHITECTURES[model_type]], OVERRIDE_KEY: {"method": VANILLA}}
    settings = {"method": method, **({} if retain is None else {"retain": retain}), **options}
    nominal = _QWEN_25 if model_type == "qwen2_5_vl" else {**_LLAVA_15, "model_type": model_type}
    served_reduction({**nominal, OVERRIDE_KEY: settings})  # refuses in one line
    return {"architectures": [ARCHITECTURES[model_type]], OVERRIDE_KEY: settings}
