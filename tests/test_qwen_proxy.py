"""The Qwen2.5-VL-shaped proxy (ficoco.proxy.qwen) and the image-only Qwen processors
(ficoco.qwen_processor): data at varied sizes, the fast training encoder against the processor,
the decoder transfer from the LLaVA proxy, a short training run saved and loaded back, and the
shipped checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import ficoco
from ficoco.assets import embedded_model_dir
from ficoco.checkpoint import load_model, load_processor
from ficoco.proxy import qwen
from ficoco.proxy.evaluate import answer
from ficoco.proxy.scenes import SPLITS, example_at
from ficoco.proxy.train import TrainConfig, collate
from ficoco.testing import QWEN_GENERATIONS, qwen_image_processor

pytestmark = pytest.mark.xdist_group("qwen-proxy")


@pytest.fixture(scope="module")
def shipped():
    folder = embedded_model_dir("qwen")
    return folder, load_model(folder), load_processor(folder)


@pytest.fixture(scope="module")
def llava():
    folder = embedded_model_dir("llava")
    return load_model(folder), load_processor(folder)


def test_image_sizes_vary_and_are_deterministic():
    seed = SPLITS["train"].seed
    sizes = [qwen.image_size_for(seed, i) for i in range(60)]
    assert sizes == [qwen.image_size_for(seed, i) for i in range(60)]
    for w, h in sizes:
        assert w in qwen.SIDES and h in qwen.SIDES and max(w, h) <= qwen.MAX_ASPECT * min(w, h)
    tokens = {(w // qwen.UNIT) * (h // qwen.UNIT) for w, h in sizes}
    assert len(tokens) > 10 and min(tokens) < 120 < max(tokens)


def test_token_words_name_every_object_on_the_token_grid():
    for index in range(40):
        example = example_at(SPLITS["validation"].seed, index)
        width, height = qwen.image_size_for(example.seed, index)
        labels = qwen.token_words(example, width, height)
        assert len(labels) == (width // qwen.UNIT) * (height // qwen.UNIT)
        named = set(labels)
        for obj in example.scene.objects:
            assert (obj.color, obj.shape) in named
        if example.scene.word:
            assert (example.scene.word,) in named
        assert () in named  # background exists in every scene


def test_fast_encoder_equals_the_processor(shipped):
    _, _, processor = shipped
    samples = [qwen.training_stream(3)(i) for i in range(5)]
    slow = collate(samples, processor)
    fast = collate(samples, processor, encode=qwen.fast_encoder(processor))
    assert fast["pixel_values"].dtype == torch.uint8 and slow.keys() == fast.keys()
    fast["pixel_values"] = qwen.normalize_patches(fast["pixel_values"], processor)
    for key in slow:
        if key == "pixel_values":
            torch.testing.assert_close(fast[key], slow[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(fast[key], slow[key]), key
    odd = samples[0].image.resize((300, 300))
    with pytest.raises(ValueError, match="multiples of 28 .* got 300x300; use the processor itself"):
        qwen.fast_encoder(processor)([odd], ["x"])


def test_decoder_transfer_gives_the_llava_decoder_on_text(llava):
    model_l, processor_l = llava
    model, processor = qwen.build(qwen.language_words(processor_l))
    with torch.no_grad():
        copied = qwen.transfer_language_model(model, processor.tokenizer, model_l, processor_l.tokenizer)
    assert copied == len(processor_l.tokenizer) - 1  # every word and special token but <image>
    text = "user : what color is the circle ? assistant :"
    ids_l = processor_l.tokenizer(text, return_tensors="pt")["input_ids"]
    ids_q = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids_l.tolist() == ids_q.tolist()
    with torch.no_grad():
        expected = model_l(input_ids=ids_l).logits
        got = model(input_ids=ids_q).logits[..., :expected.shape[-1]]
    torch.testing.assert_close(got[..., :-1], expected[..., :-1], rtol=1e-4, atol=1e-4)


def test_a_short_training_run_saves_a_checkpoint_that_loads(tmp_path, llava):
    config = TrainConfig(steps=2, batch_size=2, device="cpu", num_workers=0, warmup_steps=1, log_every=1,
                         token_drop_prob=0.5)
    logs = []
    record = qwen.train_qwen_proxy(str(tmp_path), config, str(embedded_model_dir("llava")), eval_size=4, turns=2,
                                   log=logs.append)
    assert record["embedding_rows_copied"] == len(llava[1].tokenizer) - 1 and len(record["curve"]) == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in record["curve"])
    assert set(record["validation_accuracy"]) >= {"overall"}
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["image_sides"] == list(qwen.SIDES)
    model, processor = load_model(tmp_path), load_processor(tmp_path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert processor.tokenizer.image_token == "<|image_pad|>"
    with pytest.raises(ValueError, match="token_drop_min_share must lie in"):
        qwen.train(model, processor, qwen.training_stream(1), TrainConfig(device="cpu", token_drop_min_share=1.0))


def test_the_shipped_checkpoint(shipped, llava):
    folder, model, processor = shipped
    assert sum(f.stat().st_size for f in folder.glob("*.safetensors")) <= 20 * 1024 ** 2
    vision = model.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.window_size) == (14, 2, 112)
    assert list(vision.fullatt_block_indexes) == [5, 11, 17, 23] and vision.depth == 24
    assert set(processor.tokenizer.get_vocab()) == (set(llava[1].tokenizer.get_vocab()) - {"<image>"}
                                                    | set(qwen.VISUAL_TOKENS.values()))
    record = json.loads((folder / "training.json").read_text())
    assert record["validation_size"] == 500 and record["validation_accuracy"]["overall"] >= 0.85
    samples = qwen.validation_samples(4, "test")
    vanilla = answer(model, processor, samples)
    assert all(a.strip() for a in vanilla)
    for name in ("ficoco-v", "ficoco-l"):
        with ficoco.apply(model, name, retain=0.25) as handle:
            reduced = answer(model, processor, samples)
            if name == "ficoco-v":  # each image keeps a quarter of its own tokens
                grids = collate(samples, processor, with_answers=False)["image_grid_thw"]
                assert [len(k) for k in handle.vision_trace.kept] == [round(int(g.prod()) // 4 * 0.25) for g in grids]
        assert len(reduced) == len(samples)


@pytest.mark.parametrize("generation", QWEN_GENERATIONS)
def test_image_only_processor_saves_and_loads(tmp_path, generation, llava):
    from ficoco.proxy.model import word_level_tokenizer
    from ficoco.qwen_processor import image_only_processor, save_processor

    tokenizer = word_level_tokenizer(qwen.language_words(llava[1]), qwen.VISUAL_TOKENS)
    processor = image_only_processor(generation, qwen_image_processor(generation), tokenizer, qwen.CHAT_TEMPLATE)
    save_processor(processor, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": generation}))
    loaded = load_processor(tmp_path)
    assert type(loaded).__name__ == type(processor).__name__
    image = qwen.training_stream(1)(0).image
    prompt = "user : <|vision_start|><|image_pad|><|vision_end|> what shape ? assistant :"
    before, after = (p(images=[image], text=[prompt], return_tensors="pt") for p in (processor, loaded))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    with pytest.raises(ImportError, match="install torchvision to process videos"):
        processor(videos=[torch.zeros(2, 3, 56, 56)], text=["<|vision_start|><|video_pad|><|vision_end|>"])


def test_distillation_targets_and_loss(llava, shipped):
    """The teacher's 24 x 24 grid pooled onto each Qwen token grid (2x2 means at 336 px), and a
    training step that distils from the LLaVA proxy."""
    features = torch.randn(2, 576, 8)
    grids = torch.tensor([[1, 24, 24], [1, 20, 28]])
    targets = qwen.teacher_targets(features, grids)
    assert targets.shape == (144 + 140, 8)
    two_by_two = features[0].reshape(12, 2, 12, 2, 8).mean((1, 3)).reshape(144, 8)
    torch.testing.assert_close(targets[:144], two_by_two, rtol=0, atol=1e-6)
    assert float(qwen.distillation_loss(torch.zeros(3, 8), targets[:3])) == pytest.approx(1.0)
    _, model, processor = shipped
    student = type(model)(model.config)
    student.load_state_dict(model.state_dict())
    config = TrainConfig(steps=1, batch_size=2, device="cpu", num_workers=0, warmup_steps=1, log_every=1,
                         distill_weight=1.0)
    record = qwen.train(student, processor, qwen.training_stream(1), config, log=lambda line: None, teacher=llava)
    assert 0 < record["curve"][0]["distill_loss"] < 2
    with pytest.raises(ValueError, match="distill_weight needs a teacher"):
        qwen.train(student, processor, qwen.training_stream(1), config)


@pytest.mark.parametrize("name", ["ficoco-v", "tome"])
def test_demo_picture_puts_tokens_back_in_raster_order(shipped, name):
    """The demo's picture of a Qwen2.5-VL reduction: the stages saw the merge groups window by
    window, the picture shows them in raster order; each kept token's own group owns its column,
    and the columns follow the tower's (window) order."""
    from transformers.vision_utils import get_vision_window_index

    from ficoco.demo import _qwen_reduction, bundled_example
    from ficoco.prompts import chat_prompt

    _, model, processor = shipped
    image, questions, _ = bundled_example()
    image = image.resize((420, 308))  # 15 x 11 tokens: windows cut at the border
    inputs = processor(images=[image], text=[chat_prompt(processor, questions[0])], return_tensors="pt")
    with ficoco.apply(model, name, retain=0.5, record=True) as handle:
        with torch.no_grad():
            model(**inputs)
        trace = handle.vision_trace
    positions, destinations, grid = _qwen_reduction(model, trace)
    assert grid == (11, 15) and destinations.shape == (165, len(positions))
    torch.testing.assert_close(destinations.sum(1), torch.ones(165))  # every group's information lands somewhere
    window_order = get_vision_window_index(torch.tensor([[1, 22, 30]]), 2, 112, 14)[0]
    rank = torch.empty_like(window_order)
    rank[window_order] = torch.arange(len(window_order))
    columns = torch.argsort(torch.argsort(rank[positions]))
    assert torch.equal(destinations[positions].argmax(1), columns)


def test_demo_cli_on_the_qwen_model(tmp_path):
    from click.testing import CliRunner

    from ficoco.cli import main

    picture = tmp_path / "demo.png"
    result = CliRunner().invoke(main, ["demo", "--model", "qwen", "--question", "how many circles are there?",
                                       "--retain", "0.25", "--picture", str(picture)])
    assert result.exit_code == 0, result.output
    assert "proxy-qwen2.5-vl" in result.output and picture.read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in result.output.splitlines() if line.startswith(("vanilla", "ficoco-v "))]
    assert "visual tokens 144 -> 144" in lines[0] and "visual tokens  36 ->  36" in lines[1]
