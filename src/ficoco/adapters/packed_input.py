"""Running an :class:`~ficoco.methods.InputReduction` on the merged visual tokens of a Qwen-VL model.

Qwen-VL's merger turns every 2x2 patches of the tower into one LLM token: its outputs are this
family's projected visual tokens, one per merge group, on each frame's own ``h/2 x w/2`` grid
(dynamic resolution: frames differ). The reduction runs frame by frame (an image is one frame, a
video one per temporal patch, as the towers attend within a frame), frames of the same grid,
token count and budget in one batch, on the tokens the tower hands on: every merge group, or those
an encoder-side reduction kept (their sizes and raster places from its :class:`PackedTrace`).

Every surviving token keeps the raster index of the merge group whose slot it takes (a pooled bin:
its top-left group; a fused token: the source whose slot it took), so the family adapter gives it
that group's M-RoPE position. Qwen3-VL's DeepStack features, one per merged token, get the same
split, correlation and compress as the main tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..methods import InputReduction
from ..stages import FeatureProbe, ReductionResult, TokenGroup
from .hooks import host_to_device
from .packed_vision import PackedTrace

#: ``instruction(items)``: ``(text [F, M, D], valid [F, M])``, the input embeddings of the
#: instruction of each listed item (one entry per frame of a batch), for stages that read it
Instruction = Callable[[list[int]], tuple[Tensor, Tensor]]


@dataclass
class PackedInputTrace(PackedTrace):
    """What the LLM-input reduction handed the LLM (after any encoder-side reduction).

    Attributes:
        results: each batch of frames' :class:`ReductionResult` when recording, in the order run.
    """

    results: list[ReductionResult] = field(default_factory=list)


class PackedInputSide:
    """Reduces the merged tokens of each frame of one tower call's items.

    Args:
        stage: the reduction and its budget.
        removed_for: tokens to remove from one frame of ``n`` merge groups (the plan's
            ``input_removed`` for that size).
        merge: the merger's spatial size (2).
    """

    def __init__(self, stage: InputReduction, removed_for: Callable[[int], int], *, merge: int,
                 record: bool = False) -> None:
        if not stage.reduction.keeps_order:
            raise ValueError(f"{type(stage.reduction.filter).__name__} hands tokens on in its own order, which "
                             f"Qwen-VL's M-RoPE cannot take: every token keeps its place on the grid")
        self.stage, self.removed_for, self.merge, self.record = stage, removed_for, merge, record
        self.last: PackedInputTrace | None = None

    def reduce(self, features: list[Tensor], grids: list[tuple[int, int, int]], state: PackedTrace | None,
               instruction: Instruction | None, deepstack: list[list[Tensor]]
               ) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Each item's tokens after the reduction, in raster order.

        Args:
            features: per item ``[n_i, D]``, its tokens in raster order.
            grids: ``(t, h, w)`` patch grid of each item.
            state: the encoder-side trace these tokens came from (``kept`` raster indices and
                ``sizes`` per item), or ``None``: every merge group, each of size 1.
            instruction: the instruction embeddings of given items, or ``None`` (no prompt known).
            deepstack: per DeepStack layer, per item ``[n_i, D']`` aligned with ``features``.
        Returns:
            ``(features, deepstack)`` alike, each item cut to its kept tokens; sets :attr:`last`.
        """
        device = features[0].device if features else torch.device("cpu")
        rasters, sizes = [], []
        for index, (t, h, w) in enumerate(grids):
            if state is None:
                count = t * (h // self.merge) * (w // self.merge)
                rasters.append(torch.arange(count, device=device))
                sizes.append(torch.ones(count, device=device))
            else:
                rasters.append(state.kept[index].to(device))
                sizes.append(state.sizes[index].to(device).float())
        # each frame's tokens: a contiguous stretch of its item's (raster order puts frames in order)
        frames: dict[tuple, list[tuple[int, int, int]]] = {}  # (count, removed, grid) -> [(item, start, frame)]
        pieces: dict[tuple[int, int], tuple] = {}  # (item, frame) -> its tokens after the reduction
        for index, (t, h, w) in enumerate(grids):
            side = (h // self.merge, w // self.merge)
            per_frame = side[0] * side[1]
            counts = [per_frame] * t if state is None else \
                torch.bincount(rasters[index] // per_frame, minlength=t).tolist()
            start = 0
            for frame, count in enumerate(counts):
                removed = self.removed_for(per_frame)
                stretch = slice(start, start + count)
                if removed:
                    frames.setdefault((count, removed, side), []).append((index, start, frame))
                else:
                    pieces[index, frame] = (features[index][stretch], rasters[index][stretch], sizes[index][stretch],
                                            [layer[index][stretch] for layer in deepstack])
                start += count
        results = []
        for (count, removed, side), members in frames.items():
            result, kept = self._reduce_batch(features, rasters, sizes, deepstack, members, count, removed, side,
                                              instruction)
            if self.record:
                results.append(result)
            for (index, _, frame), piece in zip(members, kept):
                pieces[index, frame] = piece
        out_features, out_rasters, out_sizes = [], [], []
        out_stack: list[list[Tensor]] = [[] for _ in deepstack]
        for index, (t, _, _) in enumerate(grids):
            parts = [pieces[index, frame] for frame in range(t)]
            out_features.append(torch.cat([p[0] for p in parts]))
            out_rasters.append(torch.cat([p[1] for p in parts]))
            out_sizes.append(torch.cat([p[2] for p in parts]))
            for layer in range(len(deepstack)):
                out_stack[layer].append(torch.cat([p[3][layer] for p in parts]))
        steps = list(state.steps) if state is not None else []
        self.last = PackedInputTrace(list(grids), out_rasters, out_sizes, steps, results)
        return out_features, out_stack

    def _reduce_batch(self, features, rasters, sizes, deepstack, members, count: int, removed: int,
                      side: tuple[int, int], instruction: Instruction | None):
        """One reduction over the frames ``members`` (``(item, start, frame)``), each of ``count``
        tokens on a ``side`` grid; returns the result and each frame's ``(features, rasters,
        sizes, deepstack)`` after it."""
        per_frame = side[0] * side[1]
        take = [slice(start, start + count) for _, start, _ in members]
        items = [index for index, _, _ in members]
        x = torch.stack([features[i][s] for i, s in zip(items, take)])  # [F, count, D]
        raster = torch.stack([rasters[i][s] for i, s in zip(items, take)])  # [F, count]
        frame = host_to_device([f for _, _, f in members], raster.device)
        tokens = TokenGroup(x, torch.stack([sizes[i][s] for i, s in zip(items, take)]),
                            raster - frame[:, None] * per_frame, side)
        probe = FeatureProbe(None if instruction is None else lambda: instruction(items))
        result = self.stage.reduction(tokens, probe, removed)
        # survivors in raster order; a fused token (a convergent correlate) takes the slot of its first source
        slots = result.kept if result.new_token_slot is None else \
            torch.cat([result.kept, result.new_token_slot[:, None]], dim=1)
        order = slots.argsort(dim=1)
        slots = slots.gather(1, order)
        kept_features = result.tokens.features.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        kept_sizes = result.tokens.sizes.gather(1, order)
        stacks = []
        split = result.filter_result
        for layer in deepstack:  # the same split, correlation and compress as the main tokens
            ds = TokenGroup(torch.stack([layer[i][s] for i, s in zip(items, take)]), tokens.sizes, tokens.positions,
                            side)
            merged = self.stage.reduction.compress(ds.select(split.targets), ds.select(split.sources),
                                                   result.correlation).features
            stacks.append(merged.gather(1, order[..., None].expand(-1, -1, merged.shape[-1])).to(ds.features.dtype))
        kept = [(kept_features[row].to(x.dtype), raster[row].gather(0, slots[row]), kept_sizes[row],
                 [stack[row] for stack in stacks]) for row in range(len(members))]
        return result, kept
