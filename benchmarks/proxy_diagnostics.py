"""Why an encoder-side method keeps or loses accuracy on the embedded proxy model (issue 4).

    python benchmarks/proxy_diagnostics.py [--model DIR] [--images 16] [--questions 120]

1. **Which patches survive.** For the first ``--images`` test scenes, the share of object and word
   patches (``ficoco.proxy.recipe.patch_words``) that reach the LLM after FiCoCo-V, EViT, random
   dropping and ToMe at 192 tokens (a token counts as surviving at its own raster position).
   Random dropping keeps a third of them by construction: 192 / 576.
2. **Does the LLM read the layout from sequence positions?** Random dropping of the same share
   at the LLM input, once renumbered (what every encoder-side method hands the LLM) and once with
   the kept tokens' original positions (``random_drop(side="language", layer=0)``), and after LLM
   layer 1, on the first ``--questions`` test questions.
3. **Which part of FiCoCo-L costs accuracy** with its start layer scaled to the 8-layer LLM
   (layer 1): its default, its filter with plain dropping, each filter term alone, all removals
   at one layer, against FastV (``k = 1``), at 192 tokens on the same questions.
4. **Which part of FiCoCo-V costs accuracy** at 192 tokens: its default, its filter with plain
   dropping, each filter term alone, without the local penalty, with an averaging merge, a control
   with a deliberately misrouted merge (each source into the next kept token), against EViT and
   ToMe; and at 64 tokens FiCoCo-V and FiCoCo-VL with and without the vision term,
   against EViT, on the same questions.

5. **Which patches each filter term calls redundant**, layer by layer, in the unreduced encoder
   (first ``--images`` test scenes): for FiCoCo-V's vision term ``v_i = q_i . mean(k)``, the
   attention a patch receives (its ``received`` option), the [CLS] term ``-c_i`` and their
   default combination ``0.35 v^ - 0.65 c^`` (L2-normalised terms, no local penalty), the AUC of
   "an object or word patch scores as more redundant than a background patch" (0.5: blind; below
   0.5: the term protects the content), and how far each normalised, weighted term spreads over
   the patches (the larger spread decides the combined ranking).

6. **Where merged patches go** at 192 tokens (first ``--images`` test scenes): for each merging
   method, the mean size (patches a token stands for, ``VisionTrace.sizes``) of the surviving
   object/word tokens and of the surviving background tokens, and the share of all 576 patches
   that the object/word tokens stand for at the LLM input. FiCoCo's correlate sends a discarded
   patch to the tokens it attends to; when those are the objects, the self-preserving update
   leaves an object token with weight 1 for itself against one per absorbed patch.

7. **The paper's FiCoCo-V ablations** (docs/spec.md §10) at 64 tokens, the paper's 1.5-TFLOPs budget:
   full, without the [CLS] term, without the local penalty, fixed K = 0 (drop), fixed K = 1,
   plain averaging.

``--parts`` picks sections (``patches,positions,ficoco-l,ficoco-v,terms,merges,ablations``; the
accuracy sections also score vanilla).
CPU, fp32, deterministic.
"""

from __future__ import annotations

import argparse
import functools

import torch

import ficoco
from ficoco.assets import embedded_model_dir
from ficoco.methods.base import LanguageReduction, Method, VisionReduction
from ficoco.adapters import attach
from ficoco.proxy.evaluate import _prompt_batch, accuracy, surviving_patch_share
from ficoco.proxy.recipe import RenderedExample, patch_words, rendered
from ficoco.proxy.scenes import FAMILIES, SPLITS, make_split
from ficoco.proxy.train import collate
from ficoco.stages import (
    AttentionQuantileCorrelate, DropCompress, NoCorrelate, SelfPreservingCompress, TokenReduction,
)
from ficoco.stages.filters import FiCoCoLanguageFilter, FiCoCoVisionFilter, l2_normalize
from ficoco.stages.probe import AttentionProbe
from ficoco.stages.tokens import Correlation

