"""The LLaVA-1.5 family: ``LlavaForConditionalGeneration`` / ``LlavaModel`` with a CLIP or SigLIP tower.

What this family is to ficoco: encoder layers ``vision_tower(.vision_model).encoder.layers``, a
[CLS] for CLIP (none for SigLIP: methods use their stand-ins), one square patch grid per image
(576 patches for CLIP-336/14), features from ``vision_feature_layer``, one ``<image>``
placeholder per visual token in the prompt, and plain 1-D positions.

Everything is done with hooks on the model's own modules (plus, for encoder-side methods, an
instance-level ``generate`` wrapper); :meth:`ReductionHandle.remove` restores the model exactly.
The ``downsample`` control (:class:`~ficoco.methods.ResolutionReduction`) resizes the pixels in a
pre-hook on the vision tower, which it asks to interpolate its position embeddings to the smaller
grid (CLIP's and SigLIP's ``interpolate_pos_encoding``); the prompt's placeholders are cut to the
smaller grid's tokens as for every method that hands the LLM fewer tokens.

An adaptive encoder-side method (PruMerge with no budget) learns each image's count only once the
tower has run, after the prompt's placeholders must already match it. Its prompt rewriting
therefore encodes the images itself, cuts each image's placeholders to that image's count and
hands the model the encoded images (``mm_encoder_outputs``) in place of the pixels; an
instance-level ``get_image_features`` wrapper gives each image only its own rows.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from ..methods import Method, ModelGeometry, ResolvedPlan
from ..stages import NO_POSITION
from .handle import ReductionHandle
from .input_side import InputSide
from .inputs import PER_TOKEN_INPUTS, cut_prompt_inputs, resized_tower_call, run_keep_mask, shrink_placeholders
from .language import LanguageSide
from .vision import VisionSide


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


def vision_layout(llava: nn.Module) -> tuple[nn.ModuleList, bool, tuple[int, int], int]:
    """``(encoder layers, has_cls, grid, feature layer index)`` of a CLIP or SigLIP tower."""
    return tower_layout(llava.config, llava.vision_tower)


def tower_layout(config, tower: nn.Module) -> tuple[nn.ModuleList, bool, tuple[int, int], int]:
    """``(encoder layers, has_cls, grid, feature layer index)`` of a CLIP or SigLIP ``tower`` of a
    model whose ``config`` has the ``vision_config`` and ``vision_feature_layer`` (LLaVA-1.5, and
    each of Video-LLaVA's two towers)."""
    vcfg = config.vision_config
    kinds = {"clip_vision_model": True, "siglip_vision_model": False}
    # transformers versions differ on whether the tower wraps its transformer in ``vision_model``
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    if vcfg.model_type not in kinds or encoder is None:
        raise TypeError(f"unsupported vision tower {type(tower).__name__} ({vcfg.model_type}); ficoco supports CLIP and SigLIP")
    layers = encoder.layers
    image_size, patch = vcfg.image_size, vcfg.patch_size
    sizes = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"non-square patch grid: image size {image_size} with patch {patch}")
    side = sizes[0] // patch  # the patch convolution drops a remainder (SigLIP-384/14: 27 x 27)
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"ficoco needs one vision_feature_layer, got {feature_layer!r}")
    # hidden_states[0] is the embedding output, so hidden_states[i] is the output of layer i - 1
    index = (feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer) - 1
    if not 0 <= index < len(layers):
        raise ValueError(f"vision_feature_layer={feature_layer} selects no encoder layer output")
    return layers, kinds[vcfg.model_type], (side, side), index


