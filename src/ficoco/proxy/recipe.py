"""The proxy model's training recipe on the procedural dataset (issue 4): build, train, evaluate,
save in HF format. ``ficoco train-proxy`` runs it; on one H100 the default recipe is meant to take
under ten minutes."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from .easyvqa import (
    EasyVQASample, easy_vqa_answers, easy_vqa_question_words, load_easy_vqa, load_image, split_easy_vqa_train,
)
from .evaluate import accuracy
from .model import ProxyShape, parameter_count, proxy_config, proxy_processor
from .scenes import (
    COLORS, DATASET_VERSION, GRID, PATCH_SIZE, SHAPES, SPLITS, VOCABULARY, WORDS, Example, example_at,
    follow_up_questions, make_split,
)
from .train import TrainConfig, train

#: multi-label targets of the [CLS] head: which shapes, colours, colour-shape pairs and word appear
TARGET_NAMES = tuple(
    [f"shape:{s}" for s in SHAPES] + [f"color:{c}" for c in COLORS]
    + [f"pair:{c} {s}" for c in COLORS for s in SHAPES] + ["word"] + [f"word:{w}" for w in WORDS]
)
EASY_VQA_FAMILY = "easy-vqa"
_TARGET_INDEX = MappingProxyType({name: i for i, name in enumerate(TARGET_NAMES)})


def scene_targets(example: Example) -> list[float]:
    """Multi-hot ``[len(TARGET_NAMES)]`` description of the scene, the [CLS] head's target."""
    target = [0.0] * len(TARGET_NAMES)
    for obj in example.scene.objects:
        for name in (f"shape:{obj.shape}", f"color:{obj.color}", f"pair:{obj.color} {obj.shape}"):
            target[_TARGET_INDEX[name]] = 1.0
    if example.scene.word:
        target[_TARGET_INDEX["word"]] = 1.0
        target[_TARGET_INDEX[f"word:{example.scene.word}"]] = 1.0
    return target


