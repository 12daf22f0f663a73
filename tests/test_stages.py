"""Stage-by-stage checks: every vectorised stage against a slow reference written from docs/spec.md §3, §4,
§6 and §7 with plain Python loops over batch, tokens and heads.

The references never call the code they check. Attention references build the whole per-head map
``softmax(q . k * scale + key_bias)`` (padding keys and, when causal, future keys masked) entry by
entry in float64; the library works in float32, hence the tolerances below.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from ficoco.adapters.inputs import shrink_placeholders
from ficoco.stages import (
    NO_POSITION,
    ArgmaxSimilarityCorrelate,
    AttentionProbe,
    AttentionQuantileCorrelate,
    AveragingCompress,
    BipartiteSimilarityFilter,
    CLSAttentionFilter,
    ConvergentCorrelate,
    Correlation,
    DropCompress,
    FiCoCoLanguageFilter,
    FiCoCoVisionFilter,
    FilterResult,
    FuseCompress,
    GroupedProbe,
    LastTokenAttentionFilter,
    NoCorrelate,
    RandomFilter,
    SelfPreservingCompress,
    SizeWeightedCompress,
    TextMediatedQuantileCorrelate,
    TokenGroup,
    TokenReduction,
    local_penalty,
    quantile_targets,
    top_k_targets,
)
from ficoco.stages.tokens import complement, gather_rows

H, HK, D_HEAD, D_MODEL = 4, 2, 6, 10  # grouped-query: query head h reads key head h // (H // HK)
SEEDS = (0, 1, 2)
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 library vs float64 reference
CASES = ("encoder", "encoder_bias", "decoder_left", "decoder_right")


# ---------------------------------------------------------------------------------------------
# random layer inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    q: Tensor  # [B, L, H, d]
    k: Tensor  # [B, L, Hk, d]
    scale: float
    candidates: Tensor  # [B, N]
    features: Tensor  # [B, N, D]
    sizes: Tensor  # [B, N]
    positions: Tensor  # [B, N]
    grid: tuple[int, int]
    cls_index: int | None = None
    key_bias: Tensor | None = None
    key_valid: Tensor | None = None
    causal: bool = False
    text_rows: Tensor | None = None
    text_valid: Tensor | None = None
    last_row: Tensor | None = None

    def probe(self) -> AttentionProbe:
        return AttentionProbe(
            self.q, self.k, self.scale, self.candidates, cls_index=self.cls_index, key_bias=self.key_bias,
            key_valid=self.key_valid, causal=self.causal, text_rows=self.text_rows, text_valid=self.text_valid,
            last_row=self.last_row,
        )

    def tokens(self) -> TokenGroup:
        return TokenGroup(self.features, self.sizes, self.positions, self.grid)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def n(self) -> int:
        return self.candidates.shape[1]


def make_encoder(seed: int, bias: bool) -> Setup:
    """Vision-encoder layout: [CLS] then N = 27 surviving patches of a 5x7 grid (8 already gone);
    sample 0 also carries a fused token without a grid position."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    b, n, grid = 3, 27, (5, 7)
    seq = n + 1
    q = torch.randn(b, seq, H, D_HEAD, generator=gen) * 1.5
    k = torch.randn(b, seq, HK, D_HEAD, generator=gen) * 1.5
    positions = []
    for row in range(b):
        if row == 0:
            positions.append(sorted(rng.sample(range(35), n - 1)) + [NO_POSITION])
        else:
            positions.append(sorted(rng.sample(range(35), n)))
    sizes = torch.randint(1, 4, (b, n), generator=gen).float()
    key_bias = None
    if bias:
        key_bias = torch.cat([torch.zeros(b, 1), sizes.log()], dim=1)
    text_rows = torch.tensor([rng.sample(range(1, seq), 4) for _ in range(b)])
    return Setup(
        q=q, k=k, scale=D_HEAD**-0.5, candidates=torch.arange(1, seq).expand(b, n).contiguous(),
        features=torch.randn(b, n, D_MODEL, generator=gen), sizes=sizes, positions=torch.tensor(positions),
        grid=grid, cls_index=0, key_bias=key_bias, text_rows=text_rows, text_valid=None,
        last_row=torch.full((b,), seq - 1),
    )


def make_decoder(seed: int, side: str) -> Setup:
    """LLM layout per sample: padding, 3 system tokens, a visual span of 15 tokens of which 13 are
    candidates (two ordinary tokens interleaved, so candidates are not contiguous), then the text.
    Samples have 5, 3 and 4 text tokens; ``text_rows`` is padded to 5 with ``text_valid`` false.
    Right padding also gets a key bias and candidates listed in a shuffled order."""
    rng = random.Random(100 + seed)
    gen = torch.Generator().manual_seed(100 + seed)
    b, n, m_max, sys_len, span = 3, 13, 5, 3, 15
    text_len = [5, 3, 4]
    lengths = [sys_len + span + t for t in text_len]
    seq = max(lengths)
    q = torch.randn(b, seq, H, D_HEAD, generator=gen) * 1.5
    k = torch.randn(b, seq, HK, D_HEAD, generator=gen) * 1.5
    valid = torch.zeros(b, seq, dtype=torch.bool)
    candidates, text_rows, text_valid, last_row = [], [], [], []
    for row in range(b):
        start = seq - lengths[row] if side == "left" else 0
        valid[row, start : start + lengths[row]] = True
        visual = list(range(start + sys_len, start + sys_len + span))
        for gap in rng.sample(visual[1:-1], span - n):
            visual.remove(gap)
        if side == "right":
            rng.shuffle(visual)
        candidates.append(visual)
        text = list(range(start + sys_len + span, start + lengths[row]))
        filler = [seq - 1 - i for i in range(m_max - len(text))] if side == "right" else [0] * (m_max - len(text))
        text_rows.append(text + filler)
        text_valid.append([True] * len(text) + [False] * (m_max - len(text)))
        last_row.append(start + lengths[row] - 1)
    key_bias = torch.randn(b, seq, generator=gen) * 0.5 if side == "right" else None
    positions = torch.tensor([sorted(rng.sample(range(15), n)) for _ in range(b)])
    return Setup(
        q=q, k=k, scale=D_HEAD**-0.5, candidates=torch.tensor(candidates),
        features=torch.randn(b, n, D_MODEL, generator=gen), sizes=torch.randint(1, 4, (b, n), generator=gen).float(),
        positions=positions, grid=(3, 5), key_bias=key_bias, key_valid=valid, causal=True,
        text_rows=torch.tensor(text_rows), text_valid=torch.tensor(text_valid), last_row=torch.tensor(last_row),
    )


# ---------------------------------------------------------------------------------------------
# reference attention statistics (loops, float64)
# ---------------------------------------------------------------------------------------------


@dataclass
class Ref:
    attn: list  # attn[b][i][j]: head-averaged softmax map
    raw: list  # raw[b][h][i][j]: scaled logits, before bias, mask and softmax
    stats: dict


