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
  prefill, and decoding continues where the full prompt would (``rope_deltas``). With no visual
  token left at all (the ``zero`` control) the text is numbered as a text-only prompt instead;
- **LLM input**: methods on the projected tokens (pool, DivPrune, CDPruner, zero) reduce the
  merger's output frame by frame inside the feature wrappers (:mod:`.packed_input`), after any
  encoder-side reduction; CDPruner's instruction is the text after each item in the prompt last
  cut. The prompt is cut and positions kept exactly as for encoder-side methods.

Everything is done with hooks on the model's own modules and four instance-level wrappers that
detaching removes: ``generate`` (shorten the prompt), ``get_image_features`` /
``get_video_features`` (the kept, or reduced, tokens of each item) and ``get_rope_index``
(positions of a shortened prompt); the positions of the tokens really kept are set in a pre-hook
on the language model, once the tower (or the LLM-input reduction) has chosen them.
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
from .packed_input import PackedInputSide
from .hooks import host_to_device
from .packed_vision import PackedVisionSide, frame_sizes

_PER_TOKEN_INPUTS = ("attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


def cut_prompt(inputs: dict, input_ids: Tensor, keep: Tensor, pad_token_id: int | None, default_side: str | None,
               why: str) -> dict:
    """``inputs`` with the prompt tokens where ``keep`` (``[B, L]`` bool) is false removed from
    ``input_ids`` and from every per-token input (rows re-padded). The model computes the M-RoPE
    positions of what is left itself, so ``position_ids`` given by the caller are refused (``why``
    says which reduction needs that)."""
    if isinstance(inputs.get("position_ids"), Tensor):
        raise ValueError(f"{why}; leave position_ids out")
    per_token = {k: inputs[k] for k in _PER_TOKEN_INPUTS if isinstance(inputs.get(k), Tensor)
                 and inputs[k].dim() == 2 and inputs[k].shape[-1] == input_ids.shape[-1]}
    new_ids, cut = cut_tokens(input_ids, per_token, keep, pad_token_id=0 if pad_token_id is None else pad_token_id,
                              default_side=default_side)
    inputs.update(cut)
    inputs["input_ids"] = new_ids
    return inputs
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
        if method.vision is not None and (method.vision.score_with_next_layer or method.vision.adaptive):
            raise ValueError(f"{method.name} reduces a block's output after its MLP, scored by the next block's "
                             f"attention to [CLS]: Qwen-VL's towers have no [CLS] and their last block feeds the "
                             f"merger; it runs on LLaVA-1.5")
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
        self._encoded: dict[int, list[tuple[int, int, int]]] = {}
        self._traces: dict = {}  # placeholder token -> PackedTrace of the tower call that encoded those items
        self._encoding = False
        self._prompt = None
        self._instruction_prompt = None  # the cut prompt whose items the LLM-input reduction is about to see
        self._positions = None
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
            self.vision.install(self.hooks)
        if method.input is not None:
            self.input = PackedInputSide(method.input, lambda n: self.plan_for(n).input_removed, merge=self.merge,
                                         record=self.record)
        if self._cuts:
            self.hooks.pre(core, self._rewrite_model_inputs, with_kwargs=True)
            if outer is not None:
                self.hooks.pre(outer, self._rewrite_model_inputs, with_kwargs=True)
                self._wrap_generate(outer)
            self._wrap(core, "get_rope_index", self._rope_index_of_cut_prompt)
            self.hooks.pre(core.language_model, self._true_positions, with_kwargs=True)
        for token, name in zip(self.visual_ids, ("get_image_features", "get_video_features")):
            if hasattr(core, name):
                self._wrap(core, name, self._features_wrapper(token))
        if method.language is not None and self.language_layers:
            self.language = LanguageSide(core, method.language, self.language_layers, schedule=self._schedule,
                                         visual_token_ids=self.visual_ids, grid=_LLM_GRID,
                                         token_state=self._token_state, record=self.record)
            self.hooks.pre(core, self._remember_prompt, with_kwargs=True)  # before the language side's own
            self.language.install(self.hooks)
            self._install_loss_hooks()
            if self.deepstack and hasattr(core.language_model, "_deepstack_process"):
                self._wrap(core.language_model, "_deepstack_process", self._reduced_deepstack)

    @property
    def _cuts(self) -> bool:
        """Whether the LLM gets fewer visual tokens than the processor wrote placeholders for (an
        encoder-side or LLM-input reduction), so the prompt is cut and positions rebuilt."""
        return self.vision is not None or self.input is not None

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
        if input_ids is None or not self._cuts:
            return inputs
        if inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is None:
            return inputs
        inputs = self._cut(inputs, input_ids, default_side)
        if self.input is not None:
            self._instruction_prompt = (inputs["input_ids"], inputs.get("attention_mask"), self._items(inputs))
        return inputs

    def _cut(self, inputs: dict, input_ids: Tensor, default_side: str) -> dict:
        """``inputs`` with each frame's placeholder run cut to its kept count."""
        keep = None
        for token, segments in self._segments(self._items(inputs)).items():
            if not segments:
                continue
            full, kept = [s[2] for s in segments], [s[3] for s in segments]
            if int((input_ids == token).sum()) == sum(kept) and kept != full:
                continue  # already cut
            mask = run_keep_mask(input_ids, token, full, kept)  # frame by frame
            keep = mask if keep is None else keep & mask
        if keep is None or bool(keep.all()):
            return inputs  # nothing to cut, or cut already (generate's prefill)
        return cut_prompt(inputs, input_ids, keep, self.config.text_config.pad_token_id, default_side,
                          "a reduction before the LLM computes the M-RoPE positions of the kept tokens itself")

    def _features_wrapper(self, token: int):
        """``get_image_features`` / ``get_video_features`` that remember the grids of the items they
        encode (the decoder side's schedule needs them: transformers >= 5.2x encodes them in
        ``generate`` before the prefill, whose call then carries no grids) and, with an
        encoder-side method, give each item's kept tokens only."""

        def make(original):
            signature = inspect.signature(original)

            def features(*args, **kwargs):
                if self._encoding:  # Qwen3-VL's get_video_features calls get_image_features: once is enough
                    return original(*args, **kwargs)
                bound = signature.bind_partial(*args, **kwargs).arguments
                grids = next((v for k, v in bound.items() if k.endswith("grid_thw")), None)
                if grids is not None:
                    self._encoded[token] = [tuple(int(x) for x in row) for row in grids.tolist()]
                self._encoding = True
                try:
                    out = original(*args, **kwargs)
                finally:
                    self._encoding = False
                if not self._cuts:
                    return out
                trace = None
                if self.vision is not None:
                    trace = self.vision.last
                    out = self._kept(out)
                if self.input is not None and grids is not None:
                    call = [tuple(int(x) for x in row) for row in grids.tolist()]
                    out = self._input_reduced(out, token, call, trace)
                    trace = self.input.last
                self._traces[token] = trace
                return out

            return features

        return make

    def _input_reduced(self, out, token: int, grids: list[tuple[int, int, int]], state):
        """A tower output (after any encoder-side cut) with each item's tokens reduced by the
        LLM-input reduction, DeepStack features alike."""
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        counts = [int(k.numel()) for k in state.kept] if state is not None else \
            [t * (h // self.merge) * (w // self.merge) for t, h, w in grids]

        def items(x):  # one tensor over every item, or one per item (split by the model)
            return list(x) if isinstance(x, (tuple, list)) else list(torch.split(x, counts))

        def like(x, parts):
            return tuple(parts) if isinstance(x, (tuple, list)) else torch.cat(parts)

        stack = getattr(out, "deepstack_features", None)
        kept, kept_stack = self.input.reduce(items(pooled), grids, state, self._instruction(token, grids),
                                             [items(x) for x in stack] if stack is not None else [])
        if stack is not None:
            stack[:] = [like(x, parts) for x, parts in zip(stack, kept_stack)]
        if hasattr(out, "pooler_output"):
            out.pooler_output = like(pooled, kept)
            return out
        return (out[0], like(pooled, kept), *out[2:])

    def _instruction(self, token: int, grids: list[tuple[int, int, int]]):
        """``instruction(items)`` for the LLM-input reduction: the input embeddings ``[F, M, D]``
        (and ``valid [F, M]``) of the text after each item in the last prompt seen, up to the next
        visual item or the prompt's end (for a video, after its last frame); ``None`` when that
        prompt does not hold these items (``get_image_features`` called on its own)."""
        if self._instruction_prompt is None:
            return None
        input_ids, mask, prompt_items = self._instruction_prompt
        if prompt_items.get(token) != grids:
            return None
        embed = self.core.get_input_embeddings()
        found: dict[int, list[tuple[int, list[int]]]] = {}  # filled on first use: only some stages read text

        def instruction(items: list[int]) -> tuple[Tensor, Tensor]:
            if not found:
                found.update(self._instruction_columns(input_ids, mask, prompt_items))
            columns = found[token]
            lacking = [i for i in items if not columns[i][1]]
            if lacking:
                raise ValueError(f"ficoco: the visual item in prompt {columns[lacking[0]][0]} has no instruction text "
                                 f"after it, and this method weighs the visual tokens by that text")
            width = max(len(columns[i][1]) for i in items)
            # laid out on the host and copied once, without waiting for the device (this runs
            # after the tower, where a wait would leave the GPU idle)
            padded = [columns[i][1] + [-1] * (width - len(columns[i][1])) for i in items]
            table = host_to_device([[columns[i][0] for i in items], *zip(*padded)], input_ids.device)  # [1 + M, F]
            samples, rows = table[0], table[1:].t()
            valid = rows >= 0
            rows = rows.clamp_min(0)
            with torch.no_grad():
                text = embed(input_ids[samples[:, None], rows])  # [F, M, D]
            return text, valid

        return instruction

    def _instruction_columns(self, input_ids: Tensor, attention_mask: Tensor | None,
                             grids: dict[int, list[tuple[int, int, int]]]) -> dict[int, list[tuple[int, list[int]]]]:
        """Per placeholder token, per item: ``(sample row, columns)`` of the real text after the
        item's last frame in the cut prompt, up to the next visual frame or the prompt's end."""
        segments = self._segments(grids)
        counters = {token: 0 for token in segments}
        out = {token: [(0, []) for _ in items] for token, items in grids.items()}
        mask_rows = attention_mask.tolist() if attention_mask is not None else None
        for row, ids in enumerate(input_ids.tolist()):
            current = None  # (token, item) whose instruction the text read now belongs to
            for start, end, token, segment in self._walk(ids, segments, counters, cut=True):
                if segment is not None:  # a frame: the text after it (so far none) is its item's
                    current = (token, segment[0])
                    out[token][segment[0]] = (row, [])
                elif current is not None:
                    real = range(start, end) if mask_rows is None else \
                        [c for c in range(start, end) if mask_rows[row][c]]
                    out[current[0]][current[1]][1].extend(real)
        return out

    def _kept(self, out):
        """A tower output with each item's kept tokens only (and DeepStack features alike)."""
        trace = self.vision.last
        if trace is None:
            return out
        index = trace.kept_index(self.merge)
        counts = [int(k.numel()) for k in trace.kept]

        def kept(x):  # one tensor over every item's grid, or one per item (split by the model)
            if isinstance(x, (tuple, list)):
                whole = torch.cat(list(x))
                return tuple(torch.split(whole.index_select(0, index.to(whole.device)), counts))
            return x.index_select(0, index.to(x.device))

        pooled = kept(out.pooler_output if hasattr(out, "pooler_output") else out[1])
        stack = getattr(out, "deepstack_features", None)
        if stack is not None:
            stack[:] = [kept(x) for x in stack]
        if hasattr(out, "pooler_output"):
            out.pooler_output = pooled
            return out
        return (out[0], pooled, *out[2:])


    # -- encoder side: positions ----------------------------------------------------------------

    def _segments(self, grids: dict[int, list[tuple[int, int, int]]]) -> dict[int, list[tuple[int, int, int, int]]]:
        """Per placeholder token, ``(item, frame, full tokens, kept tokens)`` of every frame in prompt
        order. A frame is the unit: Qwen2-VL and Qwen2.5-VL put all frames of a video in one run of
        placeholders, Qwen3-VL one run per frame with its timestamp in between."""
        return {token: [(item, frame, n, self.plan_for(n).llm_input_visual)
                        for item, frame, n in frame_sizes(items, self.merge)] for token, items in grids.items()}

    def _walk(self, ids: list[int], segments: dict[int, list[tuple[int, int, int, int]]], counters: dict[int, int],
              cut: bool):
        """``(start, end, token, segment)`` of each visual frame within one prompt row (``segment``
        ``None`` for text), consuming ``counters``; ``cut``: the row holds each frame's kept tokens."""
        position = 0
        while position < len(ids):
            token, run = ids[position], position
            while run < len(ids) and ids[run] == token:
                run += 1
            if token not in segments or not segments[token]:
                yield position, run, token, None
                position = run
                continue
            while position < run:
                segment = segments[token][counters[token]]
                counters[token] += 1
                length = segment[3] if cut else segment[2]
                yield position, position + length, token, segment
                position += length

    def _expand(self, input_ids: Tensor, mm_types: Tensor | None, attention_mask: Tensor | None,
                grids: dict[int, list[tuple[int, int, int]]], kept: dict[int, list[Tensor]] | None):
        """The full prompt a cut one came from, and where each cut column sits in it.

        Returns ``(ids, mm_types, attention_mask, columns)``: ``[B, L_full]`` tensors and
        ``columns`` ``[B, L']``: for text, its column in the full prompt; for a kept visual token,
        the column of its raster index (``kept[token][item]``; ``None``: the first ones of each frame)."""
        segments = self._segments(grids)
        counters = {token: 0 for token in segments}
        # one device-to-host copy of each input, not one per text run (each would wait for the GPU)
        type_rows = mm_types.tolist() if mm_types is not None else None
        mask_rows = attention_mask.tolist() if attention_mask is not None else None
        kept = None if kept is None else {token: [raster.cpu() for raster in items] for token, items in kept.items()}
        rows = []
        for row, ids in enumerate(input_ids.tolist()):
            full_ids, full_types, full_mask, columns = [], [], [], []
            for start, end, token, segment in self._walk(ids, segments, counters, cut=True):
                if segment is None:
                    columns.extend(range(len(full_ids), len(full_ids) + end - start))
                    full_ids.extend(ids[start:end])
                    full_types.extend([0] * (end - start) if type_rows is None else type_rows[row][start:end])
                    full_mask.extend([1] * (end - start) if mask_rows is None else mask_rows[row][start:end])
                    continue
                item, frame, full, cut = segment
                if kept is None:
                    within = list(range(cut))
                else:
                    raster = kept[token][item]
                    within = (raster[(raster // full) == frame] - frame * full).tolist()
                columns.extend(len(full_ids) + r for r in within)
                full_ids.extend([token] * full)
                full_types.extend([type_rows[row][start] if type_rows is not None else 1] * full)
                full_mask.extend([1] * full)
            rows.append((full_ids, full_types, full_mask, columns))
        width = max(len(r[0]) for r in rows)
        device = input_ids.device

        def padded(index, fill):  # the full rows padded on the right, masked out
            return torch.tensor([r[index] + [fill] * (width - len(r[index])) for r in rows], device=device)

        return padded(0, 0).to(input_ids.dtype), padded(1, 0), padded(2, 0), torch.tensor([r[3] for r in rows],
                                                                                         device=device)

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
            if found == 0:
                # nothing visual is left (the zero control): the prompt is text, numbered as the model
                # numbers a text-only prompt (0, 1, 2, ... over each row's real tokens; rope_deltas 0)
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
        self._instruction_prompt = None  # its items are encoded by now: no later tower call may read it
        stash, self._positions = self._positions, None
        position_ids = kwargs.get("position_ids")
        if stash is None or position_ids is None:
            return None
        positions, cut_ids, grids, mm_types, mask = stash
        kept = {}
        for token in self.visual_ids:
            trace = self._traces.get(token)
            if grids[token] and (trace is None or trace.grids != grids[token]):
                return None  # these items were not encoded by this method
            kept[token] = trace.kept if grids[token] else []
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
        if bound.get("input_ids") is None:
            return
        if bound.get("image_grid_thw") is not None or bound.get("video_grid_thw") is not None:
            self._prompt = (bound["input_ids"], self._items(bound))
        else:  # encoded before this call (generate): the grids the feature functions saw
            self._prompt = (bound["input_ids"], {token: list(self._encoded.get(token, [])) for token in self.visual_ids})

    def _runs(self) -> list[list[tuple[int, int, int, int]]]:
        """Per sample of the last prefill, ``(placeholder token, item, frame, tokens in the prompt)``
        of each visual frame."""
        if self._prompt is None:
            raise ValueError("decoder-side reduction on Qwen-VL needs input_ids and the grids of the images "
                             "(image_grid_thw / video_grid_thw) in the prefill call")
        input_ids, grids = self._prompt
        segments = self._segments(grids)
        if not self._cuts:  # nothing was cut: frames hold all their tokens
            segments = {token: [(i, f, n, n) for i, f, n, _ in s] for token, s in segments.items()}
        counters = {token: 0 for token in segments}
        runs = []
        for ids in input_ids.tolist():
            runs.append([(token, segment[0], segment[1], segment[3])
                         for _, _, token, segment in self._walk(ids, segments, counters, cut=True)
                         if segment is not None])
        return runs

    def _schedule(self, is_visual: Tensor) -> list[dict[int, int]]:
        _, grids = self._prompt
        schedules = []
        for sample in self._runs():
            removals: dict[int, int] = {}
            for token, item, frame, _ in sample:
                t, h, w = grids[token][item]
                for layer, removed in self.plan_for((h // self.merge) * (w // self.merge)).language.items():
                    removals[layer] = removals.get(layer, 0) + removed
            schedules.append(removals)
        return schedules

    def _token_state(self, b: int, counts: list[int], device) -> tuple[Tensor, Tensor]:
        """Per sample, the sizes and raster positions of its visual tokens: the tower's trace when
        it reduced in this forward, else fresh tokens."""
        grids = self._prompt[1]
        width = max(counts)
        sizes = torch.ones(b, width, device=device)
        positions = torch.zeros(b, width, dtype=torch.long, device=device)
        for row, sample in enumerate(self._runs()):
            parts_size, parts_position = [], []
            for token, item, frame, tokens in sample:
                t, h, w = grids[token][item]
                per_frame = (h // self.merge) * (w // self.merge)
                trace = self._traces.get(token) if self._cuts else None
                if trace is not None and trace.grids == grids[token]:
                    index = item
                    raster = trace.kept[index]
                    mine = (raster // per_frame) == frame
                    parts_size.append(trace.sizes[index][mine].to(device))
                    parts_position.append(raster[mine].to(device))
                else:
                    parts_size.append(torch.ones(tokens, device=device))
                    parts_position.append(frame * per_frame + torch.arange(tokens, device=device))
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
