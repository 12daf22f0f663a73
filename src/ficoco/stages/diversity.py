"""Filters that keep a diverse set of tokens, read from the tokens' features (no attention).

- :class:`MaxMinDiversityFilter`: DivPrune (Alvar et al., CVPR 2025), the max-min diversity
  problem solved greedily (farthest-point selection under cosine distance);
- :class:`ConditionalDPPFilter`: CDPruner (Zhang et al., NeurIPS 2025), the greedy MAP of a
  determinantal point process whose kernel weighs feature similarity by relevance to the
  instruction.

Both choose the kept set as a whole and run per sample on the whole batch at once (the official
code selects for sample 0, resp. flattens the batch into one sample). docs/methods.md lists what
else differs from the official code. Their greedy loops run as one Triton kernel per call on a
GPU with ``backend="auto"``, the default (:mod:`.greedy_kernels`; 3-19x faster than the loop on
an H200 at the bench presets' sizes, the same tokens: docs/benchmarks.md), as a PyTorch loop
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .filters import SetSelectionFilter
from .probe import triton_installed
from .tokens import TokenGroup

Backend = Literal["auto", "torch", "triton"]


def _use_triton(backend: Backend, device: torch.device, n: int) -> bool:
    """Whether a greedy loop runs as the Triton kernel: ``"auto"`` on a CUDA device with Triton
    installed and at most ``greedy_kernels.MAX_TOKENS`` tokens; ``"triton"`` always (on the CPU
    only under ``TRITON_INTERPRET=1``); ``"torch"`` never."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton":
        if not triton_installed():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        return True
    if backend == "torch" or device.type != "cuda" or not triton_installed():
        return False
    from . import greedy_kernels

    return n <= greedy_kernels.MAX_TOKENS


