"""Accuracy floors of the shipped Qwen2.5-VL-shaped proxy (issue 14), CPU only.

The model answers 85.4% of 500 validation questions (docs/proxy-model.md). Measured on these 60
test questions (10 per family) with torch 2.13.0+cpu and transformers 5.24.0: vanilla 85.0%,
FiCoCo-V at a quarter of each image's tokens 75.0% (88% of vanilla), FiCoCo-L at a quarter 85.0%
(100%); on 600 test questions see docs/proxy/qwen/proxy_accuracy.md. The floors sit a few points
below the measured values, so that a change of library version does not trip them, and guard
the Qwen-VL code paths on a trained checkpoint: varied image sizes, merge groups, window and
full-attention blocks, M-RoPE positions of kept tokens, the prompt cut.
"""

from __future__ import annotations

import pytest

from ficoco import get_method
from ficoco.assets import embedded_model_dir
from ficoco.checkpoint import load_model, load_processor
from ficoco.proxy import qwen
from ficoco.proxy.evaluate import accuracy

pytestmark = pytest.mark.xdist_group("qwen-proxy-regression")
SUBSET = 60
VANILLA_AT_LEAST = 0.80
SHARE_OF_VANILLA_AT_LEAST = {"ficoco-v": 0.80, "ficoco-l": 0.93}


@pytest.fixture(scope="module")
def scored():
    folder = embedded_model_dir("qwen")
    model, processor = load_model(folder), load_processor(folder)
    samples = qwen.validation_samples(SUBSET, "test")
    cache: dict[str, dict[str, float]] = {}

    def score(name: str) -> dict[str, float]:
        if name not in cache:
            method = None if name == "vanilla" else get_method(name, retain=0.25)
            cache[name] = accuracy(model, processor, samples, method, batch_size=30)
        return cache[name]

    return score


def test_vanilla_floor(scored):
    assert scored("vanilla")["overall"] >= VANILLA_AT_LEAST


@pytest.mark.parametrize("name", sorted(SHARE_OF_VANILLA_AT_LEAST))
def test_a_quarter_of_the_tokens_keeps_its_share_of_vanilla(scored, name):
    share = scored(name)["overall"] / scored("vanilla")["overall"]
    assert share >= SHARE_OF_VANILLA_AT_LEAST[name], f"{name} at 25%: {share:.1%} of vanilla"