def ref_attention(s: Setup) -> tuple[list, list]:
    q, k = s.q.double().tolist(), s.k.double().tolist()
    bias = s.key_bias.double().tolist() if s.key_bias is not None else None
    valid = s.key_valid.tolist() if s.key_valid is not None else None
    b_size, length = s.q.shape[0], s.q.shape[1]
    group = H // HK
    attn = [[[0.0] * length for _ in range(length)] for _ in range(b_size)]
    raw = [[[[0.0] * length for _ in range(length)] for _ in range(H)] for _ in range(b_size)]
    for b in range(b_size):
        for h in range(H):
            for i in range(length):
                logits = {}
                for j in range(length):
                    dot = sum(x * y for x, y in zip(q[b][i][h], k[b][j][h // group]))
                    raw[b][h][i][j] = dot * s.scale
                    if valid is not None and not valid[b][j]:
                        continue
                    if s.causal and j > i:
                        continue
                    logits[j] = dot * s.scale + (bias[b][j] if bias is not None else 0.0)
                if not logits:
                    continue  # a query that sees no key (padding) has an all-zero row
                top = max(logits.values())
                total = sum(math.exp(v - top) for v in logits.values())
                for j, v in logits.items():
                    attn[b][i][j] += math.exp(v - top) / total / H
    return attn, raw


def ref_stats(s: Setup, attn: list, raw: list) -> dict:
    cand = s.candidates.tolist()
    b_size, n = s.candidates.shape
    out = {}
    if s.cls_index is not None:
        out["cls"] = [[attn[b][s.cls_index][cand[b][i]] for i in range(n)] for b in range(b_size)]
    out["mean_logits"] = [
        [sum(raw[b][h][cand[b][i]][cand[b][j]] for h in range(H) for j in range(n)) / (H * n) for i in range(n)]
        for b in range(b_size)
    ]
    out["received"] = [
        [sum(attn[b][cand[b][j]][cand[b][i]] for j in range(n)) / n for i in range(n)] for b in range(b_size)
    ]
    if s.text_rows is not None:
        rows = s.text_rows.tolist()
        valid = s.text_valid.tolist() if s.text_valid is not None else [[True] * len(r) for r in rows]
        text = [
            [[attn[b][rows[b][m]][cand[b][i]] if valid[b][m] else 0.0 for i in range(n)] for m in range(len(rows[b]))]
            for b in range(b_size)
        ]
        out["text"] = text
        out["num_text"] = [max(1, sum(valid[b])) for b in range(b_size)]
        out["text_received"] = [
            [sum(text[b][m][i] for m in range(len(rows[b]))) / out["num_text"][b] for i in range(n)]
            for b in range(b_size)
        ]
    if s.last_row is not None:
        last = s.last_row.tolist()
        out["last"] = [[attn[b][last[b]][cand[b][i]] for i in range(n)] for b in range(b_size)]
    keys = s.k.double().tolist()
    out["mean_keys"] = [
        [[sum(keys[b][cand[b][i]][h][e] for h in range(HK)) / HK for e in range(D_HEAD)] for i in range(n)]
        for b in range(b_size)
    ]
    return out


@lru_cache(maxsize=None)
def case(kind: str, seed: int) -> tuple[Setup, Ref]:
    if kind.startswith("encoder"):
        s = make_encoder(seed, bias=kind == "encoder_bias")
    else:
        s = make_decoder(seed, side=kind.split("_")[1])
    attn, raw = ref_attention(s)
    return s, Ref(attn, raw, ref_stats(s, attn, raw))


def t64(x) -> Tensor:
    return torch.tensor(x, dtype=torch.float64)


def close(actual: Tensor, expected, **tol) -> None:
    assert_close(actual.double(), expected if isinstance(expected, Tensor) else t64(expected), **(tol or TOL))


# ---------------------------------------------------------------------------------------------
# 1. AttentionProbe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", CASES)
def test_probe_statistics_match_full_attention_map(kind, seed):
    s, ref = case(kind, seed)
    probe = s.probe()
    st = ref.stats
    if s.cls_index is not None:
        close(probe.cls_attention, st["cls"])
    close(probe.mean_logits, st["mean_logits"])
    close(probe.received_attention, st["received"])
    close(probe.text_attention, st["text"])
    close(probe.text_received, st["text_received"])
    close(probe.last_token_attention, st["last"])
    close(probe.mean_keys, st["mean_keys"])
    # the primitive itself: every row of the head-averaged map, padding queries included (all zero)
    every_row = torch.arange(s.q.shape[1]).expand(s.batch, -1)
    close(probe.softmax_rows(every_row), ref.attn)

    # attention_rows for arbitrary, unsorted, per-sample candidate rows
    rng = random.Random(seed)
    rows = [rng.sample(range(s.n), 6) for _ in range(s.batch)]
    cand = s.candidates.tolist()
    expected = [[[ref.attn[b][cand[b][r]][cand[b][j]] for j in range(s.n)] for r in rows[b]] for b in range(s.batch)]
    close(probe.attention_rows(torch.tensor(rows)), expected)
    # attention_between: the same rows at some candidate columns only
    cols = [rng.sample(range(s.n), 4) for _ in range(s.batch)]
    close(probe.attention_between(torch.tensor(rows), torch.tensor(cols)),
          [[[expected[b][r][j] for j in cols[b]] for r in range(6)] for b in range(s.batch)])


def test_grouped_attention_between_is_the_grouped_rows_at_those_groups():
    """A merge group's attention to some groups (FiCoCo-V's correlation on Qwen-VL): the mean over
    its sub-token rows of their sum over each target group's sub-token keys, i.e. the grouped
    rows gathered at the target groups, written out here entry by entry."""
    gen = torch.Generator().manual_seed(3)
    b, groups, g = 2, 9, 4
    q = torch.randn(b, groups * g, H, D_HEAD, generator=gen)
    k = torch.randn(b, groups * g, HK, D_HEAD, generator=gen)
    probe = AttentionProbe(q, k, 0.3, None)
    grouped = GroupedProbe(probe, g)
    rows = torch.stack([torch.randperm(groups, generator=gen)[:3] for _ in range(b)])
    cols = torch.stack([torch.randperm(groups, generator=gen)[:5] for _ in range(b)])
    every = torch.arange(groups * g).expand(b, -1)
    full = probe.attention_rows(every)  # [B, L, L]
    expected = torch.tensor([[[sum(full[i, rows[i, r] * g + a, cols[i, c] * g + e].item() for e in range(g)
                                   for a in range(g)) / g for c in range(5)] for r in range(3)] for i in range(b)],
                            dtype=torch.float64)
    close(grouped.attention_between(rows, cols), expected)
    assert_close(grouped.attention_between(rows, cols),
                 grouped.attention_rows(rows).gather(2, cols[:, None, :].expand(-1, 3, -1)), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ("decoder_left", "decoder_right"))
def test_probe_padding_text_rows_are_zero_and_masks_hold(kind):
    s, ref = case(kind, 0)
    probe = s.probe()
    text = probe.text_attention
    assert (text[~s.text_valid] == 0).all()
    assert (text[s.text_valid] > 0).all()  # text follows every candidate: causal mask lets it see them all
    # causal: a candidate's attention to a later candidate is zero
    rows = torch.arange(s.n).expand(s.batch, s.n)
    a = probe.attention_rows(rows)
    later = s.candidates[:, None, :] > s.candidates[:, :, None]
    assert (a[later] == 0).all() and (a[~later] > 0).all()


def test_probe_statistics_many_candidates():
    """N = 70 > 64: ``received_attention`` sums candidate rows chunk by chunk."""
    gen = torch.Generator().manual_seed(11)
    b, n = 2, 70
    q = torch.randn(b, n + 1, H, D_HEAD, generator=gen)
    k = torch.randn(b, n + 1, HK, D_HEAD, generator=gen)
    cand = torch.stack([torch.randperm(n, generator=gen)[:n] + 1 for _ in range(b)])
    s = Setup(q=q, k=k, scale=0.3, candidates=cand, features=torch.zeros(b, n, 1), sizes=torch.ones(b, n),
              positions=cand - 1, grid=(9, 9), cls_index=0, key_bias=torch.randn(b, n + 1, generator=gen))
    attn, raw = ref_attention(s)
    st = ref_stats(s, attn, raw)
    probe = s.probe()
    close(probe.received_attention, st["received"])
    close(probe.cls_attention, st["cls"])
    close(probe.mean_logits, st["mean_logits"])


def test_probe_without_candidates_takes_every_key_in_order():
    """``candidates=None`` (an encoder's tokens, every key a candidate) gives the statistics of the
    explicit ``arange`` candidates, without their column gathers."""
    gen = torch.Generator().manual_seed(5)
    b, n = 2, 23
    q, k = torch.randn(b, n, H, D_HEAD, generator=gen), torch.randn(b, n, HK, D_HEAD, generator=gen)
    bias = torch.randn(b, n, generator=gen)
    every = AttentionProbe(q, k, 0.3, None, key_bias=bias)
    explicit = AttentionProbe(q, k, 0.3, torch.arange(n).expand(b, n), key_bias=bias)
    assert every.every_key and not explicit.every_key and every.num_candidates == n
    rows = torch.stack([torch.randperm(n, generator=gen)[:7] for _ in range(b)])
    for name in ("received_attention", "mean_logits", "mean_keys"):
        assert_close(getattr(every, name), getattr(explicit, name), rtol=0, atol=0)
    for average in ("probs", "logits"):
        assert_close(every.attention_rows(rows, average), explicit.attention_rows(rows, average), rtol=0, atol=0)
    assert_close(every.fused_heads.attention_rows(rows), explicit.fused_heads.attention_rows(rows), rtol=0, atol=0)


def test_probe_missing_inputs_raise():
    s, _ = case("decoder_left", 0)
    with pytest.raises(ValueError):
        _ = s.probe().cls_attention
    e, _ = case("encoder", 0)
    probe = AttentionProbe(e.q, e.k, e.scale, e.candidates, cls_index=0)
    with pytest.raises(ValueError):
        _ = probe.text_attention
    with pytest.raises(ValueError):
        _ = probe.last_token_attention
    with pytest.raises(ValueError):
        AttentionProbe(e.q, e.k[:, :, :1].expand(-1, -1, 3, -1), e.scale, e.candidates)


# ---------------------------------------------------------------------------------------------
# 2. local penalty
# ---------------------------------------------------------------------------------------------


def ref_local_penalty(scores: Tensor, positions: Tensor, grid: tuple[int, int], window: int = 2) -> Tensor:
    out = scores.clone()
    gh, gw = grid
    for b in range(scores.shape[0]):
        windows: dict[tuple[int, int], list[int]] = {}
        for i in range(scores.shape[1]):
            p = int(positions[b, i])
            if p == NO_POSITION:
                continue
            row, col = divmod(p, gw)
            windows.setdefault((row // window, col // window), []).append(i)
        for members in windows.values():
            # most redundant; ties to the lowest raster position
            best = max(members, key=lambda i: (float(scores[b, i]), -int(positions[b, i])))
            v = float(scores[b, best])
            out[b, best] = v * 2 if v > 0 else v / 2
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("grid", [(5, 7), (6, 6), (3, 4), (7, 5)])
@pytest.mark.parametrize("ties", [False, True])
def test_local_penalty_matches_window_loop(seed, grid, ties):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    gh, gw = grid
    b, n = 3, gh * gw - 4
    pos = [sorted(rng.sample(range(gh * gw), n)) for _ in range(b)]
    pos[1][3] = NO_POSITION  # a fused token
    pos[2][0] = NO_POSITION
    for row in pos:
        rng.shuffle(row)  # the penalty must not rely on raster order
    positions = torch.tensor(pos)
    if ties:
        scores = torch.randint(-2, 3, (b, n), generator=gen).float()
    else:
        scores = torch.randn(b, n, generator=gen)
    out = local_penalty(scores, positions, grid)
    assert_close(out, ref_local_penalty(scores, positions, grid), rtol=0, atol=0)
    # off-grid tokens untouched
    assert_close(out[positions == NO_POSITION], scores[positions == NO_POSITION], rtol=0, atol=0)


def test_local_penalty_window_three():
    gen = torch.Generator().manual_seed(5)
    positions = torch.stack([torch.randperm(35, generator=gen)[:30] for _ in range(2)])
    scores = torch.randn(2, 30, generator=gen)
    assert_close(local_penalty(scores, positions, (5, 7), window=3),
                 ref_local_penalty(scores, positions, (5, 7), window=3), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 3. filters
# ---------------------------------------------------------------------------------------------


def ref_norm(v: list) -> list:
    """L2-normalise each row of ``[B][N]``."""
    out = []
    for row in v:
        norm = math.sqrt(sum(x * x for x in row))
        out.append([x / norm for x in row])
    return out


def ref_key_proxy(mean_keys: list) -> list:
    out = []
    for keys in mean_keys:
        n, d = len(keys), len(keys[0])
        mu = [sum(keys[i][e] for i in range(n)) / n for e in range(d)]
        mu_norm = math.sqrt(sum(x * x for x in mu))
        row = []
        for key in keys:
            dot = sum(x * y for x, y in zip(key, mu))
            row.append(-dot / (math.sqrt(sum(x * x for x in key)) * mu_norm))
        out.append(row)
    return out


def ref_vision_scores(s: Setup, ref: Ref, lam, vision_term, semantic_term, swap, normalize, penalty) -> Tensor:
    v = ref.stats["mean_logits"] if vision_term == "logits" else ref.stats["received"]
    c = ref.stats["cls"] if semantic_term == "cls" else ref_key_proxy(ref.stats["mean_keys"])
    if normalize:
        v, c = ref_norm(v), ref_norm(c)
    w_v, w_c = (1 - lam, lam) if swap else (lam, 1 - lam)
    scores = t64([[w_v * v[b][i] - w_c * c[b][i] for i in range(len(v[b]))] for b in range(len(v))])
    if penalty:
        scores = ref_local_penalty(scores, s.positions, s.grid)
    return scores


def ref_split(scores: Tensor, r: int) -> tuple[list, list]:
    """Sources (sorted) = the ``r`` highest scores; targets = the rest, ascending."""
    sources, targets = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])
        sources.append(sorted(order[:r]))
        targets.append(sorted(order[r:]))
    return sources, targets


def check_split(result: FilterResult, n: int, r: int) -> None:
    b = result.sources.shape[0]
    assert result.sources.shape == (b, r) and result.targets.shape == (b, n - r)
    for src, tgt in zip(result.sources.tolist(), result.targets.tolist()):
        assert len(set(src)) == r
        assert sorted(src + tgt) == list(range(n))  # a partition
        assert tgt == sorted(tgt) and len(set(tgt)) == len(tgt)  # ascending


VISION_OPTIONS = list(itertools.product([False, True], ["logits", "received"], ["cls", "key_proxy"], [True, False],
                                        [True, False]))


@pytest.mark.parametrize("swap,vision_term,semantic_term,normalize,penalty", VISION_OPTIONS)
def test_ficoco_vision_filter_all_options(swap, vision_term, semantic_term, normalize, penalty):
    for kind, seed in (("encoder", 0), ("encoder_bias", 1)):
        s, ref = case(kind, seed)
        for lam in (0.35, 0.8):
            flt = FiCoCoVisionFilter(lam=lam, vision_term=vision_term, semantic_term=semantic_term, swap_weights=swap,
                                     normalize=normalize, local_penalty=penalty)
            expected = ref_vision_scores(s, ref, lam, vision_term, semantic_term, swap, normalize, penalty)
            close(flt.scores(s.tokens(), s.probe()), expected)
            r = 11
            result = flt(s.tokens(), s.probe(), r)
            check_split(result, s.n, r)
            sources, targets = ref_split(expected, r)
            assert sorted_rows(result.sources) == sources
            assert result.targets.tolist() == targets
            assert result.receivers is None


def sorted_rows(x: Tensor) -> list:
    return [sorted(row) for row in x.tolist()]


def test_ficoco_vision_filter_rejects_bad_options():
    with pytest.raises(ValueError):
        FiCoCoVisionFilter(lam=1.5)
    with pytest.raises(ValueError):
        FiCoCoVisionFilter(vision_term="columns")
    with pytest.raises(ValueError):
        FiCoCoVisionFilter(semantic_term="none")
    with pytest.raises(ValueError):
        FiCoCoLanguageFilter(beta=-0.1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ("decoder_left", "decoder_right"))
@pytest.mark.parametrize("normalize", [True, False])
def test_ficoco_language_filter(kind, seed, normalize):
    s, ref = case(kind, seed)
    beta = 0.6 if seed else 0.25
    v, t = ref.stats["mean_logits"], ref.stats["text_received"]
    if normalize:
        v, t = ref_norm(v), ref_norm(t)
    expected = t64([[beta * v[b][i] - (1 - beta) * t[b][i] for i in range(s.n)] for b in range(s.batch)])
    flt = FiCoCoLanguageFilter(beta=beta, normalize=normalize)
    close(flt.scores(s.tokens(), s.probe()), expected)
    result = flt(s.tokens(), s.probe(), 5)
    check_split(result, s.n, 5)
    sources, targets = ref_split(expected, 5)
    assert sorted_rows(result.sources) == sources and result.targets.tolist() == targets


@pytest.mark.parametrize("seed", SEEDS)
def test_cls_and_last_token_filters_discard_least_attended(seed):
    s, ref = case("encoder_bias", seed)
    result = CLSAttentionFilter()(s.tokens(), s.probe(), 9)
    check_split(result, s.n, 9)
    least = [sorted(sorted(range(s.n), key=lambda i: row[i])[:9]) for row in ref.stats["cls"]]
    assert sorted_rows(result.sources) == least

    s, ref = case("decoder_left" if seed % 2 else "decoder_right", seed)
    result = LastTokenAttentionFilter()(s.tokens(), s.probe(), 4)
    check_split(result, s.n, 4)
    least = [sorted(sorted(range(s.n), key=lambda i: row[i])[:4]) for row in ref.stats["last"]]
    assert sorted_rows(result.sources) == least


def ref_cos(x: list, y: list) -> float:
    return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind,n_keep", [("encoder", 27), ("encoder_bias", 26), ("decoder_left", 13)])
def test_bipartite_similarity_filter(kind, seed, n_keep):
    s, ref = case(kind, seed)
    if n_keep != s.n:  # an even token count too
        s = Setup(**{**s.__dict__, "candidates": s.candidates[:, :n_keep], "features": s.features[:, :n_keep],
                     "sizes": s.sizes[:, :n_keep], "positions": s.positions[:, :n_keep]})
    n = n_keep
    keys = [row[:n] for row in ref.stats["mean_keys"]]
    best = [{i: max(ref_cos(keys[b][i], keys[b][j]) for j in range(1, n, 2)) for i in range(0, n, 2)}
            for b in range(s.batch)]
    flt = BipartiteSimilarityFilter()
    for r in (1, 5, (n + 1) // 2):
        result = flt(s.tokens(), s.probe(), r)
        check_split(result, n, r)
        expected = [sorted(sorted(best[b], key=lambda i: -best[b][i])[:r]) for b in range(s.batch)]
        assert sorted_rows(result.sources) == expected
        assert all(i % 2 == 0 for row in result.sources.tolist() for i in row)
        assert result.receivers.tolist() == [[j % 2 == 1 for j in row] for row in result.targets.tolist()]
        even = result.scores[:, 0::2]
        close(even, [[best[b][i] for i in range(0, n, 2)] for b in range(s.batch)])
    with pytest.raises(ValueError):
        flt(s.tokens(), s.probe(), (n + 1) // 2 + 1)


def test_random_filter_deterministic_and_batch_independent():
    s, _ = case("encoder", 0)
    tokens = s.tokens()
    flt = RandomFilter(seed=3)
    first = flt(tokens, s.probe(), 10)
    check_split(first, s.n, 10)
    again = RandomFilter(seed=3)(tokens, s.probe(), 10)
    assert first.sources.tolist() == again.sources.tolist() and first.targets.tolist() == again.targets.tolist()
    assert sorted_rows(RandomFilter(seed=4)(tokens, s.probe(), 10).sources) != sorted_rows(first.sources)
    # scores depend on grid position only: the same position gets the same score in every sample
    by_position: dict[int, float] = {}
    for pos_row, score_row in zip(s.positions.tolist(), first.scores.tolist()):
        for p, v in zip(pos_row, score_row):
            assert by_position.setdefault(p, v) == v
    # a sample alone, or with other samples in another order, gets the same split
    for order in ([2], [1, 2], [2, 0, 1]):
        sub = TokenGroup(s.features[order], s.sizes[order], s.positions[order], s.grid)
        probe = AttentionProbe(s.q[order], s.k[order], s.scale, s.candidates[order], cls_index=0)
        result = flt(sub, probe, 10)
        for row, original in enumerate(order):
            assert sorted(result.sources[row].tolist()) == sorted(first.sources[original].tolist())
            assert result.targets[row].tolist() == first.targets[original].tolist()


# ---------------------------------------------------------------------------------------------
# 4. correlates
# ---------------------------------------------------------------------------------------------


def ref_quantile_targets(c: list, eps: float, allowed: list | None = None) -> Tensor:
    """Per row: sort the allowed values, tau at position eps * (n - 1) with linear interpolation,
    keep the allowed entries >= tau."""
    out = []
    for b, rows in enumerate(c):
        cols = [j for j in range(len(rows[0])) if allowed is None or allowed[b][j]]
        out_rows = []
        for row in rows:
            vals = sorted(row[j] for j in cols)
            pos = eps * (len(vals) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(vals) - 1)
            tau = vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
            out_rows.append([row[j] if j in cols and row[j] >= tau else 0.0 for j in range(len(row))])
        out.append(out_rows)
    return t64(out)


# eps * (n - 1) is either exact (0, 0.25, 0.5, 1) or far from an integer for the sizes used
EPS_VALUES = (0.0, 0.25, 0.5, 0.613, 0.998, 1.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps", EPS_VALUES)
@pytest.mark.parametrize("mode", ["plain", "allowed", "ties"])
def test_quantile_targets_vs_sorted_interpolation(seed, eps, mode):
    gen = torch.Generator().manual_seed(seed)
    b, r, t = 3, 7, 19
    if mode == "ties":
        c = torch.randint(0, 4, (b, r, t), generator=gen).float() / 4
    else:
        c = torch.rand(b, r, t, generator=gen)
    allowed = None
    if mode == "allowed":
        allowed = torch.rand(b, t, generator=gen) < 0.5
        allowed[:, seed] = True  # at least one per row
        allowed[2] = False
        allowed[2, 5] = True  # a row with a single receiver
    out = quantile_targets(c, eps, allowed)
    expected = ref_quantile_targets(c.double().tolist(), eps, None if allowed is None else allowed.tolist())
    assert_close(out.double(), expected, rtol=0, atol=0)
    if mode != "ties":
        assert ((out > 0).sum(-1) >= 1).all()  # at least one target per source
    if allowed is not None:
        assert (out[~allowed[:, None, :].expand_as(out)] == 0).all()


def ref_top_k_targets(c: list, k: int, allowed: list | None = None) -> Tensor:
    """Per row: the k largest allowed values (ties to the lower index) keep their value; a row with
    no positive kept value sends 1 to its first allowed column."""
    out = []
    for b, rows in enumerate(c):
        cols = [j for j in range(len(rows[0])) if allowed is None or allowed[b][j]]
        out_rows = []
        for row in rows:
            chosen = sorted(cols, key=lambda j: (-row[j], j))[:k]
            kept = [row[j] if j in chosen else 0.0 for j in range(len(row))]
            if sum(kept) <= 0:
                kept = [1.0 if j == cols[0] else 0.0 for j in range(len(row))]
            out_rows.append(kept)
        out.append(out_rows)
    return t64(out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", (1, 2, 5, 40))
@pytest.mark.parametrize("mode", ["plain", "allowed", "ties"])
def test_top_k_targets_vs_reference(seed, k, mode):
    gen = torch.Generator().manual_seed(seed)
    b, r, t = 3, 7, 19
    c = torch.randint(0, 4, (b, r, t), generator=gen).float() / 4 if mode == "ties" else torch.rand(b, r, t, generator=gen)
    c[0, 0] = 0.0  # a source that sees no target
    allowed = None
    if mode == "allowed":
        allowed = torch.rand(b, t, generator=gen) < 0.5
        allowed[:, seed] = True
        allowed[2] = False
        allowed[2, 5] = True
    out = top_k_targets(c, k, allowed)
    expected = ref_top_k_targets(c.double().tolist(), k, None if allowed is None else allowed.tolist())
    assert_close(out.double(), expected, rtol=0, atol=0)
    assert ((out > 0).sum(-1) >= 1).all() and ((out > 0).sum(-1) <= k).all()
    with pytest.raises(ValueError, match="K = 0 is pruning"):
        top_k_targets(c, 0)


def random_split(n: int, r: int, batch: int, seed: int, receivers: bool) -> FilterResult:
    rng = random.Random(seed)
    sources = [rng.sample(range(n), r) for _ in range(batch)]  # unsorted, not contiguous
    targets = [sorted(set(range(n)) - set(row)) for row in sources]
    recv = None
    if receivers:
        recv = [[rng.random() < 0.6 or j == 0 for j in range(n - r)] for _ in range(batch)]
        recv = torch.tensor(recv)
    return FilterResult(torch.tensor(sources), torch.tensor(targets), None, recv)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ("encoder", "encoder_bias"))
@pytest.mark.parametrize("receivers", [False, True])
@pytest.mark.parametrize("eps", [0.998, 0.613])
def test_attention_quantile_correlate(kind, seed, receivers, eps):
    s, ref = case(kind, seed)
    split = random_split(s.n, 8, s.batch, seed, receivers)
    cand = s.candidates.tolist()
    c = [[[ref.attn[b][cand[b][i]][cand[b][j]] for j in split.targets[b].tolist()] for i in split.sources[b].tolist()]
         for b in range(s.batch)]
    expected = ref_quantile_targets(c, eps, None if split.receivers is None else split.receivers.tolist())
    corr = AttentionQuantileCorrelate(eps=eps)(s.tokens(), s.probe(), split)
    assert not corr.into_new_token
    close(corr.weights, expected)
    assert ((corr.weights > 0).sum(-1) >= 1).all()


def ref_text_mediated(s: Setup, ref: Ref, split: FilterResult, gamma: float) -> list:
    cand = s.candidates.tolist()
    text_rows = s.text_rows.tolist()
    valid = s.text_valid.tolist()
    out = []
    for b in range(s.batch):
        a = ref.attn[b]
        real = [text_rows[b][m] for m in range(len(text_rows[b])) if valid[b][m]]
        rows = []
        for i in split.sources[b].tolist():
            row = []
            for j in split.targets[b].tolist():
                direct = a[cand[b][i]][cand[b][j]]
                indirect = sum(a[k][cand[b][i]] * a[k][cand[b][j]] for k in real) / len(real)
                row.append(gamma * direct + (1 - gamma) * indirect)
            rows.append(row)
        out.append(rows)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("receivers", [False, True])
def test_fixed_k_correlates_take_each_sources_k_largest(seed, receivers):
    """``fixed_k`` (the paper's fixed-K ablation): the same correlations, the k largest kept."""
    s, ref = case("encoder", seed)
    split = random_split(s.n, 8, s.batch, seed, receivers)
    allowed = None if split.receivers is None else split.receivers.tolist()
    cand = s.candidates.tolist()
    c = [[[ref.attn[b][cand[b][i]][cand[b][j]] for j in split.targets[b].tolist()] for i in split.sources[b].tolist()]
         for b in range(s.batch)]
    for k in (1, 3):
        close(AttentionQuantileCorrelate(fixed_k=k)(s.tokens(), s.probe(), split).weights, ref_top_k_targets(c, k, allowed))
    s, ref = case("decoder_left", seed)
    split = random_split(s.n, 5, s.batch, seed, receivers)
    allowed = None if split.receivers is None else split.receivers.tolist()
    expected = ref_top_k_targets(ref_text_mediated(s, ref, split, 0.6), 2, allowed)
    close(TextMediatedQuantileCorrelate(fixed_k=2)(s.tokens(), s.probe(), split).weights, expected)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="fixed_k must be None"):
            AttentionQuantileCorrelate(fixed_k=bad)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ("decoder_left", "decoder_right"))
@pytest.mark.parametrize("receivers", [False, True])
def test_text_mediated_quantile_correlate(kind, seed, receivers):
    s, ref = case(kind, seed)
    split = random_split(s.n, 5, s.batch, seed, receivers)
    allowed = None if split.receivers is None else split.receivers.tolist()
    for gamma, eps in ((0.6, 0.998), (0.3, 0.613), (0.0, 0.5)):
        c = ref_text_mediated(s, ref, split, gamma)
        expected = ref_quantile_targets(c, eps, allowed)
        corr = TextMediatedQuantileCorrelate(gamma=gamma, eps=eps)(s.tokens(), s.probe(), split)
        close(corr.weights, expected)
        assert ((corr.weights > 0).sum(-1) >= 1).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("receivers", [False, True])
def test_argmax_similarity_correlate(seed, receivers):
    s, ref = case("encoder", seed)
    split = random_split(s.n, 9, s.batch, seed, receivers)
    keys = ref.stats["mean_keys"]
    corr = ArgmaxSimilarityCorrelate()(s.tokens(), s.probe(), split)
    expected = []
    for b in range(s.batch):
        tgt = split.targets[b].tolist()
        rows = []
        for i in split.sources[b].tolist():
            options = [t for t in range(len(tgt)) if split.receivers is None or bool(split.receivers[b, t])]
            best = max(options, key=lambda t: ref_cos(keys[b][i], keys[b][tgt[t]]))
            rows.append([1.0 if t == best else 0.0 for t in range(len(tgt))])
        expected.append(rows)
    close(corr.weights, expected, rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_convergent_correlate(seed):
    s, ref = case("encoder_bias", seed)
    split = random_split(s.n, 7, s.batch, seed, False)
    corr = ConvergentCorrelate()(s.tokens(), s.probe(), split)
    assert corr.into_new_token and ConvergentCorrelate.creates_token
    expected = [[[ref.stats["cls"][b][i]] for i in split.sources[b].tolist()] for b in range(s.batch)]
    close(corr.weights, expected)
    assert NoCorrelate()(s.tokens(), s.probe(), split).weights is None


# ---------------------------------------------------------------------------------------------
# 5. compressors
# ---------------------------------------------------------------------------------------------


def random_groups(seed: int, b=3, t=11, r=7, d=5):
    gen = torch.Generator().manual_seed(seed)
    targets = TokenGroup(torch.randn(b, t, d, generator=gen), torch.randint(1, 5, (b, t), generator=gen).float(),
                         torch.randperm(40, generator=gen)[:t].sort().values.expand(b, t).contiguous(), (5, 8))
    sources = TokenGroup(torch.randn(b, r, d, generator=gen), torch.randint(1, 5, (b, r), generator=gen).float(),
                         torch.randint(0, 40, (b, r), generator=gen), (5, 8))
    w = torch.rand(b, r, t, generator=gen)
    w = w * (torch.rand(b, r, t, generator=gen) < 0.3)
    w[torch.arange(b)[:, None], torch.arange(r)[None, :], torch.randint(0, t, (b, r), generator=gen)] += 0.5
    return targets, sources, w


def ref_merge(targets: TokenGroup, sources: TokenGroup, w: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """x_j and size_j after merging, per target, from the per-source row-normalised weights."""
    xt, st = targets.features.double().tolist(), targets.sizes.double().tolist()
    xs, ss = sources.features.double().tolist(), sources.sizes.double().tolist()
    w = w.double().tolist()
    feats, sizes = [], []
    for b in range(len(xt)):
        frow, srow = [], []
        for j in range(len(xt[b])):
            self_w = st[b][j] if mode == "size" else 1.0
            num = [self_w * x for x in xt[b][j]]
            den = self_w
            size = st[b][j]
            for i in range(len(xs[b])):
                if w[b][i][j] == 0:
                    continue
                if mode == "average":
                    chosen = sum(1 for v in w[b][i] if v > 0)
                    a, share = 1.0, 1.0 / chosen
                else:
                    share = w[b][i][j] / sum(w[b][i])
                    a = share * ss[b][i] if mode == "size" else share
                num = [u + a * x for u, x in zip(num, xs[b][i])]
                den += a
                size += share * ss[b][i]
            frow.append([u / den for u in num])
            srow.append(size)
        feats.append(frow)
        sizes.append(srow)
    return t64(feats), t64(sizes)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode,compress", [("self", SelfPreservingCompress()), ("average", AveragingCompress()),
                                           ("size", SizeWeightedCompress())])
def test_merging_compressors(seed, mode, compress):
    targets, sources, w = random_groups(seed)
    out = compress(targets, sources, Correlation(w))
    feats, sizes = ref_merge(targets, sources, w, mode)
    close(out.features, feats)
    close(out.sizes, sizes)
    assert out.features.dtype == targets.features.dtype
    assert out.positions.tolist() == targets.positions.tolist()
    close(out.sizes.sum(1), targets.sizes.double().sum(1) + sources.sizes.double().sum(1))  # size conserved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,compress", [("self", SelfPreservingCompress()), ("size", SizeWeightedCompress())])
def test_merging_half_precision_features_to_their_rounding(mode, compress, dtype):
    """Half-precision features are summed in their own precision (float32 accumulation): the result
    stays within a few of their rounding steps of the exact merge, and the targets are untouched."""
    targets, sources, w = random_groups(3)
    half = [TokenGroup(g.features.to(dtype), g.sizes, g.positions, g.grid) for g in (targets, sources)]
    before = half[0].features.clone()
    out = compress(*half, Correlation(w))
    feats, _ = ref_merge(*half, w, mode)
    step = torch.finfo(dtype).eps  # one rounding step, relative
    assert out.features.dtype == dtype and torch.equal(half[0].features, before)
    assert ((out.features.double() - feats).abs() <= 4 * step * feats.abs().clamp_min(1.0)).all()


def test_size_weighted_compress_one_hot_is_tome():
    targets, sources, w = random_groups(7)
    one_hot = torch.zeros_like(w).scatter_(-1, w.argmax(-1, keepdim=True), 1.0)
    out = SizeWeightedCompress()(targets, sources, Correlation(one_hot))
    for b in range(w.shape[0]):
        for j in range(w.shape[2]):
            members = [i for i in range(w.shape[1]) if one_hot[b, i, j] == 1]
            num = targets.sizes[b, j].double() * targets.features[b, j].double()
            den = targets.sizes[b, j].double()
            for i in members:
                num = num + sources.sizes[b, i].double() * sources.features[b, i].double()
                den = den + sources.sizes[b, i].double()
            close(out.features[b, j], num / den)
            close(out.sizes[b, j], den)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuse_and_drop_compress(seed):
    targets, sources, w = random_groups(seed)
    weights = w[:, :, :1] + 0.1  # [B, r, 1]
    out = FuseCompress()(targets, sources, Correlation(weights, into_new_token=True))
    b, t = targets.sizes.shape
    assert out.num_tokens == t + 1
    assert_close(out.features[:, :t], targets.features, rtol=0, atol=0)
    assert_close(out.sizes[:, :t], targets.sizes, rtol=0, atol=0)
    assert out.positions[:, :t].tolist() == targets.positions.tolist()
    assert out.positions[:, t].tolist() == [NO_POSITION] * b
    for row in range(b):
        ws = weights[row, :, 0].double()
        fused = sum(ws[i] * sources.features[row, i].double() for i in range(ws.shape[0])) / ws.sum()
        close(out.features[row, t], fused)
        close(out.sizes[row, t], sources.sizes[row].double().sum())
    dropped = DropCompress()(targets, sources, Correlation(None))
    assert_close(dropped.features, targets.features, rtol=0, atol=0)
    assert_close(dropped.sizes, targets.sizes, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 6. TokenReduction
# ---------------------------------------------------------------------------------------------


COMPOSITIONS = {
    "ficoco_v": ("encoder_bias", lambda: TokenReduction(FiCoCoVisionFilter(), AttentionQuantileCorrelate(), SelfPreservingCompress()), True),
    "ficoco_v_avg": ("encoder", lambda: TokenReduction(FiCoCoVisionFilter(vision_term="received"), AttentionQuantileCorrelate(eps=0.613), AveragingCompress()), True),
    "ficoco_l": ("decoder_left", lambda: TokenReduction(FiCoCoLanguageFilter(), TextMediatedQuantileCorrelate(), SelfPreservingCompress()), True),
    "ficoco_l_right": ("decoder_right", lambda: TokenReduction(FiCoCoLanguageFilter(), TextMediatedQuantileCorrelate(eps=0.613), SelfPreservingCompress()), True),
    "tome": ("encoder", lambda: TokenReduction(BipartiteSimilarityFilter(), ArgmaxSimilarityCorrelate(), SizeWeightedCompress()), True),
    "evit": ("encoder_bias", lambda: TokenReduction(CLSAttentionFilter(), ConvergentCorrelate(), FuseCompress()), True),
    "fastv": ("decoder_right", lambda: TokenReduction(LastTokenAttentionFilter(), NoCorrelate(), DropCompress()), False),
    "random": ("encoder", lambda: TokenReduction(RandomFilter(seed=1), NoCorrelate(), DropCompress()), False),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_token_reduction_counts_and_sizes(name):
    kind, build, merges = COMPOSITIONS[name]
    reduction = build()
    for seed in (0, 1):
        s, _ = case(kind, seed)
        for num_remove in (1, 4, 6):
            result = reduction(s.tokens(), s.probe(), num_remove)
            assert result.tokens.num_tokens == s.n - num_remove
            assert result.tokens.features.shape == (s.batch, s.n - num_remove, D_MODEL)
            extra = 1 if result.correlation.into_new_token else 0
            assert result.sources.shape == (s.batch, num_remove + extra)
            check_split(result.filter_result, s.n, num_remove + extra)
            assert result.kept.tolist() == result.filter_result.targets.tolist()
            if extra:
                assert [int(x) in row for x, row in zip(result.new_token_slot, result.sources.tolist())] == [True] * s.batch
            else:
                assert result.new_token_slot is None
            kept_sizes = s.sizes.gather(1, result.kept)
            if merges:
                close(result.tokens.sizes.sum(1), s.sizes.double().sum(1))
            else:
                assert_close(result.tokens.sizes, kept_sizes, rtol=0, atol=0)
                assert_close(result.tokens.features, gather_rows(s.features, result.kept), rtol=0, atol=0)
            # kept targets carry their own grid positions, in order
            assert result.tokens.positions[:, : result.kept.shape[1]].tolist() == s.positions.gather(1, result.kept).tolist()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps", [0.998, 0.613])
def test_ficoco_v_end_to_end_matches_reference(seed, eps):
    s, ref = case("encoder_bias", seed)
    r = 10
    result = TokenReduction(FiCoCoVisionFilter(), AttentionQuantileCorrelate(eps=eps), SelfPreservingCompress())(
        s.tokens(), s.probe(), r)
    scores = ref_vision_scores(s, ref, 0.35, "logits", "cls", False, True, True)
    sources, targets = ref_split(scores, r)
    assert sorted_rows(result.sources) == sources and result.kept.tolist() == targets
    cand = s.candidates.tolist()
    c = [[[ref.attn[b][cand[b][i]][cand[b][j]] for j in targets[b]] for i in sources[b]] for b in range(s.batch)]
    w = ref_quantile_targets(c, eps)
    tgt, src = torch.tensor(targets), torch.tensor(sources)
    feats, sizes = ref_merge(s.tokens().select(tgt), s.tokens().select(src), w, "self")
    close(result.tokens.features, feats)
    close(result.tokens.sizes, sizes)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ("decoder_left", "decoder_right"))
def test_ficoco_l_end_to_end_matches_reference(seed, kind):
    s, ref = case(kind, seed)
    r = 4
    result = TokenReduction(FiCoCoLanguageFilter(), TextMediatedQuantileCorrelate(eps=0.613), SelfPreservingCompress())(
        s.tokens(), s.probe(), r)
    v, t = ref_norm(ref.stats["mean_logits"]), ref_norm(ref.stats["text_received"])
    scores = t64([[0.6 * v[b][i] - 0.4 * t[b][i] for i in range(s.n)] for b in range(s.batch)])
    sources, targets = ref_split(scores, r)
    assert sorted_rows(result.sources) == sources and result.kept.tolist() == targets
    split = FilterResult(torch.tensor(sources), torch.tensor(targets))
    w = ref_quantile_targets(ref_text_mediated(s, ref, split, 0.6), 0.613)
    feats, sizes = ref_merge(s.tokens().select(split.targets), s.tokens().select(split.sources), w, "self")
    close(result.tokens.features, feats)
    close(result.tokens.sizes, sizes)


def test_token_reduction_rejects_invalid_compositions():
    with pytest.raises(ValueError):
        TokenReduction(CLSAttentionFilter(), ConvergentCorrelate(), SelfPreservingCompress())
    with pytest.raises(ValueError):
        TokenReduction(CLSAttentionFilter(), ConvergentCorrelate(), DropCompress())
    with pytest.raises(ValueError):
        TokenReduction(LastTokenAttentionFilter(), NoCorrelate(), SelfPreservingCompress())
    with pytest.raises(ValueError):
        TokenReduction(LastTokenAttentionFilter(), NoCorrelate(), SizeWeightedCompress())
    with pytest.raises(ValueError):
        TokenReduction(FiCoCoVisionFilter(), AttentionQuantileCorrelate(), FuseCompress())
    s, _ = case("encoder", 0)
    reduction = TokenReduction(CLSAttentionFilter(), ConvergentCorrelate(), FuseCompress())
    with pytest.raises(ValueError):
        reduction(s.tokens(), s.probe(), s.n)  # plus the extra source: more than there are
    with pytest.raises(ValueError):
        TokenReduction(RandomFilter(), NoCorrelate(), DropCompress())(s.tokens(), s.probe(), s.n + 1)


# ---------------------------------------------------------------------------------------------
# 7. token helpers and placeholder rewriting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,r", [(1, 0), (1, 1), (7, 3), (13, 0), (13, 13), (29, 17)])
def test_complement(n, r):
    rng = random.Random(n * 31 + r)
    index = [rng.sample(range(n), r) for _ in range(4)]
    out = complement(torch.tensor(index, dtype=torch.long).reshape(4, r), n)
    assert out.tolist() == [sorted(set(range(n)) - set(row)) for row in index]


@pytest.mark.parametrize("shape", [(3, 9), (3, 9, 5), (3, 9, 2, 4)])
def test_gather_rows(shape):
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen)
    index = torch.randint(0, shape[1], (shape[0], 6), generator=gen)
    out = gather_rows(x, index)
    assert out.shape == (shape[0], 6, *shape[2:])
    for b in range(shape[0]):
        for k in range(6):
            assert torch.equal(out[b, k], x[b, int(index[b, k])])
    sel = TokenGroup(x.reshape(shape[0], shape[1], -1), torch.rand(shape[0], shape[1]),
                     torch.arange(shape[1]).expand(shape[0], -1), (3, 3)).select(index)
    assert sel.positions.tolist() == index.tolist()
    assert torch.equal(sel.features.reshape(out.shape), out)


IMG, PAD = 99, 0
FILL = {"attention_mask": 0, "labels": -100, "position_ids": 0}


def build_prompts(seed: int, images: list[int], full: int, side: str):
    rng = random.Random(seed)
    rows = []
    for count in images:
        ids = [1] + [rng.randint(2, 50) for _ in range(rng.randint(1, 4))]
        for _ in range(count):
            ids += [IMG] * full + [rng.randint(2, 50) for _ in range(rng.randint(0, 3))]
        rows.append(ids)
    length = max(len(r) for r in rows) + (1 if side else 0)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    labels = torch.where(mask.bool() & (ids != IMG), ids + 1000, -100)
    extra = torch.randn(len(rows), length, 3, generator=torch.Generator().manual_seed(seed))
    shared = torch.arange(length)[None]  # [1, L], broadcast over the batch
    return ids, {"attention_mask": mask, "labels": labels, "extra": extra, "position_ids": shared}


def ref_shrink(ids: Tensor, per_token: dict, full: int, kept: int, side: str):
    b, length = ids.shape
    keep_cols = []
    for row in range(b):
        seen, cols = 0, []
        for col in range(length):
            if int(ids[row, col]) == IMG:
                if seen % full < kept:
                    cols.append(col)
                seen += 1
            else:
                cols.append(col)
        keep_cols.append(cols)
    new_len = max(len(c) for c in keep_cols)

    def cut(x: Tensor, fill) -> Tensor:
        x = x.expand(b, *x.shape[1:])
        rows = []
        for row in range(b):
            vals = [x[row, col] for col in keep_cols[row]]
            pad = [torch.full_like(x[row, 0], fill)] * (new_len - len(vals))
            rows.append(torch.stack(pad + vals if side == "left" else vals + pad))
        return torch.stack(rows)

    return cut(ids, PAD), {k: cut(v, FILL.get(k, 0)) for k, v in per_token.items()}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("images", [[1, 1, 1], [2, 0, 1], [1, 3], [0, 0]])
@pytest.mark.parametrize("full,kept", [(7, 3), (5, 5), (6, 1)])
def test_shrink_placeholders(seed, side, images, full, kept):
    ids, per_token = build_prompts(seed, images, full, side)
    new_ids, cut = shrink_placeholders(ids, per_token, image_token_id=IMG, full_per_image=full,
                                       kept_per_image=kept, pad_token_id=PAD)
    ref_ids, ref_cut = ref_shrink(ids, per_token, full, kept, side)
    assert new_ids.tolist() == ref_ids.tolist()
    assert set(cut) == set(per_token)
    for name, value in ref_cut.items():
        assert cut[name].shape == value.shape and cut[name].dtype == per_token[name].dtype, name
        assert torch.equal(cut[name], value), name
    assert ((new_ids == IMG).sum(1) == torch.tensor(images) * kept).all()


def test_shrink_placeholders_unpadded_batch_repads_right():
    """No row starts with padding (here: no padding at all), yet the rows end up with different
    lengths because they hold different numbers of images: re-padded on the right, as documented."""
    rows = [[1, 5] + [IMG] * 4 + [6] + [IMG] * 4 + [7], [1, 5, 8, 9, 10, 11] + [IMG] * 4 + [7, 12]]
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    per_token = {"attention_mask": mask, "labels": torch.where(ids == IMG, -100, ids)}
    new_ids, cut = shrink_placeholders(ids, per_token, image_token_id=IMG, full_per_image=4, kept_per_image=1,
                                       pad_token_id=PAD)
    ref_ids, ref_cut = ref_shrink(ids, per_token, 4, 1, "right")
    assert new_ids.shape == (2, 9)
    assert new_ids.tolist() == ref_ids.tolist()
    for name in per_token:
        assert torch.equal(cut[name], ref_cut[name]), name


def test_shrink_placeholders_unpadded_batch_for_generation_repads_left():
    rows = [[1, 5] + [IMG] * 4 + [6] + [IMG] * 4 + [7], [1, 5, 8, 9, 10, 11] + [IMG] * 4 + [7, 12]]
    ids = torch.tensor(rows)
    per_token = {"attention_mask": torch.ones_like(ids)}
    new_ids, cut = shrink_placeholders(ids, per_token, image_token_id=IMG, full_per_image=4, kept_per_image=1,
                                       pad_token_id=PAD, default_side="left")
    ref_ids, ref_cut = ref_shrink(ids, per_token, 4, 1, "left")
    assert new_ids.tolist() == ref_ids.tolist()
    assert torch.equal(cut["attention_mask"], ref_cut["attention_mask"])
    assert cut["attention_mask"][0, 0] == 0 and cut["attention_mask"][1, 0] == 1  # the shorter row is padded on the left


def test_quantile_targets_never_loses_a_source():
    """A source that sees none of the targets (causal attention) still goes somewhere: weight 1 on
    its first allowed target, so merging conserves the total size."""
    c = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.1, 0.5, 0.2, 0.0]]])
    out = quantile_targets(c, 0.998)
    assert out[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 0.5, 0.0, 0.0]))
    allowed = torch.tensor([[False, False, True, True]])
    out = quantile_targets(c, 0.998, allowed)
    assert out[0, 0].tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 0.0, 0.2, 0.0]))


