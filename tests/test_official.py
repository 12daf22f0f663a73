"""The options that reproduce the methods' official code (docs/methods.md), each against a slow,
obvious loop re-implementation of what the official code computes, written here from the
algorithms (no code of the official repositories), and each shown to differ from ficoco's default:

- ToMe ``alternation="official"``: A/B alternate over the whole sequence with [CLS] at index 0,
  survivors come back as ``[unmerged A, B]`` and the next layer alternates over that order;
- FiCoCo-V ``cls_term="logits"`` (with ``swap_weights=True``, the code's lambda placement): the
  [CLS] term is the head-averaged pre-softmax logits of the [CLS] row;
- FiCoCo-V ``correlation_map="mean_logits_softmax"``: the softmax of the head-averaged logits;
- EViT ``fused="sum"``: the fused token is the unnormalised [CLS]-attention-weighted sum.

Plus the ``NAME[KEY=VALUE,...]`` / ``NAME[official]`` method names that carry them to the command
line, and the adapters that refuse ToMe's official order where tokens must keep their place.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close

import ficoco
from ficoco.cli import main
from ficoco.methods import OFFICIAL_OPTIONS, ModelGeometry, get_method, parse_method_spec, split_methods
from ficoco.stages import (
    ArgmaxSimilarityCorrelate,
    AttentionProbe,
    AttentionQuantileCorrelate,
    BipartiteSimilarityFilter,
    CLSAttentionFilter,
    ConvergentCorrelate,
    FiCoCoVisionFilter,
    FuseCompress,
    SizeWeightedCompress,
    TokenGroup,
    TokenReduction,
)

from .conftest import PATCHES, batch_inputs
from .test_reference import reference_logits
from .test_stages import H, SEEDS, case, close, random_split, ref_local_penalty, ref_norm, ref_quantile_targets, t64

GRID = (24, 24)


# ---------------------------------------------------------------------------------------------
# ToMe: official alternation and output order
# ---------------------------------------------------------------------------------------------


def official_tome_step(x: list, size: list, position: list, metric: list, r: int, class_token: bool):
    """One layer of ToMe's official bipartite soft matching + size-weighted merge, as loops over a
    whole sequence (``[CLS]`` at index 0 when ``class_token``). ``x``: token features, ``size``:
    patches each stands for, ``position``: original patch of each (-1 for [CLS]), ``metric``:
    each token's head-averaged key. Returns the next sequence in ToMe's output order."""
    t = len(x)
    r = min(r, (t - int(class_token)) // 2)
    set_a, set_b = list(range(0, t, 2)), list(range(1, t, 2))
    unit = [m / m.norm() for m in metric]
    best = {}
    for a in set_a:
        if class_token and a == 0:
            best[a] = (-math.inf, None)  # [CLS] is protected: never merged
            continue
        sims = [float(unit[a] @ unit[b]) for b in set_b]
        j = max(range(len(sims)), key=sims.__getitem__)
        best[a] = (sims[j], set_b[j])
    edges = sorted(set_a, key=lambda a: -best[a][0])  # most similar first
    merged, unmerged = edges[:r], edges[r:]
    if class_token:
        unmerged = sorted(unmerged)  # back into sequence order, [CLS] first
    total = {b: x[b] * size[b] for b in set_b}
    mass = {b: size[b] for b in set_b}
    for a in merged:
        b = best[a][1]
        total[b] = total[b] + x[a] * size[a]
        mass[b] = mass[b] + size[a]
    new_x = [x[a] for a in unmerged] + [total[b] / mass[b] for b in set_b]
    new_size = [size[a] for a in unmerged] + [mass[b] for b in set_b]
    new_position = [position[a] for a in unmerged] + [position[b] for b in set_b]
    return new_x, new_size, new_position


def tome_reduction(alternation: str) -> TokenReduction:
    return TokenReduction(BipartiteSimilarityFilter(alternation=alternation), ArgmaxSimilarityCorrelate(),
                          SizeWeightedCompress())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("class_token", [True, False])
def test_tome_official_alternation_matches_official_loop_over_layers(seed, class_token):
    """Three successive steps on random keys: each step re-alternates over the previous output order."""
    gen = torch.Generator().manual_seed(seed)
    batch, n, dim, heads, head_dim = 2, 29, 6, 3, 4
    features = torch.randn(batch, n + int(class_token), dim, generator=gen)
    seq = [[features[b, i] for i in range(features.shape[1])] for b in range(batch)]
    sizes = [[1.0] * len(s) for s in seq]
    positions = [([-1] if class_token else []) + list(range(n)) for _ in range(batch)]
    ours = {alt: (features[:, int(class_token):], torch.ones(batch, n), torch.arange(n).expand(batch, n))
            for alt in ("official", "patches")}
    for r in (9, 7, 5):
        length = len(seq[0])
        keys = torch.randn(batch, length, heads, head_dim, generator=gen)
        for b in range(batch):
            metric = [keys[b, i].mean(dim=0) for i in range(length)]
            seq[b], sizes[b], positions[b] = official_tome_step(seq[b], sizes[b], positions[b], metric, r, class_token)
        candidates = torch.arange(int(class_token), length).expand(batch, -1)
        probe = AttentionProbe(torch.zeros_like(keys), keys, 1.0, candidates, cls_index=0 if class_token else None)
        for alt, (x, size, position) in ours.items():
            result = tome_reduction(alt)(TokenGroup(x, size, position, GRID), probe, r)
            ours[alt] = (result.tokens.features, result.tokens.sizes, result.tokens.positions)
        x, size, position = ours["official"]
        skip = int(class_token)  # ficoco keeps [CLS] outside the candidates, always first
        for b in range(batch):
            assert position[b].tolist() == positions[b][skip:]
            assert_close(x[b], torch.stack(seq[b][skip:]), rtol=1e-5, atol=1e-6)
            assert_close(size[b], torch.tensor(sizes[b][skip:]), rtol=0, atol=0)
    # the default alternates over the patches and keeps raster order: another computation
    assert ours["patches"][2].tolist() != ours["official"][2].tolist()
    assert all(row == sorted(row) for row in ours["patches"][2].tolist())


def test_tome_official_limit_and_receivers():
    s, _ = case("encoder", 0)  # 27 candidates after [CLS]
    flt = BipartiteSimilarityFilter(alternation="official")
    assert not flt.keeps_order and BipartiteSimilarityFilter().keeps_order
    result = flt(s.tokens(), s.probe(), 13)  # floor(27 / 2): every odd candidate
    assert all(i % 2 == 1 for row in result.sources.tolist() for i in row)
    assert result.receivers.tolist() == [[j % 2 == 0 for j in row] for row in result.targets.tolist()]
    with pytest.raises(ValueError, match="at most 13 of 27"):
        flt(s.tokens(), s.probe(), 14)
    with pytest.raises(ValueError, match="alternation must be 'patches' or 'official'"):
        BipartiteSimilarityFilter(alternation="sequence")
    # a schedule that breaks the official (floor) half is refused when resolved, not mid-forward
    with pytest.raises(ValueError, match="ToMe merges at most half"):
        get_method("tome[official]", schedule={12: 101, 13: 238}).plan(ModelGeometry(24, 22, PATCHES, 8))
    get_method("tome", schedule={12: 101, 13: 238}).plan(ModelGeometry(24, 22, PATCHES, 8))  # ceil(475 / 2) = 238


def hand_run_official_tome_tower(model, pixel_values, plan):
    """LLaVA's CLIP tower run layer by layer for one image, with proportional attention and
    :func:`official_tome_step` at the planned layers: the features the LLM reads and their patches."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixel_values[None]))[0]
    size, position = [1.0] * h.shape[0], [-1, *range(PATCHES)]
    for index, layer in enumerate(vm.encoder.layers):
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        split = lambda y: y.view(y.shape[0], attn.num_heads, -1).transpose(0, 1)  # noqa: E731
        q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
        scores = q @ k.transpose(-1, -2) * attn.scale + torch.tensor(size).log()
        h = h + attn.out_proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(h.shape[0], -1))
        if index in plan:
            metric = [k[:, i].mean(dim=0) for i in range(h.shape[0])]
            rows, size, position = official_tome_step(list(h), size, position, metric, plan[index], True)
            h = torch.stack(rows)
        h = h + layer.mlp(layer.layer_norm2(h))
        if index == len(vm.encoder.layers) - 2:  # vision_feature_layer = -2, [CLS] dropped
            return model.model.multi_modal_projector(h[1:]), position[1:]


