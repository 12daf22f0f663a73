"""The benchmark on LLaVA-NeXT-7B and Video-LLaVA-7B shapes: models, inputs, variants, and a whole
run on the tiny models of the same geometry (the timing itself needs a GPU; see docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
import torch

from ficoco.measure import bench, bench_models, budget
from ficoco.measure.flops import LlavaShape
from ficoco.measure.multiview import llava_next_7b, preset_defaults, video_llava_7b

PRESETS = {"llava-next-7b": llava_next_7b, "video-llava-7b": video_llava_7b}


@pytest.mark.parametrize("preset", PRESETS)
def test_models_have_the_presets_shapes(preset):
    import transformers

    reference = PRESETS[preset]()
    config = bench.model_config(preset)
    shape = LlavaShape.from_config(config)
    assert shape.vision == reference.vision and shape.language == reference.language
    assert shape.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    target = bench_models.layout(preset)
    assert target.shape == reference and target.batches == (1, 8)
    assert ",".join(map(str, target.retains)) == preset_defaults(preset)[1]
    model = bench.random_model(preset, device="meta")  # the real class at full size, no memory
    expected = {"llava-next-7b": transformers.LlavaNextForConditionalGeneration,
                "video-llava-7b": transformers.VideoLlavaForConditionalGeneration}[preset]
    assert type(model) is expected and model.config.text_config._attn_implementation == "sdpa"
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    if preset == "llava-next-7b":
        assert [tuple(p) for p in config.image_grid_pinpoints] == list(reference.grid_pinpoints)
        assert config.image_token_id == bench_models.IMAGE_TOKEN and 7.0 < billions < 7.1
    else:
        assert config.video_seq_length == 8 * 257 and config.video_token_index == bench_models.VIDEO_TOKEN
        assert 7.3 < billions < 7.4  # two CLIP-L/14 towers on Vicuna-7B


def test_presets_that_the_benchmark_does_not_build():
    with pytest.raises(ValueError, match="unknown preset"):
        bench.model_config("llava-next-13b")
    with pytest.raises(ValueError, match="qwen2.5-vl-7b is a Qwen-VL preset"):
        bench.model_config("qwen2.5-vl-7b")


def test_llava_next_inputs_are_what_its_processor_gives_a_672_image():
    from PIL import Image

    from ficoco.testing import tiny_llava_next_processor

    processor = tiny_llava_next_processor()  # LLaVA-NeXT-7B's crop size, patch and pinpoints
    image = Image.new("RGB", (672, 672), (120, 30, 200))
    reference = processor(images=[image], text=["<image>"], return_tensors="pt")
    expected = int((reference["input_ids"] == 95).sum())
    assert expected == 576 + 48 * 48 + 48 == bench_models.visual_placeholders("llava-next-7b")
    inputs = bench.make_inputs(3, 64, "cpu", torch.float32, preset="llava-next-7b")
    assert inputs["input_ids"].shape == (3, 35 + expected + 29)
    assert ((inputs["input_ids"] == bench_models.IMAGE_TOKEN).sum(dim=1) == expected).all()
    assert inputs["pixel_values"].shape == (3, *reference["pixel_values"].shape[1:]) == (3, 5, 3, 336, 336)
    assert inputs["image_sizes"].tolist() == reference["image_sizes"].tolist() * 3 == [[672, 672]] * 3


def test_video_llava_inputs_hold_eight_frames_with_their_cls():
    inputs = bench.make_inputs(2, 64, "cpu", torch.float32, preset="video-llava-7b")
    assert bench_models.visual_placeholders("video-llava-7b") == 8 * (16 * 16 + 1)
    assert ((inputs["input_ids"] == bench_models.VIDEO_TOKEN).sum(dim=1) == 2056).all()
    assert not (inputs["input_ids"] == bench_models.IMAGE_TOKEN).any()
    assert inputs["input_ids"].shape == (2, 35 + 2056 + 29) and inputs["attention_mask"].all()
    assert inputs["pixel_values_videos"].shape == (2, 8, 3, 224, 224) and "pixel_values" not in inputs
    again = bench.make_inputs(2, 64, "cpu", torch.float32, preset="video-llava-7b")
    assert torch.equal(again["pixel_values_videos"], inputs["pixel_values_videos"])  # seeded


@pytest.mark.parametrize("preset, patches", [("llava-next-7b", 576), ("video-llava-7b", 256)])
def test_variants_count_per_crop_or_frame(preset, patches):
    geometry = budget.geometry(bench_models.layout(preset).shape)
    labels = [(label, retain) for label, retain, _ in bench.variants([64, 17], ["ficoco-v", "fastv"], geometry)]
    assert labels == [("vanilla", patches), ("oracle", 64), ("ficoco-v", 64), ("oracle[fastv]", 64), ("fastv", 64),
                      ("oracle", 17), ("ficoco-v", 17), ("oracle[fastv]", 17), ("fastv", 17)]


def test_variants_skip_a_budget_the_method_cannot_meet():
    # ToMe halves a layer at most: 32 of a crop's 576 patches is past what its default schedule reaches
    geometry = budget.geometry(bench_models.layout("llava-next-7b").shape)
    said = []
    labels = [(label, retain) for label, retain, _ in bench.variants([128, 32], ["tome", "evit"], geometry, said.append)]
    assert labels == [("vanilla", 576), ("oracle", 128), ("tome", 128), ("evit", 128), ("oracle", 32), ("evit", 32)]
    assert len(said) == 1 and said[0].startswith("skipped tome at 32: ToMe merges at most half")


def _tiny(preset: str):
    """The tiny model of the preset's geometry (LLM depth too, so the oracles' schedules fit) and
    its token ids."""
    from ficoco.testing import VIDEO_LLAVA_TOKENS, tiny_llava_next, tiny_video_llava

    if preset == "llava-next-7b":
        return tiny_llava_next(llm_layers=32), {bench_models.IMAGE_TOKEN: 95}
    return tiny_video_llava(llm_layers=32), {bench_models.VIDEO_TOKEN: VIDEO_LLAVA_TOKENS["video"]}


def _patched_run(monkeypatch, preset: str, model, tokens: dict, ran: list[str]):
    """``bench.run`` on ``model`` on the CPU: the preset's own inputs with their ids mapped onto the
    tiny vocabulary, every timed function run once (its time a constant)."""
    real_inputs = bench.make_inputs

    def tiny_inputs(batch, text_tokens, device, dtype, seed=0, preset="llava-1.5-7b"):
        inputs = real_inputs(batch, text_tokens, "cpu", torch.float32, seed, preset=preset)
        ids = inputs["input_ids"]
        small = ids % 90 + 3  # text ids below the tiny placeholders
        for real, tiny in tokens.items():
            small[ids == real] = tiny
        return {**inputs, "input_ids": small}

    def once(fn, warmup, repeats):
        ran.append(getattr(fn, "__name__", "?"))
        fn()
        return [1.0] * repeats

    monkeypatch.setattr(bench, "random_model", lambda preset, device, dtype: model)
    monkeypatch.setattr(bench, "make_inputs", tiny_inputs)
    monkeypatch.setattr(bench, "cuda_times", once)
    monkeypatch.setattr(bench, "cuda_time", lambda fn, warmup, repeats: once(fn, warmup, repeats)[0] * 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(bench, "environment", lambda: {})


@pytest.mark.parametrize("preset, retain, kept, methods", [
    ("llava-next-7b", 32, 5 * 32, ["ficoco-v", "fastv"]),  # 5 crops of 32
    ("video-llava-7b", 17, 8 * 18, ["ficoco-v", "cdpruner", "fastv"]),  # 8 frames of 17 patches and their [CLS]
])
def test_a_whole_run_on_the_tiny_model(monkeypatch, preset, retain, kept, methods):
    """Every variant's prefill, vision side and generation run for real on the tiny model of the
    preset's geometry, fed the preset's own inputs: an encoder-side method (FiCoCo-V), a decoder-side
    one (FastV) with its oracle, and on Video-LLaVA an LLM-input method reading each video's
    instruction (CDPruner: the frames' prompt handed to the bare vision side) with its oracle (the
    projected frames truncated).
    The KV cache after prefill holds exactly the prompt the reduction leaves."""
    model, tokens = _tiny(preset)
    ran: list[str] = []
    _patched_run(monkeypatch, preset, model, tokens, ran)
    result = bench.run(preset, batches=[1], retains=[retain], methods=methods, generate_tokens=[1],
                       generate_batch=1, text_tokens=64, warmup=0, repeats=1, rounds=1, log=lambda _: None,
                       graph_vision=preset == "llava-next-7b")  # on the CPU the graphed tower runs eagerly
    labels = ["vanilla", "oracle", *[x for name in methods
                                      for x in ([f"oracle[{name}]"] if name in ("fastv", "cdpruner") else []) + [name]]]
    full = bench_models.visual_placeholders(preset)
    assert [(r["variant"], r["batch"]) for r in result["prefill"]] == [(v, 1) for v in labels]
    assert [r["variant"] for r in result["generate"]] == labels
    assert ran.count("prefill") == ran.count("vision") == len(labels) and ran.count("generate") == len(labels)
    settings = result["settings"]
    assert settings["visual_placeholders"] == full and settings["retains"] == [retain]
    assert settings["views"] == (5 if preset == "llava-next-7b" else 8)
    rows = {(r["variant"], r["batch"]): r for r in result["prefill"]}
    per_token = rows[("vanilla", 1)]["kv_cache_mb"] / (35 + full + 29)
    for label in [x for x in ("oracle", "ficoco-v", "cdpruner") if x in labels]:  # reduced before the LLM
        assert rows[(label, 1)]["kv_cache_mb"] == pytest.approx(per_token * (35 + kept + 29))
    for label in ("fastv", "oracle[fastv]"):  # inside the LLM: the first layers keep every token
        assert per_token * (35 + kept + 29) < rows[(label, 1)]["kv_cache_mb"] < rows[("vanilla", 1)]["kv_cache_mb"]
    # the oracle keeps, layer by layer, what FastV keeps: its schedule is resolved per crop / frame
    # as the method's is (a copy of one view's counts left 4 in 5 crops' tokens unremoved)
    assert rows[("oracle[fastv]", 1)]["kv_cache_mb"] == pytest.approx(rows[("fastv", 1)]["kv_cache_mb"])
    shape = bench_models.layout(preset).shape
    assert rows[("vanilla", 1)]["retain"] == shape.num_patches
    assert rows[("vanilla", 1)]["calculator_llm_tflops"] == pytest.approx(budget.vanilla_cost(shape, 64).llm_tflops)
    assert rows[("ficoco-v", 1)]["calculator_llm_tflops"] < rows[("vanilla", 1)]["calculator_llm_tflops"] / 4
    json.dumps(result)


def test_video_llava_refuses_graphing_a_vision_tower():
    with pytest.raises(ValueError, match="Video-LLaVA encodes frames in its video_tower"):
        bench.run("video-llava-7b", graph_vision=True)


def test_cli_lists_the_presets_and_passes_their_defaults(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from ficoco.cli import main

    help_text = CliRunner().invoke(main, ["bench", "--help"]).output
    assert "llava-next-7b" in help_text and "video-llava-7b" in help_text
    seen = {}

    def fake_run(preset, **options):
        seen.update(options, preset=preset)
        return {"preset": preset}

    monkeypatch.setattr(bench, "run", fake_run)
    for preset, batches, retains in [("video-llava-7b", [1, 8], [64, 32, 17]), ("llava-next-7b", [1, 8], [128, 64, 32]),
                                     ("llava-1.5-7b", [1, 8, 32], [192, 128, 64])]:
        out = tmp_path / f"{preset}.json"
        result = CliRunner().invoke(main, ["bench", "--preset", preset, "--no-flops", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert (seen["preset"], seen["batches"], seen["retains"]) == (preset, batches, retains)
        assert json.loads(out.read_text()) == {"preset": preset}
    result = CliRunner().invoke(main, ["bench", "--preset", "video-llava-7b", "--retain", "8", "--batches", "4",
                                       "--no-flops", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 0 and (seen["batches"], seen["retains"]) == ([4], [8])


@pytest.mark.parametrize("preset, tflops", [("llava-next-7b", 42.7), ("video-llava-7b", 29.7)])
def test_a_checkpoint_config_costs_as_its_preset(preset, tflops):
    """The calculator reading a checkpoint's config (the bench's full-size transformers config of
    each preset stands in for llava-v1.6-vicuna-7b's and Video-LLaVA-7B's) gives the preset's
    shape, hence the paper's baseline TFLOPs."""
    from ficoco.measure import multiview

    from dataclasses import replace

    shape = multiview.shape_from_config(bench_models.model_config(preset))
    assert replace(shape, image_size=None) == bench_models.layout(preset).shape  # NeXT's records its 672x672
    assert round(budget.vanilla_cost(shape, 64).llm_tflops, 1) == tflops
    with pytest.raises(ValueError, match="not a LLaVA-NeXT or Video-LLaVA config"):
        multiview.shape_from_config(bench.model_config("llava-1.5-7b"))
