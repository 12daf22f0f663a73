"""Running a :class:`~ficoco.methods.VisionReduction` inside a Qwen-VL vision tower.

These towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) pack every image of a batch into one sequence of
patches (``[S, D]``, no batch axis), separated by ``cu_seqlens``, and their merger turns every 2x2
patches into one LLM token. So a candidate here is a *merge group*: its 4 patch rows are kept,
merged or dropped together (their scores are the group means, see
:class:`~ficoco.stages.GroupedProbe`), and merging mixes groups sub-patch by sub-patch, which the
merger's concatenation of the 4 rows then sees as a mixed token.

Reductions run in full-attention blocks only (for Qwen2.5-VL, ``fullatt_block_indexes``): there
the statistics describe the attention the block really computes, over the whole image. Its window
blocks then attend within what is left of each window.

Hooks, all on the tower's own modules and removed on detach:

- a pre-hook on the tower starts each call: the grid of every image, the plan for its size, the
  window of every group (Qwen2.5-VL);
- ``attn.qkv`` forward hooks of reducing blocks keep that block's queries and keys;
- a pre-hook on a reducing block's ``norm2`` reduces the residual stream after attention (images
  with the same grid and budget at once), a forward hook on the block keeps the surviving rows;
  with ``reduce_at="output"`` (VisionZip) one forward hook on the block reduces its output, after
  the MLP, and keeps the surviving rows;
- pre-hooks on the blocks after the first reduction hand them ``cu_seqlens`` (per image, or per
  window), ``max_seqlen`` and the rotary tables of the surviving rows;
- a forward hook on the merger writes each surviving token at its place among the image's full
  grid of tokens, zeros elsewhere (:class:`PackedTrace` says which are real); with DeepStack
  (Qwen3-VL), the features taken from earlier blocks are reduced exactly as the main tokens were
  (same splits, same compress) and laid out alike.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from torch import Tensor, nn

from ..methods import VisionReduction
from ..stages import AttentionProbe, GroupedProbe, ReductionResult, TokenGroup
from ..stages.probe import compiled
from .hooks import HookSet, host_to_device
from .varlen import ATTENTION_INPUTS_KWARG, STATISTICS_BACKEND_ATTRIBUTE

_SENTINEL = object()


@dataclass
class PackedTrace:
    """What the encoder did to the visual items (images or videos) of one tower call.

    Attributes:
        grids: ``(t, h, w)`` patch grid of each item.
        kept: per item, ascending raster indices (on its merged ``t x h/2 x w/2`` grid) of the
            tokens handed to the LLM. An EViT fused token sits at the index of the group whose
            rows it took.
        sizes: per item, the patches (merge groups) each of those tokens stands for.
        steps: ``(block, [ReductionResult per batch of frames])`` when recording.
    """

    grids: list[tuple[int, int, int]]
    kept: list[Tensor]
    sizes: list[Tensor]
    steps: list[tuple[int, list[ReductionResult]]] = field(default_factory=list)

    def kept_index(self, merge: int) -> Tensor:
        """``[kept tokens]`` long: the positions of the real tokens among every item's full grid of
        tokens (raster order, items in order), ascending; an index rather than a mask, as boolean
        indexing would wait for the device."""
        parts, offset = [], 0
        for (t, h, w), kept in zip(self.grids, self.kept):
            parts.append(kept + offset)
            offset += t * (h // merge) * (w // merge)
        return torch.cat(parts)


def frame_sizes(grids: list[tuple[int, int, int]], merge: int) -> list[tuple[int, int, int]]:
    """``(item, frame, tokens)`` of every attention segment: the towers attend within one frame
    (temporal patch) of one item, so that is the unit a reduction works on."""
    return [(item, frame, (h // merge) * (w // merge)) for item, (t, h, w) in enumerate(grids) for frame in range(t)]


def _frame_rows(x: Tensor, rows: Tensor, first: int | None) -> Tensor:
    """``x[rows]``, ``[n, R, ...]`` for ``x`` ``[S, ...]`` and ``rows`` ``[n, R]``; a view of the
    slice when the rows are the ``n * R`` consecutive rows from ``first`` (not ``None``)."""
    if first is None:
        return x[rows]
    return x.narrow(0, first, rows.numel()).view(*rows.shape, *x.shape[1:])


@dataclass
class _Groups:
    """The current merge groups of every frame, in the tower's sequence order."""

    segment: Tensor  # [G] frame (attention segment) of each group, numbered over the call
    seq: Tensor  # [G] its original index in the tower's packed group order
    raster: Tensor  # [G] its raster index on its item's merged grid (an EViT fused token: its slot's)
    grid_position: Tensor  # [G] raster index within its frame for the stages, NO_POSITION for a fused token
    size: Tensor  # [G] merge groups it stands for
    window: Tensor | None  # [G] global window id (windowed towers)

    def take(self, index: Tensor) -> "_Groups":
        return _Groups(self.segment[index], self.seq[index], self.raster[index], self.grid_position[index],
                       self.size[index], None if self.window is None else self.window[index])


