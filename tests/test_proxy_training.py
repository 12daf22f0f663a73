"""The proxy model's architecture, tokenizer, batching, training loop and evaluation, on CPU with
toy samples (the real run trains on the procedural dataset on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image
from torch import Tensor

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
    turns: tuple = field(default=())


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
    easy = {"easy-vqa"} if importlib.util.find_spec("easy_vqa") else set()
    assert set(record["validation_accuracy"]) == set(FAMILIES) | {"overall"} | easy
    assert len(record["curve"]) == 4 and record["parameters"] > 0
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["dataset_version"] == "ficoco-proxy-2"
    assert (tmp_path / "model.safetensors").exists()
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert len(TARGET_NAMES) == 6 + 8 + 48 + 1 + 34


def test_multi_turn_collate_labels_every_answer_and_nothing_else(processor):
    sample = Toy(Image.new("RGB", (336, 336)), "what colour is the shape ?", "red", "attribute",
                 turns=(("is the shape red ?", "yes"), ("what shape is the shape ?", "circle")))
    batch = collate([sample, toy(1)], processor)
    tok = processor.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tok.decode(ids[labels != -100]).split() == ["red", "</s>", "yes", "</s>", "circle", "</s>"]
    text = tok.decode(ids[ids != tok.convert_tokens_to_ids("<image>")]).split()
    assert text.count("?") == 3 and text[-1] == "</s>"
    # the single-turn sample in the same batch is unchanged by its neighbour's turns
    assert tok.decode(batch["input_ids"][1][batch["labels"][1] != -100]).split() == ["green", "</s>"]


def test_masked_multilabel_loss_ignores_rows_without_targets():
    from ficoco.proxy.train import masked_multilabel_loss

    logits = torch.randn(3, 4)
    targets = torch.tensor([[1.0, 0, 0, 1], [math.nan] * 4, [0, 1, 0, 0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 2]], targets[[0, 2]])
    assert torch.allclose(masked_multilabel_loss(logits, targets), expected)
    assert masked_multilabel_loss(logits, torch.full((3, 4), math.nan)) == 0


def test_word_alignment_loss_matches_a_loop():
    from ficoco.proxy.train import word_alignment_loss

    torch.manual_seed(0)
    tokens, words = torch.randn(2, 5, 8), torch.randn(11, 8)
    targets = torch.tensor([[[3, 4], [7, -100], [-100, -100], [0, 10], [2, -100]],
                            [[-100, -100]] * 4 + [[5, 6]]])
    losses = []
    for b in range(2):
        for p in range(5):
            ids = [int(i) for i in targets[b, p] if i != -100]
            if ids:
                logp = torch.log_softmax(tokens[b, p] @ words.T, dim=-1)
                losses.append(-sum(logp[i] for i in ids) / len(ids))
    assert torch.allclose(word_alignment_loss(tokens, words, targets), torch.stack(losses).mean(), atol=1e-6)
    assert word_alignment_loss(tokens, words, torch.full((2, 5, 2), -100)) == 0


#: a 4-layer tower and a 2-layer LLM: enough for the training options' wiring, fast on CPU
SMALL = ProxyShape(vision_layers=4, vision_hidden=32, vision_heads=2, vision_mlp=64, llm_layers=2,
                   llm_hidden=48, llm_heads=2, llm_kv_heads=2, llm_mlp=96)


def small_model(processor):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(proxy_config(processor.tokenizer, SMALL))


def test_cls_attention_saliency_loss_matches_a_loop():
    from ficoco.proxy.train import cls_attention_saliency_loss

    torch.manual_seed(0)
    heads, dim, patches = 2, 4, 5
    query, keys = torch.randn(3, heads * dim), torch.randn(3, 1 + patches, heads * dim)
    salient = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    losses = []
    for b in (0, 2):  # row 1 has no salient patch: skipped
        per_head = [torch.softmax(keys[b, :, h * dim:(h + 1) * dim] @ query[b, h * dim:(h + 1) * dim] * 0.5, dim=0)
                    for h in range(heads)]
        attention = torch.stack(per_head).mean(0)[1:]  # [CLS] -> patches, over all 1 + N keys
        losses.append(-torch.stack([attention[i].log() for i in range(patches) if salient[b, i]]).mean())
    loss = cls_attention_saliency_loss(query, keys, heads, 0.5, salient)
    assert torch.allclose(loss, torch.stack(losses).mean(), atol=1e-6)
    assert cls_attention_saliency_loss(query, keys, heads, 0.5, torch.zeros_like(salient)) == 0


def test_cls_attention_loss_reaches_its_layer_and_nothing_after_it(processor):
    """With and without the saliency loss on layer 1, the gradients of layer 1's query projection
    differ and those of layer 2 (after it: the loss cannot depend on it) are identical."""
    words = [("red", "circle") if i % 7 == 0 else () for i in range(576)]

    def gradients(weight: float) -> dict[int, Tensor]:
        torch.manual_seed(0)
        model = small_model(processor)
        layers = model.model.vision_tower.encoder.layers
        grads = {}
        for i in (1, 2):
            layers[i].self_attn.q_proj.weight.register_hook(lambda g, i=i: grads.update({i: g.clone()}))
        config = TrainConfig(steps=1, batch_size=2, device="cpu", num_workers=0, warmup_steps=1, patch_weight=0.0,
                             cls_attention_layers=(1,), cls_attention_weight=weight)
        record = train(model, processor, toy, config, patch_words=lambda s: words, log=lambda _: None)
        assert record["curve"][0]["attention_loss"] > 0
        return grads

    plain, salient = gradients(0.0), gradients(1.0)
    assert not torch.allclose(plain[1], salient[1]) and torch.equal(plain[2], salient[2])
    with pytest.raises(ValueError, match="needs patch_words"):
        train(small_model(processor), processor, toy,
              TrainConfig(steps=1, device="cpu", cls_attention_layers=(1,)), log=lambda _: None)


def test_token_drop_trains_on_random_subsets_through_the_adapter(processor):
    """Steps with token dropping feed the LLM a random subset (through ficoco's adapter, which
    cuts placeholders and labels alike); the patch-word targets follow the surviving patches;
    the draws are deterministic given the seed and the hooks are gone afterwards."""
    words = [("red", "circle") if i % 5 == 0 else () for i in range(576)]

    def run() -> list[dict]:
        torch.manual_seed(0)
        model = small_model(processor)
        config = TrainConfig(steps=8, batch_size=2, device="cpu", num_workers=0, warmup_steps=1, log_every=1,
                             token_drop_prob=0.5, token_drop_min=16, cls_attention_layers=(1,), seed=1)
        curve = train(model, processor, toy, config, patch_words=lambda s: words, log=lambda _: None)["curve"]
        assert getattr(model, "_ficoco_handle", None) is None
        return curve

    curve = run()
    tokens = [entry["visual_tokens"] for entry in curve]
    assert 576 in tokens and any(16 <= t < 576 for t in tokens), tokens
    assert all(math.isfinite(e["loss"]) and e["patch_loss"] > 0 for e in curve)
    assert [(e["visual_tokens"], e["loss"]) for e in run()] == [(e["visual_tokens"], e["loss"]) for e in curve]
    with pytest.raises(ValueError, match="token_drop_min must lie in 1..575"):
        train(small_model(processor), processor, toy,
              TrainConfig(steps=1, device="cpu", token_drop_prob=0.5, token_drop_min=576), log=lambda _: None)
    with pytest.raises(ValueError, match="token_drop_prob must lie in"):
        train(small_model(processor), processor, toy,
              TrainConfig(steps=1, device="cpu", token_drop_prob=1.5), log=lambda _: None)


def test_train_proxy_cli_trains_and_saves(tmp_path):
    from click.testing import CliRunner

    from ficoco.cli import main

    out = CliRunner().invoke(main, ["train-proxy", "--out", str(tmp_path), "--steps", "2", "--batch-size", "2",
                                    "--device", "cpu", "--workers", "0", "--eval-size", "0", "--turns", "2",
                                    "--cls-layers", "12,20", "--cls-attention-layers", "12-14,20",
                                    "--token-drop-prob", "0.5", "--token-drop-min", "48", "--textured-backgrounds"])
    assert out.exit_code == 0, out.output
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["config"]["steps"] == 2 and record["config"]["lr"] == TrainConfig().lr and record["turns"] == 2
    assert record["config"]["cls_layers"] == [12, 20]
    assert record["config"]["cls_attention_layers"] == [12, 13, 14, 20]
    assert record["config"]["token_drop_prob"] == 0.5 and record["config"]["token_drop_min"] == 48
    assert record["textured_backgrounds"] is True
    assert record["curve"][0]["attention_loss"] > 0
    bad = CliRunner().invoke(main, ["train-proxy", "--out", str(tmp_path / "bad"), "--steps", "1", "--device", "cpu",
                                    "--workers", "0", "--eval-size", "0", "--cls-layers", "24"])
    assert bad.exit_code != 0 and "cls_layers (24,) must lie in 0..23" in bad.output
    assert (tmp_path / "model.safetensors").stat().st_size < 20e6
