"""Running a :class:`~ficoco.methods.VisionReduction` inside a CLIP/SigLIP vision encoder.

Hooks, all on the attached model's own modules and removed on detach:

- ``q_proj`` / ``k_proj`` forward hooks of each reducing layer keep that layer's queries and keys
  (the attention itself stays SDPA); a reduction that scores with the next layer
  (``score_with_next_layer``, PruMerge) computes that layer's input norm, queries and keys of the
  output instead;
- a forward pre-hook on the layer's ``layer_norm2`` runs the reduction on the residual stream after
  self-attention: merged targets are written back into that tensor, which the layer also holds as
  its MLP residual, and the order of survivors is remembered (with ``reduce_at="output"`` the
  reduction runs instead in a forward hook on the layer's output, after its MLP);
- a forward hook on the layer (placed first) keeps only the surviving rows of the layer's output,
  so later layers, ``output_hidden_states`` and LLaVA's feature selection all see the shorter
  sequence;
- with proportional attention, a forward pre-hook on each later layer passes ``log(size)`` of every
  key as an additive attention mask.

Per-call state (sizes, grid positions) lives on this object and is reset by a pre-hook on the
first encoder layer at the start of every image batch.

An adaptive reduction (the filter decides each image's count: PruMerge's outliers) reduces the
images that keep the same count together and the others one at a time; the batch stays
rectangular, each image's row holding its own tokens first and then rows that only pad it
(:attr:`VisionTrace.counts` says how many are real), which the family adapter cuts away before
the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..methods import VisionReduction
from ..stages import NO_POSITION, AttentionProbe, ReductionResult, TokenGroup
from ..stages.tokens import gather_rows
from .hooks import HookSet, host_to_device, replace_hidden_output, write_rows


@dataclass
class VisionTrace:
    """What the encoder did to one batch of images.

    Attributes:
        positions: ``[B, N']`` raster position of each token handed on, in the order handed on
            (raster order unless the method reorders, as ToMe's official alternation does; -1
            for fused tokens).
        sizes: ``[B, N']`` patches each of them stands for.
        steps: per reducing layer, ``(layer, ReductionResult)`` when recording is on (an adaptive
            reduction whose images keep different counts records one entry per image).
        counts: ``[B]`` tokens each image really hands on, for an adaptive reduction (the rest of
            its row pads the batch: position -1, size 0); ``None`` when all hand on ``N'``.
    """

    positions: Tensor
    sizes: Tensor
    steps: list[tuple[int, ReductionResult]]
    counts: Tensor | None = None


class VisionSide:
    """Hooks a vision reduction into the ``encoder_layers`` of a CLIP or SigLIP tower."""

    def __init__(
        self,
        encoder_layers: nn.ModuleList,
        stage: VisionReduction,
        removals: dict[int, int],
        *,
        grid: tuple[int, int],
        has_cls: bool,
        record: bool = False,
    ) -> None:
        self.layers, self.stage = encoder_layers, stage
        self.removals, self.grid, self.has_cls, self.record = removals, grid, has_cls, record
        self.offset = 1 if has_cls else 0
        self._reset()
        self.last: VisionTrace | None = None

    def _reset(self) -> None:
        self.sizes: Tensor | None = None  # [B, N] of the current candidates
        self.positions: Tensor | None = None
        self.queries: Tensor | None = None
        self.keys: Tensor | None = None
        self.pending_keep: Tensor | None = None
        self.counts: Tensor | None = None
        self.steps: list[tuple[int, ReductionResult]] = []

    # -- installation ---------------------------------------------------------------------------

    def install(self, hooks: HookSet) -> None:
        if not self.removals:
            return
        # per-forward state is reset at the first encoder layer (not on the tower module, whose hooks
        # do not run when its forward is called directly, e.g. while capturing a CUDA graph)
        hooks.pre(self.layers[0], self._start_batch)
        first = min(self.removals)
        for index, layer in enumerate(self.layers):
            if self.stage.proportional_attention and index > first:
                self._install_size_bias(hooks, layer)
            if index in self.removals:
                attn = layer.self_attn
                if self.stage.score_with_next_layer:
                    if index + 1 >= len(self.layers):
                        raise ValueError(f"the reduction scores with the encoder layer after layer {index}, which is "
                                         f"the last one here: give score_with_next_layer=False")
                else:
                    self._install_query_key_capture(hooks, attn)
                reduce = self._reducer(index, self.removals[index], attn)
                if self.stage.reduce_at == "output":
                    hooks.post(layer, self._on_output(reduce), prepend=True)
                else:
                    hooks.pre(layer.layer_norm2, reduce)
                    hooks.post(layer, self._drop_rows, prepend=True)
        hooks.post(self.layers[-1], self._finish_batch)

    def _install_query_key_capture(self, hooks: HookSet, attn: nn.Module) -> None:
        """Keep the queries and keys ``[B, L, heads x head_dim]`` of a reducing layer's attention
        (overridden for towers that fuse q, k and v into one projection: serving/vllm_llava.py)."""
        hooks.post(attn.q_proj, self._keep_queries)
        hooks.post(attn.k_proj, self._keep_keys)

    def _install_size_bias(self, hooks: HookSet, layer: nn.Module) -> None:
        """Make ``layer``'s attention add :meth:`_key_bias` to its logits (proportional attention;
        overridden for layers that take no attention mask)."""
        hooks.pre(layer, self._size_bias, with_kwargs=True)

    # -- hooks ----------------------------------------------------------------------------------

    def _start_batch(self, module, args) -> None:
        self._reset()

    def _finish_batch(self, module, args, output) -> None:
        if self.sizes is not None:
            self.last = VisionTrace(self.positions, self.sizes, self.steps, self.counts)
        self._reset()

    def _keep_queries(self, module, args, output) -> None:
        self.queries = output

    def _keep_keys(self, module, args, output) -> None:
        self.keys = output

    def _ensure_state(self, hidden: Tensor) -> None:
        if self.sizes is not None:
            return
        b, l, _ = hidden.shape
        n = l - self.offset
        if n != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"the vision encoder produced {n} patch tokens, not the {self.grid[0]}x{self.grid[1]} grid "
                f"its config describes: non-square or resized images are not supported"
            )
        self.sizes = torch.ones(b, n, device=hidden.device, dtype=torch.float32)
        self.positions = torch.arange(n, device=hidden.device).expand(b, n)

    def _key_bias(self) -> Tensor | None:
        """``[B, L]`` log-size of every key ([CLS] has size 1) when proportional attention is on."""
        if not self.stage.proportional_attention or self.sizes is None:
            return None
        bias = self.sizes.log()
        if self.has_cls:
            bias = torch.cat([bias.new_zeros(bias.shape[0], 1), bias], dim=1)
        return bias

    def _size_bias(self, module, args, kwargs):
        bias = self._key_bias()
        if bias is None:
            return None
        hidden = args[0]
        mask = bias.to(hidden.dtype)[:, None, None, :]
        if len(args) > 1:
            existing = args[1]
            args = (args[0], mask if existing is None else existing + mask, *args[2:])
        else:
            existing = kwargs.get("attention_mask")
            kwargs["attention_mask"] = mask if existing is None else existing + mask
        return args, kwargs

    def _reducer(self, index: int, count: int, attn: nn.Module):
        def reduce_after_attention(module, args) -> None:
            residual = args[0]  # [B, L, D]: the layer's residual stream after self-attention (or its output)
            self._ensure_state(residual)
            b, l, _ = residual.shape
            if self.stage.score_with_next_layer:
                scoring = self.layers[index + 1].self_attn
                x = self.layers[index + 1].layer_norm1(residual)
                queries, keys = scoring.q_proj(x), scoring.k_proj(x)
            else:
                scoring, queries, keys = attn, self.queries, self.keys
            self.queries = self.keys = None
            heads, head_dim = scoring.num_heads, scoring.head_dim
            n = l - self.offset
            candidates = torch.arange(self.offset, l, device=residual.device).expand(b, n)
            q, k, bias = queries.view(b, l, heads, head_dim), keys.view(b, l, heads, head_dim), self._key_bias()

            def probe(rows: slice) -> AttentionProbe:
                return AttentionProbe(q[rows], k[rows], scoring.scale, candidates[rows],
                                      cls_index=0 if self.has_cls else None,
                                      key_bias=None if bias is None else bias[rows])

            whole = probe(slice(None))
            tokens = TokenGroup(residual[:, self.offset:], self.sizes, self.positions, self.grid)
            reduction = self.stage.reduction
            removals = [count] * b
            if self.stage.adaptive:  # the filter's counts: one host sync, as the shapes depend on them
                if residual.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise ValueError("an adaptive reduction decides its shapes from the data, which a CUDA graph cannot "
                                     "replay: give the method a retain budget to graph the tower")
                removals = reduction.adaptive_removals(tokens, whole).tolist()
            if len(set(removals)) == 1:
                parts = [(slice(None), reduction(tokens, whole, removals[0]))]
            else:  # the images keep different counts: one at a time, each row padded below
                parts = []
                for row, removed in enumerate(removals):
                    rows = slice(row, row + 1)
                    alone = TokenGroup(tokens.features[rows], tokens.sizes[rows], tokens.positions[rows], self.grid)
                    parts.append((rows, reduction(alone, probe(rows), removed)))
            orders, sizes, positions = [], [], []
            for rows, result in parts:
                order = self._write(residual[rows], candidates[rows], result)  # a view: writes land in `residual`
                orders.append(order)
                sizes.append(result.tokens.sizes)
                positions.append(result.tokens.positions)
                if self.record:
                    self.steps.append((index, result))
            if self.stage.adaptive:
                self.counts = host_to_device([order.shape[1] - self.offset for order in orders], residual.device)
            width = max(order.shape[1] for order in orders)
            for i, (rows, result) in enumerate(parts):
                pad = width - orders[i].shape[1]
                if pad:  # rows that only pad the batch: discarded tokens' rows, size 0, no position
                    dead = candidates[rows].gather(1, result.sources[:, 1:1 + pad])
                    orders[i] = torch.cat([orders[i], dead], dim=1)
                    sizes[i] = torch.cat([sizes[i], sizes[i].new_zeros(1, pad)], dim=1)
                    positions[i] = torch.cat([positions[i], positions[i].new_full((1, pad), NO_POSITION)], dim=1)
            self.pending_keep = torch.cat(orders)
            self.sizes, self.positions = torch.cat(sizes), torch.cat(positions)

        return reduce_after_attention

    def _write(self, residual: Tensor, candidates: Tensor, result: ReductionResult) -> Tensor:
        """Write ``result``'s surviving features into their rows of ``residual`` (``[B', L, D]``)
        and return ``[B', offset + N']`` the rows to hand on, in order."""
        b = residual.shape[0]
        # in the filter's order: ascending, except ToMe's official [unmerged A, B] and PruMerge's
        # official attention order, which the rows kept below (and so later layers and the LLM) follow
        kept_rows = candidates.gather(1, result.kept)
        num_kept = kept_rows.shape[1]
        write_rows(residual, kept_rows, result.tokens.features[:, :num_kept])
        order = [torch.arange(self.offset, device=residual.device).expand(b, self.offset), kept_rows]
        if result.new_token_slot is not None:
            slot = (self.offset + result.new_token_slot)[:, None]
            write_rows(residual, slot, result.tokens.features[:, num_kept:])
            order.append(slot)  # the fused token goes after every kept token (EViT, PruMerge)
        return torch.cat(order, dim=1)

    def _on_output(self, reduce):
        """A forward hook that runs ``reduce`` on the layer's output (after its MLP) and keeps the
        surviving rows."""
        def reduce_output(module, args, output):
            def reduced(hidden: Tensor) -> Tensor:
                hidden = hidden.clone()  # the output may be a view the caller keeps (hidden_states)
                reduce(None, (hidden,))
                keep, self.pending_keep = self.pending_keep, None
                return gather_rows(hidden, keep)

            return replace_hidden_output(output, reduced)

        return reduce_output

    def _drop_rows(self, module, args, output):
        keep, self.pending_keep = self.pending_keep, None
        if keep is None:
            return None
        return replace_hidden_output(output, lambda h: gather_rows(h, keep))