class PackedVisionSide:
    """Hooks a vision reduction into a Qwen-VL vision tower.

    Args:
        tower: the tower (``model.visual``).
        stage: the reduction.
        plan_for: ``{block: removed}`` for one frame of ``n`` merge groups.
        blocks: the blocks that may reduce (hooks go there).
        full_attention: the blocks with full attention (``None``: all of them).
    """

    def __init__(self, tower: nn.Module, stage: VisionReduction, plan_for: Callable[[int], dict[int, int]], *,
                 blocks: set[int], full_attention: frozenset[int] | None, record: bool = False) -> None:
        if not stage.reduction.keeps_order:
            # each merge group is laid back at its own place on the image's grid after the merger
            raise ValueError(f"{type(stage.reduction.filter).__name__} hands tokens on in its own order (ToMe's "
                             f"official alternation), which Qwen-VL's packed towers cannot take: every token keeps "
                             f"its place on the grid; use alternation='patches'")
        self.tower, self.stage, self.plan_for = tower, stage, plan_for
        self.blocks, self.full_attention, self.record = set(blocks), full_attention, record
        self.merge, window_size, self.patch_size = self._tower_shape(tower)
        self.group = self.merge ** 2
        self.window_size = window_size if full_attention is not None else None
        self.signature = inspect.signature(type(tower).forward)
        self.rotate = self._rotary_function(tower)
        self.last: PackedTrace | None = None
        self._reset()

    @staticmethod
    def _tower_shape(tower: nn.Module) -> tuple[int, int | None, int]:
        """``(spatial merge size, window size in pixels or None, patch size)`` of the tower."""
        config = tower.config
        return config.spatial_merge_size, getattr(config, "window_size", None), config.patch_size

    @staticmethod
    def _rotary_function(tower: nn.Module) -> Callable:
        """``rotate(q, k, cos, sin) -> (q, k)``: the tower's own rotary function, for the probe."""
        attn = tower.blocks[0].attn
        rotate = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None)
        if rotate is None:
            raise TypeError(f"{type(attn).__name__} has no apply_rotary_pos_emb_vision next to it: unsupported tower")
        return rotate

    @staticmethod
    def _attention_shape(attn: nn.Module) -> tuple[int, float]:
        """``(heads, softmax scale)`` of a block's attention."""
        return attn.num_heads, attn.scaling

    def _reset(self) -> None:
        self.grids: list[tuple[int, int, int]] | None = None
        self.frames: list[tuple[int, int, int]] = []
        self.plans: list[dict[int, int]] = []
        self.groups: _Groups | None = None
        self.total = 0
        self.frame_counts: list[int] = []  # merge groups left in each frame (host-side: no sync to read)
        self.windows = 0  # windows of the call (windowed towers), and the longest one in patches
        self.longest_window = 0
        self.rope: tuple[Tensor, Tensor] | None = None  # the tower's rotary tables, original order
        self.block_rope: tuple[Tensor, Tensor] | None = None
        self.qkv: Tensor | None = None
        # from the reducing block's own attention: its rotated queries and keys, [S, H, d] each, and
        # each row's log-sum-exp, [H, S] (or None)
        self.attended: tuple[Tensor, Tensor, Tensor | None] | None = None
        self.pending_keep: Tensor | None = None
        self.reduced = False
        self.stage_kwargs: dict[bool, tuple] = {}
        self.deepstack: list[Tensor] = []  # DeepStack features taken so far, aligned with the groups
        self.steps: list[tuple[int, list[ReductionResult]]] = []

    # -- installation ---------------------------------------------------------------------------

    def install(self, hooks: HookSet) -> None:
        if not self.blocks:
            return
        hooks.pre(self.tower, self._start_call, with_kwargs=True)
        first = min(self.blocks)
        for index, block in enumerate(self.tower.blocks):
            if index >= first:
                hooks.pre(block, self._block_inputs(index), with_kwargs=True)
            if index in self.blocks:
                hooks.post(block.attn.qkv, self._keep_qkv)
                hooks.pre(block.attn, self._ask_attention_inputs, with_kwargs=True)
                reduce = self._reducer(index, block.attn)
                if self.stage.reduce_at == "output":
                    hooks.post(block, self._on_output(reduce), prepend=True)
                else:
                    hooks.pre(block.norm2, reduce)
                    hooks.post(block, self._drop_rows, prepend=True)
        for merger in getattr(self.tower, "deepstack_merger_list", ()):
            hooks.post(merger, self._keep_deepstack)
        hooks.post(self.tower.merger, self._scatter_merged)
        hooks.post(self.tower, self._finish_call)

    # -- per call -------------------------------------------------------------------------------

    def _start_call(self, module, args, kwargs) -> None:
        self._reset()
        bound = self.signature.bind_partial(module, *args, **kwargs).arguments
        grid_thw = bound.get("grid_thw")
        if grid_thw is None:
            raise ValueError("the vision tower was called without grid_thw: ficoco needs each image's grid")
        self._start(grid_thw)

    def _window_index(self, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
        """``(window_index [G], cu_windows [W + 1])``: the tower's order of the merge groups (window
        by window) and the cumulative patch count at each window's end."""
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(grid_thw, self.merge, self.window_size, self.patch_size)

    def _start(self, grid_thw: Tensor) -> None:
        """Begin a tower call on items of patch grids ``grid_thw`` ``[I, 3]``."""
        self.grids = [tuple(int(x) for x in row) for row in grid_thw.tolist()]
        self.frames = frame_sizes(self.grids, self.merge)
        self.plans = [self.plan_for(n) for _, _, n in self.frames]
        device = grid_thw.device
        self.frame_counts = [n for _, _, n in self.frames]
        counts = host_to_device(self.frame_counts, device)
        self.total = sum(self.frame_counts)
        frame_of = torch.repeat_interleave(torch.arange(len(self.frames), device=device), counts,
                                           output_size=self.total)
        frame_start = torch.nn.functional.pad(counts.cumsum(0), (1, 0))[:-1]
        seq = torch.arange(self.total, device=device)
        window = None
        raster_global = seq
        if self.window_size:  # Qwen2.5-VL: groups run window by window, each window a contiguous block
            window_index, cu_windows = self._window_index(grid_thw)
            raster_global = window_index.to(device)
            self.windows = cu_windows.shape[0] - 1
            self.longest_window = int((cu_windows[1:] - cu_windows[:-1]).max()) if self.windows else 0
            cu_groups = (cu_windows.to(device) // self.group).long()
            window = torch.searchsorted(cu_groups[1:], seq, right=True)
        segment = frame_of[raster_global]  # windows never span frames: frames stay contiguous
        within = raster_global - frame_start[segment]
        frame_index = host_to_device([frame for _, frame, _ in self.frames], device)
        raster = frame_index[segment] * counts[segment] + within
        self.groups = _Groups(segment, seq, raster, within, torch.ones(self.total, device=device), window)

    def _finish_call(self, module, args, output) -> None:
        if self.groups is None:
            return None
        groups = self.groups
        items = host_to_device([item for item, _, _ in self.frames], groups.segment.device)[groups.segment]
        # one sort by (item, raster index) and a split by the host-side counts: no per-item masks,
        # whose boolean indexing would wait for the device once per item
        order = (items * self.total + groups.raster).argsort()
        per_item = [0] * len(self.grids)
        for (item, _, _), count in zip(self.frames, self.frame_counts):
            per_item[item] += count
        kept = list(groups.raster[order].split(per_item))
        sizes = list(groups.size[order].split(per_item))
        self.last = PackedTrace(list(self.grids), kept, sizes, list(self.steps))
        features = getattr(output, "deepstack_features", None)
        if features is None and isinstance(output, tuple) and len(output) > 2 and isinstance(output[2], list):
            features = output[2]
        if features is not None and self.deepstack and self.reduced:
            features[:] = [self._full(x) for x in self.deepstack]
        self._reset()
        return None

    def _full(self, x: Tensor) -> Tensor:
        """``x`` (``[G_cur, D]``, current order) at its groups' original places among all groups of
        the call (zeros where a group went)."""
        full = x.new_zeros(self.total, x.shape[-1])
        return full.index_copy_(0, self.groups.seq, x)

    # -- per block ------------------------------------------------------------------------------

    def _block_inputs(self, index: int):
        def set_block_inputs(module, args, kwargs):
            if self.groups is None:
                return None
            if self.rope is None:
                self.rope = kwargs.get("position_embeddings")
            if self.reduced:
                full = self.full_attention is None or index in self.full_attention
                if full not in self.stage_kwargs:
                    self.stage_kwargs[full] = self._current_inputs(full)
                cu_seqlens, max_seqlen, rope = self.stage_kwargs[full]
                kwargs["cu_seqlens"] = cu_seqlens
                if "max_seqlen" in kwargs:
                    kwargs["max_seqlen"] = max_seqlen
                kwargs["position_embeddings"] = rope
            if index in self.blocks:
                self.block_rope = kwargs.get("position_embeddings")
            return args, kwargs

        return set_block_inputs

    def _current_inputs(self, full: bool) -> tuple:
        """``cu_seqlens`` (per frame, or per window), ``max_seqlen`` and the rotary tables of the
        current rows."""
        device = self.groups.seq.device
        rows = (self.groups.seq[:, None] * self.group + torch.arange(self.group, device=device)).flatten()
        rope = tuple(x.index_select(0, rows) for x in self.rope)
        if full or self.groups.window is None:  # per frame: the counts are known on the host
            lengths = [count * self.group for count in self.frame_counts]
            return host_to_device([0, *accumulate(lengths)], device, torch.int32), max(lengths), rope
        if self._one_call_attention():
            # per window, computed on the device: windows left empty stay as empty segments (the
            # one-call attention skips them) and the longest window before any reduction bounds them
            window = self.groups.window
            # a scatter, not bincount: bincount on CUDA reads the largest id back to size its output
            counts = torch.zeros(self.windows, dtype=torch.long, device=device).index_add_(
                0, window, torch.ones_like(window)) * self.group
            cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
            return cu, self.longest_window, rope
        # the stock attention splits the sequence on the host anyway: exact segments, no empty ones
        _, counts = torch.unique_consecutive(self.groups.window, return_counts=True)
        lengths = counts * self.group
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cu, int(lengths.max()), rope

    def _one_call_attention(self) -> bool:
        """Whether the tower's attention is ficoco's one-call attention (:mod:`.varlen`), which takes
        empty segments and an upper bound of the longest one."""
        from .varlen import KERNELS

        return getattr(self.tower.config, "_attn_implementation", None) in KERNELS.values()

    def _keep_qkv(self, module, args, output) -> None:
        if self.groups is not None:
            self.qkv = output

    def _ask_attention_inputs(self, module, args, kwargs):
        """Before a reducing block's attention: ask ficoco's one-call attention to hand over its
        rotated queries and keys (the statistics then neither gather nor rotate their own) and
        each row's log-sum-exp, which its kernel computes anyway (the statistics' softmax
        denominators: their first pass over the keys is then skipped). Reducing blocks attend over
        whole frames, as the statistics do."""
        if self.groups is None or not self._one_call_attention():
            return None
        self.attended = None
        kwargs[ATTENTION_INPUTS_KWARG] = self._keep_attention_inputs
        return args, kwargs

    def _keep_attention_inputs(self, query: Tensor, key: Tensor, row_logsumexp: Tensor | None) -> None:
        self.attended = (query, key, row_logsumexp)

    def _reducer(self, index: int, attn: nn.Module):
        def reduce_after_attention(module, args) -> None:
            if self.groups is None:
                return
            removals = [plan.get(index, 0) for plan in self.plans]
            if not any(removals):
                return
            residual = args[0]  # [S, D]: the residual stream after attention, also the MLP's residual
            # vLLM's towers carry a batch axis of one ([S, 1, D]): a view, so writes reach the stream
            residual = residual.view(-1, residual.shape[-1])
            qkv, self.qkv = self.qkv, None
            attended, self.attended = self.attended, None
            s, width = residual.shape
            heads, scaling = self._attention_shape(attn)
            if attended is not None and attended[0].shape[0] == s:  # rotated by the block: used as they are
                q, k, row_logsumexp = attended
                rotated = True
            else:
                qkv = qkv.view(s, 3, heads, -1)
                q, k, row_logsumexp, rotated = qkv[:, 0], qkv[:, 1], None, False
            groups, device = self.groups, residual.device
            counts = list(self.frame_counts)
            starts = [0, *accumulate(counts[:-1])]
            buckets: dict[tuple, list[int]] = {}
            for frame, removed in enumerate(removals):
                if removed:
                    side = self._frame_grid(frame)
                    buckets.setdefault((counts[frame], removed, side), []).append(frame)
            survivors, results = {}, []
            for (count, removed, side), frames in buckets.items():
                n = len(frames)
                group_index = host_to_device([starts[f] for f in frames], device)[:, None] \
                    + torch.arange(count, device=device)  # [n, G]
                rows = (group_index[..., None] * self.group + torch.arange(self.group, device=device)).flatten(1)
                # consecutive frames are one slice of the sequence: views, not gathered copies
                first = starts[frames[0]] * self.group if frames == list(range(frames[0], frames[0] + n)) else None
                q_rows, k_rows = _frame_rows(q, rows, first), _frame_rows(k, rows, first)
                rope = None
                if not rotated:
                    cos, sin = (_frame_rows(x, rows, first) for x in self.block_rope)
                    rope = self._rotation(q_rows, k_rows, cos, sin)
                bucket_logsumexp = None if row_logsumexp is None else \
                    _frame_rows(row_logsumexp.t(), rows, first).transpose(1, 2)  # [n, H, rows]
                probe = AttentionProbe(q_rows, k_rows, scaling, None,  # every row a candidate
                                       rope=rope, row_logsumexp=bucket_logsumexp,
                                       compile_backend=getattr(self.tower, STATISTICS_BACKEND_ATTRIBUTE, None))
                tokens = TokenGroup(_frame_rows(residual, rows, first).reshape(n, count, self.group * width),
                                    groups.size[group_index], groups.grid_position[group_index], side)
                result = self.stage.reduction(tokens, GroupedProbe(probe, self.group), removed)
                results.append(result)
                slots = result.kept if result.new_token_slot is None else \
                    torch.cat([result.kept, result.new_token_slot[:, None]], dim=1)
                order = slots.argsort(dim=1)  # survivors in sequence order: the fused token at its slot
                slots = slots.gather(1, order)
                features = result.tokens.features.gather(1, order[..., None].expand(-1, -1, self.group * width))
                chosen = group_index.gather(1, slots)
                target_rows = (chosen[..., None] * self.group + torch.arange(self.group, device=device)).flatten()
                residual[target_rows] = features.reshape(-1, width).to(residual.dtype)
                sizes, positions = result.tokens.sizes.gather(1, order), result.tokens.positions.gather(1, order)
                for row, frame in enumerate(frames):
                    survivors[frame] = (chosen[row], sizes[row], positions[row])
                    self.frame_counts[frame] = slots.shape[1]
                self._replay_deepstack(result, group_index, chosen, order)
            parts = []
            for frame in range(len(self.frames)):
                if frame not in survivors:
                    chosen = torch.arange(starts[frame], starts[frame] + counts[frame], device=device)
                    survivors[frame] = (chosen, groups.size[chosen], groups.grid_position[chosen])
                parts.append(survivors[frame])
            keep = torch.cat([chosen for chosen, _, _ in parts])
            new = groups.take(keep)
            new.size = torch.cat([sizes for _, sizes, _ in parts]).to(groups.size.dtype)
            new.grid_position = torch.cat([positions for _, _, positions in parts])
            self.groups, self.pending_keep = new, keep
            self.reduced, self.stage_kwargs = True, {}
            if self.record:
                self.steps.append((index, results))

        return reduce_after_attention

    def _frame_grid(self, frame: int) -> tuple[int, int]:
        item, _, _ = self.frames[frame]
        _, h, w = self.grids[item]
        return h // self.merge, w // self.merge

    def _rotation(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
        """``rope(x, rows)`` for the probe: the tower's own rotary function on ``x`` ``[n, R, H, d]``.
        The function rotates a query and a key tensor in one call, so the probe's queries ``q`` and
        keys ``k`` (all rows) are rotated together, once, when the first of them is asked for."""
        both: list[Tensor] = []
        backend = getattr(self.tower, STATISTICS_BACKEND_ATTRIBUTE, None)
        # on compiled blocks the rotation of every query and key is one fused pass too (the same
        # function the compiled blocks already run), not a dozen float32 passes
        rotate_all = compiled(self.rotate, backend) if backend is not None and q.is_cuda else self.rotate

        def rope(x: Tensor, rows: Tensor | None) -> Tensor:
            if rows is None:
                if x is q or x is k:
                    if not both:
                        both.extend(rotate_all(q, k, cos, sin))
                    return both[0] if x is q else both[1]
                c, s = cos, sin
            else:
                index = rows[..., None].expand(-1, -1, cos.shape[-1])
                c, s = cos.gather(1, index), sin.gather(1, index)
            return self.rotate(x, x, c, s)[0]

        return rope

    def _replay_deepstack(self, result: ReductionResult, group_index: Tensor, chosen: Tensor, order: Tensor) -> None:
        """Apply this split and correlation to the DeepStack features taken so far, as the
        compress applied them to the main tokens (same sizes, same weights)."""
        split, sizes = result.filter_result, self.groups.size[group_index]
        for i, features in enumerate(self.deepstack):
            tokens = TokenGroup(features[group_index], sizes, self.groups.grid_position[group_index], (1, 1))
            merged = self.stage.reduction.compress(tokens.select(split.targets), tokens.select(split.sources),
                                                   result.correlation).features
            merged = merged.gather(1, order[..., None].expand(-1, -1, merged.shape[-1]))
            updated = features.clone()
            updated[chosen.flatten()] = merged.reshape(-1, features.shape[-1]).to(features.dtype)
            self.deepstack[i] = updated

    def _on_output(self, reduce):
        """A forward hook that runs ``reduce`` on the block's output ``[S, D]`` (after its MLP:
        ``reduce_at="output"``, VisionZip's place) and keeps the surviving rows."""

        def reduce_output(module, args, output):
            if self.groups is None:
                return None
            hidden = output.clone()  # merged features are written in place; the caller's tensor stays
            reduce(None, (hidden,))
            return self._drop_rows(module, args, hidden)

        return reduce_output

    def _drop_rows(self, module, args, output):
        keep, self.pending_keep = self.pending_keep, None
        if keep is None:
            return None
        self.deepstack = [x.index_select(0, keep) for x in self.deepstack]  # they follow the surviving groups
        rows = (keep[:, None] * self.group + torch.arange(self.group, device=keep.device)).flatten()
        return output.index_select(0, rows)

    def _keep_deepstack(self, module, args, output) -> None:
        if self.groups is not None:
            self.deepstack.append(output)

    def _scatter_merged(self, module, args, output):
        if self.groups is None or not self.reduced:
            return None
        return self._full(output)
