"""ficoco's packed-tower hooks on vLLM's Qwen2.5-VL vision transformer (:mod:`.vllm_qwen`; imports
vLLM)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.layers.rotary_embedding.common import ApplyRotaryEmb

from ..adapters.hooks import HookSet
from ..adapters.packed_vision import PackedVisionSide


def _rotate_for_probe(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """vLLM's rotary function (NeoX halves, ``cos``/``sin`` ``[..., R, head_dim / 2]``) on queries
    and keys ``[..., R, H, head_dim]``, in float32 as the probe's statistics are computed."""
    return (ApplyRotaryEmb.forward_static(q, cos, sin, True, True),
            ApplyRotaryEmb.forward_static(k, cos, sin, True, True))


class VllmPackedVisionSide(PackedVisionSide):
    """ficoco's packed-tower hooks on vLLM's ``Qwen2_5_VisionTransformer``.

    Where vLLM's tower differs from transformers': the grids come as a list; the residual stream
    carries a batch axis of one (``[S, 1, D]``); ``qkv`` returns ``(out, bias)``; blocks take
    ``rotary_pos_emb_cos`` / ``rotary_pos_emb_sin`` (``[S, head_dim / 2]``), ``cu_seqlens``, a
    host-side ``max_seqlen`` and backend ``sequence_lengths``; and ``norm2`` adds the attention's
    output to the residual itself (``norm2(x, residual=x_attn)``), so the reduction sees that sum
    and hands ``norm2`` the reduced stream with a zero residual."""

    @staticmethod
    def _tower_shape(tower: nn.Module) -> tuple[int, int | None, int]:
        return tower.spatial_merge_size, tower.window_size, tower.patch_size

    @staticmethod
    def _rotary_function(tower: nn.Module):
        return _rotate_for_probe

    @staticmethod
    def _attention_shape(attn: nn.Module) -> tuple[int, float]:
        return attn.num_attention_heads_per_partition, attn.attn.scale

    def _start(self, grid_thw) -> None:
        super()._start(torch.as_tensor(grid_thw, dtype=torch.long, device=self.tower.device))

    def _window_index(self, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
        # the tower's own per-item windows, offset as its prepare_encoder_metadata offsets them
        indices, cu_parts, groups_before, patches_before = [], [torch.zeros(1, dtype=torch.int32)], 0, 0
        for t, h, w in grid_thw.tolist():
            index, cu = self.tower.get_window_index_thw(t, h, w)
            indices.append(index + groups_before)
            cu_parts.append(cu + patches_before)
            groups_before += t * (h // self.merge) * (w // self.merge)
            patches_before = int(cu_parts[-1][-1])
        return torch.cat(indices), torch.unique_consecutive(torch.cat(cu_parts))

    def _keep_qkv(self, module, args, output) -> None:
        if self.groups is not None:
            self.qkv = output[0] if isinstance(output, tuple) else output  # [S, 1, 3 x heads x head_dim]

    def install(self, hooks: HookSet) -> None:
        """The hooks, on modules vLLM calls through ``nn.Module.__call__``: its blocks and merger
        are ``support_torch_compile`` classes whose ``__call__`` runs ``forward`` without hooks,
        so the block inputs are set on each block's ``attn``, rows are dropped in the reducing
        block's ``norm2`` pre-hook (the MLP then runs on the kept rows only), an output reduction
        (VisionZip's place) runs on the merger's ``ln_q`` input and the merged tokens are laid out
        from the merger's ``mlp``."""
        if not self.blocks:
            return
        if self.tower.blocks[0].attn.tp_size != 1:
            # each rank would score with its own heads and keep different tokens
            raise ValueError("ficoco: the vision tower is split over tensor-parallel ranks; serve Qwen2.5-VL with "
                             "a reduction on one rank")
        last = len(self.tower.blocks) - 1
        if self.stage.reduce_at == "output" and self.blocks != {last}:
            raise ValueError(f"ficoco: {type(self.stage.reduction.filter).__name__} reduces a block's output, which "
                             f"this plugin does in vLLM's Qwen2.5 tower only after its last block ({last}), not in "
                             f"blocks {sorted(self.blocks - {last})}")
        hooks.pre(self.tower, self._start_call, with_kwargs=True)
        first = min(self.blocks)
        for index, block in enumerate(self.tower.blocks):
            if index >= first:
                hooks.pre(block.attn, self._block_inputs(index), with_kwargs=True)
            if index in self.blocks:
                hooks.post(block.attn.qkv, self._keep_qkv)
                reduce = self._reducer(index, block.attn)
                if self.stage.reduce_at == "output":
                    hooks.pre(self.tower.merger.ln_q, self._on_merger_input(reduce))
                else:
                    hooks.pre(block.norm2, self._after_attention(reduce), with_kwargs=True)
        hooks.post(self.tower.merger.mlp, self._scatter_merged)
        hooks.post(self.tower, self._finish_call)

    def _after_attention(self, reduce):
        def reduce_sum(module, args, kwargs):
            residual = kwargs.get("residual")
            if residual is None or self.groups is None:
                return None
            stream = args[0] + residual  # what norm2 adds: the residual stream after attention
            reduce(module, (stream,))
            if self.pending_keep is None:  # this block did not reduce: norm2 adds as it does
                return None
            stream = self._drop_rows(module, args, stream)
            return (stream,), {**kwargs, "residual": torch.zeros_like(stream)}

        return reduce_sum

    def _on_merger_input(self, reduce):
        on_output = self._on_output(reduce)

        def reduce_output(module, args):
            out = on_output(module, args, args[0])
            return None if out is None else (out,)

        return reduce_output

    def _block_inputs(self, index: int):
        def set_block_inputs(module, args, kwargs):
            if self.groups is None:
                return None
            if self.rope is None:
                self.rope = (kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"])
            if self.reduced:
                full = self.full_attention is None or index in self.full_attention
                if full not in self.stage_kwargs:
                    self.stage_kwargs[full] = self._current_inputs(full)
                cu_seqlens, max_seqlen, lengths, (cos, sin) = self.stage_kwargs[full]
                kwargs.update(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, sequence_lengths=lengths,
                              rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin)
            if index in self.blocks:
                self.block_rope = (kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"])
            return args, kwargs

        return set_block_inputs

    def _current_inputs(self, full: bool) -> tuple:
        """``cu_seqlens``, ``max_seqlen``, ``sequence_lengths`` (per frame, or per window) and the
        rotary tables of the current rows, as the tower's ``prepare_encoder_metadata`` makes them."""
        segments = self.groups.segment if full or self.groups.window is None else self.groups.window
        _, counts = torch.unique_consecutive(segments, return_counts=True)
        cu = np.concatenate([[0], np.cumsum((counts * self.group).cpu().numpy())]).astype(np.int32)
        tower, device = self.tower, self.groups.seq.device
        rows = (self.groups.seq[:, None] * self.group + torch.arange(self.group, device=device)).flatten()
        rope = tuple(x.index_select(0, rows.to(x.device)) for x in self.rope)
        max_seqlen = torch.tensor(MMEncoderAttention.compute_max_seqlen(tower.attn_backend, cu), dtype=torch.int32)
        lengths = MMEncoderAttention.maybe_compute_seq_lens(tower.attn_backend, cu, device)
        cu_seqlens = MMEncoderAttention.maybe_recompute_cu_seqlens(
            tower.attn_backend, cu, tower.hidden_size, tower.tp_size, device,
            fp8_padded_hidden_size=tower.fp8_padded_hidden_size)
        return cu_seqlens, max_seqlen, lengths, rope
