"""Attention statistics for the stages, computed from queries and keys at the cost each one needs.

The model's own attention runs through SDPA and never hands out its ``[B, H, L, L]`` map. The
stages need far less than that map: a row for [CLS], a row per discarded token, the rows of the
text queries, or a mean over keys. :class:`AttentionProbe` computes exactly those from the layer's
queries and keys (captured at the projections, with RoPE applied where the model applies it), and
caches each statistic so that filter and correlate can share it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from .tokens import gather_rows


def head_mean_softmax(logits: Tensor) -> Tensor:
    """``[B, Hk, G, R, L]`` logits (masked keys at ``-inf``) → ``[B, R, L]`` float32: the mean over
    the ``Hk * G`` heads of each head's softmax row; rows that see no key are zero."""
    return torch.softmax(logits, dim=-1, dtype=torch.float32).nan_to_num(0.0).mean(dim=(1, 2))


@functools.cache
def compiled(fn: Callable, backend: str) -> Callable:
    """``fn`` through ``torch.compile(dynamic=True, backend=backend)``, built once per function and
    backend in a process (the functions are pure, so the cache holds nothing that could go stale).
    With :func:`head_mean_softmax`: one fused pass over the logits instead of a float32 copy of
    the probabilities written and read again."""
    return torch.compile(fn, dynamic=True, backend=backend)


@functools.cache
def triton_installed() -> bool:
    """Whether the triton package can be imported (looked up once: the statistics ask per call)."""
    return importlib.util.find_spec("triton") is not None


def compiled_head_mean_softmax(backend: str) -> Callable[[Tensor], Tensor]:
    """:func:`head_mean_softmax`, compiled (:func:`compiled`)."""
    return compiled(head_mean_softmax, backend)


