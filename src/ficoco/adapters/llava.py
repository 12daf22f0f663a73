"""Attaching a method to a Hugging Face LLaVA model, reversibly.

>>> with ficoco.apply(model, ficoco.get_method("ficoco-v", retain=192)):
...     out = model.generate(**inputs, max_new_tokens=32)

Everything is done with hooks on the model's own modules (plus, for encoder-side methods, an
instance-level ``generate`` wrapper); :meth:`ReductionHandle.remove` restores the model exactly.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..methods import Method, ModelGeometry, ResolvedPlan
from .hooks import HookSet
from .inputs import shrink_placeholders
from .language import LanguageSide
from .vision import VisionSide, VisionTrace

_HANDLE_ATTRIBUTE = "_ficoco_handle"
_PER_TOKEN_INPUTS = ("attention_mask", "labels", "position_ids", "token_type_ids", "mm_token_type_ids")


def _llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(LlavaModel, LlavaForConditionalGeneration or None)`` or a clear error."""
    from transformers import LlavaForConditionalGeneration, LlavaModel

    if isinstance(model, LlavaForConditionalGeneration):
        return model.model, model
    if isinstance(model, LlavaModel):
        return model, None
    raise TypeError(
        f"ficoco supports Hugging Face LlavaForConditionalGeneration and LlavaModel (LLaVA-1.5 family); "
        f"got {type(model).__name__}"
    )


def _vision_layout(llava: nn.Module) -> tuple[nn.ModuleList, bool, tuple[int, int], int]:
    """``(encoder layers, has_cls, grid, feature layer index)`` of a CLIP or SigLIP tower."""
    config = llava.config
    vcfg = config.vision_config
    tower = llava.vision_tower
    kinds = {"clip_vision_model": True, "siglip_vision_model": False}
    # transformers versions differ on whether the tower wraps its transformer in ``vision_model``
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    if vcfg.model_type not in kinds or encoder is None:
        raise TypeError(f"unsupported vision tower {type(tower).__name__} ({vcfg.model_type}); ficoco supports CLIP and SigLIP")
    layers = encoder.layers
    image_size, patch = vcfg.image_size, vcfg.patch_size
    sizes = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if sizes[0] != sizes[1] or sizes[0] % patch:
        raise ValueError(f"non-square patch grid: image size {image_size} with patch {patch}")
    side = sizes[0] // patch
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"ficoco needs one vision_feature_layer, got {feature_layer!r}")
    # hidden_states[0] is the embedding output, so hidden_states[i] is the output of layer i - 1
    index = (feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer) - 1
    if not 0 <= index < len(layers):
        raise ValueError(f"vision_feature_layer={feature_layer} selects no encoder layer output")
    return layers, kinds[vcfg.model_type], (side, side), index