def cosine_similarity_matrix(x: Tensor) -> Tensor:
    """``[B, N, N]`` cosine similarity of the rows of ``x`` (``[B, N, D]``), in float32.

    Half-precision rows on a GPU go through one tensor-core product with float32 output: the
    product of two half-precision values is exact in float32 and the GEMM accumulates in float32,
    so the dot products are those of a float32 GEMM over ``x.float()`` up to the order of the sums
    (at a tenth of its time at LLaVA's 576 x 4096 tokens), and are divided by the float32 norms
    after. Elsewhere: the float32 rows, normalised, then multiplied."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        dots = torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
        norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(1e-12)  # as F.normalize
        return dots.div_(norms[:, :, None]).div_(norms[:, None, :])
    x = F.normalize(x.float(), dim=-1)
    return x @ x.transpose(1, 2)


@dataclass
class MaxMinDiversityFilter(SetSelectionFilter):
    """DivPrune: keep the set whose smallest pairwise cosine distance ``1 - cos`` is largest,
    greedily. The first token kept is the one whose nearest other token is farthest; each next one
    is the token farthest from everything kept so far (its smallest distance to the kept set is
    the largest). Ties go to the lowest index, as ``argmax`` gives them.

    Attributes:
        backend: the greedy loop's implementation (see :func:`_use_triton`); both keep the same
            tokens up to float rounding of near-ties.
    """

    backend: Backend = "auto"

    def select(self, tokens: TokenGroup, probe, kept: int) -> Tensor:
        b, n = tokens.batch_size, tokens.num_tokens
        distance = 1.0 - cosine_similarity_matrix(tokens.features)  # [B, N, N]
        chosen = torch.zeros(b, kept, dtype=torch.long, device=distance.device)
        if kept == 0:
            return chosen
        rows = torch.arange(b, device=distance.device)
        eye = torch.eye(n, dtype=torch.bool, device=distance.device)
        chosen[:, 0] = distance.masked_fill(eye, float("inf")).amin(dim=1).argmax(dim=1)
        if _use_triton(self.backend, distance.device, n):
            from .greedy_kernels import farthest_points

            return farthest_points(distance, chosen[:, 0], kept)
        # [B, N]: each token's distance to the kept set, -inf for the kept ones (a minimum keeps it)
        nearest = distance[rows, chosen[:, 0]].clone()
        nearest[rows, chosen[:, 0]] = float("-inf")
        for step in range(1, kept):
            pick = nearest.argmax(dim=1)
            chosen[:, step] = pick
            nearest = torch.minimum(nearest, distance[rows, pick])
            nearest[rows, pick] = float("-inf")
        return chosen


@dataclass
class ConditionalDPPFilter(SetSelectionFilter):
    """CDPruner: the greedy MAP of a DPP with kernel ``L = diag(r) S diag(r)``, ``S`` the cosine
    similarity of the tokens' features and ``r`` their relevance to the instruction.

    ``r_i = mean_m(-cos(x_i, t_m))`` over the instruction's token embeddings ``t_m`` (the official
    code negates the similarity, deliberately), min-max normalised per sample as
    ``(r - min + 1e-6) / (max - min)``. The greedy MAP is Chen et al.'s incremental Cholesky form:
    each step keeps the token with the largest remaining gain ``d_j^2`` (the first: the most
    relevant) and removes its projection from the others.

    Attributes:
        theta: ``None`` (the official code's default): relevance as above. A value in ``(0, 1)``:
            the paper's trade-off, ``r <- exp(theta / (2 (1 - theta)) * r)`` (left commented out in
            the official code).
        eps: a gain at most ``eps`` times the first pick's counts as exhausted. The kernel's rank
            is at most the feature width, so once that many tokens are kept (or earlier, among
            near-duplicates) every remaining gain is rounding noise, and the official code then
            picks by that noise (or divides by the root of a negative number). Here the rest are
            kept in order of relevance instead, which is deterministic.
        backend: the greedy loop's implementation (see :func:`_use_triton`); both keep the same
            tokens up to float rounding of near-ties.
    """

    theta: float | None = None
    eps: float = 1e-4
    backend: Backend = "auto"
    reads_instruction = True  # a class attribute (no annotation), not a field

    def __post_init__(self) -> None:
        if self.theta is not None and not 0.0 < self.theta < 1.0:
            raise ValueError(f"theta must be None or lie in (0, 1), got {self.theta}")

    def relevance(self, tokens: TokenGroup, probe) -> Tensor:
        """``[B, N]`` relevance of each token to its instruction (after normalisation)."""
        text = getattr(probe, "text_embeddings", None)
        if text is None:
            raise ValueError("CDPruner weighs tokens by their relevance to the instruction, but this prompt has no "
                             "instruction tokens after the image (or came as embeddings)")
        sim = F.normalize(tokens.features.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)
        valid = probe.text_valid
        if valid is None:
            valid = torch.ones(sim.shape[0], sim.shape[2], dtype=torch.bool, device=sim.device)
        # every row has a real token: the probe's producer checks that on the host, where the
        # counts are known (a check here would make the host wait for the encoder)
        weights = valid.float()[:, None, :]
        r = -(sim * weights).sum(dim=-1) / weights.sum(dim=-1)
        low, high = r.amin(dim=1, keepdim=True), r.amax(dim=1, keepdim=True)
        r = (r - low + 1e-6) / (high - low).clamp_min(1e-12)
        if self.theta is not None:
            r = torch.exp(self.theta / (2 * (1 - self.theta)) * r)
        return r

    def dpp_inputs(self, tokens: TokenGroup, probe) -> tuple[Tensor, Tensor, Tensor]:
        """``(kernel [B, N, N], relevance [B, N], floor [B])``: what the greedy MAP runs on, the
        floor being ``eps`` times each sample's largest initial gain."""
        r = self.relevance(tokens, probe)
        kernel = r[:, :, None] * cosine_similarity_matrix(tokens.features) * r[:, None, :]
        return kernel, r, self.eps * kernel.diagonal(dim1=1, dim2=2).amax(dim=1)

    def select(self, tokens: TokenGroup, probe, kept: int) -> Tensor:
        b, n = tokens.batch_size, tokens.num_tokens
        kernel, r, floor = self.dpp_inputs(tokens, probe)
        if _use_triton(self.backend, kernel.device, n):
            from .greedy_kernels import greedy_dpp

            return greedy_dpp(kernel, r, floor, kept)
        rows = torch.arange(b, device=kernel.device)
        gain = kernel.diagonal(dim1=1, dim2=2).clone()  # d_j^2
        factors = kernel.new_zeros(b, kept, n)  # c: one row per kept token
        chosen = torch.zeros(b, kept, dtype=torch.long, device=kernel.device)
        taken = torch.zeros(b, n, dtype=torch.bool, device=kernel.device)
        for step in range(kept):
            best = gain.masked_fill(taken, float("-inf")).amax(dim=1)
            exhausted = (best <= floor)[:, None]
            pick = torch.where(exhausted, r, gain).masked_fill(taken, float("-inf")).argmax(dim=1)
            chosen[:, step] = pick
            taken[rows, pick] = True
            projection = torch.einsum("bk,bkn->bn", factors[rows, :step, pick], factors[:, :step])
            e = (kernel[rows, pick] - projection) / gain[rows, pick].clamp_min(floor).sqrt()[:, None]
            factors[:, step] = e
            gain = gain - e.square()
        return chosen
