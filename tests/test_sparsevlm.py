"""SparseVLM: its stages against the official algorithm written out literally (one sample at a time,
the layer's full softmax map, Python loops over the tokens, DPC-kNN as TCFormer's code reads), its
budgets against the official per-stage counts, its scores against the attention the model itself
computes, the rank rule's per-sample counts inside a batch, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

import ficoco
from ficoco.methods import ModelGeometry, get_method
from ficoco.methods.baselines import SPARSEVLM_COUNTS, SparseVLMCounts
from ficoco.stages import AttentionProbe, RaterAttentionFilter, TextRaters, TokenGroup

from .conftest import IMAGE_TOKEN, PATCHES, batch_inputs, make_prompt

SEEDS = (0, 1, 2)


# -- the official algorithm, literally ---------------------------------------------------------------


def attention_map(q, k):
    """Head-averaged causal softmax map ``[L, L]`` of one sample (``q``, ``k``: ``[L, H, d]``)."""
    length, _, dim = q.shape
    logits = torch.einsum("qhd,khd->hqk", q, k) * dim ** -0.5
    logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1).mean(0)


def official_clusters(x, centres):
    """TCFormer's DPC-kNN as SparseVLM's ``cluster_and_merge`` computes it, over Python lists
    (ties in density go to the lower index, where the official code adds random noise)."""
    n, width = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(width) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:centres]) / centres) for row in dist]
    farthest = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else farthest)
    score = [delta[i] * density[i] for i in range(n)]
    chosen = sorted(range(n), key=lambda i: (-score[i], i))[:centres]
    members = {c: [] for c in chosen}
    for i in range(n):  # a centre is its own cluster's; every other token joins its nearest centre
        members[i if i in chosen else min(chosen, key=lambda c: dist[i][c])].append(i)
    return {c: torch.stack([x[i] for i in members[c]]).mean(0) for c in chosen}


def official_sparsevlm(q, k, features, candidates, raters, kept, recycle=True):
    """One SparseVLM step for one sample: relevance = the raters' head-averaged attention to each
    visual token; the ``kept`` most relevant stay; the ``int(0.3 * deleted) + 1`` most relevant
    deleted ones form ``int(recycled / 10) + 1`` clusters, each a mean in its centre's place.
    Returns the kept candidate indices (ascending) and their features after the step."""
    a = attention_map(q, k)
    relevance = [float(sum(a[r, c] for r in raters) / len(raters)) for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (-relevance[i], i))
    top, deleted = order[:kept], order[kept:]
    merged = {}
    if recycle and deleted:
        recycled = deleted[:int(len(deleted) * 0.3) + 1]
        clusters = official_clusters(features[recycled], int(len(recycled) / 10) + 1)
        merged = {recycled[c]: mean for c, mean in clusters.items()}
    survivors = sorted(top + list(merged))
    return survivors, torch.stack([merged.get(i, features[i]) for i in survivors])


def rank_rule_kept(q, k, candidates, raters, scale, bias):
    """v1's count: ``min(int(rank * scale + bias), N - 1)`` with ``rank`` of the raters' ``R x N``
    attention matrix, ``torch.linalg.matrix_rank`` as the official code calls it."""
    a = attention_map(q, k)
    rank = int(torch.linalg.matrix_rank(a[raters][:, candidates].float()))
    n = len(candidates)
    return n if rank == n else min(int(rank * scale + bias), n - 1)


def step_inputs(seed, length=70, n=40, heads=2, dim=8, width=16):
    """Queries, keys, visual features and a probe for two samples: candidates at 5..5+n, text after
    them; sample 0 has four raters, sample 1 two (its rater rows padded)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, length, heads, dim, generator=gen) * 2
    k = torch.randn(2, length, heads, dim, generator=gen) * 2
    features = torch.randn(2, n, width, generator=gen)
    candidates = torch.arange(5, 5 + n).expand(2, n)
    raters = [[n + 7, n + 10, n + 13, length - 2], [n + 6, n + 9]]
    rows = torch.tensor([raters[0], raters[1] + [0, 0]])
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    probe = AttentionProbe(q, k, dim ** -0.5, candidates, causal=True, rater_rows=rows, rater_valid=valid)
    return q, k, features, candidates, raters, probe


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kept", [3, 17, 30])
@pytest.mark.parametrize("recycle", [True, False])
def test_step_equals_the_official_algorithm(seed, kept, recycle):
    q, k, features, candidates, raters, probe = step_inputs(seed)
    n = candidates.shape[1]
    reduction = get_method("sparsevlm", recycle=recycle).language.reduction
    removed = n - reduction.filter.survivors(n, kept)
    result = reduction(TokenGroup.fresh(features, (5, 8)), probe, removed)
    for row in range(2):
        survivors, expected = official_sparsevlm(q[row], k[row], features[row], candidates[row].tolist(),
                                                 raters[row], kept, recycle)
        assert result.kept[row].tolist() == survivors
        torch.testing.assert_close(result.tokens.features[row], expected, rtol=1e-5, atol=1e-6)
        if recycle:  # the merged tokens are the only receivers, one per cluster
            assert int(result.filter_result.receivers[row].sum()) == int((int((n - kept) * 0.3) + 1) / 10) + 1


