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
   dropping, each filter term alone, without the local penalty, with an averaging merge, against
   EViT and ToMe; and at 64 tokens FiCoCo-V and FiCoCo-VL with and without the vision term,
   against EViT, on the same questions.

``--parts`` picks sections (``patches,positions,ficoco-l,ficoco-v``; vanilla is always scored).
CPU, fp32, deterministic.
"""

from __future__ import annotations

import argparse

import torch

import ficoco
from ficoco.assets import embedded_model_dir
from ficoco.methods.base import LanguageReduction, Method, VisionReduction
from ficoco.proxy.evaluate import accuracy, surviving_patch_share
from ficoco.proxy.recipe import patch_words, rendered
from ficoco.proxy.scenes import make_split
from ficoco.stages import DropCompress, NoCorrelate, TokenReduction
from ficoco.stages.filters import FiCoCoLanguageFilter, FiCoCoVisionFilter

PARTS = ("patches", "positions", "ficoco-l", "ficoco-v")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(embedded_model_dir()))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--questions", type=int, default=120)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated sections to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"model {args.model}")
    if "patches" in parts:
        patch_survival(model, processor, args.images)
    questions = [rendered(e) for e in make_split("test", size=args.questions)]
    print(f"accuracy on the first {args.questions} test questions:")
    print(f"  vanilla {accuracy(model, processor, questions, batch_size=60)['overall']:.1%}")
    if "positions" in parts:
        renumbering(model, processor, questions)
    if "ficoco-l" in parts:
        ficoco_l_parts(model, processor, questions)
    if "ficoco-v" in parts:
        ficoco_v_parts(model, processor, questions)


def patch_survival(model, processor, images: int) -> None:
    print(f"object and word patches reaching the LLM at 192 tokens ({images} test images):")
    scenes = make_split("test", size=images)
    salient = torch.tensor([[bool(words) for words in patch_words(e)] for e in scenes])
    for name in ("ficoco-v", "evit", "random", "tome"):
        share = surviving_patch_share(model, processor, [rendered(e) for e in scenes], salient,
                                      ficoco.get_method(name, retain=192))
        print(f"  {name:10} {share:.0%}")


def renumbering(model, processor, questions) -> None:
    for retain in (192, 64):
        for label, options in [("renumbered at the LLM input", {}),
                               ("original positions, at the LLM input", {"side": "language", "layer": 0}),
                               ("original positions, after LLM layer 1", {"side": "language", "layer": 1})]:
            method = ficoco.get_method("random", retain=retain, **options)
            score = accuracy(model, processor, questions, method, batch_size=60)["overall"]
            print(f"  random@{retain:<3} {label:40} {score:.1%}")


def print_accuracies(model, processor, questions, rows: list[tuple[str, Method]], width: int = 56) -> None:
    for label, method in rows:
        print(f"  {label:{width}} {accuracy(model, processor, questions, method, batch_size=60)['overall']:.1%}")


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


def ficoco_v_parts(model, processor, questions) -> None:
    filter_then_drop = Method("ficoco-v filter, dropping", vision=VisionReduction(
        TokenReduction(FiCoCoVisionFilter(), NoCorrelate(), DropCompress()), 192))
    print("FiCoCo-V at 192 tokens:")
    print_accuracies(model, processor, questions, [
        ("default (lam 0.35, local penalty, self-preserving merge)", ficoco.get_method("ficoco-v", retain=192)),
        ("its filter, plain dropping", filter_then_drop),
        ("[CLS] term only (lam 0)", ficoco.get_method("ficoco-v", retain=192, lam=0.0)),
        ("vision term only (lam 1)", ficoco.get_method("ficoco-v", retain=192, lam=1.0)),
        ("no local penalty", ficoco.get_method("ficoco-v", retain=192, local_penalty=False)),
        ("averaging merge", ficoco.get_method("ficoco-v", retain=192, compress="average")),
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


if __name__ == "__main__":
    main()