def test_tome_official_in_llava_matches_hand_run_tower(model, images):
    """The hooked model's encoder hands the LLM ToMe's official order and features."""
    geometry = ModelGeometry(24, 22, PATCHES, len(model.model.language_model.layers))
    traces = {}
    for spec in ("tome[official]", "tome"):
        method = get_method(spec, retain=192)
        with ficoco.apply(model, method) as handle, torch.inference_mode():
            features = model.model.get_image_features(pixel_values=images[:2]).pooler_output
            traces[spec] = (features, handle.vision_trace.positions)
    plan = get_method("tome[official]", retain=192).plan(geometry).vision
    with torch.inference_mode():
        for row in range(2):
            expected, positions = hand_run_official_tome_tower(model, images[row], plan)
            features, traced = traces["tome[official]"]
            assert traced[row].tolist() == positions
            assert_close(features[row], expected, rtol=1e-4, atol=1e-4)
            assert traces["tome"][1][row].tolist() != positions  # the default: raster order, other merges


@pytest.mark.parametrize("spec", ["tome[official]", "ficoco-v[official]", "evit[official]"])
def test_official_options_hooked_match_explicit_reference(model, images, prompts, spec):
    """Batched, padded, SDPA, hooked ≡ the one-sample explicit forward pass of test_reference, with
    the official options on (ToMe's order reaches the LLM and its placeholders)."""
    method = get_method(spec, retain=100)
    inputs = batch_inputs(prompts, images, "left")
    with ficoco.apply(model, method), torch.inference_mode():
        batched = model(**inputs).logits
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            expected = reference_logits(model, prompt, images[row], method)
            assert_close(batched[row, -expected.shape[0]:], expected, rtol=1e-4, atol=1e-4)


