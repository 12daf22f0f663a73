"""The benchmark's model shapes, variants and report (the timing itself needs a GPU; see docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
import torch

from ficoco.measure import bench, bench_models, bench_report, budget
from ficoco.measure.flops import LlavaShape, llava_1_5_7b, llava_1_5_13b


@pytest.mark.parametrize("preset, reference", [("llava-1.5-7b", llava_1_5_7b()), ("llava-1.5-13b", llava_1_5_13b())])
def test_benchmark_models_have_llava_shapes(preset, reference):
    shape = LlavaShape.from_config(bench.model_config(preset))
    assert shape.language == reference.language
    assert shape.vision.num_patches == 576 and shape.vision.num_layers == 24 and shape.vision.hidden_size == 1024


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        bench.model_config("llava-2")


def test_variants_pair_decoder_methods_with_their_schedule_oracle():
    geometry = budget.geometry(llava_1_5_7b())
    labels = [(label, retain) for label, retain, _ in bench.variants([192, 64], ["ficoco-v", "fastv"], geometry)]
    assert labels == [("vanilla", 576), ("oracle", 192), ("ficoco-v", 192), ("oracle[fastv]", 192), ("fastv", 192),
                      ("oracle", 64), ("ficoco-v", 64), ("oracle[fastv]", 64), ("fastv", 64)]
    methods = {label: method for label, retain, method in bench.variants([64], ["ficoco-l"], geometry)}
    assert methods["oracle[ficoco-l]"].plan(geometry).language == methods["ficoco-l"].plan(geometry).language


@pytest.mark.parametrize("name", ["ficoco-v", "ficoco-l", "ficoco-vl", "tome", "evit", "fastv", "pdrop", "dart",
                                  "sparsevlm", "visionzip", "cdpruner", "divprune", "pool"])
@pytest.mark.parametrize("patches", [576, 2880, 1196])
def test_the_oracle_resolves_the_methods_schedule_on_any_geometry(name, patches):
    """The oracle swaps only the stages, so its plan equals the method's whatever the token count
    (one crop, a whole LLaVA-NeXT image, a Qwen image), not just on the geometry it was built for."""
    from dataclasses import replace as replace_field

    from ficoco.methods import get_method
    from ficoco.methods.baselines import oracle

    geometry = replace_field(budget.geometry(llava_1_5_7b()), num_patches=patches)
    method = get_method(name, retain=64)
    twin = oracle(like=method)
    try:
        expected = method.plan(geometry)
    except ValueError:
        return  # the method cannot run here (ToMe's half limit): neither is its oracle asked to
    plan = twin.plan(geometry)
    assert (plan.vision, plan.language, plan.input_removed, plan.llm_final_visual) == (
        expected.vision, expected.language, expected.input_removed, expected.llm_final_visual)
    assert twin.name == f"oracle[{name}]"
    # an LLM-input method's floor truncates the projected tokens, where the method acts
    assert (twin.input is None) == (method.input is None) and (twin.vision is None) == (method.vision is None)


def test_llm_input_methods_get_their_own_oracle_in_the_bench():
    """On LLaVA an LLM-input method is timed against the projected tokens truncated (its own floor:
    the projector runs on every patch) as well as the plain oracle; a resolution control has none."""
    from ficoco.methods import get_method
    from ficoco.methods.baselines import oracle

    labels = [label for label, _, _ in bench.variants([64], ["cdpruner", "topk"], budget.geometry(llava_1_5_7b()),
                                                      log=lambda _: None)]
    assert labels == ["vanilla", "oracle", "oracle[cdpruner]", "cdpruner", "topk"]
    with pytest.raises(ValueError, match="has no truncation oracle"):
        oracle(like=get_method("downsample", retain=64))


def test_an_adaptive_count_has_no_oracle():
    from ficoco.methods import get_method
    from ficoco.methods.baselines import oracle

    with pytest.raises(ValueError, match="decides its count per image at run time"):
        oracle(like=get_method("prumerge", retain=None))


def test_inputs_hold_576_placeholders_and_the_text():
    inputs = bench.make_inputs(2, 64, "cpu", torch.float32)
    assert inputs["input_ids"].shape == (2, 35 + 576 + 29)
    assert int((inputs["input_ids"] == bench_models.IMAGE_TOKEN).sum()) == 2 * 576


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_benchmark_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        bench.run(batches=[1])


def _fake_results(path):
    rows, gens = [], []
    for variant, retain, total in [("vanilla", 576, 160.0), ("oracle", 192, 80.0), ("ficoco-v", 192, 84.0),
                                   ("oracle[fastv]", 192, 90.0), ("fastv", 192, 99.0)]:
        for batch in (1, 8):
            rows.append(dict(variant=variant, method=variant, retain=retain, batch=batch, prefill_ms=total * batch / 8,
                             vision_ms=10.0 * batch / 8, llm_ms=(total - 10.0) * batch / 8, peak_memory_gb=15.0,
                             kv_cache_mb=100.0, calculator_llm_tflops=3.3, extra={}))
        gens.append(dict(variant=variant, retain=retain, batch=8, new_tokens=1, ms=100.0, images_per_s=80.0))
    path.write_text(json.dumps({"preset": "llava-1.5-7b", "environment": {"gpu": "test", "date": "today"},
                                "settings": {}, "prefill": rows, "generate": gens,
                                "flops": [dict(method="vanilla", retain=576, measured_tflops=8.5,
                                               calculator_tflops=8.5, ratio=1.0)]}))


def test_report_ratios_tables_and_plot(tmp_path):
    results = tmp_path / "r.json"
    _fake_results(results)
    data = bench_report.load([str(results)])
    rows = {r["method"]: r for r in bench_report.target_rows(data)}
    assert rows["ficoco-v"]["overhead_b8"] == pytest.approx(84 / 80)
    assert rows["fastv"]["overhead_b8"] == pytest.approx(99 / 90)  # against the oracle of its own schedule
    assert rows["ficoco-v"]["speedup_b8"] == pytest.approx(160 / 84)
    assert rows["ficoco-v"]["llm_speedup_b8"] == pytest.approx(150 / 74)
    text = bench_report.markdown(data)
    assert "| ficoco-v | 192 | 1.05x" in text and "Generation throughput" in text and "FlopCounterMode" in text
    bench_report.plot(data, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("repeats,rounds,expected", [(10, 5, [2, 2, 2, 2, 2]), (10, 3, [4, 3, 3]), (2, 5, [1, 1]),
                                                     (7, 1, [7])])
def test_repeats_are_spread_over_interleaved_rounds(repeats, rounds, expected):
    assert bench.split_repeats(repeats, rounds) == expected


def test_run_interleaves_variants_and_reports_every_row(monkeypatch):
    """The benchmark loop's bookkeeping on the tiny CPU model, with the CUDA timer replaced by a
    counter: every variant is measured in every round, in the same order each round; each
    (variant, batch) gets all its repeats; generation runs once per variant."""
    from ficoco.testing import tiny_llava

    model = tiny_llava().eval()
    calls: list[str] = []
    original_attach = bench.attach

    def spy_attach(m, method, **kw):
        calls.append(method.name)
        return original_attach(m, method, **kw)

    timed: list[int] = []
    monkeypatch.setattr(bench, "random_model", lambda preset, device, dtype: model)
    monkeypatch.setattr(bench, "attach", spy_attach)
    monkeypatch.setattr(bench, "make_inputs", lambda b, t, d, dt, **kw: _cpu_inputs(b, t, model.config.image_token_id))
    monkeypatch.setattr(bench, "cuda_times", lambda fn, warmup, repeats: (timed.append(repeats), [1.0] * repeats)[1])
    monkeypatch.setattr(bench, "cuda_time", lambda fn, warmup, repeats: 2.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(bench, "environment", lambda: {})
    result = bench.run("llava-1.5-7b", batches=[1, 2], retains=[64], methods=["ficoco-v", "fastv"],
                       generate_tokens=[1], generate_batch=1, text_tokens=4, warmup=0, repeats=5, rounds=2,
                       log=lambda _: None)
    per_round = ["oracle", "ficoco-v", "oracle[fastv]", "fastv"]
    assert calls == per_round * 2
    assert sum(timed) == 2 * 5 * 2 * (len(per_round) + 1)  # prefill + vision, 5 repeats, 2 batches, 5 variants
    assert [(r["variant"], r["batch"]) for r in result["prefill"]] == [
        (v, b) for v in ["vanilla", *per_round] for b in (1, 2)]
    assert [r["variant"] for r in result["generate"]] == ["vanilla", *per_round]
    assert result["settings"]["rounds"] == 2 and all(r["prefill_ms"] == 1.0 for r in result["prefill"])
    assert {r["cache"] for r in result["generate"]} == {"dynamic"}
    static = bench.run("llava-1.5-7b", batches=[1], retains=[64], methods=["ficoco-v", "fastv"], generate_tokens=[1],
                       generate_batch=1, text_tokens=4, warmup=0, repeats=1, rounds=1, static_cache=True,
                       log=lambda _: None)
    assert [r["variant"] for r in static["generate"] if r["cache"] == "static"] == ["vanilla", "oracle", "ficoco-v"]


def _cpu_inputs(batch: int, text_tokens: int, image_token: int) -> dict:
    ids = torch.tensor([[1] + [image_token] * 576 + [5] * text_tokens] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(batch, 3, 336, 336)}


# -- Qwen-VL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"])
def test_qwen_benchmark_models_have_the_presets_shapes(preset):
    from ficoco.measure import bench_qwen
    from ficoco.measure.flops import preset as flops_preset
    from ficoco.measure.qwen import QwenVLShape

    shape = QwenVLShape.from_config(bench_qwen.qwen_config(preset))
    reference = flops_preset(preset)
    assert shape.vision == reference.vision and shape.language == reference.language


def test_qwen_variants_and_inputs():
    from ficoco.measure import bench_qwen
    from ficoco.measure.flops import preset as flops_preset

    shape = flops_preset("qwen2.5-vl-7b")
    skipped = []
    labels = [(label, share) for label, share, _ in bench_qwen.variants([0.25, 0.125], ["ficoco-v", "tome", "fastv"],
                                                                        budget.geometry(shape), skipped.append)]
    assert labels[:7] == [("vanilla", 1.0), ("oracle", 0.25), ("oracle[ficoco-v]", 0.25), ("ficoco-v", 0.25),
                          ("oracle[tome]", 0.25), ("tome", 0.25), ("oracle[fastv]", 0.25)]
    assert ("tome", 0.125) not in labels and "ToMe merges at most half" in skipped[0]  # 3 full-attention blocks
    # an LLM-input method's own oracle truncates the merger's tokens; a resolution control has none
    plain = [label for label, _, _ in bench_qwen.variants([0.25], ["pool", "cdpruner", "downsample", "dart"],
                                                          budget.geometry(shape), skipped.append)]
    assert plain == ["vanilla", "oracle", "oracle[pool]", "pool", "oracle[cdpruner]", "cdpruner", "downsample",
                     "oracle[dart]", "dart"]
    inputs = bench_qwen.make_inputs(shape, 2, 64, "cpu", torch.float32)
    assert inputs["input_ids"].shape == (2, 64 + 1196) and int((inputs["input_ids"] == 151655).sum()) == 2 * 1196
    assert inputs["pixel_values"].shape == (2 * 4784, 3 * 2 * 14 * 14)
    assert inputs["image_grid_thw"].tolist() == [[1, 52, 92]] * 2
    assert int(inputs["mm_token_type_ids"].sum()) == 2 * 1196
