"""The benchmark's model shapes, variants and report (the timing itself needs a GPU; see docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
import torch

from ficoco import bench, bench_report, budget
from ficoco.flops import LlavaShape, llava_1_5_7b, llava_1_5_13b


@pytest.mark.parametrize("preset, reference", [("llava-1.5-7b", llava_1_5_7b()), ("llava-1.5-13b", llava_1_5_13b())])
def test_benchmark_models_have_llava_shapes(preset, reference):
    shape = LlavaShape.from_config(bench.llava_config(preset))
    assert shape.language == reference.language
    assert shape.vision.num_patches == 576 and shape.vision.num_layers == 24 and shape.vision.hidden_size == 1024


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        bench.llava_config("llava-2")


def test_variants_pair_decoder_methods_with_their_schedule_oracle():
    geometry = budget.geometry(llava_1_5_7b())
    labels = [(label, retain) for label, retain, _ in bench.variants([192, 64], ["ficoco-v", "fastv"], geometry)]
    assert labels == [("vanilla", 576), ("oracle", 192), ("ficoco-v", 192), ("oracle[fastv]", 192), ("fastv", 192),
                      ("oracle", 64), ("ficoco-v", 64), ("oracle[fastv]", 64), ("fastv", 64)]
    methods = {label: method for label, retain, method in bench.variants([64], ["ficoco-l"], geometry)}
    assert methods["oracle[ficoco-l]"].plan(geometry).language == methods["ficoco-l"].plan(geometry).language


def test_inputs_hold_576_placeholders_and_the_text():
    inputs = bench.make_inputs(2, 64, "cpu", torch.float32)
    assert inputs["input_ids"].shape == (2, 35 + 576 + 29)
    assert int((inputs["input_ids"] == bench.IMAGE_TOKEN).sum()) == 2 * 576


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