class ReductionHandle:
    """A method attached to a model. Use as a context manager or call :meth:`remove`.

    Attributes:
        plan: the resolved per-layer schedule.
        vision_trace: what the encoder did to the last image batch (kept positions and sizes).
        kept_index: ``[B, L']`` original prompt column of each position of the last prefill's output
            (decoder-side methods; ``None`` otherwise).
    """

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        llava, outer = _llava_parts(model)
        if getattr(model, _HANDLE_ATTRIBUTE, None) is not None:
            raise RuntimeError("a ficoco method is already attached to this model; remove it first")
        layers, has_cls, grid, feature_layer = _vision_layout(llava)
        self.model, self.llava, self.outer, self.method = model, llava, outer, method
        self.grid, self.has_cls = grid, has_cls
        config = llava.config
        self.strategy = getattr(config, "vision_feature_select_strategy", "default")
        self.cls_to_llm = int(has_cls and self.strategy == "full")
        geometry = ModelGeometry(len(layers), feature_layer, grid[0] * grid[1], len(llava.language_model.layers))
        self.plan: ResolvedPlan = method.plan(geometry)
        self._check_cls(has_cls)
        self.hooks = HookSet()
        self.vision: VisionSide | None = None
        self.language: LanguageSide | None = None
        self._stashed_labels: Tensor | None = None
        self._signatures = {id(m): inspect.signature(type(m).forward) for m in (llava, outer) if m is not None}
        self._original_generate = None
        try:
            if self.plan.vision:
                self.vision = VisionSide(layers, method.vision, self.plan.vision, grid=grid, has_cls=has_cls,
                                         record=record)
                self.hooks.pre(llava, self._rewrite_model_inputs, with_kwargs=True)
                if outer is not None:
                    self.hooks.pre(outer, self._rewrite_model_inputs, with_kwargs=True)
                    self._wrap_generate(outer)
                self.vision.install(self.hooks)
            if self.plan.language:
                self.language = LanguageSide(
                    llava, method.language, self.plan.language,
                    visual_per_image=self.plan.llm_input_visual + self.cls_to_llm, grid=grid,
                    vision_trace=(lambda: self.vision.last) if self.vision is not None else None, record=record,
                )
                self.language.install(self.hooks)
                if outer is not None:
                    self.hooks.pre(outer, self._stash_labels, with_kwargs=True)
                    self.hooks.post(outer, self._loss_on_kept_tokens)
        except Exception:
            self.remove()
            raise
        setattr(model, _HANDLE_ATTRIBUTE, self)

    def _check_cls(self, has_cls: bool) -> None:
        if has_cls or self.method.vision is None:
            return
        filt = self.method.vision.reduction.filter
        if getattr(filt, "semantic_term", None) == "cls" or type(filt).__name__ == "CLSAttentionFilter":
            raise ValueError(
                f"method {self.method.name!r} reads [CLS] attention but this vision tower has no [CLS]; "
                "use semantic_term='key_proxy'"
            )

    # -- public -------------------------------------------------------------------------------

    @property
    def vision_trace(self) -> VisionTrace | None:
        return None if self.vision is None else self.vision.last

    @property
    def kept_index(self) -> Tensor | None:
        return None if self.language is None else self.language.kept_index

    @property
    def language_steps(self) -> list:
        """``(layer, ReductionResult)`` of each decoder reduction of the last prefill (``record=True``)."""
        if self.language is None or self.language.seq is None:
            return []
        return list(self.language.seq.steps)

    @property
    def visual_tokens_per_image(self) -> int:
        """Visual tokens per image after the last reduction (what the LLM's last layers see)."""
        return self.plan.llm_final_visual

    def prepare_inputs(self, **inputs):
        """Cut the image placeholders of processor outputs to what the encoder hands on. ``generate``
        and ``forward`` do this by themselves; call it to run a manual decoding loop whose attention
        mask must match the prefill length."""
        return self._rewrite(dict(inputs))

    def remove(self) -> None:
        """Detach: remove every hook and the ``generate`` wrapper."""
        self.hooks.remove()
        if self._original_generate is not None and self.outer is not None:
            self.outer.__dict__.pop("generate", None)
            self._original_generate = None
        if getattr(self.model, _HANDLE_ATTRIBUTE, None) is self:
            delattr(self.model, _HANDLE_ATTRIBUTE)

    def __enter__(self) -> "ReductionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- encoder-side: placeholders -------------------------------------------------------------

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        input_ids = inputs.get("input_ids")
        pixel_values = inputs.get("pixel_values")
        if input_ids is None or pixel_values is None or not self.plan.vision:
            return inputs
        image_token = self.llava.config.image_token_id
        full = self.plan.geometry.num_patches + self.cls_to_llm
        kept = self.plan.llm_input_visual + self.cls_to_llm
        images = pixel_values.shape[0]
        total = int((input_ids == image_token).sum())
        if total == images * kept:
            return inputs  # already cut
        if total != images * full:
            raise ValueError(
                f"the prompt has {total} image placeholders for {images} image(s); expected {full} per image"
            )
        per_token = {k: inputs[k] for k in _PER_TOKEN_INPUTS if isinstance(inputs.get(k), Tensor)
                     and inputs[k].shape[-1] == input_ids.shape[-1] and inputs[k].dim() == 2}
        pad = self.llava.config.text_config.pad_token_id
        pad = image_token if pad is None else pad
        new_ids, cut = shrink_placeholders(input_ids, per_token, image_token_id=image_token, full_per_image=full,
                                           kept_per_image=kept, pad_token_id=pad, default_side=default_side)
        inputs.update(cut)
        inputs["input_ids"] = new_ids
        return inputs

    def _rewrite_model_inputs(self, module, args, kwargs):
        if not args and kwargs.get("pixel_values") is None:
            return None  # nothing to cut: decoding steps, text-only calls
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        bound.pop("self", None)
        extra = bound.pop("kwargs", {})
        rewritten = self._rewrite({**bound, **extra})
        return (), rewritten

    def _wrap_generate(self, outer: nn.Module) -> None:
        original = outer.generate
        self._original_generate = original

        @functools.wraps(original)
        def generate(*args, **kwargs):
            if args and isinstance(args[0], Tensor) and "input_ids" not in kwargs:
                kwargs["input_ids"], args = args[0], args[1:]
            prompt = kwargs.get("input_ids")
            kwargs = self._rewrite(kwargs, default_side="left")
            out = original(*args, **kwargs)
            if prompt is None or kwargs.get("input_ids") is prompt:
                return out
            # give back the caller's prompt in front of the new tokens, as without reduction
            cut_len = kwargs["input_ids"].shape[1]
            if isinstance(out, Tensor):
                return torch.cat([prompt, out[:, cut_len:]], dim=1)
            out.sequences = torch.cat([prompt, out.sequences[:, cut_len:]], dim=1)
            return out

        outer.generate = generate

    # -- decoder-side: loss on the surviving positions ------------------------------------------

    def _stash_labels(self, module, args, kwargs):
        if kwargs.get("labels") is None:
            return None
        self._stashed_labels = kwargs.pop("labels")
        return args, kwargs

    def _loss_on_kept_tokens(self, module, args, output):
        labels, self._stashed_labels = self._stashed_labels, None
        if labels is None:
            return None
        kept = self.kept_index
        if kept is not None and output.logits.shape[1] != labels.shape[1]:
            labels = labels.gather(1, kept.to(labels.device))
        output.loss = module.loss_function(logits=output.logits, labels=labels,
                                           vocab_size=module.config.text_config.vocab_size)
        return output


def attach(model: nn.Module, method: Method | str, *, record: bool = False, **options) -> ReductionHandle:
    """Attach ``method`` (a :class:`Method` or a registered name with ``options``) to ``model``."""
    if isinstance(method, str):
        from ..methods import get_method

        method = get_method(method, **options)
    elif options:
        raise ValueError("options are only accepted together with a method name")
    return ReductionHandle(model, method, record=record)


@contextmanager
def apply(model: nn.Module, method: Method | str, *, record: bool = False, **options):
    """Context manager: ``with apply(model, "ficoco-v", retain=192): model.generate(...)``."""
    handle = attach(model, method, record=record, **options)
    try:
        yield handle
    finally:
        handle.remove()
