"""The Video-LLaVA family: ``VideoLlavaForConditionalGeneration`` / ``VideoLlavaModel``.

What this family is to ficoco:

- **two towers**: ``image_tower`` for images and ``video_tower`` for video frames, both CLIP-224/14
  with a [CLS] (256 patches, a 16x16 grid), features from ``vision_feature_layer`` (-2), one
  multimodal projector shared by both. The video tower encodes every frame as its own sequence
  (``[videos x frames, 257, D]``), so a frame is to it what an image is to the image tower.
- **tokens handed to the LLM**: an image hands on its 256 patches (``vision_feature_select_strategy``
  ``"default"``); a frame hands on its [CLS] and its 256 patches, whatever the strategy, as
  transformers' ``get_video_features`` and the original ``LanguageBindVideoTower.feature_select``
  ("return all") do: 8 frames are 2,056 tokens.
- **budgets**: ``retain`` is the number (or share) of *patch* tokens kept per image and per frame;
  a frame's [CLS] goes on top (``retain=17`` hands the LLM 17 per image and 8 x 18 = 144 per
  8-frame video). Each image and each frame is reduced alone: encoder-side methods inside the tower
  that encodes it, LLM-input methods on its projected tokens (the [CLS] never a candidate). The
  ``zero`` control hands on nothing, the frames' [CLS] included.
- **decoder-side methods** see the image and video placeholders of a sample as its visual tokens
  (a frame's [CLS] is one of them) and remove ``(images + frames) x`` the per-image removal of
  the plan, chosen over all of them together, as FastV, PDrop, SparseVLM and FiCoCo-L rank one
  sequence.
- **prompt**: one ``<image>`` placeholder per image token and one ``<video>`` per frame token; the
  rewriting cuts each image's run and each video's run to the tokens kept. No newline or separator
  tokens exist.
- **positions**: plain 1-D. A cut prompt is numbered as the shorter prompt it is; decoder-side
  methods keep every surviving token at its original position (:mod:`.language`).

transformers 5.17 names the image input ``pixel_values_images``, newer versions ``pixel_values``
(taking the old name with a deprecation warning): both are read.

An adaptive encoder-side method (PruMerge with no budget) learns each image's and each frame's count
only in the tower. Its prompt rewriting then encodes the images and videos itself, cuts every run
to its own count and hands the model the encoded tokens (``mm_encoder_outputs``), which needs a
transformers whose Video-LLaVA takes them (newer than 5.17); it is refused in one line otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..methods import Method, ModelGeometry, ResolvedPlan
from ..stages import NO_POSITION
from .handle import ReductionHandle
from .input_side import InputSide
from .inputs import cut_tokens, resized_tower_call, run_keep_mask
from .language import LanguageSide
from .llava import tower_layout
from .vision import VisionSide

_PER_TOKEN_INPUTS = ("attention_mask", "labels", "position_ids", "token_type_ids", "mm_token_type_ids")
#: where a call's images are: ``pixel_values`` (transformers newer than 5.22), ``pixel_values_images`` (before)
IMAGE_INPUTS = ("pixel_values", "pixel_values_images")


def _video_llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(VideoLlavaModel, VideoLlavaForConditionalGeneration or None)`` or a clear error."""
    from transformers import VideoLlavaForConditionalGeneration, VideoLlavaModel

    if isinstance(model, VideoLlavaForConditionalGeneration):
        return model.model, model
    if isinstance(model, VideoLlavaModel):
        return model, None
    raise TypeError(f"ficoco's Video-LLaVA adapter takes VideoLlavaForConditionalGeneration and VideoLlavaModel; "
                    f"got {type(model).__name__}")


@dataclass(frozen=True)
class _Kind:
    """Images or videos: how their tokens reach the LLM.

    Attributes:
        name: ``"image"`` or ``"video"``.
        token_id: the placeholder of one of their tokens.
        tower: the vision tower that encodes them.
        layers: its encoder layers.
        cls: [CLS] rows each image / frame hands the projector (never a reduction candidate).
        cls_kept: of those, how many reach the LLM (none when no patch does: the ``zero`` control).
    """

    name: str
    token_id: int
    tower: nn.Module
    layers: nn.ModuleList
    cls: int
    cls_kept: int


