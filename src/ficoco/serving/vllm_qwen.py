"""Qwen2.5-VL for vLLM with a ficoco reduction before the LLM (imported by vLLM, through the
plugin's registration, only in processes that build this architecture).

Three things must agree, all from :func:`ficoco.serving.config.served_reduction` (a plan per
image size, as the Qwen-VL adapter of transformers makes them):

- the multimodal processor writes each image's kept count of placeholders
  (:class:`FicocoQwen2_5_VLMultiModalProcessor`), so the scheduler, the paged KV cache and the
  prompt's length see the short sequence from the start;
- the vision path hands that many tokens per image to the LLM: ficoco's own
  :class:`~ficoco.adapters.packed_vision.PackedVisionSide` runs the method's stages in the
  full-attention blocks of vLLM's Qwen2.5 ViT (:mod:`.vllm_qwen_tower` adapts its hooks to vLLM's
  modules), and :class:`~ficoco.adapters.packed_input.PackedInputSide` reduces the
  merger's output for LLM-input methods (pooling, DivPrune);
- M-RoPE: every kept token keeps the (t, h, w) position it had in the full image, and the text
  after the image (and decoding) continues where it would after the full image. The positions
  travel as vLLM's video pruning (EVS) carries them (``SupportsMultiModalPruning``): each image's
  embeddings get 4 more channels, from vLLM's ``compute_mrope_for_media`` (its tokens' positions
  as if the image opened the prompt, and where the text after it starts). EVS has the model
  runner place them (``recompute_mrope_positions``), but vLLM 0.32's CPU runner never turns that
  on (``CPUModelRunner.load_model`` leaves ``is_multimodal_pruning_enabled`` False), so this model
  places them itself, on every runner: :meth:`get_mrope_input_positions` numbers the text as it
  ends up and puts every placeholder of an image at the image's base ``(b, b, b)``;
  :meth:`embed_input_ids` strips the channels and keeps them; :meth:`forward` adds them to the
  image rows' positions, ``b + (t, h, w)``. Each row carries its own offset, so a prompt split
  by chunked prefill or batched with others is placed alike.

Not served with a reduction (one line each): videos (the processor takes none), precomputed
image embeddings, a vision tower split over tensor-parallel ranks or sharded over them
(``mm_encoder_tp_mode="data"``), vLLM's own video pruning at once, a compiled or graph-captured
tower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from ..adapters.hooks import HookSet
from ..adapters.packed_input import PackedInputSide
from .config import ServedQwenReduction, served_reduction
from .vllm_qwen_tower import VllmPackedVisionSide

#: the largest integer every smaller one of which a float type holds exactly (the positions ride
#: in the embeddings' dtype)
_EXACT_INTEGERS = {torch.bfloat16: 256, torch.float16: 2048}
#: the refusal of videos when a reduction is served
_NO_VIDEO = ("ficoco: the plugin reduces Qwen2.5-VL's images only; videos are not taken while a ficoco method is "
             "served")


def media_positions(grid: Sequence[int], merge: int) -> Tensor:
    """``[t x h/merge x w/merge, 4]`` int64: each LLM token's M-RoPE (t, h, w) position in an
    image of patch grid ``grid`` that opened the prompt (vLLM's ``compute_mrope_for_media``), and in
    channel 3 where the text after the whole image starts (its largest position + 1: the full
    image's, whichever tokens are kept). EVS writes the token grid's width there instead, which is
    the same for images no taller than wide."""
    positions = compute_mrope_for_media(torch.tensor(list(grid)), merge)
    positions[:, 3] = positions[:, :3].max() + 1
    return positions


class ServedQwen:
    """A ficoco reduction attached to a vLLM Qwen2.5-VL model's own modules.

    Args:
        model: the vLLM ``Qwen2_5_VLForConditionalGeneration`` (its ``visual`` tower).
        served: the resolved method (:func:`~ficoco.serving.config.served_reduction`).
    """

    def __init__(self, model: nn.Module, served: ServedQwenReduction) -> None:
        self.served, self.hooks = served, HookSet()
        self.vision: VllmPackedVisionSide | None = None
        self.input: PackedInputSide | None = None
        method, tower = served.method, model.visual
        blocks = set(served.plan_for(1 << 16).vision)
        try:
            if method.vision is not None and blocks:
                self.vision = VllmPackedVisionSide(tower, method.vision, lambda n: served.plan_for(n).vision,
                                                   blocks=blocks, full_attention=served.full_attention)
                self.vision.install(self.hooks)
            if method.input is not None:
                self.input = PackedInputSide(method.input, lambda n: served.plan_for(n).input_removed,
                                             merge=served.merge)
        except BaseException:
            self.remove()
            raise

    def kept(self, embeds: Sequence[Tensor], grids: list[list[int]]) -> tuple[Tensor, ...]:
        """Each image's kept tokens ``[k_i, D + 4]``: the features (the tower's output, ``[n_i, D]``
        per image, raster order, zeros where the tower dropped a token) and their positions
        (:func:`media_positions`)."""
        grids = [tuple(int(x) for x in g) for g in grids]
        trace = self.vision.last if self.vision is not None else None
        if trace is not None:
            if trace.grids != grids:
                raise RuntimeError(f"ficoco: the tower's last call encoded grids {trace.grids}, not {grids}")
            embeds = [e.index_select(0, kept.to(e.device)) for e, kept in zip(embeds, trace.kept)]
        if self.input is not None:
            embeds, _ = self.input.reduce(list(embeds), grids, trace, None, [])
            trace = self.input.last
        out = []
        for index, (e, grid) in enumerate(zip(embeds, grids)):
            expected = self.served.kept_tokens((grid[1] // self.served.merge) * (grid[2] // self.served.merge))
            if e.shape[0] != expected:
                raise RuntimeError(f"ficoco: image {index} has {e.shape[0]} tokens after the reduction, its "
                                   f"placeholders {expected}")
            positions = media_positions(grid, self.served.merge)
            exact = _EXACT_INTEGERS.get(e.dtype)
            if exact is not None and int(positions[:, :3].max()) > exact:
                raise ValueError(f"ficoco: an image of {grid[1] // self.served.merge} x {grid[2] // self.served.merge} "
                                 f"tokens has positions above {exact}, which its {e.dtype} embeddings cannot carry "
                                 f"exactly; serve in float32 or send a less elongated image")
            if trace is not None:
                positions = positions.index_select(0, trace.kept[index].cpu())
            out.append(torch.cat([e, positions.to(device=e.device, dtype=e.dtype)], dim=1))
        return tuple(out)

    def remove(self) -> None:
        """Detach: every hook removed."""
        self.hooks.remove()


class FicocoQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info with each image's kept count of placeholders, and no videos
    while a reduction is served."""

    @cached_property
    def served(self) -> ServedQwenReduction | None:
        # the config as loaded (no type check), so that a LLaVA checkpoint sent here gets one line
        # (a count above the largest image's tokens fails at start-up too: vLLM sizes its budgets
        # with get_num_image_tokens of the largest image the processor makes)
        served = served_reduction(self.ctx.model_config.hf_config)
        if served is not None and not isinstance(served, ServedQwenReduction):
            raise ValueError("ficoco: FicocoQwen2_5_VLForConditionalGeneration serves Qwen2.5-VL checkpoints")
        return served

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # asked while vLLM validates its model config, which would bury a refusal under pydantic's
        # lines: a refused method answers as Qwen2.5-VL does here and is refused in one line by
        # get_num_image_tokens and the model, a moment later
        try:
            served = self.served
        except ValueError:
            served = None
        if served is None:
            return super().get_supported_mm_limits()
        return {"image": None}  # a modality left out is not taken at all

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor,
                             mm_kwargs: Mapping[str, object]) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height,
                                            image_processor=image_processor, mm_kwargs=mm_kwargs)
        return full if self.served is None else self.served.kept_tokens(full)


class FicocoQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor writing each image's kept count of placeholders."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        served = self.info.served
        if served is None:
            return updates
        token = self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token]

        def replacement(item: int) -> list[int]:
            _, h, w = (int(x) for x in out_mm_kwargs["image"][item]["image_grid_thw"].data)
            return [token] * served.kept_tokens((h // served.merge) * (w // served.merge))

        return [PromptReplacement(modality="image", target=[token], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(FicocoQwen2_5_VLMultiModalProcessor, info=FicocoQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class FicocoQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with the ficoco method of ``hf_config.ficoco`` (none: vLLM's Qwen2.5-VL as it is)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        served = served_reduction(self.config)
        self.ficoco: ServedQwen | None = None
        if served is None:
            return
        if not isinstance(served, ServedQwenReduction):
            raise ValueError("ficoco: FicocoQwen2_5_VLForConditionalGeneration serves Qwen2.5-VL checkpoints")
        compilation = vllm_config.compilation_config
        if getattr(compilation, "compile_mm_encoder", False) or getattr(compilation, "cudagraph_mm_encoder", False):
            raise ValueError("ficoco: the reduction runs in the vision tower's Python forward; leave "
                             "compile_mm_encoder and cudagraph_mm_encoder off")
        if self.use_data_parallel:
            raise ValueError("ficoco: a reduction in Qwen2.5-VL's tower is not served with the tower sharded over "
                             "ranks (mm_encoder_tp_mode='data')")
        if self.is_multimodal_pruning_enabled:
            raise ValueError("ficoco: vLLM's video pruning (--video-pruning-rate) and a ficoco reduction are not "
                             "served together")
        self.ficoco = ServedQwen(self, served)
        # offsets [3, R] of the image rows of the tokens embedded last (embed_input_ids), added to
        # their positions by the forward that follows
        self._image_offsets: tuple[Tensor, Tensor] | None = None

    def _process_image_input(self, image_input) -> tuple[Tensor, ...]:
        if self.ficoco is None:
            return super()._process_image_input(image_input)
        if image_input["type"] == "image_embeds":
            raise ValueError("ficoco: precomputed image embeddings cannot be reduced (the reduction runs inside "
                             "the vision tower); send the image")
        embeds = super()._process_image_input(image_input)  # per image [n_i, D], zeros where dropped
        return self.ficoco.kept(embeds, image_input["image_grid_thw"].tolist())

    def _process_video_input(self, video_input) -> tuple[Tensor, ...]:
        if self.ficoco is not None:
            raise ValueError(_NO_VIDEO)
        return super()._process_video_input(video_input)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        """The prompt's M-RoPE positions ``[3, L]`` and decoding's offset, before the images are
        encoded: text at its final positions (after an image, where it would be after the full
        image), every placeholder of an image at the image's base, to which :meth:`forward` adds
        its kept token's (t, h, w)."""
        if self.ficoco is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        parts, start, next_position = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(_NO_VIDEO)
            offset, count = feature.mm_position.offset, feature.mm_position.length
            parts.append(torch.arange(offset - start).expand(3, -1) + next_position)
            base = next_position + offset - start
            parts.append(torch.full((3, count), base, dtype=torch.long))
            grid = feature.data["image_grid_thw"].data.tolist()
            next_position, start = base + int(media_positions(grid, self.ficoco.served.merge)[0, 3]), offset + count
        parts.append(torch.arange(len(input_tokens) - start).expand(3, -1) + next_position)
        # decoding continues where text after the prompt would (the prompt's largest position + 1
        # when it ends with text, as chat prompts do)
        return torch.cat(parts, dim=1), next_position - start

    def embed_input_ids(self, input_ids: Tensor, multimodal_embeddings=None, *, is_multimodal=None) -> Tensor:
        if self.ficoco is None or multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        # each image's rows (of this step's share of it) carry their (t, h, w) in channels -4..-2
        offsets = torch.cat([e[:, -4:-1] for e in multimodal_embeddings]).round().long().T  # [3, R]
        self._image_offsets = (is_multimodal, offsets)
        return super().embed_input_ids(input_ids, [e[:, :-4] for e in multimodal_embeddings],
                                       is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        stash, self._image_offsets = getattr(self, "_image_offsets", None), None
        if stash is not None and positions.dim() == 2:
            rows, offsets = stash
            index = rows.nonzero().squeeze(1).to(positions.device)
            positions = positions.clone()  # the runner's buffer is rebuilt each step; leave it
            positions[:, index] += offsets.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
