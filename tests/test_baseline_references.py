"""TopK, VisionZip, DART and PruMerge against their official algorithms written out literally: one
sample at a time, the full softmax map of the layer, Python loops over the tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ficoco.methods import get_method
from ficoco.stages import AttentionProbe, TokenGroup

SEEDS = (0, 1, 2)


def layer(seed: int, n: int = 48, heads: int = 4, dim: int = 8, batch: int = 2):
    """Queries/keys of one encoder layer with [CLS] at index 0, and the patch features."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n + 1, heads, dim, generator=gen) * 2
    k = torch.randn(batch, n + 1, heads, dim, generator=gen) * 2
    x = torch.randn(batch, n, 16, generator=gen)
    probe = AttentionProbe(q, k, dim ** -0.5, torch.arange(1, n + 1).expand(batch, n), cls_index=0)
    return q, k, x, probe


def cls_row(q, k, b):
    """Head-averaged softmax row of [CLS] over the patches, from the full map."""
    logits = torch.einsum("qhd,khd->hqk", q[b], k[b]) * q.shape[-1] ** -0.5
    return logits.softmax(-1).mean(0)[0, 1:]


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_keeps_the_most_attended_patches_in_raster_order(seed):
    q, k, x, probe = layer(seed)
    method = get_method("topk", retain=10)
    result = method.vision.reduction(TokenGroup.fresh(x, (6, 8)), probe, 38)
    for b in range(2):
        row = cls_row(q, k, b).tolist()
        expected = sorted(sorted(range(48), key=lambda i: -row[i])[:10])
        assert result.kept[b].tolist() == expected
        torch.testing.assert_close(result.tokens.features[b], x[b, expected])


