"""The proxy model's architecture, tokenizer, batching, training loop and evaluation, on CPU with
toy samples (the real run trains on the procedural dataset on a GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image

import ficoco
from ficoco.proxy.evaluate import accuracy, normalize_answer
from ficoco.proxy.model import ProxyShape, parameter_count, proxy_config, proxy_processor
from ficoco.proxy.train import TrainConfig, collate, cosine_lr, train

WORDS = ["what", "colour", "is", "the", "shape", "?", "red", "green", "blue", "circle", "square", "yes", "no"]


@dataclass
class Toy:
    image: Image.Image
    question: str
    answer: str
    family: str


def toy(i: int) -> Toy:
    colour = ["red", "green", "blue"][i % 3]
    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[colour]
    return Toy(Image.new("RGB", (336, 336), rgb), "what colour is the shape ?", colour, "attribute")


@pytest.fixture(scope="module")
def processor():
    return proxy_processor(WORDS)


def test_default_shape_fits_20_mb(processor):
    realistic = proxy_processor(WORDS + [f"w{i}" for i in range(200)])
    assert parameter_count(proxy_config(realistic.tokenizer)) * 2 < 20e6


def test_tokenizer_and_chat_template_roundtrip(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    batch = collate([toy(0), toy(1)], loaded)
    ids = batch["input_ids"]
    assert int((ids[0] == loaded.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576
    answer_positions = batch["labels"][0] != -100
    assert loaded.tokenizer.decode(ids[0][answer_positions]) .split() == ["red", "</s>"]
    assert batch["pixel_values"].shape == (2, 3, 336, 336)


def test_lr_schedule():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert cosine_lr(0, config) == pytest.approx(0.1) and cosine_lr(9, config) == pytest.approx(1.0)
    assert cosine_lr(99, config) == pytest.approx(0.1, abs=1e-3)


def test_training_reduces_the_loss_and_evaluation_runs(processor, tmp_path):
    from transformers import LlavaForConditionalGeneration

    shape = ProxyShape(vision_layers=14, vision_hidden=32, vision_heads=2, vision_mlp=64, llm_layers=6,
                       llm_hidden=48, llm_heads=2, llm_kv_heads=2, llm_mlp=96)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(proxy_config(processor.tokenizer, shape))
    config = TrainConfig(steps=30, batch_size=6, lr=3e-3, warmup_steps=3, device="cpu", num_workers=0, log_every=29)
    record = train(model, processor, toy, config, aux_targets=lambda s: [float(s.answer == c) for c in WORDS[6:9]],
                   num_aux=3, log=lambda _: None)
    assert record["curve"][-1]["loss"] < record["curve"][0]["loss"] * 0.5
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    samples = [toy(i) for i in range(6)]
    vanilla = accuracy(reloaded, processor, samples, batch_size=3)
    assert set(vanilla) == {"attribute", "overall"} and vanilla["overall"] >= 2 / 3
    reduced = accuracy(reloaded, processor, samples, ficoco.get_method("ficoco-v", retain=64, start_layer=6))
    assert 0.0 <= reduced["overall"] <= 1.0


def test_answer_normalisation():
    assert normalize_answer(" Red. ") == "red"


def test_train_proxy_end_to_end_on_cpu(tmp_path):
    """The recipe on the real procedural data with a micro model: trains, evaluates per family,
    saves fp16 safetensors + processor + training record, reloads through from_pretrained."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ficoco.proxy.recipe import TARGET_NAMES, scene_targets, train_proxy
    from ficoco.proxy.scenes import FAMILIES, make_split

    assert sum(scene_targets(make_split("validation", size=1)[0])) >= 3
    shape = ProxyShape(vision_layers=14, vision_hidden=32, vision_heads=2, vision_mlp=64, llm_layers=6,
                       llm_hidden=48, llm_heads=2, llm_kv_heads=2, llm_mlp=96)
    config = TrainConfig(steps=4, batch_size=4, device="cpu", num_workers=0, warmup_steps=1, log_every=1)
    record = train_proxy(str(tmp_path), config, shape, eval_size=12, log=lambda _: None)
    assert set(record["validation_accuracy"]) == set(FAMILIES) | {"overall"}
    assert len(record["curve"]) == 4 and record["parameters"] > 0
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["dataset_version"] == "ficoco-proxy-1"
    assert (tmp_path / "model.safetensors").exists()
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert len(TARGET_NAMES) == 6 + 8 + 48 + 1 + 34
