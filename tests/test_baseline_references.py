"""TopK and VisionZip against their official algorithms written out literally: one sample at a
time, the full softmax map of the layer, Python loops over the tokens."""

from __future__ import annotations

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
