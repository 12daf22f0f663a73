"""Running a :class:`~ficoco.methods.LanguageReduction` inside the LLM decoder of a LLaVA model.

The decoder's hidden states get shorter mid-model. What every later layer needs is rebuilt from the
model's own tensors by gathering, never by re-implementing a layer:

- the attention mask the model built for the full sequence: rows and columns of the kept tokens
  (prefill), or columns of the kept prompt tokens plus all generated ones (decoding, where each
  layer's KV cache holds only what that layer saw);
- RoPE ``(cos, sin)`` and ``position_ids`` at the kept rows, so every kept token keeps its
  original position; generated tokens continue from the full prompt length;
- the KV cache itself needs nothing: each layer appends what it computes, so cache lengths differ
  per layer and the gathered masks match them.

Hooks per reducing layer: ``q_proj`` / ``k_proj`` outputs are kept, RoPE is applied to them with the
model's own ``apply_rotary_pos_emb``, a pre-hook on ``post_attention_layernorm`` reduces the
residual stream in place and a forward hook keeps only the surviving rows. A pre-hook on the LLaVA
model marks each forward as prefill (empty cache: locate image tokens, text queries, padding) or
decoding (reuse the prefill's bookkeeping).
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
from ..stages.tokens import gather_rows
from .hooks import HookSet, replace_hidden_output, write_rows


def _first_k_true(flags: Tensor, k: int) -> Tensor:
    """``[B, k]`` ascending indices of the first ``k`` true entries of each row of ``flags`` ``[B, L]``
    (rows hold at least ``k`` true entries), with no host sync."""
    return torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :k]


@dataclass
class _Sequence:
    """Bookkeeping of one batch of prompts, built at prefill and reused while decoding.

    All ``[B, L_cur]`` tensors describe the *current* (possibly reduced) sequence.
    """

    prefill_len: int
    images_per_sample: int
    num_visual: int  # per sample, current
    num_text: int  # max text queries after the image, per sample
    is_visual: Tensor
    is_text: Tensor
    valid: Tensor
    orig_index: Tensor  # original column of each current token
    stage_index: list[Tensor] = field(default_factory=list)  # orig_index after each reduction
    layer_stage: dict[int, int] = field(default_factory=dict)
    prefill: bool = True
    step_inputs: dict[int, tuple] = field(default_factory=dict)  # per stage, for the current forward
    sizes: Tensor | None = None
    positions: Tensor | None = None
    steps: list[tuple[int, ReductionResult]] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return len(self.stage_index)

    def advance(self, keep: Tensor) -> None:
        self.is_visual = self.is_visual.gather(1, keep)
        self.is_text = self.is_text.gather(1, keep)
        self.valid = self.valid.gather(1, keep)
        self.orig_index = self.orig_index.gather(1, keep)
        self.stage_index.append(self.orig_index)


class LanguageSide:
    """Hooks a language-side reduction into the decoder layers of a LLaVA model."""

    def __init__(
        self,
        llava_model: nn.Module,
        stage: LanguageReduction,
        removals: dict[int, int],
        *,
        visual_per_image: int,
        grid: tuple[int, int],
        vision_trace: Callable[[], object] | None = None,
        record: bool = False,
    ) -> None:
        self.llava, self.stage, self.removals = llava_model, stage, removals
        self.layers = llava_model.language_model.layers
        self.visual_per_image, self.grid = visual_per_image, grid
        self.vision_trace, self.record = vision_trace, record
        self.image_token_id = llava_model.config.image_token_id
        self.signature = inspect.signature(type(llava_model).forward)
        self.seq: _Sequence | None = None
        self.queries: Tensor | None = None
        self.keys: Tensor | None = None
        self.rope: tuple[Tensor, Tensor] | None = None
        self.cache = None
        self.pending_keep: Tensor | None = None
        self.step_graphs = None  # a CapturedCalls while graph_language_steps is in effect
        attn = self.layers[0].self_attn
        module = sys.modules[type(attn).__module__]
        self.apply_rotary = getattr(module, "apply_rotary_pos_emb", None)
        if self.apply_rotary is None:
            raise TypeError(f"{type(attn).__name__} has no apply_rotary_pos_emb next to it: unsupported decoder")

    # -- installation ---------------------------------------------------------------------------

    def install(self, hooks: HookSet) -> None:
        if not self.removals:
            return
        hooks.pre(self.llava, self._start_forward, with_kwargs=True)
        first = min(self.removals)
        for index, layer in enumerate(self.layers):
            if index >= first:
                hooks.pre(layer, self._layer_inputs(index), with_kwargs=True)
            if index in self.removals:
                hooks.post(layer.self_attn.q_proj, self._keep_queries)
                hooks.post(layer.self_attn.k_proj, self._keep_keys)
                hooks.pre(layer.post_attention_layernorm, self._reducer(index, self.removals[index], layer.self_attn))
                hooks.post(layer, self._drop_rows, prepend=True)

    @property
    def kept_index(self) -> Tensor | None:
        """``[B, L']`` original column of every token the last prefill's final layers saw."""
        return None if self.seq is None else self.seq.orig_index

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
            if step.shape[1] > 1 and bool(self._image_positions(input_ids, embeds).any()):
                raise ValueError("image tokens after a filled cache: start a new prompt with an empty cache")
            self.seq.prefill = False
            self.seq.step_inputs = {}
            return
        self.seq = self._new_sequence(self._image_positions(input_ids, embeds), bound.get("attention_mask"))

    def _image_positions(self, input_ids: Tensor | None, embeds: Tensor | None) -> Tensor:
        if input_ids is not None:
            return input_ids == self.image_token_id
        table = self.llava.get_input_embeddings()
        token = table(torch.tensor(self.image_token_id, device=embeds.device))
        return (embeds == token.to(embeds.dtype)).all(dim=-1)

    def _new_sequence(self, is_visual: Tensor, attention_mask: Tensor | None) -> _Sequence | None:
        b, l = is_visual.shape
        counts = is_visual.sum(dim=1).tolist()  # one host sync per prefill
        if max(counts) == 0:
            return None  # text-only prompt: nothing to reduce
        if len(set(counts)) != 1:
            raise ValueError(
                f"decoder-side reduction needs the same number of image tokens in every sample, got {counts}"
            )
        images, rest = divmod(counts[0], self.visual_per_image)
        if rest:
            raise ValueError(
                f"{counts[0]} image tokens per sample is not a whole number of images of {self.visual_per_image} tokens"
            )
        device = is_visual.device
        valid = torch.ones(b, l, dtype=torch.bool, device=device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.bool()
        columns = torch.arange(l, device=device)
        last_visual = torch.where(is_visual, columns, -1).amax(dim=1, keepdim=True)
        is_text = valid & (columns > last_visual)
        num_text = int(is_text.sum(dim=1).max())
        return _Sequence(
            prefill_len=l, images_per_sample=images, num_visual=counts[0], num_text=num_text,
            is_visual=is_visual, is_text=is_text, valid=valid, orig_index=columns.expand(b, l),
        )

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
                    seq.step_inputs[stage] = self._stage_inputs(seq, seq.stage_index[stage - 1], kwargs)
                mask, rope, position_ids = seq.step_inputs[stage]
                kwargs["attention_mask"] = mask
                if rope is not None:
                    kwargs["position_embeddings"] = rope
                if position_ids is not None:
                    kwargs["position_ids"] = position_ids
            if index in self.removals:
                self.rope = kwargs.get("position_embeddings")
                self.cache = kwargs.get("past_key_values", kwargs.get("cache"))
            return args, kwargs

        return gather_layer_inputs

    def _stage_inputs(self, seq: _Sequence, kept: Tensor, kwargs: dict) -> tuple:
        """Mask, RoPE and position ids for a layer whose cache holds the prompt columns ``kept``."""
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
            if rope is not None:
                rope = tuple(gather_rows(x.expand(b, *x.shape[1:]), kept) for x in rope)
            if position_ids is not None:
                position_ids = position_ids.expand(b, -1).gather(1, kept)
        elif mask is not None:
            total = mask.shape[-1]
            generated = torch.arange(seq.prefill_len, total, device=kept.device).expand(b, -1)
            cols = torch.cat([kept, generated], dim=1)
            mask = mask.expand(b, *mask.shape[1:])
            if mask.dim() == 4:
                mask = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
            else:
                mask = mask.gather(1, cols)
        return mask, rope, position_ids

    def _keep_queries(self, module, args, output) -> None:
        if self.seq is not None and self.seq.prefill:
            self.queries = output

    def _keep_keys(self, module, args, output) -> None:
        if self.seq is not None and self.seq.prefill:
            self.keys = output

    def _reducer(self, index: int, count: int, attn: nn.Module):
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
            cos, sin = self.rope
            inputs = (residual, q.view(b, l, heads, d), k.view(b, l, kv_heads, d), cos, sin,
                      self._cached_keys(index, b, l, kv_heads, d),
                      seq.is_visual, seq.is_text, seq.valid, seq.sizes, seq.positions)
            removed = count * seq.images_per_sample
            step = partial(self._reduction_step, removed, seq.num_visual, seq.num_text, attn.scaling)
            graphs = self.step_graphs
            # a named range, so that a profiler can tell the step's own host and device time apart
            with torch.profiler.record_function("ficoco.language_step"):
                if graphs is not None and residual.is_cuda and not self.record and not torch.is_grad_enabled():
                    key = (index, removed, seq.num_visual, seq.num_text)
                    outputs, result = graphs(key, lambda *x: step(*x)[0], *inputs), None
                else:
                    outputs, result = step(*inputs)
            rows, features, keep, sizes, positions = outputs
            write_rows(residual, rows, features)
            self.pending_keep = keep
            seq.sizes, seq.positions, seq.num_visual = sizes, positions, rows.shape[1]
            if self.record:
                seq.steps.append((index, result))

        return reduce_after_attention

    def _reduction_step(
        self, removed: int, num_visual: int, num_text: int, scaling: float,
        residual: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, cached_keys: Tensor | None,
        is_visual: Tensor, is_text: Tensor, valid: Tensor, sizes: Tensor, positions: Tensor,
    ) -> tuple[tuple[Tensor, ...], ReductionResult]:
        """One decoder-side reduction: a pure function of tensors with no host sync, so that it can
        be replayed as a CUDA graph.

        Args:
            removed: visual tokens to remove per sample; ``num_visual`` / ``num_text``: visual
                tokens and (max) text queries after the image, per sample, before this step.
            residual: ``[B, L, D]`` residual stream after self-attention; ``q`` ``[B, L, H, d]``,
                ``k`` ``[B, L, Hk, d]`` before RoPE; ``cos``/``sin`` ``[1 or B, L, d]``;
                ``cached_keys`` ``[B, Hk, L, d]`` with RoPE, or ``None``.
            is_visual / is_text / valid: ``[B, L]`` bool; ``sizes`` / ``positions``: ``[B, N]``.

        Returns:
            ``((rows, features, keep, sizes, positions), result)``: the residual rows ``[B, K]``
            to overwrite with ``features`` ``[B, K, D]`` (the survivors, fused token included),
            the ``[B, L - removed]`` rows that go on to the next layer, the survivors' sizes and
            grid positions in sequence order, and the stage composition's own result.
        """
        b, l, _ = residual.shape
        candidates = _first_k_true(is_visual, num_visual)
        text_rows = _first_k_true(is_text, num_text)
        last_row = torch.where(valid, torch.arange(l, device=residual.device), -1).amax(dim=1)
        probe = AttentionProbe(
            q, k, scaling, candidates,
            key_valid=valid, causal=True,
            text_rows=text_rows, text_valid=is_text.gather(1, text_rows), last_row=last_row,
            rope=self._rotation((cos, sin), b), attended_keys=cached_keys,
        )
        tokens = TokenGroup(gather_rows(residual, candidates), sizes, positions, self.grid)
        result = self.stage.reduction(tokens, probe, removed)
        survivors = candidates.gather(1, result.kept)
        if result.new_token_slot is not None:
            # inside the causal LLM a fused token takes the place (and position) of one source
            survivors = torch.cat([survivors, candidates.gather(1, result.new_token_slot[:, None])], dim=1)
        features = result.tokens.features[:, :survivors.shape[1]]
        keep_flags = (~is_visual).scatter(1, survivors, True)
        keep = _first_k_true(keep_flags, l - (num_visual - survivors.shape[1]))
        order = survivors.argsort(dim=1)
        return (survivors, features, keep, result.tokens.sizes.gather(1, order),
                result.tokens.positions.gather(1, order)), result

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
        if seq.sizes is not None:
            return
        trace = self.vision_trace() if self.vision_trace is not None else None
        n = seq.num_visual
        if trace is not None and trace.sizes.numel() == b * n:
            seq.sizes = trace.sizes.reshape(b, n).to(device)
            seq.positions = trace.positions.reshape(b, n).to(device)
            return
        seq.sizes = torch.ones(b, n, device=device)
        within_image = torch.arange(n, device=device) % self.visual_per_image
        if self.visual_per_image != self.grid[0] * self.grid[1]:
            within_image = torch.full_like(within_image, NO_POSITION)  # not a full grid: no positions
        seq.positions = within_image.expand(b, n)

    def _drop_rows(self, module, args, output):
        keep, self.pending_keep = self.pending_keep, None
        if keep is None:
            return None
        self.seq.advance(keep)
        return replace_hidden_output(output, lambda h: gather_rows(h, keep))