class AttentionProbe:
    """Lazily computed, head-averaged attention statistics of one layer.

    Args:
        queries: ``[B, L, H, d]`` queries of the whole current sequence (RoPE applied if any).
        keys: ``[B, L, Hk, d]`` keys (``H`` a multiple of ``Hk``: grouped-query attention).
        scale: softmax scale of the layer (``d ** -0.5`` for CLIP and Llama).
        candidates: ``[B, N]`` sequence indices of the candidate (visual) tokens; ``None``: every
            key is a candidate, in sequence order (an encoder's tokens), so that statistics over
            the candidates need no gathered copy of their columns.
        cls_index: sequence index of [CLS] if the encoder has one.
        key_bias: ``[B, L]`` added to every query's logits before softmax (proportional attention's
            ``log(size)``), as the layer's attention did.
        key_valid: ``[B, L]`` bool, ``False`` for padding keys.
        causal: keys after the query are masked (decoder self-attention).
        text_rows: ``[B, M]`` sequence indices of the text queries that follow the image.
        text_valid: ``[B, M]`` bool, which of ``text_rows`` are real (samples differ in length).
        last_row: ``[B]`` sequence index of each sample's last real token.
        rope: ``rope(x, rows)`` applies the layer's rotary embedding to ``x`` ``[B, R, heads, d]``
            taken at sequence rows ``rows`` ``[B, R]`` (``None``: all rows in order). Queries and
            keys are given before RoPE and rotated only where a statistic needs them.
        attended_keys: ``[B, Hk, L, d]`` the keys exactly as the attention used them (RoPE
            applied), when already at hand (the layer's KV-cache entry), so they need no work.
        hidden: ``[B, L, D]`` the sequence's hidden states at the reduction point (inside the
            LLM), for stages that compare tokens' states with text tokens' (DART's text pivots).
        hidden_weight: ``[D]`` the elementwise weight of the decoder's final norm, which a
            cosine of normed hidden states keeps (the norm's 1/RMS cancels in a cosine).
        rater_rows: ``[B, R]`` sequence indices of the text tokens that rate the visual tokens
            (SparseVLM's raters, :class:`~ficoco.stages.TextRaters`).
        rater_valid: ``[B, R]`` bool, which of ``rater_rows`` are real (samples have different
            numbers of raters); a sample with none is rated by its ``last_row``.
        row_logsumexp: ``[B, H, L]`` float32, each query row's ``log sum_l exp(q . k_l * scale)``
            over every key, natural log, as the layer's own attention computed it (flash attention
            returns it beside its output); only for attention without key bias or mask. The fused
            statistics then skip their first pass over the keys.
        compile_backend: the fast statistics path, on CUDA: head-averaged softmax rows of
            non-causal attention as the Triton kernels of :mod:`.attention_kernels` (the logits
            never in memory; where Triton is installed), else as
            :func:`compiled_head_mean_softmax` of this ``torch.compile`` backend (``None``: eagerly,
            the reference). The adapters pass it where the user compiled the model's blocks
            (``fast_vision_attention(..., compile_blocks=True)``).
    """

    def __init__(
        self,
        queries: Tensor,
        keys: Tensor,
        scale: float,
        candidates: Tensor | None,
        *,
        cls_index: int | None = None,
        key_bias: Tensor | None = None,
        key_valid: Tensor | None = None,
        causal: bool = False,
        text_rows: Tensor | None = None,
        text_valid: Tensor | None = None,
        last_row: Tensor | None = None,
        rope: Callable[[Tensor, Tensor | None], Tensor] | None = None,
        attended_keys: Tensor | None = None,
        hidden: Tensor | None = None,
        hidden_weight: Tensor | None = None,
        rater_rows: Tensor | None = None,
        rater_valid: Tensor | None = None,
        row_logsumexp: Tensor | None = None,
        compile_backend: str | None = None,
    ) -> None:
        b, l, h, d = queries.shape
        hk = keys.shape[2]
        if h % hk:
            raise ValueError(f"{h} query heads cannot share {hk} key heads")
        self.queries, self.keys, self.scale = queries, keys, scale
        self.every_key = candidates is None
        if candidates is None:
            candidates = torch.arange(l, device=queries.device).expand(b, l)
        self.candidates = candidates
        self.cls_index, self.key_bias, self.key_valid, self.causal = cls_index, key_bias, key_valid, causal
        self.text_rows, self.text_valid, self.last_row = text_rows, text_valid, last_row
        self.rope = rope
        self.hidden, self.hidden_weight = hidden, hidden_weight
        self.rater_rows, self.rater_valid = rater_rows, rater_valid
        self.compile_backend = compile_backend
        if row_logsumexp is not None and (key_bias is not None or key_valid is not None or causal):
            raise ValueError("row_logsumexp is the attention's own row statistic: only for attention without key "
                             "bias, key mask or causal mask")
        self.row_logsumexp = row_logsumexp
        if attended_keys is not None:
            self.__dict__["head_major_keys"] = attended_keys  # pre-fills the cached property

    @property
    def num_candidates(self) -> int:
        return self.candidates.shape[1]

    # -- rotated queries and keys -----------------------------------------------------------------

    @cached_property
    def rotated_queries(self) -> Tensor:
        """``[B, L, H, d]`` queries as the attention used them (rotated once, then indexed)."""
        return self.queries if self.rope is None else self.rope(self.queries, None)

    def query_rows(self, rows: Tensor) -> Tensor:
        """``[B, R, H, d]`` queries at sequence rows ``rows``, rotated if the layer uses RoPE."""
        return gather_rows(self.rotated_queries, rows)

    @cached_property
    def _masked_keys(self) -> Tensor | None:
        """``[B, 1, L]`` bool, keys no query may see (padding)."""
        return None if self.key_valid is None else ~self.key_valid[:, None, :]

    @cached_property
    def _key_index(self) -> Tensor:
        return torch.arange(self.queries.shape[1], device=self.queries.device)

    @cached_property
    def _attended_keys(self) -> Tensor:
        """``[B, L, Hk, d]`` keys as the attention saw them (rotated once; not a copy without RoPE)."""
        return self.keys if self.rope is None else self.rope(self.keys, None)

    @cached_property
    def head_major_keys(self) -> Tensor:
        """``[B, Hk, L, d]`` keys as the attention saw them (contiguous, ready for matmul)."""
        return self._attended_keys.transpose(1, 2).contiguous()

    @property
    def rotated_keys(self) -> Tensor:
        """``[B, L, Hk, d]`` keys as the attention saw them (a view)."""
        return self.head_major_keys.transpose(1, 2)

    # -- the one primitive: softmax rows for some queries --------------------------------------

    def _row_logits(self, rows: Tensor) -> Tensor:
        """``[B, Hk, G, R, L]`` scaled logits ``q . k * scale`` of the query rows ``rows``
        (``[B, R]`` sequence indices) against every key, per head (``Hk`` key heads of ``G`` query
        heads each), before any bias or mask, in the model's dtype (float accumulation, as the
        attention's own products). Cost ``O(R * L * d)`` per head."""
        b, l, h, d = self.queries.shape
        hk = self.keys.shape[2]
        # the scale goes into the R query rows rather than into the R x L logits: one pass less
        # over the largest tensor a statistic forms
        q = self.query_rows(rows) * self.scale  # [B, R, H, d]
        r = q.shape[1]
        # grouped-query attention without repeating keys: [B, Hk, G*R, d] @ [B, Hk, d, L]
        q = q.view(b, r, hk, h // hk, d).permute(0, 2, 3, 1, 4).reshape(b, hk, h // hk * r, d)
        return torch.matmul(q, self.head_major_keys.transpose(-1, -2)).view(b, hk, h // hk, r, l)

    def _masked_logits(self, logits: Tensor, rows: Tensor) -> tuple[Tensor, bool]:
        """``[B, ..., R, L]`` logits after the layer's key bias and masks (padding keys; future keys
        when causal: ``-inf``), and whether any key was masked."""
        extra = logits.dim() - 3  # axes between the batch and the rows (heads, or none)
        if self.key_bias is not None:
            logits = logits + self.key_bias.float().view(logits.shape[0], *([1] * (extra + 1)), -1)
        masked = self._masked_keys  # [B, 1, L]
        if self.causal:
            future = self._key_index[None, None, :] > rows[:, :, None]  # [B, R, L]
            masked = future if masked is None else (masked | future)
        if masked is None:
            return logits, False
        return logits.masked_fill(masked.view(masked.shape[0], *([1] * extra), *masked.shape[1:]), float("-inf")), True

    def _masked_softmax(self, logits: Tensor, rows: Tensor) -> Tensor:
        """Float32 softmax over the last axis of ``[B, ..., R, L]`` logits after the layer's key
        bias and masks; rows that see no key become zero. Half-precision logits are read as they
        are and normalised in float32 (no float copy of them first: these rows are the largest
        tensor a statistic forms)."""
        logits, masked = self._masked_logits(logits, rows)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        return probs.nan_to_num_(0.0) if masked else probs  # rows that see no key (padding) -> 0

    def softmax_rows(self, rows: Tensor, average: Literal["probs", "logits"] = "probs") -> Tensor:
        """Head-averaged attention probabilities of the query rows ``rows`` (``[B, R]`` sequence
        indices) over all keys, masked as the layer masked them: ``[B, R, L]`` float32.

        ``average="probs"`` (the attention the layer computed): the mean over heads of each head's
        softmax. ``"logits"``: the softmax of the head-averaged logits (bias and masks, the same for
        every head, are added after the average), what FiCoCo's official code correlates with
        (docs/methods.md).

        Cost ``O(R * L * d)`` per head; only these ``R`` rows of the map are formed.
        """
        if average not in ("probs", "logits"):
            raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
        if average == "probs" and self._fused_rows(rows):
            return self._fused_softmax_rows(rows)
        logits = self._row_logits(rows)  # [B, Hk, G, R, L]
        if average == "logits":
            return self._masked_softmax(logits.mean(dim=(1, 2), dtype=torch.float32), rows)
        if self.compile_backend is not None and logits.is_cuda:
            return compiled_head_mean_softmax(self.compile_backend)(self._masked_logits(logits, rows)[0])
        return self._masked_softmax(logits, rows).mean(dim=(1, 2))

    def _fused_rows(self, rows: Tensor) -> bool:
        """Whether :meth:`softmax_rows` runs as the Triton kernels of :mod:`.attention_kernels`: on
        the fast statistics path (``compile_backend`` set), for CUDA tensors, non-causal attention
        (the encoders), with Triton installed."""
        return self.compile_backend is not None and rows.is_cuda and not self.causal and triton_installed()

    def _fused_softmax_rows(self, rows: Tensor) -> Tensor:
        """:meth:`softmax_rows` (``"probs"``) with the logits kept in registers
        (:func:`~ficoco.stages.attention_kernels.head_mean_softmax_rows`)."""
        from .attention_kernels import head_mean_softmax_rows

        return head_mean_softmax_rows(*self._kernel_operands(rows), **self._kernel_options(rows))

    def _kernel_operands(self, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(queries [B, H, R, d], keys [B, Hk, L, d])`` for the Triton kernels at sequence rows
        ``rows``; heads ordered key head by key head. ``rows=None``: every row in order, both as
        views of the rotated tensors (no gathered or head-major copy is made for the kernel that
        reads strides, :func:`~ficoco.stages.attention_kernels.head_mean_softmax_column_sums`)."""
        if rows is not None:
            return self.query_rows(rows).transpose(1, 2), self.head_major_keys
        keys = self.__dict__.get("head_major_keys")  # the contiguous copy where one was made already
        return self.rotated_queries.transpose(1, 2), (self._attended_keys.transpose(1, 2) if keys is None else keys)

    def _kernel_options(self, rows: Tensor | None) -> dict:
        """The kernels' keyword arguments for the query rows ``rows`` (``None``: every row, in
        order): bias, mask, the scale (applied to each product in float32, as the attention did)
        and, where the layer's attention handed it over, the rows' log-sum-exp (the kernels' first
        pass then skipped)."""
        lse = self.row_logsumexp
        if lse is not None and rows is not None:
            lse = self.row_logsumexp.gather(2, rows[:, None, :].expand(-1, self.row_logsumexp.shape[1], -1))
        return dict(key_bias=self.key_bias, key_valid=self.key_valid, scale=self.scale, row_logsumexp=lse)

    def _candidate_columns(self, rows_probs: Tensor) -> Tensor:
        """``[B, R, L]`` → ``[B, R, N]``: keep the columns of the candidates."""
        if self.every_key:
            return rows_probs
        idx = self.candidates[:, None, :].expand(-1, rows_probs.shape[1], -1)
        return rows_probs.gather(2, idx)

    # -- statistics ----------------------------------------------------------------------------

    @cached_property
    def cls_attention(self) -> Tensor:
        """``[B, N]``: attention from [CLS] to each candidate (softmax over all keys)."""
        if self.cls_index is None:
            raise ValueError("this encoder has no [CLS] token; use the key-proxy semantic term instead")
        b = self.queries.shape[0]
        rows = torch.full((b, 1), self.cls_index, device=self.candidates.device, dtype=torch.long)
        return self._candidate_columns(self.softmax_rows(rows))[:, 0]

    @cached_property
    def cls_logits(self) -> Tensor:
        """``[B, N]``: the [CLS] row of the scaled pre-softmax logits at each candidate key,
        head-averaged, before bias and masks: ``mean_h q_cls . k_j * scale``, one row, so
        ``O(H * L * d)``. FiCoCo's official code takes this as its [CLS] term (docs/methods.md)."""
        if self.cls_index is None:
            raise ValueError("this encoder has no [CLS] token; use the key-proxy semantic term instead")
        b = self.queries.shape[0]
        rows = torch.full((b, 1), self.cls_index, device=self.candidates.device, dtype=torch.long)
        return self._candidate_columns(self._row_logits(rows).mean(dim=(1, 2), dtype=torch.float32))[:, 0]

    @cached_property
    def mean_logits(self) -> Tensor:
        """``[B, N]``: ``v_i = mean_j A~_ij`` over candidate keys ``j`` of the scaled pre-softmax
        logits, head-averaged; equal to ``q_i . mean_j(k_j) * scale``, so ``O(N * d)``.

        Two matrix products in the model's dtype with float accumulation, as the attention's own
        logits are computed: the mean key is a ``1/N`` membership row times the keys (no gathered
        copy of them), and the dot products take the candidate queries as they are, not upcast.
        The ``scale / H`` factor goes into the mean key first, so that half precision holds a
        head-averaged logit rather than a sum over heads."""
        b, l, h, d = self.queries.shape
        hk = self.keys.shape[2]
        keys = self.head_major_keys  # [B, Hk, L, d]
        member = torch.zeros(b, 1, 1, l, dtype=keys.dtype, device=keys.device)
        member.scatter_(3, self.candidates[:, None, None, :], 1.0 / self.num_candidates)
        k_mean = torch.matmul(member, keys)[:, :, 0].float() * (self.scale / h)  # [B, Hk, d]
        k_mean = k_mean.repeat_interleave(h // hk, dim=1)  # [B, H, d]
        # every row's product, then the candidates' entries: a [B, L] gather instead of a gathered
        # copy of the candidates' queries (L is at most a few text tokens more than N)
        q = self.rotated_queries  # [B, L, H, d]
        v = torch.matmul(q.reshape(b, l, h * d), k_mean.reshape(b, h * d, 1).to(q.dtype))[..., 0]
        return (v if self.every_key else v.gather(1, self.candidates)).float()

    def attention_rows(self, rows: Tensor, average: Literal["probs", "logits"] = "probs") -> Tensor:
        """``[B, r, N]``: attention of candidates ``rows`` (``[B, r]`` candidate indices) to every
        candidate, softmax taken over all keys of the layer; ``average`` as in :meth:`softmax_rows`."""
        return self._candidate_columns(self.softmax_rows(rows if self.every_key else self.candidates.gather(1, rows),
                                                         average))

    def attention_between(self, rows: Tensor, columns: Tensor, average: Literal["probs", "logits"] = "probs",
                          group: int = 1) -> Tensor:
        """``[B, R / g, C / g]``: :meth:`attention_rows` of candidates ``rows`` (``[B, R]``) at the
        candidates ``columns`` (``[B, C]``) only, the softmax still over all keys. With ``group``
        ``g`` > 1 the rows and columns come in consecutive groups of ``g``: the mean over each row
        group of the sum over each column group (see :class:`GroupedProbe`).

        On the fused path (:meth:`_fused_rows`) the probabilities are formed for these columns
        alone and summed over groups in registers
        (:func:`~ficoco.stages.attention_kernels.head_mean_softmax_between`): a correlation with
        the kept tokens costs ``O(R * C)`` after the row sums instead of writing ``[B, R, L]``."""
        b, r, c = rows.shape[0], rows.shape[1], columns.shape[1]
        if average == "probs" and self._fused_rows(rows):  # only then is Triton imported
            from .attention_kernels import BLOCK_ROWS, head_mean_softmax_between

            if BLOCK_ROWS % group == 0:
                sequence_rows = rows if self.every_key else self.candidates.gather(1, rows)
                sequence_columns = columns if self.every_key else self.candidates.gather(1, columns)
                return head_mean_softmax_between(*self._kernel_operands(sequence_rows), sequence_columns, group=group,
                                                 **self._kernel_options(sequence_rows))
        full = self.attention_rows(rows, average)
        between = full.gather(2, columns[:, None, :].expand(-1, r, -1))  # [B, R, C]
        if group == 1:
            return between
        return between.reshape(b, r // group, group, c // group, group).mean(dim=2).sum(dim=-1)

    @cached_property
    def received_attention(self) -> Tensor:
        """``[B, N]``: ``(1/N) sum_j A_ji`` over candidate queries ``j``. Needs every candidate row,
        so it costs ``O(N^2 d)``. On the fused path (Triton, see :meth:`softmax_rows`) neither the
        logits nor the rows are in memory, only each 64-row block's column sums; elsewhere rows are
        processed in chunks of at most ``2**28`` per-head logits in memory and at least 64 rows,
        each chunk's rows summed before its candidate columns are taken."""
        b, l, h, _ = self.queries.shape
        if self._fused_rows(self.candidates):
            from .attention_kernels import head_mean_softmax_column_sums

            rows = None if self.every_key else self.candidates  # every row in order: views, no copies
            total = head_mean_softmax_column_sums(*self._kernel_operands(rows), **self._kernel_options(rows))
            return (total if self.every_key else total.gather(1, self.candidates)) / self.num_candidates
        rows_per_chunk = max(64, (1 << 28) // max(1, b * h * l))
        total = None
        for chunk in self.candidates.split(rows_per_chunk, dim=1):
            part = self.softmax_rows(chunk).sum(dim=1)  # [B, L]
            total = part if total is None else total + part
        return (total if self.every_key else total.gather(1, self.candidates)) / self.num_candidates

    @cached_property
    def text_attention(self) -> Tensor:
        """``[B, M, N]``: attention from each text query after the image to each candidate; rows of
        padding (``text_valid`` false) are zero."""
        if self.text_rows is None:
            raise ValueError("text attention needs the text queries: only available inside the LLM")
        probs = self._candidate_columns(self.softmax_rows(self.text_rows))
        if self.text_valid is not None:
            probs = probs * self.text_valid[:, :, None]
        return probs

    @cached_property
    def num_text(self) -> Tensor:
        """``[B, 1]`` float: number of real text queries per sample (at least 1)."""
        if self.text_valid is None:
            return torch.full((self.queries.shape[0], 1), float(self.text_attention.shape[1]), device=self.queries.device)
        return self.text_valid.sum(dim=1, keepdim=True).clamp_min(1).float()

    @cached_property
    def text_received(self) -> Tensor:
        """``[B, N]``: ``(1/M) sum_k A_ki``, the attention each candidate receives from the text."""
        return self.text_attention.sum(dim=1) / self.num_text

    @cached_property
    def _raters(self) -> tuple[Tensor, Tensor | None]:
        """``(rows, valid)`` of the raters; a sample without any (no text after its image) is
        rated by its last token (``last_row``), in its first row."""
        if self.rater_rows is None:
            raise ValueError("rater attention needs the text raters (SparseVLM): only available inside the LLM, "
                             "with LanguageReduction(raters=TextRaters())")
        rows, valid = self.rater_rows, self.rater_valid
        if valid is None or self.last_row is None or rows.shape[1] == 0:
            return rows, valid
        first = (torch.arange(rows.shape[1], device=rows.device) == 0)[None, :] & ~valid.any(dim=1, keepdim=True)
        return torch.where(first, self.last_row[:, None], rows), valid | first

    @cached_property
    def rater_attention_rows(self) -> Tensor:
        """``[B, R, N]``: attention from each rater (``rater_rows``) to each candidate, head-averaged,
        softmax over all keys; rows of padding (``rater_valid`` false) are zero. Only these ``R``
        rows of the map are formed."""
        rows, valid = self._raters
        probs = self._candidate_columns(self.softmax_rows(rows))
        return probs if valid is None else probs * valid[:, :, None]

    @property
    def rater_count(self) -> Tensor:
        """``[B]``: raters per sample (padding rows not counted)."""
        rows, valid = self._raters
        return torch.full((rows.shape[0],), rows.shape[1], device=rows.device) if valid is None else valid.sum(dim=1)

    @cached_property
    def rater_attention(self) -> Tensor:
        """``[B, N]``: the attention each candidate receives from the raters, averaged over them
        (SparseVLM's relevance of a visual token)."""
        return self.rater_attention_rows.sum(dim=1) / self.rater_count[:, None].clamp_min(1).float()

    @cached_property
    def last_token_attention(self) -> Tensor:
        """``[B, N]``: attention from each sample's last real token to each candidate (FastV)."""
        if self.last_row is None:
            raise ValueError("last-token attention is only available inside the LLM")
        return self._candidate_columns(self.softmax_rows(self.last_row[:, None]))[:, 0]

    @cached_property
    def mean_keys(self) -> Tensor:
        """``[B, N, d]``: candidate keys averaged over heads (ToMe's similarity metric)."""
        # averaged over heads first, then gathered: one read of the keys, no float copy of them
        keys = self.head_major_keys.mean(dim=1, dtype=torch.float32)
        return keys if self.every_key else gather_rows(keys, self.candidates)

    @cached_property
    def fused_heads(self) -> "AttentionProbe":
        """The same layer read as *one* attention head over all ``H * d`` channels: queries and keys
        ``[B, L, 1, H * d]`` (the heads concatenated, as the projections output them) with scale
        ``(H * d) ** -0.5``. Its softmax rows are ``softmax(sqrt(H) x head-averaged logits)``, how
        PruMerge's official code reads a CLIP layer's attention, and its ``mean_keys`` are the full
        ``[B, N, H * d]`` keys. Masks and key bias carry over; defined only without RoPE (the
        vision encoders), where the heads' channels need no rotation."""
        if self.rope is not None:
            raise ValueError("fused heads are defined for attention without rotary embeddings (vision encoders)")
        b, l, h, d = self.queries.shape
        keys = self.keys
        if keys.shape[2] != h:  # grouped-query attention: each query head's own key
            keys = keys.repeat_interleave(h // keys.shape[2], dim=2)
        return AttentionProbe(
            self.queries.reshape(b, l, 1, h * d), keys.reshape(b, l, 1, h * d), (h * d) ** -0.5,
            None if self.every_key else self.candidates,
            cls_index=self.cls_index, key_bias=self.key_bias, key_valid=self.key_valid, causal=self.causal,
            text_rows=self.text_rows, text_valid=self.text_valid, last_row=self.last_row,
            compile_backend=self.compile_backend,
        )


def token_importance(probe: AttentionProbe, heads: Literal["fused", "mean"] = "mean",
                     importance: Literal["cls", "received"] = "cls") -> Tensor:
    """``[B, N]``: the attention each candidate gets, from [CLS] (``"cls"``) or from all tokens on
    average (``"received"``, the stand-in without [CLS]), with the layer's heads averaged
    (``"mean"``) or read as one fused head (``"fused"``, :attr:`AttentionProbe.fused_heads`)."""
    view = probe.fused_heads if heads == "fused" else probe
    return view.cls_attention if importance == "cls" else view.received_attention


class GroupedProbe:
    """The statistics of :class:`AttentionProbe` for candidates that are groups of ``size``
    sub-tokens, each group one token downstream (Qwen-VL's vision tower merges every 2x2 patches
    into one LLM token, so it is whole groups that must be kept, merged or dropped).

    ``probe`` is a sub-token probe whose candidates are the groups' sub-tokens, group by group
    (``[B, N * size]``: group ``i`` is candidates ``i*size .. i*size + size - 1``). A group's
    score is the mean of its sub-tokens' (``mean_logits``, ``mean_keys``); attention received by a
    group is the sum over its sub-tokens; the attention of group ``i`` to group ``j`` is the mean
    over ``i``'s sub-token queries of their attention summed over ``j``'s sub-token keys, so that
    each group row still sums to at most one.
    """

    def __init__(self, probe: AttentionProbe, size: int) -> None:
        if probe.num_candidates % size:
            raise ValueError(f"{probe.num_candidates} sub-tokens do not form groups of {size}")
        self.probe, self.size = probe, size

    @property
    def num_candidates(self) -> int:
        return self.probe.num_candidates // self.size

    def _grouped(self, x: Tensor) -> Tensor:
        """``[B, N * g, ...]`` → ``[B, N, g, ...]``."""
        return x.reshape(x.shape[0], -1, self.size, *x.shape[2:])

    @cached_property
    def mean_logits(self) -> Tensor:
        return self._grouped(self.probe.mean_logits).mean(dim=2)

    @cached_property
    def mean_keys(self) -> Tensor:
        return self._grouped(self.probe.mean_keys).mean(dim=2)

    @cached_property
    def cls_attention(self) -> Tensor:
        return self._grouped(self.probe.cls_attention).sum(dim=2)

    @cached_property
    def received_attention(self) -> Tensor:
        return self._grouped(self.probe.received_attention).sum(dim=2)

    def _sub_tokens(self, groups: Tensor) -> Tensor:
        """``[B, r]`` group indices → ``[B, r * g]`` their sub-tokens, group by group."""
        b, r = groups.shape
        return (groups[:, :, None] * self.size + torch.arange(self.size, device=groups.device)).reshape(b, r * self.size)

    def attention_rows(self, rows: Tensor, average: Literal["probs", "logits"] = "probs") -> Tensor:
        """``[B, r, N]``: attention of the groups ``rows`` (``[B, r]`` group indices) to every group
        (``average`` as in :meth:`AttentionProbe.softmax_rows`, for each sub-token row)."""
        b, r = rows.shape
        a = self.probe.attention_rows(self._sub_tokens(rows), average)  # [B, r * g, N * g]
        return a.reshape(b, r, self.size, -1, self.size).mean(dim=2).sum(dim=-1)

    def attention_between(self, rows: Tensor, columns: Tensor, average: Literal["probs", "logits"] = "probs") -> Tensor:
        """``[B, r, c]``: :meth:`attention_rows` at the groups ``columns`` (``[B, c]``) only."""
        return self.probe.attention_between(self._sub_tokens(rows), self._sub_tokens(columns), average, self.size)

    def __getattr__(self, name: str):
        # text and last-token statistics exist only inside the LLM, where tokens are not grouped
        raise AttributeError(f"{name!r} is not defined for grouped candidates (encoder merge groups)")


class FeatureProbe:
    """What a stage may read at the LLM input (:class:`~ficoco.methods.InputReduction`): the
    tokens' own features come in the :class:`~ficoco.stages.TokenGroup`; this adds the
    instruction's token embeddings, for filters conditioned on the text (CDPruner), looked up only
    when a stage reads them. There is no attention here: a filter that asks for an attention
    statistic gets one clear error.

    Args:
        text: returns ``(text_embeddings [B, M, D], text_valid [B, M] bool)``: the input embeddings
            of each image's instruction tokens (the text after the image in its prompt) and which
            are real, at least one per row (it raises ``ValueError`` for an image with no text
            after it); ``None`` when the prompt came as embeddings.
    """

    def __init__(self, text: Callable[[], tuple[Tensor, Tensor]] | None = None) -> None:
        self._text = text

    @cached_property
    def _instruction(self) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if self._text is None else self._text()

    @property
    def text_embeddings(self) -> Tensor | None:
        return self._instruction[0]

    @property
    def text_valid(self) -> Tensor | None:
        return self._instruction[1]

    def __getattr__(self, name: str):
        raise AttributeError(f"{name!r} is an attention statistic, which does not exist at the LLM input: this "
                             f"filter belongs in the vision encoder or the LLM decoder")
