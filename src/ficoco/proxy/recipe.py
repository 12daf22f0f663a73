"""The proxy model's training recipe on the procedural dataset (issue 4): build, train, evaluate,
save in HF format. ``ficoco train-proxy`` runs it; on one H100 the default recipe is meant to take
under ten minutes."""

from __future__ import annotations

from types import MappingProxyType

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .evaluate import accuracy
from .model import ProxyShape, parameter_count, proxy_config, proxy_processor
from .scenes import COLORS, DATASET_VERSION, SHAPES, SPLITS, VOCABULARY, WORDS, Example, example_at, make_split
from .train import TrainConfig, train

#: multi-label targets of the [CLS] head: which shapes, colours, colour-shape pairs and word appear
TARGET_NAMES = tuple(
    [f"shape:{s}" for s in SHAPES] + [f"color:{c}" for c in COLORS]
    + [f"pair:{c} {s}" for c in COLORS for s in SHAPES] + ["word"] + [f"word:{w}" for w in WORDS]
)
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


@dataclass
class RenderedExample:
    """An :class:`Example` with its image rendered (what the training loop and evaluation read)."""

    image: object
    question: str
    answer: str
    family: str
    example: Example


def rendered(example: Example) -> RenderedExample:
    return RenderedExample(example.image(), example.question, example.answer, example.family, example)


def build(shape: ProxyShape = ProxyShape(), seed: int = 0):
    """A fresh (random) proxy model and its processor."""
    from transformers import LlavaForConditionalGeneration

    processor = proxy_processor(VOCABULARY)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(proxy_config(processor.tokenizer, shape))
    return model, processor


def train_proxy(out_dir: str, config: TrainConfig, shape: ProxyShape = ProxyShape(), eval_size: int = 500,
                log=print) -> dict:
    """Train on the ``train`` split, evaluate on the first ``eval_size`` validation samples, save the
    model (fp16 safetensors) and processor to ``out_dir`` with ``training.json`` beside them."""
    model, processor = build(shape, config.seed)
    train_seed = SPLITS["train"].seed
    started = time.time()
    record = train(model, processor, lambda i: rendered(example_at(train_seed, i)), config,
                   aux_targets=lambda s: scene_targets(s.example), num_aux=len(TARGET_NAMES), log=log)
    validation = [rendered(e) for e in make_split("validation", size=eval_size)]
    metrics = accuracy(model, processor, validation, batch_size=64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    record.update(dataset_version=DATASET_VERSION, shape=asdict(shape), parameters=parameter_count(model.config),
                  validation_size=eval_size, validation_accuracy=metrics, total_seconds=time.time() - started)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    log(f"validation accuracy: {metrics}")
    return record
