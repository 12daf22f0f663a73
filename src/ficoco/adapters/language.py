"""Running a :class:`~ficoco.methods.LanguageReduction` inside the LLM decoder of a multimodal model.

The decoder's hidden states get shorter mid-model. What every later layer needs is rebuilt from the
model's own tensors by gathering, never by re-implementing a layer:

- the attention mask the model built for the full sequence: rows and columns of the kept tokens
  (prefill), or columns of the kept prompt tokens plus all generated ones (decoding, where each
  layer's KV cache holds only what that layer saw);
- RoPE ``(cos, sin)`` and ``position_ids`` at the kept rows, so every kept token keeps its
  original position (with M-RoPE, its 3-D position); generated tokens continue from the full
  prompt;
- the KV cache itself needs nothing: each layer appends what it computes, so cache lengths differ
  per layer and the gathered masks match them.

Samples may bring different numbers of visual tokens (dynamic resolution) and so remove different
numbers per layer. The reduction then runs once per group of samples that agree, and the batch
stays rectangular: a sample that removed more than the least-removing one keeps some of its
removed rows as *dead* rows, masked out of every later attention and of the outputs
(``kept_valid``). When every sample agrees (LLaVA-1.5) there are none.

Hooks per reducing layer: ``q_proj`` / ``k_proj`` outputs are kept, RoPE is applied to them with the
model's own ``apply_rotary_pos_emb``, a pre-hook on ``post_attention_layernorm`` reduces the
residual stream in place and a forward hook keeps only the surviving rows. A pre-hook on the
multimodal model marks each forward as prefill (empty cache: locate visual tokens, text queries,
padding) or decoding (reuse the prefill's bookkeeping).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..methods import LanguageReduction
from ..stages import AttentionProbe, NO_POSITION, ReductionResult, TokenGroup
from ..stages.tokens import first_k_true, gather_rows
from .hooks import HookSet, replace_hidden_output, write_rows


@dataclass
class SampleGroup:
    """Samples of a batch whose visual tokens are reduced alike.

    Attributes:
        rows: ``[G]`` their batch rows (``None``: the whole batch, in order).
        num_visual: visual tokens each of them has now.
        num_text: text queries after the image (the most any of them has).
        removals: ``{layer: removed}`` each of them removes.
    """

    rows: Tensor | None
    num_visual: int
    num_text: int
    removals: dict[int, int]
    row_list: tuple[int, ...] = ()

    def take(self, x: Tensor | None) -> Tensor | None:
        """``x`` (``[B, ...]``) at this group's rows."""
        if x is None or self.rows is None:
            return x
        return x.index_select(0, self.rows.to(x.device)) if x.shape[0] > 1 else x


@dataclass
class _Sequence:
    """Bookkeeping of one batch of prompts, built at prefill and reused while decoding.

    All ``[B, L_cur]`` tensors describe the *current* (possibly reduced) sequence.
    """

    prefill_len: int
    groups: list[SampleGroup]
    is_visual: Tensor
    is_text: Tensor
    valid: Tensor  # real tokens: neither padding nor dead rows
    orig_index: Tensor  # original column of each current token
    dead: Tensor | None = None  # dead rows (see the module docstring), once there are any
    stage_index: list[Tensor] = field(default_factory=list)  # orig_index after each reduction
    stage_valid: list[Tensor | None] = field(default_factory=list)  # valid after each reduction if it has dead rows
    layer_stage: dict[int, int] = field(default_factory=dict)
    prefill: bool = True
    step_inputs: dict[int, tuple] = field(default_factory=dict)  # per stage, for the current forward
    sizes: Tensor | None = None  # [B, N_max] of the current visual tokens, in sequence order
    positions: Tensor | None = None
    steps: list[tuple[int, ReductionResult]] = field(default_factory=list)
    #: per reduction: ``(group, ReductionResult)`` of each group, for replaying merges on DeepStack features
    results: list[list[tuple[SampleGroup, ReductionResult]]] = field(default_factory=list)
    raters: Tensor | None = None  # [B, prefill_len] the text raters (SparseVLM), at the prefill's columns
    num_raters: int = 0  # the most raters any sample has

    @property
    def stage(self) -> int:
        return len(self.stage_index)

    @property
    def has_dead_rows(self) -> bool:
        return any(v is not None for v in self.stage_valid)

    def advance(self, keep: Tensor, dead: Tensor | None) -> None:
        self.is_visual = self.is_visual.gather(1, keep)
        self.is_text = self.is_text.gather(1, keep)
        self.valid = self.valid.gather(1, keep)
        if dead is not None:
            self.is_visual, self.valid = self.is_visual & ~dead, self.valid & ~dead
        self.orig_index = self.orig_index.gather(1, keep)
        if dead is not None or self.dead is not None:
            before = self.dead.gather(1, keep) if self.dead is not None else torch.zeros_like(keep, dtype=torch.bool)
            self.dead = before if dead is None else before | dead
        self.stage_index.append(self.orig_index)
        self.stage_valid.append(self.valid if dead is not None or self.has_dead_rows else None)