def patch_words(example: Example) -> list[tuple[str, ...]]:
    """``[GRID * GRID]`` words describing each patch in raster order: ``(color, shape)`` of the object
    whose box holds the patch's centre pixel, ``(word,)`` for the written word's box, ``()`` for
    background. Boxes never overlap and every object is wider than a patch, so every object owns
    at least one patch."""
    labels: list[tuple[str, ...]] = [()] * (GRID * GRID)
    boxes = [(obj.bbox, (obj.color, obj.shape)) for obj in example.scene.objects]
    if example.scene.word is not None:
        boxes.append((example.scene.word_box, (example.scene.word,)))
    centres = [i * PATCH_SIZE + PATCH_SIZE // 2 for i in range(GRID)]
    for (x0, y0, x1, y1), words in boxes:
        cols = [c for c, x in enumerate(centres) if x0 <= x < x1]
        for row in (r for r, y in enumerate(centres) if y0 <= y < y1):
            for col in cols:
                labels[row * GRID + col] = words
    return labels


@dataclass
class RenderedExample:
    """An :class:`Example` with its image rendered (what the training loop and evaluation read)."""

    image: object
    question: str
    answer: str
    family: str
    example: Example | None  # None for samples that are not procedural scenes (easy-VQA)
    turns: tuple[tuple[str, str], ...] = ()  # later (question, answer) turns about the same image


def rendered(example: Example, textured: bool = False) -> RenderedExample:
    return RenderedExample(example.image(textured), example.question, example.answer, example.family, example)


def easy_vqa_rendered(sample: EasyVQASample) -> RenderedExample:
    """An easy-VQA question with its image loaded at 336 px; family ``"easy-vqa"``, no scene."""
    return RenderedExample(load_image(sample.image_path), sample.question, sample.answer, EASY_VQA_FAMILY, None)


def easy_vqa_vocabulary() -> list[str]:
    """Question and answer words of every easy-VQA split (empty without the package)."""
    try:
        samples = load_easy_vqa("train") + load_easy_vqa("test")
    except ImportError:
        return []
    return easy_vqa_question_words(samples) + easy_vqa_answers()


def mixed_training_stream(easy_vqa_fit: Sequence[EasyVQASample], every: int, seed: int, turns: int = 1,
                          textured: bool = False, render=None):
    """``sample_at(i)`` for training: procedural train sample ``i``, except that every ``every``-th
    index (``i % every == every - 1``) is an easy-VQA question instead, drawn without replacement
    in a seeded order that is reshuffled each pass over ``easy_vqa_fit``. With ``turns > 1`` each
    sample carries up to ``turns - 1`` more questions about the same image as later turns (as in
    LLaVA's multi-turn instruction data): more supervised answers per image forward pass.
    ``textured`` draws the scenes on textured backgrounds (:func:`~ficoco.proxy.scenes.background_texture`);
    ``render(example, textured)`` makes the sample (default :func:`rendered`, 336 px)."""
    render = render or rendered
    train_seed = SPLITS["train"].seed
    by_image: dict[int, list[EasyVQASample]] = {}
    for sample in easy_vqa_fit:
        by_image.setdefault(sample.image_id, []).append(sample)

    @functools.lru_cache(maxsize=2)  # one shuffle per pass, not per sample
    def epoch_order(epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(len(easy_vqa_fit))

    def sample_at(i: int) -> RenderedExample:
        if easy_vqa_fit and every > 0 and i % every == every - 1:
            epoch, slot = divmod(i // every, len(easy_vqa_fit))
            first = easy_vqa_fit[int(epoch_order(epoch)[slot])]
            others = [s for s in by_image[first.image_id] if s.question != first.question]
            picked = np.random.Generator(np.random.PCG64([seed, epoch, slot])).permutation(len(others))[:turns - 1]
            item = easy_vqa_rendered(first)
            item.turns = tuple((others[k].question, others[k].answer) for k in picked)
            return item
        example = example_at(train_seed, i)
        item = render(example, textured)
        if turns > 1:
            item.turns = tuple((s.question, s.answer) for s in follow_up_questions(example, turns - 1))
        return item

    return sample_at


def build(shape: ProxyShape = ProxyShape(), seed: int = 0, extra_words: Sequence[str] = ()):
    """A fresh (random) proxy model and its processor (vocabulary: the procedural dataset's, plus
    ``extra_words``)."""
    from transformers import LlavaForConditionalGeneration

    processor = proxy_processor(tuple(VOCABULARY) + tuple(extra_words))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(proxy_config(processor.tokenizer, shape))
    return model, processor


def train_proxy(out_dir: str, config: TrainConfig, shape: ProxyShape = ProxyShape(), eval_size: int = 500,
                easy_vqa_every: int = 8, turns: int = 12, init_from: str | None = None, textured: bool = False,
                log=print) -> dict:
    """Train on the procedural ``train`` split mixed with easy-VQA's train images (one sample in
    ``easy_vqa_every``; 0 or a missing ``easy-vqa`` package: procedural only), evaluate on the first
    ``eval_size`` procedural validation samples and on easy-VQA's held-out train images, save the
    model (fp16 safetensors) and processor to ``out_dir`` with ``training.json`` beside them.
    ``textured``: scenes (training and validation) on textured backgrounds."""
    easy_fit, easy_validation = [], []
    if easy_vqa_every > 0:
        try:
            easy_fit, easy_validation = split_easy_vqa_train(load_easy_vqa("train"))
        except ImportError:
            log("easy-vqa is not installed: training on the procedural scenes only")
    if init_from is None:
        model, processor = build(shape, config.seed, easy_vqa_vocabulary() if easy_fit else ())
    else:  # a further stage: continue from a saved checkpoint (its weights, tokenizer and shape)
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(init_from)
    started = time.time()
    stream = mixed_training_stream(easy_fit, easy_vqa_every, config.seed, turns, textured)
    record = train(model, processor, stream, config,
                   aux_targets=lambda s: scene_targets(s.example) if s.example is not None else None,
                   num_aux=len(TARGET_NAMES),
                   patch_words=lambda s: patch_words(s.example) if s.example is not None else None, log=log)
    metrics = {}
    if eval_size > 0:
        validation = [rendered(e, textured) for e in make_split("validation", size=eval_size)]
        metrics = accuracy(model, processor, validation, batch_size=64)
    if easy_validation and eval_size > 0:
        metrics[EASY_VQA_FAMILY] = accuracy(
            model, processor, [easy_vqa_rendered(s) for s in easy_validation[:eval_size]], batch_size=64)["overall"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    record.update(init_from=init_from, easy_vqa_every=easy_vqa_every if easy_fit else 0, turns=turns,
                  dataset_version=DATASET_VERSION, textured_backgrounds=textured, shape=asdict(shape),
                  parameters=parameter_count(model.config),
                  validation_size=eval_size, validation_accuracy=metrics, total_seconds=time.time() - started)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    log(f"validation accuracy: {metrics}")
    return record