def official_visionzip(q, k, x, b, dominant, contextual):
    """VisionZip's token selection and merging for sample ``b`` as its code reads."""
    row = cls_row(q, k, b).tolist()
    top = sorted(sorted(range(len(row)), key=lambda i: -row[i])[:dominant])
    rest = [i for i in range(len(row)) if i not in top]  # raster order
    step = max(1, len(rest) // contextual)
    targets = rest[0::step][:contextual]
    others = [i for i in rest if i not in targets]
    keys = F.normalize(k[b, 1:].mean(dim=1), dim=-1)  # head-averaged keys of the patches
    assigned = {t: [] for t in targets}
    for i in others:
        sims = [float(keys[i] @ keys[t]) for t in targets]
        assigned[targets[sims.index(max(sims))]].append(i)  # first target on ties
    merged = {t: x[b, t] + (x[b, assigned[t]].mean(dim=0) if assigned[t] else 0) for t in targets}
    kept = sorted(top + targets)
    return kept, torch.stack([merged[i] if i in merged else x[b, i] for i in kept])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("retain,share", [(12, 10 / 64), (20, 0.25), (9, 0.0)])
def test_visionzip_equals_the_official_algorithm(seed, retain, share):
    q, k, x, probe = layer(seed)
    method = get_method("visionzip", retain=retain, contextual_share=share)
    result = method.vision.reduction(TokenGroup.fresh(x, (6, 8)), probe, 48 - retain)
    contextual = round(retain * share)
    for b in range(2):
        kept, features = official_visionzip(q, k, x, b, retain - contextual, contextual) if contextual else (
            sorted(sorted(range(48), key=lambda i: -cls_row(q, k, b)[i].item())[:retain]), None)
        assert result.kept[b].tolist() == kept
        if features is not None:
            torch.testing.assert_close(result.tokens.features[b], features, rtol=1e-5, atol=1e-5)


def test_visionzip_refuses_bad_shares():
    with pytest.raises(ValueError, match="contextual_share must lie in"):
        get_method("visionzip", contextual_share=1.0)


def official_dart(keys, hidden, weight, candidates, text, kept, image_pivots=4, text_pivots=4):
    """DART's selection for one sample written out: pivots by the L1 norm of their keys (before
    RoPE, see docs/methods.md), then each pivot in turn claims the visual tokens whose normed
    hidden state is least similar to its own."""
    norm = [float(keys[i].abs().sum()) for i in range(keys.shape[0])]
    image = sorted(candidates, key=lambda i: (-norm[i], candidates.index(i)))[:image_pivots]
    texts = sorted(text, key=lambda i: -norm[i])[:min(text_pivots, len(text))]
    pivots = image + texts
    share, extra = divmod(kept - image_pivots, len(pivots))
    state = {i: F.normalize(hidden[i] * weight, dim=0) for i in range(hidden.shape[0])}
    chosen = set(image)
    for index, p in enumerate(pivots):
        claim = share + (index < extra)
        pool = [c for c in candidates if c not in chosen]
        ranked = sorted(pool, key=lambda c: float(state[p] @ state[c]))  # least similar first
        chosen.update(ranked[:claim])
    return sorted(candidates.index(c) for c in chosen)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kept", [4, 13, 30])
def test_dart_equals_the_pivot_and_duplication_loop(seed, kept):
    from ficoco.stages import DuplicationFilter

    gen = torch.Generator().manual_seed(seed)
    b, length, heads, dim, width = 2, 60, 2, 8, 16
    q = torch.randn(b, length, heads, dim, generator=gen)
    k = torch.randn(b, length, heads, dim, generator=gen)
    hidden = torch.randn(b, length, width, generator=gen)
    weight = torch.rand(width, generator=gen) + 0.5
    candidates = torch.arange(5, 45).expand(b, 40)
    text_rows = torch.arange(45, 60).expand(b, 15)
    text_valid = torch.ones(b, 15, dtype=torch.bool)
    text_valid[1, 3:] = False  # the second prompt has 3 text tokens after the image: 3 text pivots
    probe = AttentionProbe(q, k, dim ** -0.5, candidates, causal=True, text_rows=text_rows, text_valid=text_valid,
                           last_row=torch.full((b,), length - 1), hidden=hidden, hidden_weight=weight)
    result = DuplicationFilter()(TokenGroup.fresh(torch.randn(b, 40, 4), (5, 8)), probe, 40 - kept)
    for row in range(b):
        text = text_rows[row][text_valid[row]].tolist()
        expected = official_dart(k[row], hidden[row], weight, candidates[row].tolist(), text, kept)
        assert result.targets[row].tolist() == expected


def test_dart_refuses_budgets_below_its_pivots():
    with pytest.raises(ValueError, match="keeps its 4 image pivots: cannot keep 3"):
        _, _, x, probe = layer(0)
        from ficoco.stages import DuplicationFilter

        DuplicationFilter()(TokenGroup.fresh(x, (6, 8)), probe, 45)
    with pytest.raises(ValueError, match="DART's k must be an integer >= 1"):
        get_method("dart", k=0)


def test_pdrop_stages_follow_the_depth_and_keep_one_share():
    """PyramidDrop's default stages are a quarter, half and three quarters of the LLM's depth
    (before layers 8 / 16 / 24 of LLaVA-1.5-7B's 32, the official ones), and each keeps the same
    share: the official 576 -> 288 -> 144 -> 72."""
    from ficoco.methods import ModelGeometry

    assert get_method("pdrop", retain=72).plan(ModelGeometry(24, 22, 576, 32)).language == {7: 288, 15: 144, 23: 72}
    assert get_method("pdrop", retain=72).plan(ModelGeometry(24, 22, 576, 28)).language == {6: 288, 13: 144, 20: 72}
    plan = get_method("pdrop", retain=64, layers=(2, 4, 6)).plan(ModelGeometry(24, 22, 576, 8))
    assert plan.language == {1: 299, 3: 144, 5: 69} and plan.llm_final_visual == 64
    with pytest.raises(ValueError, match="distinct layer indices >= 1 or shares of the depth"):
        get_method("pdrop", layers=(8, 8))
    with pytest.raises(ValueError, match=r"stages \[39\].*must lie within 0\.\.30"):
        get_method("pdrop", layers=(40,)).plan(ModelGeometry(24, 22, 576, 32))


def official_prumerge(q, k, x, b, *, plus=False, kept=None, iqr=1.5, neighbours=32):
    """PruMerge(+) for sample ``b`` as its official code reads, written out: the fused-head
    attention map of the layer (one head over all channels, scale ``C ** -0.5``), the IQR fence
    with ``numpy.percentile``, a Python loop over the kept tokens for their key neighbours, the
    extra token last. ``kept=None``: the adaptive count; else the budget rule of docs/methods.md.
    Returns ``(kept indices in the official order, output features)``."""
    length, heads, dim = q.shape[1:]
    n = length - 1
    fused_q, fused_k = q[b].reshape(length, -1), k[b].reshape(length, -1)
    attn = (fused_q @ fused_k.T * (heads * dim) ** -0.5).softmax(dim=-1)  # the whole map
    cls = attn[0, 1:]
    values = cls.numpy().astype(np.float32)
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    outliers = int((values > q3 + iqr * (q3 - q1)).sum())
    assert outliers >= 1  # the official path: ficoco keeps the top token where there is none
    by_attention = sorted(range(n), key=lambda i: -values[i])
    if kept is None:
        idx = by_attention[:outliers]
        if plus:
            step = int(1 / (outliers / n))
            idx = idx + [p for p in range(0, n - 1, max(1, int(step / 3))) if p not in idx]
    elif not plus or outliers >= kept:
        idx = by_attention[:kept]
    else:
        idx = by_attention[:outliers]
        rest = [p for p in range(n) if p not in idx]  # raster order
        need = kept - outliers
        idx = idx + [rest[i * len(rest) // need] for i in range(need)]
    keys = F.normalize(fused_k[1:], dim=-1)
    pruned = [j for j in range(n) if j not in idx]
    out = []
    for i in idx:
        others = [j for j in idx if j != i] + pruned
        sims = [float(keys[i] @ keys[j]) for j in others]
        near = [others[t] for t in sorted(range(len(others)), key=lambda t: -sims[t])[:neighbours]]
        out.append(x[b, i] + sum(cls[j] * x[b, j] for j in near))
    out.append(sum(cls[j] * x[b, j] for j in pruned))
    return idx, torch.stack(out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("kept", [None, 5, 17])
@pytest.mark.parametrize("order", ["raster", "official"])
def test_prumerge_equals_the_official_algorithm(seed, plus, kept, order):
    """The batched stages against the loop: the same kept tokens (raster order, or the official
    descending attention then PruMerge+'s spread tokens), the same merged features and extra token;
    without a budget each sample keeps its own outlier count."""
    q, k, x, probe = layer(seed)
    name = "prumerge+" if plus else "prumerge"
    reduction = get_method(name, retain=None if kept is None else kept + 1, order=order).vision.reduction
    tokens = TokenGroup.fresh(x, (6, 8))
    if kept is None:
        removals = reduction.adaptive_removals(tokens, probe).tolist()
        results = [reduction(TokenGroup.fresh(x[b:b + 1], (6, 8)),
                             AttentionProbe(q[b:b + 1], k[b:b + 1], 8 ** -0.5, probe.candidates[b:b + 1], cls_index=0),
                             removals[b]) for b in range(2)]
        rows = [(result, 0) for result in results]
    else:
        result = reduction(tokens, probe, 48 - kept - 1)
        rows = [(result, b) for b in range(2)]
    for b, (result, row) in enumerate(rows):
        idx, features = official_prumerge(q, k, x, b, plus=plus, kept=kept)
        expected_order = idx if order == "official" else sorted(idx)
        assert result.kept[row].tolist() == expected_order
        position = {i: t for t, i in enumerate(idx)}
        expected = torch.stack([features[position[i]] for i in expected_order] + [features[-1]])
        torch.testing.assert_close(result.tokens.features[row], expected, rtol=1e-5, atol=1e-5)
        assert result.tokens.positions[row, -1] == -1 and result.tokens.sizes[row].sum() == 48


def test_prumerge_takes_every_option_and_refuses_bad_ones():
    import ficoco
    from ficoco.methods import ModelGeometry
    from ficoco.testing import tiny_qwen_vl

    method = get_method("prumerge+", retain=64, neighbours=8, iqr_multiplier=3.0, heads="mean", layer=20,
                        score_with_next_layer=False)
    f, c = method.vision.reduction.filter, method.vision.reduction.correlate
    assert (f.iqr_multiplier, f.spatial_samples, f.heads, c.neighbours, c.heads) == (3.0, True, "mean", 8, "mean")
    assert method.plan(ModelGeometry(24, 22, 576, 32)).vision == {20: 512}
    assert get_method("prumerge").plan(ModelGeometry(24, 22, 576, 32)).vision == {22: 0}  # adaptive: decided per image
    assert get_method("prumerge[official]").vision.reduction.filter.order == "official"
    for options, message in ((dict(neighbours=0), "neighbours must be an integer >= 1"),
                             (dict(iqr_multiplier=-1), "iqr_multiplier must be a number >= 0"),
                             (dict(heads="max"), "heads must be 'fused' or 'mean'"),
                             (dict(order="score"), "order must be 'raster' or 'official'"),
                             (dict(nope=1), "bad option for method 'prumerge'")):
        with pytest.raises(ValueError, match=message):
            get_method("prumerge", **options)
    with pytest.raises(ValueError, match="exceeds the 576 visual tokens"):
        get_method("prumerge", retain=577).plan(ModelGeometry(24, 22, 576, 32))
    adaptive = get_method("prumerge").vision.reduction
    with pytest.raises(ValueError, match="decides its count in one layer"):
        two_layers = ficoco.VisionReduction(adaptive, start_layer=20, end_layer=22)
        ficoco.Method("two layers", vision=two_layers).plan(ModelGeometry(24, 22, 576, 32))
    with pytest.raises(ValueError, match="decides how many tokens each image keeps: give neither"):
        ficoco.VisionReduction(adaptive, retain=64)
    _, _, x, probe = layer(0)
    with pytest.raises(TypeError, match="decides no count of its own"):
        get_method("prumerge", retain=64).vision.reduction.adaptive_removals(TokenGroup.fresh(x, (6, 8)), probe)
    with pytest.raises(ValueError, match=r"the outliers keep \[\d+, \d+\] tokens per sample, not 40"):
        adaptive(TokenGroup.fresh(x, (6, 8)), probe, 7)  # an adaptive call must remove what the outliers leave
    # Qwen-VL: no [CLS], and its last block feeds the merger: refused in one line, as VisionZip
    with pytest.raises(ValueError, match="prumerge reduces a block's output after its MLP.*Qwen-VL"):
        ficoco.attach(tiny_qwen_vl("qwen2_vl"), "prumerge", retain=0.5)


def test_prumerge_edge_counts():
    """An image with no outlier keeps its most attended token (the official code would keep none,
    and PruMerge+ divide by zero); PruMerge+ never keeps every token (the official code would hand
    on N + 1, the extra one empty): the least attended is left to the extra token."""
    from types import SimpleNamespace

    from ficoco.stages import OutlierAttentionFilter

    def counts(values, **options):
        attention = torch.tensor([values], dtype=torch.float32)
        probe = SimpleNamespace(fused_heads=SimpleNamespace(cls_attention=attention))
        tokens = TokenGroup.fresh(torch.zeros(1, len(values), 4), (1, len(values)))
        return OutlierAttentionFilter(adaptive=True, **options).kept_counts(tokens, probe).tolist()

    # no outlier: the first of the tied maxima; PruMerge+ adds positions 0, 4, 8 (stride (12 // 1) // 3), 0 among them
    assert counts([0.5] * 12) == [1] and counts([0.5] * 12, spatial_samples=True) == [3]
    # three outliers of 12: stride (12 // 3) // 3 = 1 reaches every position below the last, an outlier
    assert counts([1.0] * 9 + [100.0] * 3) == [3] and counts([1.0] * 9 + [100.0] * 3, spatial_samples=True) == [11]