def test_probe_rotates_only_where_needed_and_consistently():
    """A probe given un-rotated q/k and a ``rope(x, rows)`` equals one given pre-rotated q/k."""
    gen = torch.Generator().manual_seed(7)
    b, l, h, hk, d = 2, 11, 4, 2, 6
    q, k = torch.randn(b, l, h, d, generator=gen), torch.randn(b, l, hk, d, generator=gen)
    angle = torch.randn(b, l, d // 2, generator=gen)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rope(x, rows):
        c, s = (cos, sin) if rows is None else (gather_rows(cos, rows), gather_rows(sin, rows))
        half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
        return x * c[:, :, None] + half * s[:, :, None]

    cand = torch.tensor([[2, 3, 5, 6, 7], [1, 2, 4, 8, 9]])
    common = dict(causal=True, text_rows=torch.tensor([[8, 9, 10], [10, 10, 10]]),
                  text_valid=torch.tensor([[True, True, True], [True, False, False]]), last_row=torch.tensor([10, 10]))
    lazy = AttentionProbe(q, k, 0.4, cand, rope=rope, **common)
    eager = AttentionProbe(rope(q, None), rope(k, None), 0.4, cand, **common)
    for stat in ("mean_logits", "received_attention", "text_received", "last_token_attention", "mean_keys"):
        torch.testing.assert_close(getattr(lazy, stat), getattr(eager, stat))
    rows = torch.tensor([[0, 4], [3, 1]])
    torch.testing.assert_close(lazy.attention_rows(rows), eager.attention_rows(rows))
    assert not torch.allclose(eager.mean_logits, AttentionProbe(q, k, 0.4, cand, **common).mean_logits)


def test_statistics_on_the_cpu_never_import_triton(monkeypatch):
    """Triton is only a test extra: without it, the probe's statistics (the correlation at the kept
    columns included) run in PyTorch and never import the Triton kernels' module."""
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now fails
    monkeypatch.delitem(sys.modules, "ficoco.stages.attention_kernels", raising=False)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 16, H, D_HEAD, generator=gen), torch.randn(2, 16, HK, D_HEAD, generator=gen)
    probe = AttentionProbe(q, k, 0.3, None, compile_backend="inductor")
    rows, cols = torch.tensor([[0, 5], [3, 1]]), torch.tensor([[2, 7, 9], [4, 0, 8]])
    assert probe.attention_between(rows, cols).shape == (2, 2, 3)
    assert GroupedProbe(probe, 4).attention_between(torch.tensor([[0], [2]]), torch.tensor([[1, 3], [0, 1]])).shape \
        == (2, 1, 2)
    assert probe.received_attention.shape == (2, 16) and probe.softmax_rows(rows).shape == (2, 2, 16)
    assert "ficoco.stages.attention_kernels" not in sys.modules

