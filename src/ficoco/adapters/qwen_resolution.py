"""The ``downsample`` control on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: every image (and video) at a
lower resolution, as if the processor had been handed a smaller one.

Qwen-VL takes images of any size keeping their aspect, as ``pixel_values`` ``[patches, C x T x P x
P]`` (each item's patches in ``(t, h / m, w / m, m, m)`` order, ``m`` the merge size) with their
``image_grid_thw``. The handle rewrites a call's inputs before the model sees them: each item is
put back together as ``[t, T, C, h x P, w x P]`` pixels, resized (bicubic, antialiased) to the
smaller grid of :meth:`~ficoco.methods.ResolutionReduction.resolve` (the aspect kept, at most the
budget's tokens per frame, sides in whole merge groups), cut into patches again, its grid row
replaced, and its runs of placeholders cut to the smaller grid's tokens. Everything downstream,
the tower, M-RoPE positions (``get_rope_index``) and ``rope_deltas``, is then the model's own
handling of a smaller image.

A call's inputs are rewritten once: forward pre-hooks on the model (and on its inner model) and a
``generate`` wrapper; grid tensors this handle made are recognised and passed on, and forward
calls inside a wrapped ``generate`` are left alone.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn

from ..methods import Method, ModelGeometry, ResolvedPlan
from ..stages.resolution import resize_images
from .handle import ReductionHandle
from .inputs import run_keep_mask
from .qwen_vl import _qwen_parts, cut_prompt

#: (pixels, grids) keys of the two kinds of visual input
_VISUAL_INPUTS = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))


def unpatchify(patches: Tensor, grid: tuple[int, int, int], *, channels: int, temporal: int, patch: int,
               merge: int) -> Tensor:
    """One item's patches ``[t x h x w, C x T x P x P]`` (grid ``(t, h, w)`` in patches) back to
    pixels ``[t, T, C, h x P, w x P]``."""
    t, h, w = grid
    x = patches.reshape(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (t, T, C, h/m, m, P, w/m, m, P)
    return x.reshape(t, temporal, channels, h * patch, w * patch)


def patchify(pixels: Tensor, *, patch: int, merge: int) -> Tensor:
    """Pixels ``[t, T, C, H, W]`` (``H``, ``W`` multiples of ``patch x merge``) to patches
    ``[t x (H / P) x (W / P), C x T x P x P]`` in the processor's order (:func:`unpatchify`'s inverse)."""
    t, temporal, channels, height, width = pixels.shape
    h, w = height // patch, width // patch
    x = pixels.reshape(t, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, T, P, P)
    return x.reshape(t * h * w, channels * temporal * patch * patch)


class QwenResolutionHandle(ReductionHandle):
    """The ``downsample`` control attached to a Qwen-VL model (see the module docstring).

    Attributes:
        method: the method (its ``resolution``).
    """

    family = "qwen-vl"

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        if method.resolution is None:
            raise ValueError(f"{method.name} does not change the image's resolution")
        core, outer = _qwen_parts(model)
        super().__init__(model, core, outer, method, record=record)
        config = core.config
        vision = config.vision_config
        self.config = config
        self.merge, self.patch = vision.spatial_merge_size, vision.patch_size
        self.temporal = vision.temporal_patch_size
        self.channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", None) or 3
        self.depth, self.llm_layers = len(core.visual.blocks), len(core.language_model.layers)
        self.visual_ids = (config.image_token_id, config.video_token_id)
        self._plan = functools.lru_cache(maxsize=None)(self._resolve)
        # grid tensors this handle made, by id (weak: a made tensor is recognised only while it lives)
        self._made: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._generating = False
        self._attach()

    def _install(self) -> None:
        self.hooks.pre(self.core, self._rewrite_model_inputs, with_kwargs=True)
        if self.outer is not None:
            self.hooks.pre(self.outer, self._rewrite_model_inputs, with_kwargs=True)
            self._wrap_generate(self.outer)
            self._wrap(self.outer, "generate", self._flag_generation)

    # -- budgets ----------------------------------------------------------------------------------

    def _resolve(self, grid: tuple[int, int]) -> ResolvedPlan:
        geometry = ModelGeometry(self.depth, self.depth - 1, grid[0] * grid[1], self.llm_layers, grid=grid,
                                 dynamic_resolution=True)
        return self.method.plan(geometry)

    def plan_for(self, grid: tuple[int, int]) -> ResolvedPlan:
        """The plan for one frame of ``grid`` ``(rows, cols)`` merge groups: ``image_grid`` is the
        smaller one, ``llm_input_visual`` its tokens."""
        return self._plan(tuple(grid))

    def smaller_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The ``(t, h, w)`` patch grid an item of patch grid ``grid`` is resized to."""
        t, h, w = grid
        rows, cols = self.plan_for((h // self.merge, w // self.merge)).image_grid
        return t, rows * self.merge, cols * self.merge

    def kept_tokens(self, grid: tuple[int, int, int]) -> int:
        """LLM input tokens of one item of patch grid ``grid`` (``t, h, w``) under this method."""
        t, h, w = self.smaller_grid(grid)
        return t * h * w // self.merge ** 2

    # -- the inputs -------------------------------------------------------------------------------

    def _flag_generation(self, original):
        """``generate`` (around the prompt-cutting wrapper) during which forward hooks stand aside:
        the inputs were rewritten once, and generate may copy their grids (beam expansion)."""

        def generate(*args, **kwargs):
            self._generating = True
            try:
                return original(*args, **kwargs)
            finally:
                self._generating = False

        return generate

    def _rewrite_model_inputs(self, module, args, kwargs):
        if self._generating:
            return None
        return super()._rewrite_model_inputs(module, args, kwargs)

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        input_ids = inputs.get("input_ids")
        keep = None
        for (pixel_key, grid_key), token in zip(_VISUAL_INPUTS, self.visual_ids):
            pixels, grids = inputs.get(pixel_key), inputs.get(grid_key)
            if pixels is None or grids is None or self._made.get(id(grids)) is grids:
                continue  # nothing of this kind, or rewritten already
            items = [tuple(int(x) for x in row) for row in grids.tolist()]
            smaller = [self.smaller_grid(item) for item in items]
            if smaller == items:
                continue
            inputs[pixel_key] = self._resized(pixels, items, smaller)
            new_grids = torch.tensor(smaller, dtype=grids.dtype, device=grids.device)
            self._made[id(new_grids)] = new_grids
            inputs[grid_key] = new_grids
            if input_ids is None:
                continue
            # frame by frame, in prompt order (Qwen3-VL puts each frame of a video in a run of its own)
            full = [h * w // self.merge ** 2 for t, h, w in items for _ in range(t)]
            kept = [h * w // self.merge ** 2 for t, h, w in smaller for _ in range(t)]
            if int((input_ids == token).sum()) == sum(kept):
                continue  # the prompt was cut already
            mask = run_keep_mask(input_ids, token, full, kept)
            keep = mask if keep is None else keep & mask
        if keep is None:
            return inputs
        return cut_prompt(inputs, input_ids, keep, self.config.text_config.pad_token_id, default_side,
                          "downsample changes the image's grid, whose M-RoPE positions the model computes itself")

    def _resized(self, pixels: Tensor, items: list[tuple[int, int, int]],
                 smaller: list[tuple[int, int, int]]) -> Tensor:
        """``pixels`` ``[sum t h w, C T P P]`` of ``items`` as the patches of each item resized to its
        ``smaller`` grid ``[sum t h' w', C T P P]``."""
        layout = dict(channels=self.channels, temporal=self.temporal, patch=self.patch, merge=self.merge)
        parts = torch.split(pixels, [t * h * w for t, h, w in items])
        out = []
        for part, item, (_, h, w) in zip(parts, items, smaller):
            image = unpatchify(part, item, **layout)
            image = resize_images(image, (h * self.patch, w * self.patch))
            out.append(patchify(image, patch=self.patch, merge=self.merge))
        return torch.cat(out)