def test_official_order_refused_where_tokens_keep_their_place(model):
    from ficoco import LanguageReduction, Method

    language = LanguageReduction(tome_reduction("official"), retain=100, start_layer=2)
    with pytest.raises(ValueError, match="cannot take") as err:
        ficoco.attach(model, Method("tome-llm", language=language))
    assert len(str(err.value).splitlines()) == 1
    assert ficoco.attach(model, get_method("tome", retain=100)).remove() is None  # nothing left behind


def test_official_tome_refused_by_qwen_packed_tower():
    from ficoco.testing import tiny_qwen_vl

    qwen = tiny_qwen_vl("qwen2_vl", seed=0)
    with pytest.raises(ValueError, match="Qwen-VL's packed towers cannot take") as err:
        ficoco.attach(qwen, get_method("tome[official]", retain=0.5))
    assert len(str(err.value).splitlines()) == 1
    ficoco.attach(qwen, get_method("tome", retain=0.5)).remove()


# ---------------------------------------------------------------------------------------------
# FiCoCo-V: [CLS] logits and the correlation map
# ---------------------------------------------------------------------------------------------


def official_ficoco_v_redundancy(s, ref) -> torch.Tensor:
    """FiCoCo-V's official filter score as loops: ``c`` = the [CLS] row of the head-averaged
    logits, ``v`` = the mean head-averaged logit of each patch over the patches, both L2-normalised;
    the code keeps the highest ``0.35 c - 0.65 v``, i.e. discards the highest ``0.65 v - 0.35 c``."""
    cand = s.candidates.tolist()
    c, v = [], []
    for b in range(s.batch):
        c.append([sum(ref.raw[b][h][s.cls_index][cand[b][i]] for h in range(H)) / H for i in range(s.n)])
        v.append([sum(ref.raw[b][h][cand[b][i]][cand[b][j]] for h in range(H) for j in range(s.n)) / (H * s.n)
                  for i in range(s.n)])
    c, v = ref_norm(c), ref_norm(v)
    return t64([[0.65 * v[b][i] - 0.35 * c[b][i] for i in range(s.n)] for b in range(s.batch)])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["encoder", "encoder_bias"])
