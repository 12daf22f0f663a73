"""Videos whose frames are pooled after the vision tower, for the LLaVA-NeXT-layout families
that take them (LLaVA-OneVision, LLaVA-NeXT-Video).

Both families run each frame through the tower as one crop, then pool its full patch grid
(OneVision: bilinear to ``ceil(27/2)²`` = 196 tokens after the projector, and one newline token
after the video's last frame; LLaVA-NeXT-Video: 2x2 average pooling to 12 x 12 = 144 tokens
before the projector, no newline). So:

- **decoder-side methods** take videos, alone or with images in the same batch or sample: a
  frame's pooled tokens are candidates, ``retain`` is per frame (as Video-LLaVA's), so a video of
  ``F`` frames keeps ``F x min(k, frame_tokens)`` (a share: of its ``frame_tokens``) and its newline
  token, if any, is kept and never a candidate; a sample's images and videos are ranked together;
- **methods that reduce before the LLM** (in the tower or on the projector's output) are refused
  for videos in one line: the pooling needs each frame's full grid, which a reduced frame no
  longer has.

:class:`PooledVideos` is a mixin for :class:`~.llava_next.LlavaNextHandle` subclasses; they set
``video_token``, ``frame_grid`` and the class attributes ``video_newlines`` and ``pooling``
(how the family pools, for the refusal) and call :meth:`_init_videos` before the handle's own
``__init__``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ..methods.base import kept_count


def _video_pixels(args: tuple, kwargs: dict) -> Tensor | None:
    """``[videos, frames, C, H, W]`` of a ``get_video_features`` call (``pixel_values_videos``
    on newer transformers, ``pixel_values`` on 5.17)."""
    for name in ("pixel_values_videos", "pixel_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[0] if args else None


class PooledVideos:
    """Videos of pooled frames on a LLaVA-NeXT-layout handle (see the module docstring).

    Attributes:
        video_token: the video placeholder's id.
        frame_grid: ``(rows, cols)`` of a frame's pooled tokens.
        video_newlines: newline tokens after a video's last frame (class attribute).
        pooling: how the family pools a frame, named in the refusal (class attribute).
    """

    video_newlines = 0
    pooling = "pooled"

    def _init_videos(self, video_token: int, frame_grid: tuple[int, int]) -> None:
        self.video_token = video_token
        self.frame_grid = frame_grid
        self._frames: list[int] = []  # frames of each video last encoded or prompted
        self._prompt_ids: Tensor | None = None  # the last forward's input_ids (decoder side)
        self.video_plan = lru_cache(maxsize=None)(self._video_plan)

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

    # -- refusals -------------------------------------------------------------------------------

    def _refuse_unsupported(self, module, args, kwargs) -> None:
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        self._check({**bound.get("kwargs", {}), **bound})

    def _check(self, inputs: dict) -> None:
        if inputs.get("pixel_values_videos") is not None and self._cuts:
            raise ValueError(f"{self.method.name} reduces before the LLM, which {self.family_name}'s videos do not "
                             f"take: each frame is {self.pooling} on its full {self.grid[0]}x{self.grid[1]} grid, "
                             f"which a reduced frame no longer has; on videos use a decoder-side method")

    def check_videos(self) -> None:
        """``ValueError`` in one line when this handle's method cannot run on the family's videos:
        what a call with videos would raise, asked before one is made (``ficoco eval`` asks before
        it answers a video benchmark)."""
        self._check({"pixel_values_videos": True})

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        self._check(inputs)
        return super()._rewrite(inputs, default_side)

    # -- videos ---------------------------------------------------------------------------------

    @property
    def frame_tokens(self) -> int:
        """Pooled tokens of one video frame (OneVision: 196; LLaVA-NeXT-Video: 144)."""
        return self.frame_grid[0] * self.frame_grid[1]

    def video_tokens(self, frames: int) -> int:
        """Placeholders of a video of ``frames`` frames in the prompt: its pooled tokens and, where
        the family adds one, a newline token (reductions before the LLM are refused for videos, so
        always the model's own)."""
        return frames * self.frame_tokens + self.video_newlines

    def _frame_keep(self) -> int:
        """Pooled tokens a frame keeps inside the LLM: ``min(k, frame_tokens)``, or that share of them."""
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
        """Pooled tokens (a newline token not counted) of a video of ``frames`` frames after the last
        reduction."""
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
        LLaVA-NeXT, a video's pooled tokens ``frame x frame_tokens + row x cols + column`` (1-D
        ``LLM_GRID`` indices, unique within the video)."""
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
