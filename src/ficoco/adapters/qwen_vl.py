"""The Qwen-VL family: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``*ForConditionalGeneration`` / ``*Model``).

What this family is to ficoco:

- **vision layers**: ``model.visual.blocks``, packed sequences of patches with no [CLS] (methods use
  their stand-ins: :meth:`ficoco.Method.without_cls`); Qwen2.5-VL attends in windows except in
  ``fullatt_block_indexes``, and reductions run only there; Qwen3-VL also feeds DeepStack features
  from intermediate blocks into the first decoder layers, reduced like the main tokens;
- **patch grid of each image**: its ``image_grid_thw`` row (dynamic resolution), merged 2x2 into
  LLM tokens, so a reduction keeps or merges whole merge groups; videos are reduced frame by
  frame, as the towers attend within a frame;
- **budgets**: a plan per frame size (``retain`` as a count or a share of each frame's tokens);
- **visual tokens in the prompt**: runs of ``image_token_id`` / ``video_token_id``, one per LLM
  token, cut to the kept count of each item before the model runs;
- **positions**: M-RoPE. Kept tokens keep their original (temporal, height, width) positions in
  prefill, and decoding continues where the full prompt would (``rope_deltas``).

Everything is done with hooks on the model's own modules and four instance-level wrappers that
detaching removes: ``generate`` (shorten the prompt), ``get_image_features`` /
``get_video_features`` (the kept tokens of each item) and ``get_rope_index`` (positions of a
shortened prompt); the positions of the tokens really kept are set in a pre-hook on the language
model, once the tower has chosen them.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import Tensor, nn

from ..methods import Method, ModelGeometry, ResolvedPlan
from .handle import ReductionHandle
from .inputs import cut_tokens, run_keep_mask
from .language import LanguageSide
from .packed_vision import PackedVisionSide, frame_sizes

_PER_TOKEN_INPUTS = ("attention_mask", "labels", "token_type_ids", "mm_token_type_ids")
#: the grid a decoder-side stage sees for Qwen tokens: positions are only used as hash keys there
_LLM_GRID = (1, 1 << 20)


def _qwen_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    core = getattr(model, "model", None)
    if core is not None and hasattr(core, "visual") and hasattr(core, "language_model"):
        return core, model
    if hasattr(model, "visual") and hasattr(model, "language_model"):
        return model, None
    raise TypeError(f"{type(model).__name__} has no Qwen-VL vision tower and language model")


class QwenVLHandle(ReductionHandle):
    """A method attached to a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model."""

    family = "qwen-vl"

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        core, outer = _qwen_parts(model)
        super().__init__(model, core, outer, method.without_cls(), record=record)
        tower, config = core.visual, core.config
        self.tower, self.config = tower, config
        self.merge = config.vision_config.spatial_merge_size
        full = getattr(config.vision_config, "fullatt_block_indexes", None)
        self.full_attention = frozenset(full) if full else None
        self.depth = len(tower.blocks)
        self.llm_layers = len(core.language_model.layers)
        self.visual_ids = (config.image_token_id, config.video_token_id)
        self._plan = lru_cache(maxsize=None)(self._resolve)
        # fail at once on impossible layers or options: a large frame spreads removals over every layer
        nominal = self._resolve(1 << 16)
        self.vision_blocks = set(nominal.vision)
        self.language_layers = set(nominal.language)
        self.deepstack = bool(getattr(tower, "deepstack_visual_indexes", None))
        self._attach()

    def _resolve(self, tokens: int) -> ResolvedPlan:
        geometry = ModelGeometry(self.depth, self.depth - 1, tokens, self.llm_layers, self.full_attention)
        return self.method.plan(geometry)

    def plan_for(self, tokens: int) -> ResolvedPlan:
        """The per-layer schedule for one frame of ``tokens`` merge groups."""
        return self._plan(tokens)

    def _install(self) -> None:
        core, outer, method = self.core, self.outer, self.method
        if method.vision is not None and self.vision_blocks:
            self.vision = PackedVisionSide(self.tower, method.vision, lambda n: self.plan_for(n).vision,
                                           blocks=self.vision_blocks, full_attention=self.full_attention,
                                           record=self.record)
            self.hooks.pre(core, self._rewrite_model_inputs, with_kwargs=True)
            if outer is not None:
                self.hooks.pre(outer, self._rewrite_model_inputs, with_kwargs=True)
                self._wrap_generate(outer)
            self.vision.install(self.hooks)
            for name in ("get_image_features", "get_video_features"):
                if hasattr(core, name):
                    self._wrap(core, name, self._kept_features)
            self._wrap(core, "get_rope_index", self._rope_index_of_cut_prompt)
            self.hooks.pre(core.language_model, self._true_positions, with_kwargs=True)
            self._positions: tuple | None = None
        if method.language is not None and self.language_layers:
            self.language = LanguageSide(core, method.language, self.language_layers, schedule=self._schedule,
                                         visual_token_ids=self.visual_ids, grid=_LLM_GRID,
                                         token_state=self._token_state, record=self.record)
            self.hooks.pre(core, self._remember_prompt, with_kwargs=True)  # before the language side's own
            self.language.install(self.hooks)
            self._install_loss_hooks()
            if self.deepstack and hasattr(core.language_model, "_deepstack_process"):
                self._wrap(core.language_model, "_deepstack_process", self._reduced_deepstack)

    # -- budgets --------------------------------------------------------------------------------

    def kept_tokens(self, grid: tuple[int, int, int]) -> int:
        """LLM input tokens of one item of patch grid ``grid`` (``t, h, w``) under this method."""
        return sum(self.plan_for(n).llm_input_visual for _, _, n in frame_sizes([grid], self.merge))

    def _items(self, inputs: dict) -> dict[int, list[tuple[int, int, int]]]:
        """``{placeholder token: [grid of each item]}`` of a call's images and videos."""
        out = {}
        for token, key in zip(self.visual_ids, ("image_grid_thw", "video_grid_thw")):
            grids = inputs.get(key)
            out[token] = [] if grids is None else [tuple(int(x) for x in row) for row in grids.tolist()]
        return out

    # -- encoder side: the prompt ---------------------------------------------------------------

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        input_ids = inputs.get("input_ids")
        if input_ids is None or self.vision is None:
            return inputs
        if inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is None:
            return inputs
        if isinstance(inputs.get("position_ids"), Tensor):
            raise ValueError("encoder-side reduction computes the M-RoPE positions of the kept tokens itself; "
                             "leave position_ids out")
        keep = None
        for token, grids in self._items(inputs).items():
            if not grids:
                continue
            full = [t * (h // self.merge) * (w // self.merge) for t, h, w in grids]
            kept = [self.kept_tokens(grid) for grid in grids]
            if int((input_ids == token).sum()) == sum(kept) and kept != full:
                continue  # already cut
            mask = run_keep_mask(input_ids, token, full, kept)
            keep = mask if keep is None else keep & mask
        if keep is None or bool(keep.all()):
            return inputs
        per_token = {k: inputs[k] for k in _PER_TOKEN_INPUTS if isinstance(inputs.get(k), Tensor)
                     and inputs[k].dim() == 2 and inputs[k].shape[-1] == input_ids.shape[-1]}
        pad = self.config.text_config.pad_token_id
        new_ids, cut = cut_tokens(input_ids, per_token, keep, pad_token_id=0 if pad is None else pad,
                                  default_side=default_side)
        inputs.update(cut)
        inputs["input_ids"] = new_ids
        return inputs

    def _kept_features(self, original):
        """``get_image_features`` / ``get_video_features`` giving each item's kept tokens only."""

        def kept_features(*args, **kwargs):
            out = original(*args, **kwargs)
            trace = self.vision.last
            if trace is None:
                return out
            mask = trace.kept_mask(self.merge)
            counts = [int(k.numel()) for k in trace.kept]

            def kept(x):  # one tensor over every item's grid, or one per item (split by the model)
                if isinstance(x, (tuple, list)):
                    whole = torch.cat(list(x))
                    return tuple(torch.split(whole[mask.to(whole.device)], counts))
                return x[mask.to(x.device)]

            pooled = kept(out.pooler_output if hasattr(out, "pooler_output") else out[1])
            stack = getattr(out, "deepstack_features", None)
            if stack is not None:
                stack[:] = [kept(x) for x in stack]
            if hasattr(out, "pooler_output"):
                out.pooler_output = pooled
                return out
            return (out[0], pooled, *out[2:])

        return kept_features

    # -- encoder side: positions ----------------------------------------------------------------

    def _expand(self, input_ids: Tensor, mm_types: Tensor | None, attention_mask: Tensor | None,
                grids: dict[int, list[tuple[int, int, int]]], kept: dict[int, list[Tensor]] | None):
        """The full prompt a cut one came from, and where each cut column sits in it.

        Returns ``(ids, mm_types, attention_mask, columns)``: ``[B, L_full]`` tensors and
        ``columns`` ``[B, L']``: for text, its column in the full prompt; for the ``i``-th kept token
        of an item, the column of its raster index (``kept[token][item]``; ``None``: the first ones)."""
        b, l = input_ids.shape
        ids_rows, type_rows, mask_rows, column_rows = [], [], [], []
        counters = {token: 0 for token in grids}
        ids_list = input_ids.tolist()
        for row in range(b):
            ids, columns, types, mask = [], [], [], []
            position = 0
            while position < l:
                token = ids_list[row][position]
                run = position
                while run < l and ids_list[row][run] == token:
                    run += 1
                if token in grids and grids[token]:
                    length = run - position
                    while length > 0:
                        item = counters[token]
                        t, h, w = grids[token][item]
                        full = t * (h // self.merge) * (w // self.merge)
                        cut = self.kept_tokens((t, h, w))
                        take = min(cut, length)
                        start = len(ids)
                        raster = (list(range(take)) if kept is None else kept[token][item].tolist()[:take])
                        columns.extend(start + r for r in raster)
                        ids.extend([token] * full)
                        types.extend([mm_types[row, position].item() if mm_types is not None else 1] * full)
                        mask.extend([1] * full)
                        counters[token] += 1
                        length -= take
                        position += take
                else:
                    for column in range(position, run):
                        columns.append(len(ids))
                        ids.append(token)
                        types.append(0 if mm_types is None else int(mm_types[row, column]))
                        mask.append(1 if attention_mask is None else int(attention_mask[row, column]))
                    position = run
            ids_rows.append(ids)
            type_rows.append(types)
            mask_rows.append(mask)
            column_rows.append(columns)
        width = max(len(ids) for ids in ids_rows)
        device = input_ids.device

        def padded(rows, fill):
            return torch.tensor([r + [fill] * (width - len(r)) for r in rows], device=device)

        # padding stays where the cut prompt had it: pad the full rows on the right, masked out
        return (padded(ids_rows, ids_list[0][0]).to(input_ids.dtype), padded(type_rows, 0),
                padded(mask_rows, 0), torch.tensor(column_rows, device=device))

    def _rope_index_of_cut_prompt(self, original):
        """``get_rope_index`` for a prompt whose visual runs were cut: the positions of the full
        prompt at the kept columns (the first tokens of each item, until the tower has chosen)."""
        signature = inspect.signature(original)

        def rope_index(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            extra = values.pop("kwargs", {})
            input_ids = values["input_ids"]
            grids = self._items(values)
            full_count = sum(t * (h // self.merge) * (w // self.merge) for g in grids.values() for t, h, w in g)
            found = int(sum((input_ids == token).sum() for token in grids))
            if full_count == found:
                return original(*args, **kwargs)
            mm_types, mask = values.get("mm_token_type_ids"), values.get("attention_mask")
            ids, types, full_mask, columns = self._expand(input_ids, mm_types, mask, grids, None)
            values.update(input_ids=ids, mm_token_type_ids=types, attention_mask=full_mask)
            positions, _ = original(**values, **extra)
            self._positions = (positions, input_ids, grids, mm_types, mask)
            cut = positions.gather(2, columns[None].expand(positions.shape[0], -1, -1))
            return cut, self._deltas(cut, mask)

        return rope_index

    @staticmethod
    def _deltas(positions: Tensor, mask: Tensor | None) -> Tensor:
        """``rope_deltas`` ``[B, 1]``: where decoding continues (``max position + 1``) minus the
        prompt's real length, as ``get_rope_index`` defines them."""
        valid = torch.ones_like(positions[0], dtype=torch.bool) if mask is None else mask.bool()
        top = positions.masked_fill(~valid[None], -1).amax(dim=(0, 2))
        return (top + 1 - valid.sum(dim=1))[:, None]

    def _true_positions(self, module, args, kwargs):
        """Prefill: the kept tokens' own positions, now that the tower has chosen them."""
        stash, self._positions = self._positions, None
        trace = self.vision.last
        position_ids = kwargs.get("position_ids")
        if stash is None or trace is None or position_ids is None:
            return None
        positions, cut_ids, grids, mm_types, mask = stash
        kept, index = {}, 0
        for token in self.visual_ids:
            kept[token] = trace.kept[index:index + len(grids[token])] if grids[token] else []
            index += len(grids[token])
        if index != len(trace.kept):
            return None  # the trace is of another call
        _, _, _, columns = self._expand(cut_ids, mm_types, mask, grids, kept)
        true = positions.gather(2, columns[None].expand(positions.shape[0], -1, -1))
        rows = position_ids.shape[0]
        position_ids = position_ids.clone()
        position_ids[rows - 3:] = true.to(position_ids.dtype)
        kwargs["position_ids"] = position_ids
        self.core.rope_deltas = self._deltas(true, mask)
        return args, kwargs

    # -- decoder side ---------------------------------------------------------------------------

    def _remember_prompt(self, module, args, kwargs) -> None:
        """Keep a prefill's visual items (grids and placeholder ids) for the decoder side's schedule."""
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))
        if bound.get("input_ids") is not None and (bound.get("image_grid_thw") is not None
                                                   or bound.get("video_grid_thw") is not None):
            self._prompt = (bound["input_ids"], self._items(bound))

    def _runs(self) -> list[list[tuple[int, int, int]]]:
        """Per sample, ``(placeholder token, item, tokens in the prompt)`` of each visual run."""
        prompt = getattr(self, "_prompt", None)
        if prompt is None:
            raise ValueError("decoder-side reduction on Qwen-VL needs input_ids and the grids of the images "
                             "(image_grid_thw / video_grid_thw) in the prefill call")
        input_ids, grids = prompt
        counters = {token: 0 for token in grids}
        runs = []
        for ids in input_ids.tolist():
            sample, position = [], 0
            while position < len(ids):
                token, end = ids[position], position
                while end < len(ids) and ids[end] == token:
                    end += 1
                if token in grids and grids[token]:
                    length = end - position
                    while length > 0:
                        item = counters[token]
                        tokens = self.kept_tokens(grids[token][item]) if self.vision is not None else \
                            self._full_tokens(grids[token][item])
                        sample.append((token, item, tokens))
                        counters[token] += 1
                        length -= tokens
                position = end
            runs.append(sample)
        return runs

    def _full_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * (h // self.merge) * (w // self.merge)

    def _schedule(self, is_visual: Tensor) -> list[dict[int, int]]:
        _, grids = self._prompt if getattr(self, "_prompt", None) else (None, None)
        schedules = []
        for sample in self._runs():
            removals: dict[int, int] = {}
            for token, item, _ in sample:
                for _, _, n in frame_sizes([grids[token][item]], self.merge):
                    for layer, removed in self.plan_for(n).language.items():
                        removals[layer] = removals.get(layer, 0) + removed
            schedules.append(removals)
        return schedules

    def _token_state(self, b: int, counts: list[int], device) -> tuple[Tensor, Tensor]:
        """Per sample, the sizes and raster positions of its visual tokens: the tower's trace when
        it reduced in this forward, else fresh tokens."""
        runs = self._runs()
        trace = self.vision.last if self.vision is not None else None
        width = max(counts)
        sizes = torch.ones(b, width, device=device)
        positions = torch.zeros(b, width, dtype=torch.long, device=device)
        images = len(self._prompt[1][self.visual_ids[0]])
        for row, sample in enumerate(runs):
            parts_size, parts_position = [], []
            for token, item, tokens in sample:
                index = item if token == self.visual_ids[0] else images + item
                if trace is not None and index < len(trace.kept) and trace.kept[index].numel() == tokens:
                    parts_size.append(trace.sizes[index].to(device))
                    parts_position.append(trace.kept[index].to(device))
                else:
                    parts_size.append(torch.ones(tokens, device=device))
                    parts_position.append(torch.arange(tokens, device=device))
            if parts_size:
                n = sum(x.numel() for x in parts_size)
                sizes[row, :n] = torch.cat(parts_size)
                positions[row, :n] = torch.cat(parts_position)
        return sizes, positions

    def _reduced_deepstack(self, original):
        """DeepStack's addition to the first decoder layers, for the tokens those layers still hold."""

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            if self.language is not None and self.language.seq is not None and self.language.seq.prefill \
                    and visual_pos_masks is not None and visual_pos_masks.shape[1] != hidden_states.shape[1]:
                visual_pos_masks, visual_embeds = self.language.deepstack_inputs(visual_pos_masks, visual_embeds, 0)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        return deepstack_process