class LlavaHandle(ReductionHandle):
    """A method attached to a Hugging Face LLaVA model (LLaVA-1.5: CLIP or SigLIP tower, one square
    patch grid per image, 1-D positions).

    Attributes:
        plan: the resolved per-layer schedule.
    """

    family = "llava"

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        llava, outer = _llava_parts(model)
        super().__init__(model, llava, outer, method, record=record)
        self.llava = llava
        layers, has_cls, grid, feature_layer = vision_layout(llava)
        self.encoder_layers, self.grid, self.has_cls = layers, grid, has_cls
        if not has_cls:
            self.method = method = method.without_cls()
        config = llava.config
        self.strategy = getattr(config, "vision_feature_select_strategy", "default")
        self.cls_to_llm = int(has_cls and self.strategy == "full")
        geometry = ModelGeometry(len(layers), feature_layer, grid[0] * grid[1], len(llava.language_model.layers),
                                 grid=grid)
        self.plan: ResolvedPlan = method.plan(geometry)
        self.adaptive = self._adaptive_counts("image", "LLaVA")
        self._attach()

    def _install(self) -> None:
        llava, outer, method = self.llava, self.outer, self.method
        if self._fewer_tokens:
            self.hooks.pre(llava, self._rewrite_model_inputs, with_kwargs=True)
            if outer is not None:
                self.hooks.pre(outer, self._rewrite_model_inputs, with_kwargs=True)
                self._wrap_generate(outer)
        if self.plan.image_grid is not None:
            self.hooks.pre(llava.vision_tower, self._downsample, with_kwargs=True)
        if self.plan.vision:
            self.vision = VisionSide(self.encoder_layers, method.vision, self.plan.vision, grid=self.grid,
                                     has_cls=self.has_cls, record=self.record)
            self.vision.install(self.hooks)
            if self.adaptive:
                self._wrap(llava, "get_image_features", self._own_rows)
        if self.plan.input_removed:
            self.input = InputSide(method.input, self.plan.input_removed, grid=self.grid, leading=self.cls_to_llm,
                                   image_token_id=llava.config.image_token_id, embed=llava.get_input_embeddings(),
                                   token_state=self._encoder_state if self.plan.vision else None, record=self.record)
            self.input.install(self.hooks, llava.multi_modal_projector)
        if self.plan.language:
            self.language = LanguageSide(
                llava, method.language, set(self.plan.language), schedule=self._schedule,
                visual_token_ids=(llava.config.image_token_id,), grid=self.grid, token_state=self._token_state,
                record=self.record,
            )
            self.language.install(self.hooks)
            self._install_loss_hooks()

    # -- public -------------------------------------------------------------------------------

    @property
    def visual_tokens_per_image(self) -> int:
        """Visual tokens per image after the last reduction (what the LLM's last layers see)."""
        if self.adaptive:
            raise ValueError(f"{self.method.name} decides each image's count: see vision_trace.counts")
        return self.plan.llm_final_visual

    @property
    def _fewer_tokens(self) -> bool:
        """Whether the LLM receives fewer visual tokens than the processor wrote placeholders for."""
        plan = self.plan
        return bool(plan.vision or plan.input_removed) or plan.llm_input_visual != plan.geometry.num_patches

    # -- downsample: the image at a lower resolution --------------------------------------------

    def _downsample(self, module, args, kwargs):
        """Vision tower pre-hook: pixels ``[I, C, H, W]`` resized to the plan's grid of patches
        (``[I, C, rows x patch, cols x patch]``), the position embeddings interpolated to it."""
        return resized_tower_call(args, kwargs, self.llava.config.vision_config.patch_size, self.plan.image_grid,
                                  self.grid)

    # -- decoder side: every sample removes per image -----------------------------------------------

    def _schedule(self, is_visual: Tensor) -> list[dict[int, int]]:
        per_image = self.plan.llm_input_visual + self.cls_to_llm
        schedules = []
        for count in is_visual.sum(dim=1).tolist():
            images, rest = divmod(count, per_image)
            if rest:
                raise ValueError(f"{count} image tokens in a sample is not a whole number of images of {per_image} "
                                 f"tokens")
            schedules.append({layer: removed * images for layer, removed in self.plan.language.items()})
        return schedules

    def _token_state(self, b: int, counts: list[int], device) -> tuple[Tensor, Tensor] | None:
        """Sizes and grid positions of the visual tokens: the encoder's (or input reduction's)
        trace, or fresh patches."""
        n = max(counts)
        trace = self.input_trace or self.vision_trace
        if trace is not None and len(set(counts)) == 1 and trace.sizes.numel() == b * n:
            return trace.sizes.reshape(b, n).to(device), trace.positions.reshape(b, n).to(device)
        per_image = self.plan.llm_input_visual + self.cls_to_llm
        within_image = torch.arange(n, device=device) % per_image
        if per_image != self.grid[0] * self.grid[1]:
            within_image = torch.full_like(within_image, NO_POSITION)  # not a full grid: no positions
        return torch.ones(b, n, device=device), within_image.expand(b, n)

    # -- encoder-side: placeholders -------------------------------------------------------------

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        if self.adaptive:
            return self._encode_and_cut(inputs, default_side)
        inputs = self._cut_placeholders(inputs, default_side)
        if self.input is not None and inputs.get("pixel_values") is not None:
            self.input.remember_prompt(inputs.get("input_ids"), inputs.get("attention_mask"))
        return inputs

    def _own_rows(self, original):
        """``get_image_features`` that gives each image only its own rows of an adaptive
        reduction's padded batch (``pooler_output`` is a list of ``[N_i, D]``)."""
        def get_image_features(*args, **kwargs):
            out = original(*args, **kwargs)
            trace = self.vision_trace
            features = getattr(out, "pooler_output", None)
            if trace is not None and trace.counts is not None and isinstance(features, (list, tuple)):
                counts = (trace.counts + self.cls_to_llm).tolist()
                out.pooler_output = [f[:count] for f, count in zip(features, counts)]
            return out

        return get_image_features

    def _encode_and_cut(self, inputs: dict, default_side: str) -> dict:
        """For an adaptive method: encode the images, cut each image's placeholders to its own
        count and pass the encoded images on as ``mm_encoder_outputs`` instead of the pixels."""
        input_ids, pixel_values = inputs.get("input_ids"), inputs.get("pixel_values")
        if input_ids is None or pixel_values is None:
            return inputs
        image_token = self.llava.config.image_token_id
        full = self.plan.geometry.num_patches + self.cls_to_llm
        images = pixel_values.shape[0]
        total = int((input_ids == image_token).sum())
        if total != images * full:
            raise ValueError(
                f"the prompt has {total} image placeholders for {images} image(s); expected {full} per image"
            )
        options = {key: inputs[key] for key in ("vision_feature_layer", "vision_feature_select_strategy")
                   if inputs.get(key) is not None}
        encoded = self.llava.get_image_features(pixel_values=pixel_values, return_dict=True, **options)
        kept = [features.shape[0] for features in encoded.pooler_output]
        pad = self.llava.config.text_config.pad_token_id
        keep = run_keep_mask(input_ids, image_token, [full] * images, kept)
        inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
        inputs = cut_prompt_inputs(inputs, keep, pad_token_id=image_token if pad is None else pad,
                                   default_side=default_side)
        inputs["mm_encoder_outputs"] = {**(inputs.get("mm_encoder_outputs") or {}), "image": encoded}
        return inputs

    def _cut_placeholders(self, inputs: dict, default_side: str) -> dict:
        input_ids = inputs.get("input_ids")
        pixel_values = inputs.get("pixel_values")
        if input_ids is None or pixel_values is None or not self._fewer_tokens:
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
        per_token = {k: inputs[k] for k in PER_TOKEN_INPUTS if isinstance(inputs.get(k), Tensor)
                     and inputs[k].shape[-1] == input_ids.shape[-1] and inputs[k].dim() == 2}
        pad = self.llava.config.text_config.pad_token_id
        pad = image_token if pad is None else pad
        new_ids, cut = shrink_placeholders(input_ids, per_token, image_token_id=image_token, full_per_image=full,
                                           kept_per_image=kept, pad_token_id=pad, default_side=default_side)
        inputs.update(cut)
        inputs["input_ids"] = new_ids
        return inputs
