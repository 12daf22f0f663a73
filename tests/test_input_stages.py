"""The stages that act on the projected tokens at the LLM input (pool, DivPrune, CDPruner) against
slow, obvious re-implementations: bins walked cell by cell, the official greedy max-min loop over
Python lists, and the greedy MAP of a DPP by explicit determinants of the kernel's submatrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ficoco
from ficoco.stages import AveragingCompress, DropCompress, FeatureProbe, NoCorrelate, TokenGroup, TokenReduction
from ficoco.stages.diversity import ConditionalDPPFilter, MaxMinDiversityFilter
from ficoco.stages.pooling import GridPartitionCorrelate, GridPartitionFilter, pooled_bands, pooled_grid

SEEDS = (0, 1, 2)


def pooling():
    return TokenReduction(GridPartitionFilter(), GridPartitionCorrelate(), AveragingCompress())


def explicit_bins(grid, kept):
    """The bins as docs/methods.md describes them, cell by cell: the rectangle of ``pooled_grid``
    where one fits, else ``r`` row bands of ``floor``/``ceil(kept / r)`` bins, ``r`` the band count
    whose bins come closest to the grid's aspect (ties: more bands)."""
    import math

    h, w = grid
    try:
        bands = pooled_grid(grid, kept)[0]
    except ValueError:
        fits = [r for r in range(1, min(h, kept) + 1) if math.ceil(kept / r) <= w]
        bands = min(fits, key=lambda r: (abs(math.log(r * r / kept) - math.log(h / w)), -r))
    bins = []
    for i in range(bands):  # band i spans rows floor(i h / bands) .. floor((i + 1) h / bands) - 1
        across = (i + 1) * kept // bands - i * kept // bands
        for j in range(across):
            rows = range(i * h // bands, (i + 1) * h // bands)
            cols = range(j * w // across, (j + 1) * w // across)
            bins.append([r * w + c for r in rows for c in cols])
    return bins


@pytest.mark.parametrize("grid,kept", [((24, 24), 144), ((24, 24), 64), ((24, 24), 192), ((24, 24), 128),
                                       ((7, 5), 6), ((6, 9), 12), ((5, 5), 9),
                                       ((24, 24), 191), ((7, 9), 19), ((6, 10), 13), ((3, 17), 31), ((5, 5), 23)])
def test_pool_equals_bin_by_bin_means(grid, kept):
    torch.manual_seed(0)
    h, w = grid
    x = torch.randn(2, h * w, 4)
    result = pooling()(TokenGroup.fresh(x, grid), None, h * w - kept)
    bins = explicit_bins(grid, kept)
    assert sorted(c for cells in bins for c in cells) == list(range(h * w))  # a tiling: no overlap, no gap
    assert result.kept[0].tolist() == [cells[0] for cells in bins]  # each bin's top-left token, raster order
    expected = torch.stack([x[:, cells].mean(dim=1) for cells in bins], dim=1)
    torch.testing.assert_close(result.tokens.features, expected, rtol=1e-5, atol=1e-6)
    assert result.tokens.sizes[0].tolist() == [len(cells) for cells in bins]
    heights = {len({c // w for c in cells}) for cells in bins}
    assert max(heights) - min(heights) <= 1  # bands differ by at most one row
    for top in {cells[0] // w for cells in bins}:  # and bins within a band by at most one column
        widths = {len({c % w for c in cells}) for cells in bins if cells[0] // w == top}
        assert max(widths) - min(widths) <= 1
    out = pooled_grid(grid, kept) if kept in {a * b for a in range(1, h + 1) for b in range(1, w + 1)} else None
    if out is not None and h % out[0] == 0 and w % out[1] == 0:  # the plain strided average pooling
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(2, 4, h, w), (h // out[0], w // out[1]))
        torch.testing.assert_close(result.tokens.features, pooled.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_pooled_grid_choice_and_refusal():
    assert pooled_grid((24, 24), 192) == (16, 12) and pooled_grid((24, 24), 128) == (16, 8)
    assert pooled_grid((24, 24), 64) == (8, 8) and pooled_grid((24, 24), 144) == (12, 12)
    assert pooled_grid((6, 12), 18) == (3, 6)  # the grid's own aspect
    with pytest.raises(ValueError, match="191 tokens cannot be pooled from a 24x24 grid.*budgets near it"):
        pooled_grid((24, 24), 191)
    assert pooled_bands((24, 24), 191) == 14 and pooled_bands((24, 24), 192) == 16  # bands only without a rectangle
    with pytest.raises(ValueError, match="needs the whole 4x4 token grid"):
        pooling()(TokenGroup(torch.randn(1, 15, 2), torch.ones(1, 15), torch.arange(15)[None], (4, 4)), None, 11)


def official_divprune(x: torch.Tensor, kept: int) -> list[int]:
    """DivPrune's greedy loop as its code reads: the second-smallest distance of each column picks
    the first token, then the largest smallest-distance to the selected set, over Python lists.
    Distances in ``x``'s dtype: mutual nearest neighbours tie in exact arithmetic, and only the
    same rounding breaks the tie the same way."""
    v = F.normalize(x, dim=-1)
    distance = (1 - v @ v.T).tolist()
    n = len(distance)
    columns = [sorted(distance[i][j] for i in range(n)) for j in range(n)]
    second = [c[1] for c in columns]
    selected = [max(range(n), key=lambda j: (second[j], -j))]
    while len(selected) < kept:
        best, pick = None, None
        for j in range(n):
            if j in selected:
                continue
            score = min(distance[s][j] for s in selected)
            if best is None or score > best:
                best, pick = score, j
        selected.append(pick)
    return sorted(selected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kept", [1, 5, 17])
def test_divprune_equals_the_official_greedy_loop(seed, kept):
    torch.manual_seed(seed)
    x = torch.randn(3, 30, 8)
    result = MaxMinDiversityFilter()(TokenGroup.fresh(x, (5, 6)), None, 30 - kept)
    for row in range(3):  # every sample by its own features (the official code uses sample 0's choice)
        assert result.targets[row].tolist() == official_divprune(x[row], kept)


def greedy_log_det(kernel: torch.Tensor, kept: int) -> list[int]:
    """Greedy MAP of a DPP by its definition: add the token that makes det(L_S) largest."""
    chosen = []
    for _ in range(kept):
        dets = {}
        for j in range(kernel.shape[0]):
            if j not in chosen:
                s = chosen + [j]
                dets[j] = torch.linalg.det(kernel[s][:, s]).item()
        chosen.append(max(dets, key=lambda j: (dets[j], -j)))
    return chosen


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("theta", [None, 0.5])
def test_cdpruner_equals_greedy_determinant_maximisation(seed, theta):
    torch.manual_seed(seed)
    n, d, kept = 14, 32, 6  # features wider than the tokens: a full-rank kernel
    x, text = torch.randn(2, n, d), torch.randn(2, 3, d)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    stage = ConditionalDPPFilter(theta=theta)
    probe = FeatureProbe(lambda: (text, valid))
    tokens = TokenGroup.fresh(x, (2, 7))
    result = stage(tokens, probe, n - kept)
    for row in range(2):
        m = int(valid[row].sum())
        cos = [[F.cosine_similarity(x[row, i], text[row, k], dim=0).item() for k in range(m)] for i in range(n)]
        r = [-sum(c) / m for c in cos]
        low, high = min(r), max(r)
        r = [(v - low + 1e-6) / (high - low) for v in r]
        if theta is not None:
            r = [torch.exp(torch.tensor(theta / (2 * (1 - theta)) * v)).item() for v in r]
        r = torch.tensor(r, dtype=torch.float64)
        sim = F.normalize(x[row].double(), dim=-1) @ F.normalize(x[row].double(), dim=-1).T
        kernel = r[:, None] * sim * r[None, :]
        assert result.targets[row].tolist() == sorted(greedy_log_det(kernel, kept))
    torch.testing.assert_close(stage.relevance(tokens, probe)[1], stage.relevance(
        TokenGroup.fresh(x[1:], (2, 7)), FeatureProbe(lambda: (text[1:, :2], valid[1:, :2])))[0])


def test_cdpruner_rank_exhaustion_falls_back_to_relevance():
    """With fewer feature dimensions than kept tokens the kernel runs out of rank; the rest are
    then taken by relevance, not by rounding noise."""
    torch.manual_seed(0)
    x, text = torch.randn(1, 20, 4), torch.randn(1, 2, 4)
    stage = ConditionalDPPFilter()
    probe = FeatureProbe(lambda: (text, None))
    tokens = TokenGroup.fresh(x, (4, 5))
    first_four = stage.select(tokens, probe, 4)[0].tolist()
    chosen = stage.select(tokens, probe, 12)[0].tolist()
    assert chosen[:4] == first_four
    rest = [j for j in stage.relevance(tokens, probe)[0].argsort(descending=True).tolist() if j not in first_four]
    assert chosen[4:] == rest[:8]


def test_input_stage_errors():
    tokens = TokenGroup.fresh(torch.randn(1, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="relevance to the instruction.*no instruction tokens"):
        ConditionalDPPFilter()(tokens, FeatureProbe(), 2)
    with pytest.raises(ValueError, match="theta must be None or lie in"):
        ConditionalDPPFilter(theta=1.0)
    with pytest.raises(AttributeError, match="'cls_attention' is an attention statistic.*LLM input"):
        FeatureProbe().cls_attention
    with pytest.raises(TypeError, match="chooses a set of tokens as a whole"):
        MaxMinDiversityFilter().scores(tokens, None)
    with pytest.raises(ValueError, match="retain=0 keeps no visual token: that is the 'zero' control"):
        ficoco.get_method("divprune", retain=0)
    with pytest.raises(ValueError, match="bad option for method 'zero'"):
        ficoco.get_method("zero", retain=64)


def test_drop_and_pool_compositions_count():
    torch.manual_seed(0)
    tokens = TokenGroup.fresh(torch.randn(2, 36, 5), (6, 6))
    for reduction, kept in ((TokenReduction(MaxMinDiversityFilter(), NoCorrelate(), DropCompress()), 10),
                            (pooling(), 9)):
        result = reduction(tokens, None, 36 - kept)
        assert result.tokens.features.shape == (2, kept, 5)
        assert torch.equal(result.kept, result.kept.sort(dim=1).values)  # raster order kept


def test_instruction_rows_match_a_token_by_token_walk():
    """The text each image's instruction is read from: after its run of placeholders, up to the
    next run or the prompt's end, padding left out (several images, padding on both sides)."""
    from ficoco.adapters.input_side import instruction_rows

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 6, (4, 30), generator=gen)
    ids[0, 3:8] = ids[0, 15:20] = ids[1, 0:4] = ids[2, 10:14] = ids[3, 20:25] = 9  # image runs
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    mask[3, 27:] = 0  # right padding: two real tokens after the image
    samples, rows, valid = instruction_rows(ids, mask, 9)
    expected = []
    for b in range(4):
        image = (ids[b] == 9).tolist()
        starts = [i for i in range(30) if image[i] and (i == 0 or not image[i - 1])]
        for k, start in enumerate(starts):
            end = next((i for i in range(start, 30) if not image[i]), 30)
            stop = starts[k + 1] if k + 1 < len(starts) else 30
            expected.append((b, [i for i in range(end, stop) if mask[b, i]]))
    assert samples.tolist() == [b for b, _ in expected]
    assert [rows[i][valid[i]].tolist() for i in range(len(expected))] == [span for _, span in expected]


def test_instruction_rows_refuse_an_image_with_no_text_after_it():
    """An image that ends its prompt (only padding after it) gives a filter that reads the
    instruction nothing to weigh by: one error naming the prompt, found on the host."""
    from ficoco.adapters.input_side import instruction_rows

    ids = torch.full((3, 12), 4)
    ids[0, 2:5] = ids[1, 1:4] = ids[1, 8:11] = ids[2, 3:6] = 9
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # the second image of prompt 1 is followed only by padding
    with pytest.raises(ValueError, match="the image in prompt 1 has no instruction text after it"):
        instruction_rows(ids, mask, 9)
    mask[1, 11:] = 1
    assert instruction_rows(ids, mask, 9)[0].tolist() == [0, 1, 1, 2]



def test_graph_input_reduction_needs_an_input_reduction(model):
    """Only a method that reduces the projected tokens has a reduction to replay as CUDA graphs; the
    graphed part attaches to it (here, on the CPU, calls would run eagerly) and detaches."""
    with ficoco.apply(model, ficoco.get_method("ficoco-v", retain=100)) as handle, \
            pytest.raises(ValueError, match="nothing to graph"):
        ficoco.graph_input_reduction(handle)
    with ficoco.apply(model, ficoco.get_method("cdpruner", retain=100)) as handle:
        with ficoco.graph_input_reduction(handle) as graphed:
            assert handle.input.step_graphs is graphed.calls
            with pytest.raises(RuntimeError, match="already graphed"):
                ficoco.graph_input_reduction(handle)
        assert handle.input.step_graphs is None


def test_the_llm_input_oracle_truncates_the_projected_tokens(model, images, prompts):
    """``oracle(like=<LLM-input method>)`` hands the LLM the first ``retain`` projected tokens of
    each image: the method's floor, with the projector run on every patch as the method runs it."""
    from ficoco.methods.baselines import oracle

    from .conftest import batch_inputs

    inputs = batch_inputs(prompts, images)
    with ficoco.apply(model, oracle(like=ficoco.get_method("cdpruner", retain=100))) as handle, \
            torch.inference_mode():
        out = model(**inputs).logits
        positions = handle.input.last.positions
    assert out.shape[1] == inputs["input_ids"].shape[1] - (576 - 100)
    assert torch.equal(positions, torch.arange(100).expand(len(prompts), -1))