def test_ficoco_v_logit_cls_term_matches_official_filter(kind, seed):
    s, ref = case(kind, seed)
    cand = s.candidates.tolist()
    close(s.probe().cls_logits,
          [[sum(ref.raw[b][h][0][cand[b][i]] for h in range(H)) / H for i in range(s.n)] for b in range(s.batch)])
    expected = official_ficoco_v_redundancy(s, ref)
    official = FiCoCoVisionFilter(swap_weights=True, cls_term="logits", local_penalty=False)
    close(official.scores(s.tokens(), s.probe()), expected)
    penalised = FiCoCoVisionFilter(swap_weights=True, cls_term="logits")
    close(penalised.scores(s.tokens(), s.probe()), ref_local_penalty(expected, s.positions, s.grid))
    ours = FiCoCoVisionFilter(swap_weights=True, local_penalty=False).scores(s.tokens(), s.probe())
    assert not torch.allclose(ours.double(), expected, rtol=1e-3, atol=1e-3)  # softmax row: another term
    with pytest.raises(ValueError, match="cls_term must be 'softmax' or 'logits'"):
        FiCoCoVisionFilter(cls_term="probs")


def official_correlation_rows(s, ref, rows: list) -> list:
    """``softmax_j(mean_h logits_hij + bias_j)`` over the keys each query may see, per row, as loops."""
    out = []
    length = s.q.shape[1]
    for b in range(s.batch):
        out_rows = []
        for i in rows[b]:
            logits = {}
            for j in range(length):
                if (s.key_valid is not None and not s.key_valid[b, j]) or (s.causal and j > i):
                    continue
                bias = float(s.key_bias[b, j]) if s.key_bias is not None else 0.0
                logits[j] = sum(ref.raw[b][h][i][j] for h in range(H)) / H + bias
            top = max(logits.values(), default=0.0)
            total = sum(math.exp(x - top) for x in logits.values())
            out_rows.append([math.exp(logits[j] - top) / total if j in logits else 0.0 for j in range(length)])
        out.append(out_rows)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["encoder", "encoder_bias", "decoder_left", "decoder_right"])
def test_probe_softmax_of_mean_logits(kind, seed):
    s, ref = case(kind, seed)
    rows = torch.arange(s.q.shape[1]).expand(s.batch, -1)
    close(s.probe().softmax_rows(rows, "logits"), official_correlation_rows(s, ref, rows.tolist()))
    with pytest.raises(ValueError, match="average must be 'probs' or 'logits'"):
        s.probe().softmax_rows(rows, "heads")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["encoder", "encoder_bias"])
@pytest.mark.parametrize("receivers", [False, True])
def test_mean_logits_softmax_correlation_matches_official_map(kind, seed, receivers):
    s, ref = case(kind, seed)
    split = random_split(s.n, 8, s.batch, seed, receivers)
    cand = s.candidates.tolist()
    rows = official_correlation_rows(s, ref, [[cand[b][i] for i in split.sources[b].tolist()] for b in range(s.batch)])
    c = [[[row[cand[b][j]] for j in split.targets[b].tolist()] for row in rows[b]] for b in range(s.batch)]
    allowed = None if split.receivers is None else split.receivers.tolist()
    official = AttentionQuantileCorrelate(correlation_map="mean_logits_softmax")(s.tokens(), s.probe(), split)
    close(official.weights, ref_quantile_targets(c, 0.998, allowed))
    fixed = AttentionQuantileCorrelate(fixed_k=2, correlation_map="mean_logits_softmax")(s.tokens(), s.probe(), split)
    assert ((fixed.weights > 0).sum(-1) <= 2).all()
    ours = AttentionQuantileCorrelate()(s.tokens(), s.probe(), split)
    assert not torch.allclose(ours.weights, official.weights, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="correlation_map must be"):
        AttentionQuantileCorrelate(correlation_map="softmax_mean")


# ---------------------------------------------------------------------------------------------
# EViT: the fused token
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_evit_fused_sum_matches_official_loop(seed):
    """EViT's official block: keep the ``k`` tokens [CLS] attends to most; the others become
    ``sum_i a_i x_i`` with ``a`` the head-averaged [CLS] attention, no normalisation."""
    s, ref = case("encoder_bias", seed)
    remove = 9
    keep = s.n - remove - 1  # the fused token is counted among the survivors
    official = TokenReduction(CLSAttentionFilter(), ConvergentCorrelate(), FuseCompress(fused="sum"))
    default = TokenReduction(CLSAttentionFilter(), ConvergentCorrelate(), FuseCompress())
    result = official(s.tokens(), s.probe(), remove)
    averaged = default(s.tokens(), s.probe(), remove)
    for b in range(s.batch):
        attention = ref.stats["cls"][b]
        kept = sorted(range(s.n), key=lambda i: -attention[i])[:keep]
        fused = sum(attention[i] * s.features[b, i].double() for i in range(s.n) if i not in kept)
        assert sorted(result.kept[b].tolist()) == sorted(kept)
        close(result.tokens.features[b, -1], fused)
        assert not torch.allclose(averaged.tokens.features[b, -1].double(), fused, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="fused must be 'average' or 'sum'"):
        FuseCompress(fused="mean")


