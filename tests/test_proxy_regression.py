"""Accuracy regression tests on the embedded proxy model (issue 4), CPU only.

The shipped model answers a fixed subset of the procedural test split:

- with vanilla;
- with FiCoCo-V and FiCoCo-L at 192 tokens;
- with every FiCoCo method and with random dropping at 64 tokens.

Thresholds come from the measured accuracy table (docs/proxy/proxy_accuracy.md, 600 test questions),
with a safety margin for the smaller subset. A broken filter, a merge into the wrong token or a
lost [CLS] shows up here as lost accuracy. Random weights could never show that.

Some of the issue's criteria fail on this model. They are marked as expected failures, strict, so
they turn into failures the day a retrained model meets them:

- FiCoCo-V at 192 tokens keeps ≥ 95% of vanilla;
- FiCoCo-V and FiCoCo-VL (whose first half is FiCoCo-V) beat random dropping at 64 tokens.

The reason is the model's [CLS] attention in layers 12-22, which is lowest on object interiors
(docs/proxy-model.md, "What the accuracy table shows").
"""

from __future__ import annotations

import json

import pytest
import torch

from ficoco import get_method
from ficoco.assets import embedded_model_dir
from ficoco.proxy.evaluate import accuracy
from ficoco.proxy.model import ProxyShape
from ficoco.proxy.recipe import rendered
from ficoco.proxy.scenes import DATASET_VERSION, FAMILIES, make_split

SUBSET = 120  # the first 120 test questions: 20 per family
# measured: vanilla 89.0% on the first 600 test questions (docs/proxy/proxy_accuracy.md), 93.3% on
# this subset; FiCoCo-L 92.5% at 192 and 91.7% at 64 tokens, random dropping 62.5% at 64 tokens
VANILLA_AT_LEAST = 0.83
FAMILY_AT_LEAST = {"attribute": 0.7, "counting": 0.7, "existence": 0.85, "spatial": 0.45, "text": 0.85, "choice": 0.8}
CLS_ATTENTION_GAP = "the shipped model's [CLS] attention is lowest on object interiors (docs/proxy-model.md)"


@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = embedded_model_dir()
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def questions():
    return [rendered(example) for example in make_split("test", SUBSET)]


@pytest.fixture(scope="module")
def scores(embedded, questions):
    """``score(name, retain)``: accuracy per family and overall, each variant computed once."""
    model, processor = embedded
    cache: dict[str, dict[str, float]] = {}

    def score(name: str, retain: int | None = None) -> dict[str, float]:
        label = name if retain is None else f"{name}@{retain}"
        if label not in cache:
            method = None if name == "vanilla" else get_method(name, retain=retain)
            cache[label] = accuracy(model, processor, questions, method, batch_size=40)
        return cache[label]

    return score


def test_shipped_checkpoint_is_the_documented_model():
    """LLaVA-1.5's geometry at small width, at most 20 MB, trained on this dataset version."""
    from transformers import AutoConfig

    folder = embedded_model_dir()
    config = AutoConfig.from_pretrained(folder)
    shape = ProxyShape()
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers) == (336, 14, 24)
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert (text.num_hidden_layers, text.hidden_size) == (shape.llm_layers, shape.llm_hidden)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 1024 * 1024
    record = json.loads((folder / "training.json").read_text())
    assert record["dataset_version"] == DATASET_VERSION


def test_vanilla_accuracy(scores, questions):
    result = scores("vanilla")
    assert {q.family for q in questions} == set(FAMILIES)
    assert result["overall"] >= VANILLA_AT_LEAST, result
    for family, floor in FAMILY_AT_LEAST.items():
        assert result[family] >= floor, (family, result)


def test_ficoco_l_at_192_tokens_keeps_95_percent_of_vanilla(scores):
    assert scores("ficoco-l", 192)["overall"] >= 0.95 * scores("vanilla")["overall"]


@pytest.mark.xfail(strict=True, reason=CLS_ATTENTION_GAP)
def test_ficoco_v_at_192_tokens_keeps_95_percent_of_vanilla(scores):
    assert scores("ficoco-v", 192)["overall"] >= 0.95 * scores("vanilla")["overall"]


@pytest.mark.parametrize("name", [
    "ficoco-l",
    pytest.param("ficoco-v", marks=pytest.mark.xfail(strict=True, reason=CLS_ATTENTION_GAP)),
    pytest.param("ficoco-vl", marks=pytest.mark.xfail(strict=True, reason=CLS_ATTENTION_GAP)),  # its encoder half
])
def test_ficoco_beats_random_dropping_at_64_tokens(scores, name):
    assert scores(name, 64)["overall"] >= scores("random", 64)["overall"] + 0.05