def image_pixels(inputs: dict) -> Tensor | None:
    """``[I, C, H, W]`` the images of a call, under either of their names."""
    for name in IMAGE_INPUTS:
        if inputs.get(name) is not None:
            return inputs[name]
    return None


class VideoLlavaHandle(ReductionHandle):
    """A method attached to a Hugging Face Video-LLaVA model (images and videos, a CLIP tower for
    each, 1-D positions).

    Attributes:
        plan: the resolved per-layer schedule, per image and per frame.
        video_vision: the encoder-side reduction in the video tower (``vision`` is the image tower's).
        video_input: the LLM-input reduction of video frames (``input`` is the images').
    """

    family = "video_llava"
    pixel_inputs = (*IMAGE_INPUTS, "pixel_values_videos")

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        core, outer = _video_llava_parts(model)
        super().__init__(model, core, outer, method, record=record)
        self.video_vision: VisionSide | None = None
        self.video_input: InputSide | None = None
        self._projecting: str | None = None  # which tower ran last: whose tokens the projector sees
        self._prompt_ids: Tensor | None = None  # the prefill's input_ids (decoder side)
        config = core.config
        image_layout = tower_layout(config, core.image_tower)
        video_layout = tower_layout(config, core.video_tower)
        layers, has_cls, grid, feature_layer = image_layout
        if (has_cls, grid) != video_layout[1:3] or len(layers) != len(video_layout[0]):
            raise ValueError("Video-LLaVA's image and video towers differ in depth, grid or [CLS]: ficoco needs one "
                             "geometry for both")
        self.grid, self.has_cls = grid, has_cls
        if not has_cls:
            self.method = method = method.without_cls()
        geometry = ModelGeometry(len(layers), feature_layer, grid[0] * grid[1], len(core.language_model.layers),
                                 grid=grid)
        self.plan: ResolvedPlan = method.plan(geometry)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        image_cls, frame_cls = int(has_cls and strategy == "full"), int(has_cls)
        handed = self.plan.llm_input_visual > 0
        self.kinds = {
            "image": _Kind("image", config.image_token_id, core.image_tower, layers, image_cls, image_cls * handed),
            "video": _Kind("video", config.video_token_id, core.video_tower, video_layout[0], frame_cls,
                           frame_cls * handed),
        }
        self.adaptive = self._adaptive_counts("image and frame", "Video-LLaVA")
        self._attach()

    def _install(self) -> None:
        core, outer, method, plan = self.core, self.outer, self.method, self.plan
        if self._fewer_tokens:
            self.hooks.pre(core, self._rewrite_model_inputs, with_kwargs=True)
            if outer is not None:
                self.hooks.pre(outer, self._rewrite_model_inputs, with_kwargs=True)
                self._wrap_generate(outer)
        for kind in self.kinds.values():
            self.hooks.pre(kind.tower, self._projecting_for(kind.name))
            if plan.image_grid is not None:
                self.hooks.pre(kind.tower, self._downsample, with_kwargs=True)
        if plan.vision:
            sides = [VisionSide(kind.layers, method.vision, plan.vision, grid=self.grid, has_cls=self.has_cls,
                                record=self.record) for kind in self.kinds.values()]
            self.vision, self.video_vision = sides
            for side in sides:
                side.install(self.hooks)
        if plan.input_removed:
            sides = []
            for kind, vision in zip(self.kinds.values(), (self.vision, self.video_vision)):
                side = InputSide(method.input, plan.input_removed, grid=self.grid, leading=kind.cls,
                                 image_token_id=kind.token_id, embed=core.get_input_embeddings(),
                                 token_state=self._encoder_state(vision) if vision is not None else None,
                                 record=self.record)
                side.install(self.hooks, core.multi_modal_projector, active=self._is_projecting(kind.name))
                sides.append(side)
            self.input, self.video_input = sides
        if any(kind.cls_kept < kind.cls for kind in self.kinds.values()):
            self.hooks.post(core.multi_modal_projector, self._drop_cls)
        if plan.language:
            self.hooks.pre(core, self._remember_prompt, with_kwargs=True)  # before the language side's own
            self.language = LanguageSide(
                core, method.language, set(plan.language), schedule=self._schedule,
                visual_token_ids=tuple(kind.token_id for kind in self.kinds.values()), grid=self.grid,
                token_state=self._token_state, record=self.record,
            )
            self.language.install(self.hooks)
            self._install_loss_hooks()

    # -- public -------------------------------------------------------------------------------

    @property
    def video_trace(self):
        """What the video tower's reduction did to the last batch of frames (``[videos x frames, N']``)."""
        return None if self.video_vision is None else self.video_vision.last

    @property
    def video_input_trace(self):
        """What the LLM-input reduction did to the last batch of frames."""
        return None if self.video_input is None else self.video_input.last

    @property
    def visual_tokens_per_image(self) -> int:
        """Tokens per image after the last reduction (what the LLM's last layers see)."""
        return self._per_unit("image")

    @property
    def visual_tokens_per_frame(self) -> int:
        """Tokens per video frame after the last reduction, its [CLS] included."""
        return self._per_unit("video")

    def _per_unit(self, kind: str) -> int:
        if self.adaptive:
            raise ValueError(f"{self.method.name} decides each image's and frame's count: see vision_trace.counts "
                             f"and video_trace.counts")
        return self.plan.llm_final_visual + self.kinds[kind].cls_kept

    @property
    def _fewer_tokens(self) -> bool:
        """Whether the LLM receives fewer visual tokens than the processor wrote placeholders for."""
        plan = self.plan
        return bool(plan.vision or plan.input_removed) or plan.llm_input_visual != plan.geometry.num_patches

    # -- which tower's tokens the shared projector sees -------------------------------------------

    def _projecting_for(self, name: str):
        def remember(module, args) -> None:
            self._projecting = name

        return remember

    def _is_projecting(self, name: str):
        return lambda: self._projecting == name

    def _drop_cls(self, module, args, output: Tensor) -> Tensor | None:
        """Projector hook: a method that hands on no patch hands on no [CLS] either (``zero``)."""
        kind = self.kinds.get(self._projecting)
        if kind is None or kind.cls_kept == kind.cls:
            return None
        return output[:, kind.cls - kind.cls_kept:]

    # -- downsample: images and frames at a lower resolution --------------------------------------

    def _downsample(self, module, args, kwargs):
        """Tower pre-hook: pixels ``[I, C, H, W]`` resized to the plan's grid of patches, the position
        embeddings interpolated to it."""
        return resized_tower_call(args, kwargs, self.core.config.vision_config.patch_size, self.plan.image_grid,
                                  self.grid)

    # -- decoder side ------------------------------------------------------------------------------

    def _remember_prompt(self, module, args, kwargs) -> None:
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        ids = bound.get("input_ids")
        cache = bound.get("cache", bound.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:  # a prefill (decoding steps keep the prefill's)
            self._prompt_ids = ids

    def _unit_sizes(self) -> dict[str, int]:
        """LLM tokens of one image / one frame entering the decoder."""
        return {name: self.plan.llm_input_visual + kind.cls_kept for name, kind in self.kinds.items()}

    def _units(self, is_visual: Tensor) -> Tensor:
        """``[B]`` images plus frames of every sample of the prefill."""
        ids = self._prompt_ids
        if ids is None or ids.shape != is_visual.shape:
            raise ValueError("decoder-side reduction on Video-LLaVA needs input_ids in the prefill call (it tells "
                             "images from video frames)")
        units = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        for (name, kind), per_unit in zip(self.kinds.items(), self._unit_sizes().values()):
            count = (ids == kind.token_id).sum(dim=1)
            if bool((count % per_unit).any()):
                raise ValueError(f"a sample's {name} tokens {count.tolist()} are no whole number of {per_unit}-token "
                                 f"{'images' if name == 'image' else 'frames'}")
            units += count // per_unit
        return units

    def _schedule(self, is_visual: Tensor) -> list[dict[int, int]]:
        return [{layer: removed * units for layer, removed in self.plan.language.items()}
                for units in self._units(is_visual).tolist()]

    def _token_state(self, b: int, counts: list[int], device) -> tuple[Tensor, Tensor]:
        """``[B, max(counts)]`` sizes and grid positions of the visual tokens in sequence order: each
        image's / frame's from what the encoder (or the LLM-input reduction) did to it this forward,
        else fresh patches; a frame's [CLS] has no position."""
        ids = self._prompt_ids.to(device)
        n = max(counts)
        sizes = torch.ones(ids.shape, device=device)
        positions = torch.full(ids.shape, NO_POSITION, dtype=torch.long, device=device)
        traces = {"image": self.input_trace or self.vision_trace, "video": self.video_input_trace or self.video_trace}
        patches = self.plan.llm_input_visual
        for (name, kind), per_unit in zip(self.kinds.items(), self._unit_sizes().values()):
            mine = ids == kind.token_id
            if per_unit == 0 or not bool(mine.any()):
                continue
            index = mine.flatten().long().cumsum(0).view_as(mine)[mine] - 1  # over the batch, row by row
            unit, patch = index // per_unit, index % per_unit - kind.cls_kept
            is_patch = patch >= 0
            trace = traces[name]
            if trace is not None and tuple(trace.positions.shape) == (int(unit.max()) + 1, patches):
                at = (unit, patch.clamp_min(0))
                found = torch.where(is_patch, trace.positions.to(device)[at], NO_POSITION)
                sizes[mine] = torch.where(is_patch, trace.sizes.to(device)[at].float(), 1.0)
            elif patches == self.plan.geometry.num_patches:
                found = torch.where(is_patch, patch, NO_POSITION)
            else:  # not a full grid and no trace: no positions
                found = torch.full_like(patch, NO_POSITION)
            positions[mine] = found
        is_visual = ids == self.kinds["image"].token_id
        is_visual |= ids == self.kinds["video"].token_id
        rank = (is_visual.cumsum(dim=1) - 1).clamp_min(0)
        rank = torch.where(is_visual, rank, n)  # text goes to a scratch column
        out_sizes = torch.ones(b, n + 1, device=device).scatter_(1, rank, sizes)[:, :n]
        out_positions = torch.full((b, n + 1), NO_POSITION, dtype=torch.long, device=device)
        out_positions = out_positions.scatter_(1, rank, positions)[:, :n]
        return out_sizes, out_positions

    def _encoder_state(self, vision: VisionSide):
        """Sizes and grid positions of the tokens ``vision``'s tower handed the projector, from its trace."""
        def state(items: int, n: int, device) -> tuple[Tensor, Tensor] | None:
            trace = vision.last
            if trace is None or trace.sizes.shape != (items, n):
                return None
            return trace.sizes.to(device), trace.positions.to(device)

        return state

    # -- the prompt: placeholders cut to what the LLM receives -------------------------------------

    def _sides(self, name: str) -> list:
        """The encoder-side and LLM-input reductions of images or of videos."""
        sides = (self.vision, self.input) if name == "image" else (self.video_vision, self.video_input)
        return [side for side in sides if side is not None]

    def _items(self, inputs: dict) -> dict[str, tuple[int, int]]:
        """``{kind: (items, units per item)}`` of a call's images (one unit each) and videos (a unit
        per frame)."""
        items = {}
        images = image_pixels(inputs)
        if images is not None:
            items["image"] = (images.shape[0], 1)
        videos = inputs.get("pixel_values_videos")
        if videos is not None:
            if videos.dim() != 5:
                raise ValueError(f"pixel_values_videos must be [videos, frames, channels, height, width], got "
                                 f"{tuple(videos.shape)}")
            items["video"] = (videos.shape[0], videos.shape[1])
        return items

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        items = self._items(inputs)
        if not items:
            return inputs
        for name in ("image", "video"):
            if name in items:
                continue
            for side in self._sides(name):
                side.last = None  # a trace from an earlier call must not describe this one's tokens
        if self.adaptive:
            return self._encode_and_cut(inputs, items, default_side)
        inputs = self._cut_placeholders(inputs, items, default_side)
        input_ids = inputs.get("input_ids")
        mask = inputs.get("attention_mask")
        for name, side in (("image", self.input), ("video", self.video_input)):
            if side is None or name not in items or input_ids is None:
                continue
            # each kind's instruction is the text after it: the other kind's placeholders are no text
            other = self.kinds["video" if name == "image" else "image"].token_id
            real = input_ids != other if mask is None else mask.bool() & (input_ids != other)
            side.remember_prompt(input_ids, real.long(), per_run=items[name][1])
        return inputs

    def _counts(self, inputs: dict, items: dict[str, tuple[int, int]], input_ids: Tensor) -> dict[str, int]:
        """Placeholders of each kind in the prompt, checked against what the processor writes."""
        found = {}
        for name, (count, units) in items.items():
            kind = self.kinds[name]
            full = self.plan.geometry.num_patches + kind.cls
            total = int((input_ids == kind.token_id).sum())
            kept = (self.plan.llm_input_visual + kind.cls_kept) * units * count
            if total not in (count * units * full, kept) or self.adaptive and total != count * units * full:
                what = f"{count} image(s)" if name == "image" else f"{count} video(s) of {units} frames"
                raise ValueError(f"the prompt has {total} {name} placeholders for {what}; expected {full} per "
                                 f"{'image' if name == 'image' else 'frame'}")
            found[name] = total
        return found

    def _per_token(self, inputs: dict, input_ids: Tensor) -> dict[str, Tensor]:
        return {k: inputs[k] for k in _PER_TOKEN_INPUTS if isinstance(inputs.get(k), Tensor)
                and inputs[k].shape[-1] == input_ids.shape[-1] and inputs[k].dim() == 2}

    def _cut_placeholders(self, inputs: dict, items: dict[str, tuple[int, int]], default_side: str) -> dict:
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            return inputs
        found = self._counts(inputs, items, input_ids)
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for name, (count, units) in items.items():
            kind = self.kinds[name]
            full = (self.plan.geometry.num_patches + kind.cls) * units
            kept = (self.plan.llm_input_visual + kind.cls_kept) * units
            if found[name] != count * full or kept == full:
                continue  # already cut (or nothing to cut)
            keep &= run_keep_mask(input_ids, kind.token_id, [full] * count, [kept] * count)
        if bool(keep.all()):
            return inputs
        pad = self.core.config.text_config.pad_token_id
        new_ids, cut = cut_tokens(input_ids, self._per_token(inputs, input_ids), keep,
                                  pad_token_id=self.kinds["image"].token_id if pad is None else pad,
                                  default_side=default_side)
        inputs.update(cut)
        inputs["input_ids"] = new_ids
        return inputs

    def _encode_and_cut(self, inputs: dict, items: dict[str, tuple[int, int]], default_side: str) -> dict:
        """For an adaptive method: encode the images and videos, cut each image's and each video's
        placeholders to its own count and pass the encoded tokens on as ``mm_encoder_outputs``
        instead of the pixels."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            return inputs
        self._counts(inputs, items, input_ids)
        options = {"vision_feature_layer": inputs["vision_feature_layer"]} \
            if inputs.get("vision_feature_layer") is not None else {}
        encoded = dict(inputs.get("mm_encoder_outputs") or {})
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for name, (count, units) in items.items():
            kind = self.kinds[name]
            if name == "image":
                strategy = {"vision_feature_select_strategy": inputs["vision_feature_select_strategy"]} \
                    if inputs.get("vision_feature_select_strategy") is not None else {}
                out = self.core.get_image_features(pixel_values=image_pixels(inputs), return_dict=True,
                                                   **options, **strategy)
                trace = self.vision.last
            else:
                out = self.core.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                   return_dict=True, **options)
                trace = self.video_vision.last
            per_unit = (trace.counts + kind.cls).tolist()  # [items x units] tokens each image / frame hands on
            features = out.pooler_output  # [items x units, width, D], each row padded after its own tokens
            out.pooler_output = torch.cat([row[:n] for row, n in zip(features, per_unit)])[None]
            encoded[name] = out
            full = (self.plan.geometry.num_patches + kind.cls) * units
            kept = [sum(per_unit[i * units:(i + 1) * units]) for i in range(count)]
            keep &= run_keep_mask(input_ids, kind.token_id, [full] * count, kept)
        new_ids, cut = cut_tokens(input_ids, self._per_token(inputs, input_ids), keep,
                                  pad_token_id=self.core.config.text_config.pad_token_id or 0,
                                  default_side=default_side)
        inputs = {key: value for key, value in inputs.items() if key not in self.pixel_inputs}
        inputs.update(cut)
        inputs["input_ids"] = new_ids
        inputs["mm_encoder_outputs"] = encoded
        return inputs