# ---------------------------------------------------------------------------------------------
# method names with options
# ---------------------------------------------------------------------------------------------


def test_method_names_carry_options_and_official_presets():
    assert parse_method_spec("ficoco-v[swap_weights=true, cls_term=logits,lam=0.5,fixed_k=none]") == (
        "ficoco-v", {"swap_weights": True, "cls_term": "logits", "lam": 0.5, "fixed_k": None})
    method = get_method("ficoco-v[official]", retain=64)
    assert method.name == "ficoco-v[official]" and method.vision.retain == 64
    f, c = method.vision.reduction.filter, method.vision.reduction.correlate
    assert (f.swap_weights, f.cls_term, c.correlation_map) == (True, "logits", "mean_logits_softmax")
    assert get_method("tome[official]").vision.reduction.filter.alternation == "official"
    assert get_method("evit[official]").vision.reduction.compress.fused == "sum"
    assert get_method("tome[official,proportional_attention=false]").vision.proportional_attention is False
    assert get_method("ficoco-v").name == "ficoco-v"
    assert set(OFFICIAL_OPTIONS) == {"ficoco-v", "tome", "evit", "prumerge", "prumerge+"}
    assert split_methods("ficoco-v, ficoco-v[lam=0.5,swap_weights=true],tome[official]") == [
        "ficoco-v", "ficoco-v[lam=0.5,swap_weights=true]", "tome[official]"]
    for bad, message in (("fastv[official]", "no official-code options"), ("ficoco-v[lam]", "expected KEY=VALUE"),
                         ("ficoco-v[lam=1,lam=0.5]", "sets lam twice"), ("nope[lam=1]", "unknown method 'nope'"),
                         ("ficoco-v[cls_term=probs]", "cls_term must be"), ("tome[x=1]", "bad option for method")):
        with pytest.raises(ValueError, match=message):
            get_method(bad)
    with pytest.raises(ValueError, match="in brackets and as a keyword"):
        get_method("ficoco-v[lam=0.5]", lam=0.3)


def test_cli_lists_official_options_and_takes_bracketed_methods(checkpoint_with_processor, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(main, ["methods"]).output
    assert "ficoco-v[official]" in listed and "cls_term='logits'" in listed and "tome[official]" in listed
    bad = runner.invoke(main, ["proxy-accuracy", "--model", str(checkpoint_with_processor), "--out", str(tmp_path),
                               "--methods", "ficoco-v,ficoco-v[cls_term=probs]", "--no-easy-vqa"])
    assert bad.exit_code != 0 and bad.output.strip().splitlines() == [
        "Error: cls_term must be 'softmax' or 'logits', got 'probs'"]


def test_documented_proxy_comparison_command_plans_its_rows():
    """docs/methods.md's one command names the variants it records, each a distinct table row."""
    import re
    from pathlib import Path

    from ficoco.measure.flops import LlavaShape
    from ficoco.proxy.table import plan_variants
    from ficoco.testing import tiny_llava_config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    command = re.search(r"```bash\n(ficoco proxy-accuracy .*?)\n```", doc, flags=re.S).group(1)
    names = split_methods(re.search(r"--methods '([^']+)'", command).group(1))
    assert names == ["ficoco-v", "ficoco-v[swap_weights=true,cls_term=logits]", "ficoco-v[official]"]
    planned = plan_variants(LlavaShape.from_config(tiny_llava_config()), names, (192,), text_tokens=14)
    assert [row["label"] for row, _ in planned] == ["vanilla"] + [f"{name}@192" for name in names]
    filters = [method.vision.reduction.filter for _, method in planned[1:]]
    assert [(f.swap_weights, f.cls_term) for f in filters] == [(False, "softmax"), (True, "logits"), (True, "logits")]