#: ``schedule(visual_counts)`` -> per sample ``{layer: removed}`` (the model family's budget rule)
Schedule = Callable[[Tensor], list[dict[int, int]]]


class LanguageSide:
    """Hooks a language-side reduction into the decoder layers of a multimodal model.

    Args:
        core_model: the model whose ``forward`` takes ``input_ids`` / ``inputs_embeds`` and whose
            ``language_model.layers`` are the decoder layers (``LlavaModel``, ``Qwen2_5_VLModel``, ...).
        stage: the reduction.
        layers: the decoder layers that may reduce (the union of every sample's schedule).
        schedule: per sample, ``{layer: removed}`` from the prefill's ``is_visual`` ``[B, L]``.
        visual_token_ids: the placeholder ids of visual tokens (image, video).
        token_state: ``(B, counts) -> (sizes, positions)`` ``[B, max(counts)]`` of the visual
            tokens entering the LLM (what the encoder did to them), or ``None`` for fresh ones.
        grid: the patch grid the positions refer to.
        candidates: ``placeholders [B, L] -> [B, L]``: which of the visual placeholders may be
            reduced (``None``: all). The others (LLaVA-NeXT's newline tokens) are kept like
            text, but are not text queries either.
    """

    def __init__(
        self,
        core_model: nn.Module,
        stage: LanguageReduction,
        layers: set[int],
        *,
        schedule: Schedule,
        visual_token_ids: tuple[int, ...],
        grid: tuple[int, int],
        token_state: Callable[[int, list[int], torch.device], tuple[Tensor, Tensor] | None] | None = None,
        record: bool = False,
        candidates: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not stage.reduction.keeps_order:
            # kept tokens keep their place (and position id) in the prompt, whatever order a filter asks for
            raise ValueError(f"{type(stage.reduction.filter).__name__} hands tokens on in its own order, which a "
                             f"reduction inside the LLM cannot take (tokens keep their prompt positions); use it in "
                             f"the vision encoder, or alternation='patches'")
        self.core, self.stage, self.reducing = core_model, stage, set(layers)
        self.layers = core_model.language_model.layers
        self.schedule, self.visual_token_ids, self.grid = schedule, tuple(visual_token_ids), grid
        self.token_state, self.record, self.candidates = token_state, record, candidates
        self.signature = inspect.signature(type(core_model).forward)
        self.seq: _Sequence | None = None
        self.queries: Tensor | None = None
        self.keys: Tensor | None = None
        self.rope: tuple[Tensor, Tensor] | None = None
        self.cache = None
        self.pending: tuple[Tensor, Tensor | None] | None = None
        self.step_graphs = None  # a CapturedCalls while graph_language_steps is in effect
        # the elementwise weight of the decoder's final norm (DART compares normed hidden states)
        self.final_norm_weight = getattr(getattr(core_model.language_model, "norm", None), "weight", None)
        attn = self.layers[0].self_attn
        module = sys.modules[type(attn).__module__]
        self.apply_rotary = getattr(module, "apply_rotary_pos_emb", None)
        if self.apply_rotary is None:
            raise TypeError(f"{type(attn).__name__} has no apply_rotary_pos_emb next to it: unsupported decoder")

    # -- installation ---------------------------------------------------------------------------

    def install(self, hooks: HookSet) -> None:
        if not self.reducing:
            return
        hooks.pre(self.core, self._start_forward, with_kwargs=True)
        if self.stage.raters is not None:  # chosen from the first layer's input: the LLM's input embeddings
            hooks.pre(self.layers[0], self._select_raters, with_kwargs=True)
        first = min(self.reducing)
        for index, layer in enumerate(self.layers):
            if index >= first:
                hooks.pre(layer, self._layer_inputs(index), with_kwargs=True)
            if index in self.reducing:
                attn = layer.self_attn
                # Qwen3's decoder normalises each head's queries and keys before RoPE (q_norm,
                # k_norm): the attention uses their outputs, not the projections'
                hooks.post(getattr(attn, "q_norm", None) or attn.q_proj, self._keep_queries)
                hooks.post(getattr(attn, "k_norm", None) or attn.k_proj, self._keep_keys)
                reduce = self._reducer(index, layer.self_attn)
                if self.stage.reduce_at == "output":
                    hooks.post(layer, self._on_output(reduce), prepend=True)
                else:
                    hooks.pre(layer.post_attention_layernorm, reduce)
                    hooks.post(layer, self._drop_rows, prepend=True)

    @property
    def kept_index(self) -> Tensor | None:
        """``[B, L']`` original column of every token the last prefill's final layers saw."""
        return None if self.seq is None else self.seq.orig_index

    @property
    def kept_valid(self) -> Tensor | None:
        """``[B, L']`` which of them are real tokens (not padding, not dead rows)."""
        return None if self.seq is None else self.seq.valid

    @property
    def kept_dead(self) -> Tensor | None:
        """``[B, L']`` which of them are dead rows (``None`` when there are none)."""
        return None if self.seq is None else self.seq.dead

    # -- per forward ----------------------------------------------------------------------------

    def _start_forward(self, module, args, kwargs) -> None:
        bound = self.signature.bind_partial(module, *args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        cache = bound.get("cache", bound.get("past_key_values", extra.get("past_key_values", extra.get("cache"))))
        input_ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"decoder-side token reduction needs a dynamic KV cache (each layer keeps a different number "
                f"of tokens), got {type(cache).__name__}; drop cache_implementation='static' or use an "
                f"encoder-side method")
        past = cache.get_seq_length() if cache is not None else 0
        if past:  # decoding (or continuing) after a prefill
            if self.seq is None:
                return
            step = input_ids if input_ids is not None else embeds
            if step.shape[1] > 1 and bool(self._visual_positions(input_ids, embeds).any()):
                raise ValueError("image tokens after a filled cache: start a new prompt with an empty cache")
            self.seq.prefill = False
            self.seq.step_inputs = {}
            return
        self.seq = self._new_sequence(self._visual_positions(input_ids, embeds), bound.get("attention_mask"))

    def _select_raters(self, module, args, kwargs) -> None:
        """At prefill, the text raters of every prompt from the first decoder layer's input."""
        seq = self.seq
        if seq is None or not seq.prefill:
            return
        embeds = args[0] if args else kwargs["hidden_states"]
        seq.raters = self.stage.raters(embeds, seq.is_visual, seq.is_text)
        # one host sync per prefill; at least one row, which the probe gives a sample without raters
        seq.num_raters = max(1, int(seq.raters.sum(dim=1).amax()))

    def _visual_positions(self, input_ids: Tensor | None, embeds: Tensor | None) -> Tensor:
        if input_ids is not None:
            found = input_ids == self.visual_token_ids[0]
            for token in self.visual_token_ids[1:]:
                found = found | (input_ids == token)
            return found
        table = self.core.get_input_embeddings()
        found = None
        for token in self.visual_token_ids:
            row = table(torch.tensor(token, device=embeds.device)).to(embeds.dtype)
            hit = (embeds == row).all(dim=-1)
            found = hit if found is None else found | hit
        return found

    def _new_sequence(self, placeholders: Tensor, attention_mask: Tensor | None) -> _Sequence | None:
        b, l = placeholders.shape
        is_visual = placeholders
        if self.candidates is not None and bool(placeholders.any()):
            is_visual = self.candidates(placeholders)
        counts = is_visual.sum(dim=1).tolist()  # one host sync per prefill
        if max(counts) == 0:
            return None  # text-only prompt (or only placeholders that are never reduced): nothing to reduce
        device = is_visual.device
        valid = torch.ones(b, l, dtype=torch.bool, device=device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.bool()
        columns = torch.arange(l, device=device)
        last_visual = torch.where(placeholders, columns, -1).amax(dim=1, keepdim=True)
        is_text = valid & (columns > last_visual)
        num_text = is_text.sum(dim=1).tolist()
        per_sample = self.schedule(is_visual)
        for row, (count, removals) in enumerate(zip(counts, per_sample)):
            if sum(removals.values()) >= count > 0:
                raise ValueError(f"sample {row} has {count} visual tokens but its schedule removes "
                                 f"{sum(removals.values())}")
        keys: dict[tuple, list[int]] = {}
        for row, (count, removals) in enumerate(zip(counts, per_sample)):
            keys.setdefault((count, tuple(sorted(removals.items()))), []).append(row)
        groups = []
        for (count, removals), rows in keys.items():
            index = None if len(keys) == 1 else torch.tensor(rows, device=device)
            groups.append(SampleGroup(index, count, max(num_text[r] for r in rows), dict(removals), tuple(rows)))
        return _Sequence(prefill_len=l, groups=groups, is_visual=is_visual, is_text=is_text, valid=valid,
                         orig_index=columns.expand(b, l))

    # -- per layer ------------------------------------------------------------------------------

    def _layer_inputs(self, index: int):
        def gather_layer_inputs(module, args, kwargs):
            seq = self.seq
            if seq is None:
                return None
            if seq.prefill:
                seq.layer_stage[index] = seq.stage
            stage = seq.layer_stage.get(index, 0)
            if stage:
                if stage not in seq.step_inputs:
                    seq.step_inputs[stage] = self._stage_inputs(seq, stage, kwargs)
                mask, rope, position_ids = seq.step_inputs[stage]
                kwargs["attention_mask"] = mask
                if rope is not None:
                    kwargs["position_embeddings"] = rope
                if position_ids is not None:
                    kwargs["position_ids"] = position_ids
            if index in self.reducing:
                self.rope = kwargs.get("position_embeddings")
                self.cache = kwargs.get("past_key_values", kwargs.get("cache"))
            return args, kwargs

        return gather_layer_inputs

    def _stage_inputs(self, seq: _Sequence, stage: int, kwargs: dict) -> tuple:
        """Mask, RoPE and position ids for a layer whose cache holds the prompt columns of ``stage``."""
        kept, stage_valid = seq.stage_index[stage - 1], seq.stage_valid[stage - 1]
        b = kept.shape[0]
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(
                f"decoder-side reduction supports tensor attention masks (eager, sdpa, flash); got {type(mask).__name__}"
            )
        rope, position_ids = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        if seq.prefill:
            if mask is not None:
                mask = mask.expand(b, *mask.shape[1:])
                if mask.dim() == 4:
                    if mask.shape[2] == seq.prefill_len:
                        rows = kept[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
                        mask = mask.gather(2, rows)
                    cols = kept[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
                    mask = mask.gather(3, cols)
                else:  # [B, L] padding mask (flash attention)
                    mask = mask.gather(1, kept)
            elif stage_valid is not None:  # no mask (causal SDPA): dead rows need one
                n = kept.shape[1]
                mask = torch.ones(n, n, dtype=torch.bool, device=kept.device).tril()[None, None].expand(b, 1, n, n)
            if rope is not None:
                rope = tuple(gather_rows(x.expand(b, *x.shape[1:]), kept) for x in rope)
            if position_ids is not None:
                position_ids = position_ids.expand(b, -1).gather(1, kept)
            key_valid = stage_valid
        else:
            total = None if mask is None else mask.shape[-1]
            if mask is not None:
                generated = torch.arange(seq.prefill_len, total, device=kept.device).expand(b, -1)
                cols = torch.cat([kept, generated], dim=1)
                mask = mask.expand(b, *mask.shape[1:])
                if mask.dim() == 4:
                    mask = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
                else:
                    mask = mask.gather(1, cols)
            key_valid = None
            if stage_valid is not None:
                cache_len = kept.shape[1]
                layer_cache = self.cache
                generated_len = (total - seq.prefill_len) if total is not None else None
                if generated_len is None:  # no mask at all: every generated column is attended
                    generated_len = int(layer_cache.get_seq_length()) - cache_len + 1 if layer_cache else 1
                    mask = torch.ones(b, 1, 1, cache_len + generated_len, dtype=torch.bool, device=kept.device)
                key_valid = torch.cat([stage_valid, stage_valid.new_ones(b, generated_len)], dim=1)
        if key_valid is not None and mask is not None:
            mask = _mask_columns(mask, key_valid)
        return mask, rope, position_ids

    def _keep_queries(self, module, args, output) -> None:
        if self.seq is not None and self.seq.prefill:
            self.queries = output

    def _keep_keys(self, module, args, output) -> None:
        if self.seq is not None and self.seq.prefill:
            self.keys = output

    def _reducer(self, index: int, attn: nn.Module):
        config = attn.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads

        def reduce_after_attention(module, args) -> None:
            seq = self.seq
            if seq is None or not seq.prefill:
                return
            residual = args[0]  # [B, L, D]: residual stream after self-attention
            b, l, _ = residual.shape
            d = attn.head_dim
            q, k = self.queries, self.keys
            self.queries = self.keys = None
            self._ensure_token_state(seq, b, residual.device)
            removing = [g for g in seq.groups if g.removals.get(index, 0)]
            if not removing:
                return
            cos, sin = self.rope
            cached = None
            if self.stage.score_with_next_layer:  # the next layer's view of this layer's output
                q, k = self._next_layer_projections(index, residual)
            else:
                cached = self._cached_keys(index, b, l, kv_heads, d)
            q, k = q.reshape(b, l, heads, d), k.reshape(b, l, kv_heads, d)
            raters = None if seq.raters is None else seq.raters.gather(1, seq.orig_index)  # at the current rows

            def inputs_of(group: SampleGroup) -> tuple:
                take = group.take
                return (take(residual), take(q), take(k), take(cos), take(sin), take(cached), take(seq.is_visual),
                        take(seq.is_text), take(seq.valid), take(seq.sizes)[:, :group.num_visual],
                        take(seq.positions)[:, :group.num_visual], take(raters))

            decides = self.stage.reduction.decides_removals
            if decides:  # the filter's counts per sample, known only now (SparseVLM's rank rule)
                removing = self._group_by_removals(seq, index, removing, inputs_of, attn.scaling)
                if not removing:
                    return
            outcomes = []
            for group in removing:
                inputs = inputs_of(group)
                removed = group.removals[index]
                step = partial(self._reduction_step, removed, group.num_visual, group.num_text, seq.num_raters,
                               attn.scaling)
                graphs = self.step_graphs
                # a named range, so that a profiler can tell the step's own host and device time apart
                with torch.profiler.record_function("ficoco.language_step"):
                    # a filter that decides its own counts reads them on the host: no graph replay
                    if graphs is not None and residual.is_cuda and not self.record and not torch.is_grad_enabled() \
                            and not decides:
                        key = (index, removed, group.num_visual, group.num_text, seq.num_raters, inputs[0].shape[0])
                        outputs, result = graphs(key, lambda *x: step(*x)[0], *inputs), None
                    else:
                        outputs, result = step(*inputs)
                outcomes.append((group, removed, outputs, result))
            self._apply(seq, index, residual, outcomes)

        return reduce_after_attention

    def _apply(self, seq: _Sequence, index: int, residual: Tensor, outcomes: list) -> None:
        """Write each group's survivors into ``residual`` and set the rows the next layers keep
        (``self.pending``): each sample's survivors and text, plus dead rows where a sample removed
        more than the least-removing one."""
        b, l, _ = residual.shape
        seq.results.append([(group, result) for group, _, _, result in outcomes])
        if self.record:
            seq.steps.extend((index, result) for *_, result in outcomes)
        if len(outcomes) == 1 and outcomes[0][0].rows is None:  # every sample alike: no groups, no dead rows
            group, _, (rows, features, keep, sizes, positions), _ = outcomes[0]
            write_rows(residual, rows, features)
            self.pending = (keep, None)
            seq.sizes, seq.positions, group.num_visual = sizes, positions, rows.shape[1]
            return
        removed_by_row = [0] * b
        for group, removed, *_ in outcomes:
            for row in group.row_list:
                removed_by_row[row] = removed
        least = min(removed_by_row)
        keep = torch.arange(l - least, device=residual.device).expand(b, l - least).clone()
        dead = torch.zeros(b, l - least, dtype=torch.bool, device=residual.device)
        for group, removed, (rows, features, group_keep, sizes, positions), _ in outcomes:
            batch_rows = group.rows.to(residual.device)
            residual[batch_rows[:, None], rows] = features.to(residual.dtype)
            if removed > least:  # keep some of the removed visual rows, as dead padding
                gone = group.take(seq.is_visual).scatter(1, rows, False)
                padding = first_k_true(gone, removed - least)
                group_keep = torch.cat([group_keep, padding], dim=1).sort(dim=1).values
                dead[batch_rows] = (group_keep[:, :, None] == padding[:, None, :]).any(dim=2)
            keep[batch_rows] = group_keep
            group.num_visual = rows.shape[1]
        width = max(g.num_visual for g in seq.groups)
        sizes_all = torch.nn.functional.pad(seq.sizes, (0, max(0, width - seq.sizes.shape[1])))[:, :width].clone()
        positions_all = torch.nn.functional.pad(seq.positions, (0, max(0, width - seq.positions.shape[1])),
                                                value=NO_POSITION)[:, :width].clone()
        for group, _, (rows, _, _, sizes, positions), _ in outcomes:
            batch_rows = group.rows.to(residual.device)
            sizes_all[batch_rows] = torch.nn.functional.pad(sizes, (0, width - sizes.shape[1]))
            positions_all[batch_rows] = torch.nn.functional.pad(positions, (0, width - positions.shape[1]),
                                                                value=NO_POSITION)
        seq.sizes, seq.positions = sizes_all, positions_all
        self.pending = (keep, dead if bool(dead.any()) else None)

    def _probe(
        self, num_visual: int, num_text: int, num_raters: int, scaling: float,
        residual: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, cached_keys: Tensor | None,
        is_visual: Tensor, is_text: Tensor, valid: Tensor, sizes: Tensor, positions: Tensor, raters: Tensor | None,
    ) -> tuple[Tensor, AttentionProbe, TokenGroup]:
        """``(candidates [B, N], probe, tokens)`` of one reduction step (arguments as
        :meth:`_reduction_step`'s), with no host sync."""
        b, l, _ = residual.shape
        candidates = first_k_true(is_visual, num_visual)
        text_rows = first_k_true(is_text, num_text)
        last_row = torch.where(valid, torch.arange(l, device=residual.device), -1).amax(dim=1)
        rater_rows = rater_valid = None
        if raters is not None:
            rater_rows = first_k_true(raters, num_raters)
            rater_valid = raters.gather(1, rater_rows)
        probe = AttentionProbe(
            q, k, scaling, candidates,
            key_valid=valid, causal=True,
            text_rows=text_rows, text_valid=is_text.gather(1, text_rows), last_row=last_row,
            rope=self._rotation((cos, sin), b), attended_keys=cached_keys,
            hidden=residual, hidden_weight=self.final_norm_weight, rater_rows=rater_rows, rater_valid=rater_valid,
        )
        return candidates, probe, TokenGroup(gather_rows(residual, candidates), sizes, positions, self.grid)

    def _group_by_removals(self, seq: _Sequence, index: int, groups: list[SampleGroup], inputs_of,
                           scaling: float) -> list[SampleGroup]:
        """``groups`` split by the count the filter removes from each sample at layer ``index``
        (:meth:`~ficoco.stages.Filter.removals`; one host sync per group), which replace them in
        ``seq.groups``; those that remove any, each with its count in ``removals[index]``."""
        out = []
        for group in groups:
            _, probe, tokens = self._probe(group.num_visual, group.num_text, seq.num_raters, scaling,
                                           *inputs_of(group))
            counts = self.stage.reduction.filter.removals(tokens, probe)
            rows_of: dict[int, list[int]] = {}
            for row, count in zip(group.row_list or range(len(counts)), counts):
                rows_of.setdefault(count, []).append(row)
            if len(rows_of) == 1:
                group.removals[index] = counts[0]
                parts = [group]
            else:  # samples part ways: each count its own group, the batch kept rectangular by dead rows
                device = seq.is_visual.device
                parts = [SampleGroup(torch.tensor(rows, device=device), group.num_visual, group.num_text,
                                     {**group.removals, index: count}, tuple(rows)) for count, rows in rows_of.items()]
                at = next(i for i, g in enumerate(seq.groups) if g is group)
                seq.groups[at:at + 1] = parts
            out.extend(part for part in parts if part.removals[index])
        return out

    def _reduction_step(
        self, removed: int, num_visual: int, num_text: int, num_raters: int, scaling: float,
        residual: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, cached_keys: Tensor | None,
        is_visual: Tensor, is_text: Tensor, valid: Tensor, sizes: Tensor, positions: Tensor, raters: Tensor | None,
    ) -> tuple[tuple[Tensor, ...], ReductionResult]:
        """One decoder-side reduction: a pure function of tensors with no host sync, so that it can
        be replayed as a CUDA graph (but for a filter that decides its own counts).

        Args:
            removed: visual tokens to remove per sample; ``num_visual`` / ``num_text`` /
                ``num_raters``: visual tokens, (max) text queries after the image and (max) text
                raters, per sample, before this step.
            residual: ``[B, L, D]`` residual stream after self-attention (the layer's output with
                ``reduce_at="output"``); ``q`` ``[B, L, H, d]``,
                ``k`` ``[B, L, Hk, d]`` before RoPE; ``cos``/``sin`` ``[1 or B, L, d]``;
                ``cached_keys`` ``[B, Hk, L, d]`` with RoPE, or ``None``.
            is_visual / is_text / valid: ``[B, L]`` bool; ``sizes`` / ``positions``: ``[B, N]``;
            raters: ``[B, L]`` bool, the text raters, or ``None``.

        Returns:
            ``((rows, features, keep, sizes, positions), result)``: the residual rows ``[B, K]``
            to overwrite with ``features`` ``[B, K, D]`` (the survivors, fused token included),
            the ``[B, L - removed]`` rows that go on to the next layer, the survivors' sizes and
            grid positions in sequence order, and the stage composition's own result.
        """
        l = residual.shape[1]
        candidates, probe, tokens = self._probe(num_visual, num_text, num_raters, scaling, residual, q, k, cos, sin,
                                                cached_keys, is_visual, is_text, valid, sizes, positions, raters)
        result = self.stage.reduction(tokens, probe, removed)
        survivors = candidates.gather(1, result.kept)
        if result.new_token_slot is not None:
            # inside the causal LLM a fused token takes the place (and position) of one source
            survivors = torch.cat([survivors, candidates.gather(1, result.new_token_slot[:, None])], dim=1)
        features = result.tokens.features[:, :survivors.shape[1]]
        keep_flags = (~is_visual).scatter(1, survivors, True)
        keep = first_k_true(keep_flags, l - (num_visual - survivors.shape[1]))
        order = survivors.argsort(dim=1)
        return (survivors, features, keep, result.tokens.sizes.gather(1, order),
                result.tokens.positions.gather(1, order)), result

    def _next_layer_projections(self, index: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys (before RoPE) that decoder layer ``index + 1`` computes from ``hidden``
        (layer ``index``'s output), with its own input norm, projections and per-head norms; the
        positions are the same rows', so the probe rotates them as it would this layer's."""
        layer = self.layers[index + 1]
        attn = layer.self_attn
        b, l, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(b, l, -1, attn.head_dim)
        k = attn.k_proj(x).view(b, l, -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k

    def _cached_keys(self, index: int, b: int, l: int, kv_heads: int, d: int) -> Tensor | None:
        """The layer's keys from its KV-cache entry (RoPE applied, ``[B, Hk, L, d]``) when the
        cache holds exactly this prefill, so the probe need not rotate them again."""
        layers = getattr(self.cache, "layers", None)
        if layers is None or index >= len(layers):
            return None
        keys = getattr(layers[index], "keys", None)
        if isinstance(keys, Tensor) and tuple(keys.shape) == (b, kv_heads, l, d):
            return keys
        return None

    def _rotation(self, position_embeddings: tuple[Tensor, Tensor], batch: int):
        """``rope(x, rows)`` for the probe, with the model's own ``apply_rotary_pos_emb``."""
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in position_embeddings)  # [B, L, d]

        def rope(x: Tensor, rows: Tensor | None) -> Tensor:
            c, s = (cos, sin) if rows is None else (gather_rows(cos, rows), gather_rows(sin, rows))
            return self.apply_rotary(x, x[:, :, :0], c, s, unsqueeze_dim=2)[0]  # an empty "k": rotate x only

        return rope

    def _ensure_token_state(self, seq: _Sequence, b: int, device) -> None:
        """Sizes and grid positions of the visual tokens entering the LLM, per sample in sequence
        order (``[B, max count]``): what the encoder left (its trace) or fresh tokens."""
        if seq.sizes is not None:
            return
        counts = [0] * b
        for group in seq.groups:
            for row in (group.row_list or range(b)):
                counts[row] = group.num_visual
        state = self.token_state(b, counts, device) if self.token_state is not None else None
        if state is None:
            n = max(counts)
            state = torch.ones(b, n, device=device), torch.full((b, n), NO_POSITION, dtype=torch.long, device=device)
        seq.sizes, seq.positions = state

    def _on_output(self, reduce):
        """A forward hook that runs ``reduce`` on the layer's output (after its MLP) and keeps the
        surviving rows (``reduce_at="output"``)."""
        def reduce_output(module, args, output):
            if self.seq is None or not self.seq.prefill:
                return None

            def reduced(hidden: Tensor) -> Tensor:
                hidden = hidden.clone()  # written in place below; the caller may hold the output
                reduce(None, (hidden,))
                return hidden

            output = replace_hidden_output(output, reduced)
            dropped = self._drop_rows(module, args, output)
            return output if dropped is None else dropped

        return reduce_output

    def _drop_rows(self, module, args, output):
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        keep, dead = pending
        self.seq.advance(keep, dead)
        return replace_hidden_output(output, lambda h: gather_rows(h, keep))

    # -- DeepStack (Qwen3-VL): visual features added to the first decoder layers' outputs ---------

    def deepstack_inputs(self, visual_mask: Tensor, embeds: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """The ``(visual_pos_masks, embeds)`` that DeepStack adds after decoder ``layer``, for the
        tokens that layer's output holds: the masks at the kept columns (dead rows excluded) and
        the embeds of the kept visual tokens, merged by every reduction so far exactly as the main
        visual tokens were (the same compress, split and correlation)."""
        seq = self.seq
        if seq is None or not seq.results:
            return visual_mask, embeds
        b, l = visual_mask.shape
        # the DeepStack features of each sample's visual tokens, in sequence order
        counts = visual_mask.sum(dim=1).tolist()
        width = max(counts)
        full = embeds.new_zeros(b, width, embeds.shape[-1])
        full[torch.arange(width, device=embeds.device)[None, :] < torch.tensor(counts, device=embeds.device)[:, None]] \
            = embeds
        tokens = full
        for results in seq.results[:seq.stage]:
            tokens = self._replay(tokens, results, b)
        kept_mask = visual_mask.gather(1, seq.orig_index) & seq.valid & seq.is_visual
        kept_counts = kept_mask.sum(dim=1)
        order = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < kept_counts[:, None]
        return kept_mask, tokens[order]

    def _replay(self, tokens: Tensor, results: list, b: int) -> Tensor:
        """``tokens`` (``[B, N, D]``, each sample's visual tokens in order) after one reduction, as
        each group's compress applied its split and correlation to the main tokens (samples that
        removed nothing there keep theirs). Sizes are taken as one each: no decoder-side method
        weighs merges by size."""
        replayed = tokens
        for group, result in results:
            n = result.kept.shape[1] + result.sources.shape[1]
            candidates = TokenGroup.fresh(group.take(tokens)[:, :n], self.grid)
            split = result.filter_result
            merged = self.stage.reduction.compress(candidates.select(split.targets), candidates.select(split.sources),
                                                   result.correlation).features
            slots = result.kept if result.new_token_slot is None else torch.cat(
                [result.kept, result.new_token_slot[:, None]], dim=1)
            merged = merged.gather(1, slots.argsort(dim=1)[..., None].expand(-1, -1, merged.shape[-1]))
            if group.rows is None:
                return merged
            if replayed is tokens:
                replayed = tokens.clone()
            rows = group.rows.to(tokens.device)
            replayed[rows] = torch.nn.functional.pad(merged, (0, 0, 0, tokens.shape[1] - merged.shape[1]))
        return replayed


def _mask_columns(mask: Tensor, key_valid: Tensor) -> Tensor:
    """``mask`` (``[B, H, Q, K]`` bool or additive float, or ``[B, K]``) with the keys where
    ``key_valid`` (``[B, K]``) is false masked out."""
    if mask.dim() == 2:
        return mask * key_valid.to(mask.dtype)
    valid = key_valid[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & valid
    return mask.masked_fill(~valid, torch.finfo(mask.dtype).min)
