"""The LLaVA-OneVision family: ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``.

LLaVA-OneVision is LLaVA-NeXT's anyres layout on a SigLIP tower, plus videos, so this family is
:class:`~.llava_next.LlavaNextHandle` with these differences (docs/methods.md, "LLaVA-OneVision"):

- **tower**: SigLIP-384/14 (27 x 27 = 729 patches per crop, no [CLS]), features from the last
  layer kept, ``vision_feature_select_strategy="full"`` (every patch). Methods needing [CLS] run
  their stand-ins (:meth:`~ficoco.methods.Method.without_cls`);
- **anyres_max_N** (``config.vision_aspect_ratio``): an unpadded tiles' grid larger than
  ``1.1² x N`` crops' worth of patches is resized (bilinear) before the newline tokens are added
  (:class:`~.anyres.OnevisionLayout`). Inside the LLM the resized tokens are the candidates;
  before it, reduced crops are packed as on LLaVA-NeXT (no unpadding, no resize, no newlines), so
  ``retain`` stays per crop: ``crops x k``;
- **videos** (``pixel_values_videos``, ``[videos, frames, 3, 384, 384]``): every frame goes through
  the tower as one crop, is projected, then pooled (bilinear) to ``ceil(27/2)² = 14 x 14 = 196``
  tokens; a video hands the LLM ``frames x 196`` tokens and one newline token after its last frame
  (transformers' ``get_video_features``). Decoder-side methods take videos, alone or with images in
  the same batch or sample: a frame's pooled tokens are candidates, ``retain`` is per frame (as
  Video-LLaVA's), so a video of ``F`` frames keeps ``F x min(k, 196)`` (a share: of its 196), and
  its newline token is kept, never a candidate. Methods that reduce before the LLM (in the tower or
  on the projector's output) are refused for videos: the pooling runs after the projector on each
  frame's full 27 x 27 grid, which a reduced frame no longer has;
- **also refused**: samples of several images (``batch_num_images`` above 1: OneVision then
  encodes each image as its base crop only).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor, nn

from ..methods import Method
from ..methods.base import kept_count
from .anyres import OnevisionLayout, onevision_layout
from .llava_next import LlavaNextHandle


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(LlavaOnevisionModel, LlavaOnevisionForConditionalGeneration or None)`` or a clear error."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        return model.model, model
    if isinstance(model, LlavaOnevisionModel):
        return model, None
    raise TypeError(f"ficoco's LLaVA-OneVision family takes LlavaOnevisionForConditionalGeneration and "
                    f"LlavaOnevisionModel; got {type(model).__name__}")


def max_crops(vision_aspect_ratio: str) -> int:
    """``N`` of ``"anyres_max_N"``, or a clear error."""
    digits = str(vision_aspect_ratio).removeprefix("anyres_max_")
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not 'anyres_max_N', the only layout "
                         f"LLaVA-OneVision's packing knows")
    return int(digits)


def _video_pixels(args: tuple, kwargs: dict) -> Tensor | None:
    """``[videos, frames, C, H, W]`` of a ``get_video_features`` call (``pixel_values_videos``
    on newer transformers, ``pixel_values`` on 5.17)."""
    for name in ("pixel_values_videos", "pixel_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[0] if args else None


class LlavaOnevisionHandle(LlavaNextHandle):
    """A method attached to a Hugging Face LLaVA-OneVision model (see the module docstring).

    Attributes:
        max_crops: ``N`` of the model's ``anyres_max_N``.
        frame_grid: ``(rows, cols)`` of a video frame's pooled tokens (14 x 14).
    """

    family = "llava-onevision"
    family_name = "LLaVA-OneVision"

    @staticmethod
    def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        return _parts(model)

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        llava, _ = _parts(model)
        config = llava.config
        self.max_crops = max_crops(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
        self.video_token = config.video_token_id
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.frame_grid = (math.ceil(side / 2), math.ceil(side / 2))  # transformers' apply_pooling
        self._frames: list[int] = []  # frames of each video last encoded or prompted
        self._prompt_ids: Tensor | None = None  # the last forward's input_ids (decoder side)
        self.video_plan = lru_cache(maxsize=None)(self._video_plan)
        super().__init__(model, method, record=record)

    def _install(self) -> None:
        # registered first, so that a refusal comes before any rewriting hook runs
        self.hooks.pre(self.llava, self._refuse_unsupported, with_kwargs=True)
        if self.outer is not None:
            self.hooks.pre(self.outer, self._refuse_unsupported, with_kwargs=True)
        # the encoder itself checks too, whatever runs before it (generate encodes before the prefill)
        self._wrap(self.llava, "get_video_features", self._remember_videos)
        super()._install()

    def _visual_token_ids(self) -> tuple[int, ...]:
        return (self.image_token, self.video_token)

    def _layout(self, size: tuple[int, int]) -> OnevisionLayout:
        return onevision_layout(size, self.pinpoints, self.crop_size, self.patch_size, self.max_crops)

    # -- refusals -------------------------------------------------------------------------------

    def _refuse_unsupported(self, module, args, kwargs) -> None:
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        self._check({**bound.get("kwargs", {}), **bound})

    def _check(self, inputs: dict) -> None:
        if inputs.get("pixel_values_videos") is not None and self._cuts:
            raise ValueError(f"{self.method.name} reduces before the LLM, which LLaVA-OneVision's videos do not take: "
                             f"each frame is pooled 2x2 after the projector on its full {self.grid[0]}x{self.grid[1]} "
                             f"grid, which a reduced frame no longer has; on videos use a decoder-side method")
        counts = inputs.get("batch_num_images")
        if counts is not None and any(int(n) != 1 for n in (counts.tolist() if isinstance(counts, Tensor) else counts)):
            raise ValueError(f"{self.method.name} on LLaVA-OneVision takes one image per sample; batch_num_images="
                             f"{[int(n) for n in counts]} makes the model encode each image of a multi-image sample "
                             f"as its base crop only, which is not supported yet")

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        self._check(inputs)
        return super()._rewrite(inputs, default_side)

    # -- videos ---------------------------------------------------------------------------------

    @property
    def frame_tokens(self) -> int:
        """Pooled tokens of one video frame (196 for SigLIP-384/14)."""
        return self.frame_grid[0] * self.frame_grid[1]

    def video_tokens(self, frames: int) -> int:
        """Placeholders of a video of ``frames`` frames in the prompt: its pooled tokens and one
        newline token (reductions before the LLM are refused for videos, so always the model's own)."""
        return frames * self.frame_tokens + 1

    def _frame_keep(self) -> int:
        """Pooled tokens a frame keeps inside the LLM: ``min(k, 196)``, or the share of its 196."""
        retain = self.method.language.retain
        if isinstance(retain, float):
            return kept_count(retain, self.frame_tokens, "LLM")
        return min(self.plan.llm_final_visual, self.frame_tokens)

    def _video_plan(self, frames: int) -> dict[int, int]:
        """``{decoder layer: removed}`` for one video of ``frames`` frames, down to ``frames x`` the
        per-frame budget (:meth:`_frame_keep`), spread by the method's own schedule."""
        if not self.plan.language:
            return {}
        return self.method.language.resolve(self.llm_layers, frames * self.frame_tokens,
                                            keep=frames * self._frame_keep())

    def kept_video_tokens(self, frames: int) -> int:
        """Pooled tokens (the newline token not counted) of a video of ``frames`` frames after the
        last reduction."""
        return frames * self.frame_tokens - sum(self.video_plan(frames).values())

    def _remember_videos(self, original):
        """``get_video_features`` that refuses videos for reductions before the LLM and keeps the
        frames of the videos it encodes (newer transformers encode them before the prefill)."""
        def get_video_features(*args, **kwargs):
            pixels = _video_pixels(args, kwargs)
            self._check({"pixel_values_videos": pixels})
            if pixels is not None:
                self._frames = [int(pixels.shape[1])] * int(pixels.shape[0])
            return original(*args, **kwargs)

        return get_video_features

    def _remember_prompted(self, module, args, kwargs) -> None:
        super()._remember_prompted(module, args, kwargs)
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        bound = {**bound.get("kwargs", {}), **bound}
        videos = bound.get("pixel_values_videos")
        if videos is not None:
            self._frames = [int(videos.shape[1])] * int(videos.shape[0])
        self._prompt_ids = bound.get("input_ids")

    # -- inside the LLM -------------------------------------------------------------------------

    def _candidates(self, placeholders: Tensor) -> Tensor:
        """``[B, L]``: the image placeholders that are patches and the video placeholders that are
        pooled frame tokens (newline tokens are not candidates); also sorts the prompt's images and
        videos into samples, in prompt order, for :meth:`_schedule` and :meth:`_token_state`."""
        ids = self._prompt_ids
        if ids is None or ids.shape != placeholders.shape:
            is_video = torch.zeros_like(placeholders)  # embeddings only: image placeholders (checked below)
        else:
            is_video = placeholders & (ids.to(placeholders.device) == self.video_token)
        is_image = placeholders & ~is_video
        layouts, image_counts = self._prompt_images()
        kinds = {"image": (is_image, image_counts), "video": (is_video, [self.video_tokens(f) for f in self._frames])}
        found: list[list[tuple[int, str, int]]] = [[] for _ in range(placeholders.shape[0])]
        for kind, (mask, counts) in kinds.items():
            total = int(mask.sum())
            if total == 0:
                kinds[kind] = (mask, [])
                continue
            if total != sum(counts):
                raise ValueError(f"the prompt has {total} {kind} placeholders but the {len(counts)} {kind}(s) last "
                                 f"encoded need {sum(counts)} ({counts}); decoder-side reduction on "
                                 f"{self.family_name} needs the {kind}s of this prompt")
            item = 0
            for row, columns in enumerate(mask.cpu()):
                columns = columns.nonzero().flatten().tolist()
                at = 0
                while at < len(columns):
                    found[row].append((columns[at], kind, item))
                    at += counts[item]
                    item += 1
                if at != len(columns):
                    raise ValueError(f"a {kind}'s placeholders run across two samples of the batch")
        self._rows = [[(kind, item) for _, kind, item in sorted(row)] for row in found]
        if self._cuts:
            return placeholders  # videos are refused before the LLM: image placeholders only
        out = torch.zeros_like(placeholders)
        if kinds["image"][1]:
            flags = torch.cat([~layout.newlines() for layout in layouts]).to(placeholders.device)
            out[is_image] = flags
        if kinds["video"][1]:
            flags = torch.cat([torch.arange(self.video_tokens(f)) < f * self.frame_tokens for f in self._frames])
            out[is_video] = flags.to(placeholders.device)
        return out

    def _schedule(self, is_visual: Tensor) -> list[dict[int, int]]:
        layouts = [self.layout(size) for size in self._sizes]
        schedules = []
        for items in self._rows:
            removals: dict[int, int] = {}
            for kind, item in items:
                plan = self.image_plan(layouts[item]) if kind == "image" else self.video_plan(self._frames[item])
                for layer, removed in plan.items():
                    removals[layer] = removals.get(layer, 0) + removed
            schedules.append(removals)
        return schedules

    def _token_state(self, b: int, counts: list[int], device) -> tuple[Tensor, Tensor]:
        """Per sample, the sizes and indices of its visual tokens in prompt order: an image's as on
        LLaVA-NeXT, a video's pooled tokens ``frame x 196 + row x 14 + column`` (1-D ``LLM_GRID``
        indices, unique within the video)."""
        layouts = [self.layout(size) for size in self._sizes]
        width = max(counts)
        sizes = torch.ones(b, width, device=device)
        positions = torch.zeros(b, width, dtype=torch.long, device=device)
        packed = self._packed if self._cuts and len(self._packed) == len(layouts) else None
        for row, items in enumerate(self._rows):
            parts = []
            for kind, item in items:
                if kind == "video":
                    n = self._frames[item] * self.frame_tokens
                    parts.append((torch.arange(n), torch.ones(n)))
                elif packed is not None:
                    parts.append(packed[item])
                else:
                    parts.append((layouts[item].patch_positions(), torch.ones(layouts[item].patch_tokens)))
            if parts:
                n = sum(p[0].numel() for p in parts)
                positions[row, :n] = torch.cat([p[0].to(device) for p in parts])
                sizes[row, :n] = torch.cat([p[1].to(device) for p in parts])
        return sizes, positions