SCENE_PARTS = ("patches", "terms", "merges")  # on the first --images test scenes
QUESTION_PARTS = ("positions", "ficoco-l", "ficoco-v", "ablations")  # accuracy on the first --questions
PARTS = SCENE_PARTS + QUESTION_PARTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(embedded_model_dir()))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--questions", type=int, default=120)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated sections to run")
    parser.add_argument("--families", default="", help="comma-separated question families to keep (the first "
                        "--questions of them in the test split) [all]")
    parser.add_argument("--textured-backgrounds", action="store_true",
                        help="draw the test scenes on textured backgrounds (for a model trained on them)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"model {args.model}")
    scenes = [rendered(e, args.textured_backgrounds) for e in make_split("test", size=args.images)]
    for name, section in zip(SCENE_PARTS, (patch_survival, filter_terms, merge_destinations)):
        if name in parts:
            section(model, processor, scenes)
    if not parts & set(QUESTION_PARTS):
        return
    questions = [rendered(e, args.textured_backgrounds) for e in _test_questions(args.questions, args.families)]
    print(f"accuracy on the first {len(questions)} test questions{' of ' + args.families if args.families else ''}:")
    vanilla = accuracy(model, processor, questions, batch_size=60)
    print(f"  vanilla {vanilla['overall']:.1%}")
    ablations = functools.partial(paper_ablations, vanilla=vanilla)
    for name, section in zip(QUESTION_PARTS, (renumbering, ficoco_l_parts, ficoco_v_parts, ablations)):
        if name in parts:
            section(model, processor, questions)


def _test_questions(count: int, families: str) -> list:
    """The first ``count`` test examples, or the first ``count`` of the comma-separated ``families``
    (families come in blocks of six, so ``count`` of k families lie in the first ``6 * count / k``)."""
    if not families:
        return make_split("test", size=count)
    wanted = set(families.split(","))
    if wanted - set(FAMILIES):
        raise SystemExit(f"unknown families {sorted(wanted - set(FAMILIES))}; choose from {', '.join(FAMILIES)}")
    pool = make_split("test", size=min(SPLITS["test"].size, -(-6 * count // len(wanted))))
    return [e for e in pool if e.family in wanted][:count]


def _salient_patches(scenes: list[RenderedExample]) -> torch.Tensor:
    """``[B, 576]`` bool: the patches that show an object or the word."""
    return torch.tensor([[bool(words) for words in patch_words(s.example)] for s in scenes])


def patch_survival(model, processor, scenes: list[RenderedExample]) -> None:
    print(f"object and word patches reaching the LLM at 192 tokens ({len(scenes)} test images):")
    salient = _salient_patches(scenes)
    for name in ("ficoco-v", "evit", "random", "tome"):
        share = surviving_patch_share(model, processor, scenes, salient, ficoco.get_method(name, retain=192))
        print(f"  {name:10} {share:.0%}")


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half, pooled over ``[B, N]``."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + ties / 2)


@torch.inference_mode()
def filter_terms(model, processor, scenes: list[RenderedExample]) -> None:
    salient = _salient_patches(scenes)
    batch = collate(scenes, processor, with_answers=False)
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(index, module, args, kwargs):
        inputs[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [layer.self_attn.register_forward_pre_hook(functools.partial(keep_input, i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    try:
        tower(batch["pixel_values"].to(next(model.parameters()).dtype))
    finally:
        for hook in hooks:
            hook.remove()
    lam = FiCoCoVisionFilter().lam
    print(f"filter terms in the unreduced encoder ({len(scenes)} test images; {salient.float().mean():.0%} of "
          f"patches show an object or the word):")
    print("  AUC that an object/word patch scores more redundant than a background patch, and the spread "
          "(std over patches) of each weighted, L2-normalised term")
    print(f"  {'layer':>5} {'v (logits)':>10} {'received':>9} {'-c [CLS]':>9} {'combined':>9}"
          f" {'spread lam*v':>13} {'spread (1-lam)*c':>17}")
    for index in range(len(layers) // 2, len(layers) - 1):
        attention = layers[index].self_attn
        x = inputs[index]
        b, length, _ = x.shape
        heads = attention.num_heads
        q = attention.q_proj(x).view(b, length, heads, -1)
        k = attention.k_proj(x).view(b, length, heads, -1)
        candidates = torch.arange(1, length)[None].expand(b, -1)
        probe = AttentionProbe(q, k, attention.scale, candidates, cls_index=0)
        v, c = l2_normalize(probe.mean_logits), l2_normalize(probe.cls_attention)
        combined = lam * v - (1 - lam) * c
        print(f"  {index:5d} {_auc(probe.mean_logits, salient):10.2f} {_auc(probe.received_attention, salient):9.2f}"
              f" {_auc(-c, salient):9.2f} {_auc(combined, salient):9.2f}"
              f" {(lam * v).std(dim=1).mean():13.4f} {((1 - lam) * c).std(dim=1).mean():17.4f}")


@torch.inference_mode()
def merge_destinations(model, processor, scenes: list[RenderedExample]) -> None:
    salient = _salient_patches(scenes)
    batch = _prompt_batch(model, processor, scenes)
    print(f"where merged patches go at 192 tokens ({len(scenes)} test images; object/word patches are "
          f"{salient.float().mean():.0%} of the image):")
    print(f"  {'method':40} {'object/word size':>16} {'background size':>15} {'object/word share':>17}")
    for label, method in [("FiCoCo-V default", ficoco.get_method("ficoco-v", retain=192)),
                          ("FiCoCo-V, [CLS] term only (lam 0)", ficoco.get_method("ficoco-v", retain=192, lam=0.0)),
                          ("FiCoCo-V, averaging merge", ficoco.get_method("ficoco-v", retain=192, compress="average")),
                          ("ToMe", ficoco.get_method("tome", retain=192))]:
        with attach(model, method) as handle:
            model(**batch)
            positions, sizes = handle.vision_trace.positions.cpu(), handle.vision_trace.sizes.cpu()
        on_grid = positions >= 0  # EViT-style fused tokens have no grid position
        shows = torch.zeros_like(on_grid)
        shows[on_grid] = salient.gather(1, positions.clamp_min(0))[on_grid]
        background = on_grid & ~shows
        print(f"  {label:40} {sizes[shows].mean():16.2f} {sizes[background].mean():15.2f}"
              f" {sizes[shows].sum() / sizes.sum():17.0%}")


def renumbering(model, processor, questions) -> None:
    for retain in (192, 64):
        for label, options in [("renumbered at the LLM input", {}),
                               ("original positions, at the LLM input", {"side": "language", "layer": 0}),
                               ("original positions, after LLM layer 1", {"side": "language", "layer": 1})]:
            method = ficoco.get_method("random", retain=retain, **options)
            score = accuracy(model, processor, questions, method, batch_size=60)["overall"]
            print(f"  random@{retain:<3} {label:40} {score:.1%}")


def print_accuracies(model, processor, questions, rows: list[tuple[str, Method]], width: int = 56,
                     families: tuple[str, ...] = ()) -> None:
    """One line per ``(label, method)``: overall accuracy, then each of ``families``."""
    for label, method in rows:
        _print_row(label, accuracy(model, processor, questions, method, batch_size=60), width, families)


def _print_row(label: str, result: dict[str, float], width: int, families: tuple[str, ...]) -> None:
    if not families:
        print(f"  {label:{width}} {result['overall']:.1%}")
        return
    columns = "".join(f" {result.get(f, float('nan')):{len(f) + 1}.1%}" for f in families)
    print(f"  {label:{width}} {result['overall']:6.1%}{columns}")


def ficoco_l_parts(model, processor, questions) -> None:
    filter_then_drop = Method("ficoco-l filter, dropping", language=LanguageReduction(
        TokenReduction(FiCoCoLanguageFilter(), NoCorrelate(), DropCompress()), 192, 1))
    print("FiCoCo-L from LLM layer 1 at 192 tokens:")
    print_accuracies(model, processor, questions, [
        ("default (beta 0.6, self-preserving merge)", ficoco.get_method("ficoco-l", retain=192, start_layer=1)),
        ("its filter, plain dropping", filter_then_drop),
        ("visual term only (beta 1)", ficoco.get_method("ficoco-l", retain=192, start_layer=1, beta=1.0)),
        ("text term only (beta 0)", ficoco.get_method("ficoco-l", retain=192, start_layer=1, beta=0.0)),
        ("all removals at layer 1", ficoco.get_method("ficoco-l", retain=192, start_layer=1, end_layer=1)),
        ("FastV, k = 1", ficoco.get_method("fastv", retain=192, k=1)),
    ], width=44)


class MisroutedCompress(SelfPreservingCompress):
    """A deliberate bug, for a control row: every source's weights move one target along (to the
    next kept token in raster order), as a scatter onto the wrong indices would."""

    def __call__(self, targets, sources, correlation: Correlation):
        return super().__call__(targets, sources, Correlation(correlation.weights.roll(1, dims=-1)))


def ficoco_v_parts(model, processor, questions) -> None:
    filter_then_drop = Method("ficoco-v filter, dropping", vision=VisionReduction(
        TokenReduction(FiCoCoVisionFilter(), NoCorrelate(), DropCompress()), 192))
    misrouted = Method("ficoco-v, misrouted merge", vision=VisionReduction(
        TokenReduction(FiCoCoVisionFilter(), AttentionQuantileCorrelate(), MisroutedCompress()), 192))
    print("FiCoCo-V at 192 tokens:")
    print_accuracies(model, processor, questions, [
        ("default (lam 0.35, local penalty, self-preserving merge)", ficoco.get_method("ficoco-v", retain=192)),
        ("its filter, plain dropping", filter_then_drop),
        ("[CLS] term only (lam 0)", ficoco.get_method("ficoco-v", retain=192, lam=0.0)),
        ("vision term only (lam 1)", ficoco.get_method("ficoco-v", retain=192, lam=1.0)),
        ("no local penalty", ficoco.get_method("ficoco-v", retain=192, local_penalty=False)),
        ("averaging merge", ficoco.get_method("ficoco-v", retain=192, compress="average")),
        ("control: merged into the next target (a deliberate bug)", misrouted),
        ("EViT", ficoco.get_method("evit", retain=192)),
        ("ToMe", ficoco.get_method("tome", retain=192)),
    ])
    print("FiCoCo-V and FiCoCo-VL at 64 tokens:")
    print_accuracies(model, processor, questions, [
        ("FiCoCo-V default", ficoco.get_method("ficoco-v", retain=64)),
        ("FiCoCo-V, [CLS] term only (lam 0)", ficoco.get_method("ficoco-v", retain=64, lam=0.0)),
        ("FiCoCo-VL default", ficoco.get_method("ficoco-vl", retain=64)),
        ("FiCoCo-VL, [CLS] term only in its encoder half", ficoco.get_method("ficoco-vl", retain=64,
                                                                             vision_options={"lam": 0.0})),
        ("EViT", ficoco.get_method("evit", retain=64)),
    ])


def paper_ablations(model, processor, questions, vanilla: dict[str, float]) -> None:
    """Overall, and the families nearest the paper's two ablation benchmarks: multiple choice
    (ScienceQA) and text (TextVQA)."""
    families, width = ("choice", "text"), 56
    print("the paper's FiCoCo-V ablations (docs/spec.md §10) at 64 tokens:   overall  choice  text")
    _print_row("vanilla", vanilla, width, families)
    print_accuracies(model, processor, questions, [
        ("full", ficoco.get_method("ficoco-v", retain=64)),
        ("without the [CLS] term (lam 1)", ficoco.get_method("ficoco-v", retain=64, lam=1.0)),
        ("without the local penalty", ficoco.get_method("ficoco-v", retain=64, local_penalty=False)),
        ("fixed K = 0 (discarded tokens dropped)", ficoco.get_method("ficoco-v", retain=64, fixed_k=0)),
        ("fixed K = 1", ficoco.get_method("ficoco-v", retain=64, fixed_k=1)),
        ("plain averaging", ficoco.get_method("ficoco-v", retain=64, compress="average")),
    ], width, families)

if __name__ == "__main__":
    main()