@pytest.mark.parametrize("seed", SEEDS)
def test_rank_rule_counts_per_sample_as_the_official_code(seed):
    """Sample 0's raters have rank 4, sample 1's rank 2: the rule keeps 4 * 4 + 1 = 17 and
    2 * 4 + 1 = 9 by score; each sample's step equals the official one at its own count."""
    q, k, features, candidates, raters, probe = step_inputs(seed)
    n = candidates.shape[1]
    method = get_method("sparsevlm", rank_adaptive=True, scale=4.0, bias=1.0)
    flt = method.language.reduction.filter
    tokens = TokenGroup.fresh(features, (5, 8))
    kept = [rank_rule_kept(q[row], k[row], candidates[row].tolist(), raters[row], 4.0, 1.0) for row in range(2)]
    assert kept == [17, 9]
    assert flt.removals(tokens, probe) == [n - flt.survivors(n, x) for x in kept]
    for row in range(2):
        one = AttentionProbe(q[row:row + 1], k[row:row + 1], probe.scale, candidates[row:row + 1], causal=True,
                             rater_rows=torch.tensor([raters[row]]))
        result = method.language.reduction(TokenGroup.fresh(features[row:row + 1], (5, 8)), one,
                                           n - flt.survivors(n, kept[row]))
        survivors, expected = official_sparsevlm(q[row], k[row], features[row], candidates[row].tolist(),
                                                 raters[row], kept[row])
        assert result.kept[0].tolist() == survivors
        torch.testing.assert_close(result.tokens.features[0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="grouped by Filter.removals"):  # a batch whose samples disagree
        method.language.reduction(tokens, probe, n - flt.survivors(n, 17))


@pytest.mark.parametrize("seed", SEEDS)
def test_rank_rule_keeps_different_counts_that_leave_the_same(seed):
    """Keeping 31 or 30 of 60 by score both leave 32 (29 deleted make one cluster, 30 make two):
    the two samples share one step, each split as the official code splits it."""
    q, k, _, _, _, _ = step_inputs(seed, length=90)
    gen = torch.Generator().manual_seed(seed + 10)
    features = torch.randn(2, 60, 16, generator=gen)
    candidates = torch.arange(5, 65).expand(2, 60)
    raters = [[67, 70, 73, 88], [66, 69]]
    probe = AttentionProbe(q, k, 8 ** -0.5, candidates, causal=True, rater_rows=torch.tensor([raters[0], raters[1] + [0, 0]]),
                           rater_valid=torch.tensor([[True] * 4, [True, True, False, False]]))
    method = get_method("sparsevlm", rank_adaptive=True, scale=0.5, bias=29.0)
    assert method.language.reduction.filter.removals(TokenGroup.fresh(features, (6, 10)), probe) == [28, 28]
    result = method.language.reduction(TokenGroup.fresh(features, (6, 10)), probe, 28)
    for row, kept in enumerate((31, 30)):
        survivors, expected = official_sparsevlm(q[row], k[row], features[row], candidates[row].tolist(), raters[row],
                                                 kept)
        assert result.kept[row].tolist() == survivors
        torch.testing.assert_close(result.tokens.features[row], expected, rtol=1e-5, atol=1e-6)
        assert int(result.filter_result.receivers[row].sum()) == (1, 2)[row]


def official_raters(embeds, visual, text):
    """The official selection for one prompt: ``softmax`` over the text of ``v . t`` per visual
    token, averaged over the visual tokens; the text tokens above the mean."""
    relevance = [0.0] * len(text)
    for i in visual:
        row = torch.stack([embeds[i] @ embeds[m] for m in text]).softmax(0)
        for j in range(len(text)):
            relevance[j] += float(row[j]) / len(visual)
    mean = sum(relevance) / len(relevance)
    return [m for m, r in zip(text, relevance) if r > mean]


@pytest.mark.parametrize("seed", SEEDS)
def test_text_raters_equal_the_official_selection(seed):
    """Three prompts, left-padded, with 12, 5 and 1 text tokens after the image (the last: its one
    token rates), and a fourth with none (no rater: the probe falls back to its last token)."""
    gen = torch.Generator().manual_seed(seed)
    length = 30
    embeds = torch.randn(4, length, 8, generator=gen)
    layout = [(2, 10, 12), (8, 12, 5), (3, 20, 1), (10, 20, 0)]  # (first column, visual tokens, text tokens)
    is_visual = torch.zeros(4, length, dtype=torch.bool)
    is_text = torch.zeros_like(is_visual)
    for row, (start, n, m) in enumerate(layout):
        is_visual[row, start:start + n] = True
        is_text[row, start + n:start + n + m] = True
    raters = TextRaters()(embeds, is_visual, is_text)
    for row, (start, n, m) in enumerate(layout):
        visual, text = list(range(start, start + n)), list(range(start + n, start + n + m))
        expected = official_raters(embeds[row], visual, text) if m > 1 else text
        assert raters[row].nonzero()[:, 0].tolist() == expected


def test_a_sample_without_raters_is_rated_by_its_last_token():
    q, k, _, candidates, raters, _ = step_inputs(0)
    rows = torch.tensor([raters[0], [0, 0, 0, 0]])
    valid = torch.tensor([[True] * 4, [False] * 4])
    last = torch.tensor([69, 50])
    probe = AttentionProbe(q, k, 8 ** -0.5, candidates, causal=True, last_row=last, rater_rows=rows, rater_valid=valid)
    alone = AttentionProbe(q, k, 8 ** -0.5, candidates, causal=True, last_row=last, rater_rows=torch.tensor([[69], [50]]))
    torch.testing.assert_close(probe.rater_attention[1], alone.rater_attention[1], rtol=1e-5, atol=1e-8)
    assert probe.rater_count.tolist() == [4, 1]
    a = attention_map(q[1], k[1])
    torch.testing.assert_close(probe.rater_attention[1], a[50, 5:45], rtol=1e-5, atol=1e-7)


# -- budgets -----------------------------------------------------------------------------------------


def test_official_budgets_keep_the_official_counts():
    """192 / 128 / 64 on LLaVA-1.5-7B's 32 layers: the official kept counts after layers 2, 6, 15
    plus the merged tokens (309 / 204 / 113 for 192: 300 + 9, 200 + 4, 110 + 3)."""
    geometry = ModelGeometry(24, 22, 576, 32)
    expected = {192: (309, 204, 113), 128: (312, 117, 39), 64: (82, 32, 18)}
    for budget, left in expected.items():
        plan = get_method("sparsevlm", retain=budget).plan(geometry).language
        assert plan == {2: 576 - left[0], 6: left[0] - left[1], 15: left[1] - left[2]}
        method = get_method("sparsevlm", retain=budget)
        assert method.language.stage_counts.kept_by_score(576, budget, 3) == list(SPARSEVLM_COUNTS[budget])
    assert get_method("sparsevlm", recycle=False).plan(geometry).language == {2: 276, 6: 100, 15: 90}
    # the official layers as shares of the depth: 2 / 5 / 13 of 28, 0 / 1 / 3 of 8
    assert set(get_method("sparsevlm").plan(ModelGeometry(24, 22, 576, 28)).language) == {2, 5, 13}
    assert set(get_method("sparsevlm").plan(ModelGeometry(24, 22, 576, 8)).language) == {0, 1, 3}


def test_other_budgets_interpolate_the_official_table():
    counts = SparseVLMCounts(tuple(SPARSEVLM_COUNTS.items()), RaterAttentionFilter())
    # halfway between 128 and 192 on 576 tokens: halfway between their counts, stage by stage
    assert counts.kept_by_score(576, 160, 3) == [round(301.5), 155, round(73)]
    # a share of a 1152-token image keeps the same shares of it as of 576 tokens
    assert counts.kept_by_score(1152, 384, 3) == [600, 400, 220]
    # below the smallest budget towards nothing, above the largest towards everything
    assert counts.kept_by_score(576, 32, 3) == [33, 15, round(8.5)]
    assert counts.kept_by_score(576, 576, 3) == [576, 576, 576]
    # every budget leaves fewer tokens at every stage than a larger one (here with recycling)
    previous = None
    for budget in range(8, 577, 8):
        left = counts(576, budget, 3)
        assert left == sorted(left, reverse=True)
        if previous is not None:
            assert left[-1] >= previous[-1]
        previous = left
    assert get_method("sparsevlm", retain=576).plan(ModelGeometry(24, 22, 576, 32)).language == {}


def test_custom_counts_and_the_rank_rule_plan():
    geometry = ModelGeometry(24, 22, 576, 32)
    method = get_method("sparsevlm", retain=100, counts={100: (200, 100, 50)}, recycle=False)
    assert method.plan(geometry).language == {2: 376, 6: 100, 15: 50}
    # the rank rule decides its counts when a layer runs: the plan marks its layers with one token each
    method = get_method("sparsevlm", rank_adaptive=True, layers=(2, 6, 15, 19))
    assert method.plan(geometry).language == {2: 1, 6: 1, 15: 1, 19: 1}
    assert (method.language.reduction.filter.scale, method.language.reduction.filter.bias) == (13.5, 0.0)
    assert get_method("sparsevlm", retain=128, rank_adaptive=True).language.reduction.filter.bias == 6.0


# -- inside the model --------------------------------------------------------------------------------


def test_exact_counts_inside_the_model(model, images, prompts):
    """The official 192-token counts on the tiny 8-layer LLM (stages after layers 0, 1, 3): every
    layer's output holds the planned visual tokens, and each stage keeps the official counts by
    score and makes the official number of merged tokens."""
    inputs = batch_inputs(prompts[:2], images[:2])
    with ficoco.apply(model, "sparsevlm", retain=192, record=True) as handle, torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
        steps = handle.language_steps
    assert handle.plan.language == {0: 267, 1: 105, 3: 91}
    text = inputs["input_ids"].shape[1] - PATCHES
    assert [h.shape[1] - text for h in out.hidden_states[1:]] == [309, 204, 204, 113, 113, 113, 113, 113]
    assert handle.kept_index.shape == (2, 113 + text)
    for (layer, result), by_score, merged in zip(steps, (300, 200, 110), (9, 4, 3)):
        assert (result.filter_result.receivers.sum(dim=1) == merged).all()
        assert result.kept.shape[1] == by_score + merged
        # each merged token is the mean of its cluster: weight 1 from each recycled source, none from the rest
        weights = result.correlation.weights
        assert torch.equal(weights.sum(dim=-1), result.filter_result.passing.float())


def _captured_embeddings(model, inputs):
    """The first decoder layer's input (the LLM's input embeddings) of a plain forward."""
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_are_the_models_own_attention_rows(eager_model, images, prompts, side):
    """At every stage, the relevance the filter ranks by equals the mean over the raters of the
    eager model's own head-averaged attention rows at that layer (the hooked eager model returns
    the maps of the shortened sequence), and the raters are the official selection from the LLM's
    input embeddings."""
    inputs = batch_inputs(prompts, images, side)
    embeds = _captured_embeddings(eager_model, inputs)
    with ficoco.apply(eager_model, "sparsevlm", retain=128, record=True) as handle, torch.inference_mode():
        attentions = eager_model(**inputs, output_attentions=True).attentions
        seq = handle.language.seq
        raters = seq.raters.clone()
        steps = list(zip(sorted(handle.plan.language), seq.results))
        columns = [torch.arange(inputs["input_ids"].shape[1]).expand_as(raters), *seq.stage_index]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for row in range(len(prompts)):
        visual = (ids[row] == IMAGE_TOKEN).nonzero()[:, 0].tolist()
        text = [i for i in range(visual[-1] + 1, ids.shape[1]) if mask[row, i]]
        assert raters[row].nonzero()[:, 0].tolist() == official_raters(embeds[row], visual, text)
    for stage, (layer, results) in enumerate(steps):
        (_, result), = results
        for row in range(len(prompts)):
            now = columns[stage][row]  # the original column of each row this layer saw
            rater_rows = raters[row][now].nonzero()[:, 0]
            visual_rows = (ids[row][now] == IMAGE_TOKEN).nonzero()[:, 0]
            expected = attentions[layer][row][:, rater_rows][:, :, visual_rows].mean(0).mean(0)
            torch.testing.assert_close(-result.filter_result.scores[row], expected, rtol=1e-5, atol=1e-6)


RANK = dict(retain=100, rank_adaptive=True, scale=13.5, bias=0.0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rank_rule_batches_like_one_by_one(model, images, prompts, side):
    """Under the rank rule the three prompts (9, 5 and 3 text tokens after the image, so different
    raters and ranks) keep different counts at each stage: the batch parts ways into groups held
    rectangular by dead rows, and each sample answers as alone."""
    with ficoco.apply(model, "sparsevlm", record=True, **RANK) as handle, torch.inference_mode():
        batched = model(**batch_inputs(prompts, images, side)).logits
        valid, dead = handle.kept_valid.clone(), handle.kept_dead
        visual = [int(x) for x in (handle.kept_valid & (batch_inputs(prompts, images, side)["input_ids"].gather(
            1, handle.kept_index) == IMAGE_TOKEN)).sum(dim=1)]
        singles = [model(**batch_inputs([prompt], images[row:row + 1], side)).logits[0]
                   for row, prompt in enumerate(prompts)]
    assert dead is not None and bool(dead.any()) and len(set(visual)) == 3
    for row, single in enumerate(singles):
        torch.testing.assert_close(batched[row][valid[row]], single, rtol=1e-4, atol=1e-4)


def test_rank_rule_generates_like_one_by_one(model, images, prompts):
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                   pad_token_id=0)
    with ficoco.apply(model, "sparsevlm", **RANK), torch.inference_mode():
        batched = model.generate(**batch_inputs(prompts, images, "left"), **options)
        singles = [model.generate(**batch_inputs([prompt], images[row:row + 1], "left"), **options)
                   for row, prompt in enumerate(prompts)]
    for row, single in enumerate(singles):
        steps = len(single.logits)
        torch.testing.assert_close(torch.stack(batched.logits[:steps], dim=1)[row],
                                   torch.stack(single.logits, dim=1)[0], rtol=1e-4, atol=1e-4)


def test_several_images_and_a_prompt_ending_in_its_image(model, images, prompts):
    """Two images in one prompt are one pool of visual tokens; a prompt with no text after its
    image is rated by its last token at every stage (the last visual token, until it goes, then
    the last of those left). Both batch like one by one."""
    two = make_prompt([4], [5, 6], images=2)
    bare = make_prompt([7, 8], [])
    with ficoco.apply(model, "sparsevlm", retain=100) as handle, torch.inference_mode():
        batched = model(**batch_inputs([two, bare], images[:3])).logits
        valid = handle.kept_valid.clone()
        singles = [model(**batch_inputs([two], images[:2])).logits[0], model(**batch_inputs([bare], images[2:3])).logits[0]]
    for row, single in enumerate(singles):
        torch.testing.assert_close(batched[row][valid[row]], single, rtol=1e-4, atol=1e-4)


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(layers=(2, 2)), "layers must be distinct layer indices"),
    (dict(layers=(1.5,)), "layers must be distinct layer indices"),
    (dict(recycle_ratio=1.5), "recycle_ratio must lie in"),
    (dict(cluster_ratio=-0.1), "cluster_ratio must lie in"),
    (dict(scale=2.0), "give rank_adaptive=True too"),
    (dict(rank_adaptive=True, retain=100), "give scale= and bias= for retain=100"),
    (dict(rank_adaptive=True, scale=2.0), "give both of SparseVLM's scale= and bias="),
    (dict(rank_adaptive=True, scale=-1.0, bias=0.0), "scale must be positive"),
    (dict(counts={192: (300, 200)}), "one non-negative count per stage"),
    (dict(nope=1), "bad option for method 'sparsevlm'"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("sparsevlm", **options)


def test_probe_without_raters_and_impossible_removals():
    _, _, features, _, _, probe = step_inputs(0)
    plain = AttentionProbe(probe.queries, probe.keys, probe.scale, probe.candidates, causal=True)
    with pytest.raises(ValueError, match="rater attention needs the text raters"):
        get_method("sparsevlm").language.reduction(TokenGroup.fresh(features, (5, 8)), plain, 10)
    with pytest.raises(ValueError, match="cannot remove 40 of 40 tokens: recycling keeps at least"):
        RaterAttentionFilter().kept_for(40, 40)


# -- Qwen-VL -----------------------------------------------------------------------------------------


class LayerInputs:
    """What one decoder layer receives at prefill (its input, position embeddings, position ids)."""

    def __init__(self, layer):
        self.seen = []
        self.hook = layer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.seen.append((args[0] if args else kwargs["hidden_states"], kwargs.get("position_embeddings"),
                          kwargs.get("position_ids")))

    def remove(self):
        self.hook.remove()


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_scores_are_the_models_own_attention_rows_and_positions_stay(generation):
    """On each Qwen-VL generation (Qwen3-VL normalises queries and keys per head): at every stage
    the filter's relevance equals the mean over the raters of the eager model's own attention rows
    at that layer, and the last layer receives every kept token's (3-D M-RoPE) rotation exactly
    as the full prompt gives it at that token's column."""
    from ficoco.testing import tiny_qwen_vl

    from .qwen_inputs import image_batch, sample_of

    model = tiny_qwen_vl(generation, attn_implementation="eager")
    last = model.model.language_model.layers[-1]
    batch = image_batch(generation)
    token = model.config.image_token_id
    for row in range(3):
        inputs = sample_of(batch, row, generation)
        spy = LayerInputs(last)
        try:
            with torch.inference_mode():
                model(**inputs)
        finally:
            spy.remove()
        (_, (cos, sin), _), = spy.seen
        with ficoco.apply(model, "sparsevlm", retain=0.5, record=True) as handle, torch.inference_mode():
            spy = LayerInputs(last)  # after the method's hooks: what the layer really gets
            try:
                attentions = model(**inputs, output_attentions=True).attentions
            finally:
                spy.remove()
            seq = handle.language.seq
            raters, kept = seq.raters.clone(), handle.kept_index.clone()
            steps = handle.language_steps
            columns = [torch.arange(inputs["input_ids"].shape[1])[None], *seq.stage_index]
        ids = inputs["input_ids"][0]
        assert len(steps) == 3 and raters[0].any()
        for stage, (layer, result) in enumerate(steps):
            now = columns[stage][0]
            expected = attentions[layer][0][:, raters[0][now].nonzero()[:, 0]][:, :, (ids[now] == token).nonzero()[:, 0]]
            torch.testing.assert_close(-result.filter_result.scores[0], expected.mean(0).mean(0), rtol=1e-5, atol=1e-6)
        (_, (cos_kept, sin_kept), _), = spy.seen
        torch.testing.assert_close(cos_kept, cos[:, kept[0]], rtol=0, atol=0)
        torch.testing.assert_close(sin_kept, sin[:, kept[0]], rtol=0, atol=0)
