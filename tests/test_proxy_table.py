"""``ficoco proxy-accuracy`` (ficoco.proxy.table): the proxy model's accuracy table, on CPU with a
tiny checkpoint that answers "no" to everything, so that accuracies are known in advance."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

from ficoco.measure import budget
from ficoco.cli import main
from ficoco.measure.flops import LlavaShape
from ficoco.proxy.table import DEFAULT_METHODS, REFERENCE, matched_label, plan_variants
from ficoco.testing import tiny_llava, tiny_llava_config, tiny_llava_processor

# under pytest-xdist (--dist loadgroup) one worker runs this module: its module fixtures are costly
pytestmark = pytest.mark.xdist_group("proxy-table")
HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None


@pytest.fixture(scope="module")
def says_no(tmp_path_factory):
    """The tiny LLaVA (24-layer tower, 8-layer LLM) made a bigram model: its decoder layers write
    nothing into the residual stream, so the next token depends on the current one only, and
    ``:`` (the end of every prompt) → ``no`` → ``</s>``. Image and reductions cannot change that."""
    processor = tiny_llava_processor()
    colon, no, eos = processor.tokenizer.convert_tokens_to_ids([":", "no", "</s>"])
    model = tiny_llava(seed=0)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.language_model.embed_tokens.weight
        embed[colon], embed[no] = torch.eye(embed.shape[1])[:2]
        model.lm_head.weight.zero_()
        model.lm_head.weight[no, 0] = model.lm_head.weight[eos, 1] = 10.0
    path = tmp_path_factory.mktemp("says-no")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def table(says_no, tmp_path_factory):
    out = tmp_path_factory.mktemp("proxy-accuracy")
    args = ["proxy-accuracy", "--model", str(says_no), "--out", str(out), "--size", "12", "--retain", "384,64",
            "--methods", "ficoco-v,fastv,ficoco-vl", "--device", "cpu", "--batch-size", "12",
            "--method-option", "fastv:k=3"]
    result = CliRunner().invoke(main, args + ([] if HAS_EASY_VQA else ["--no-easy-vqa"]))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_writes_json_markdown_and_plot(table):
    out, printed = table
    report = json.loads((out / "proxy_accuracy.json").read_text())
    assert (out / "proxy_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "proxy_accuracy.md").read_text()
    assert markdown in printed and "| vanilla | 576 |" in markdown and "| ficoco-v@64 | 64 |" in markdown
    assert {"model", "split", "size", "device", "torch", "transformers", "date", "text_tokens"} <= set(report)
    assert (report["split"], report["size"], report["device"]) == ("test", 12, "cpu")
    labels = [row["label"] for row in report["rows"]]
    assert labels[0] == "vanilla" and len(labels) == len(set(labels)) == 1 + 3 * 2 + 2 * 2
    for row in report["rows"]:
        if row["kind"] == "matched":
            assert row["label"] == matched_label(row["method"], row["retain"])
        if row["method"] == "fastv" and not row["skipped"]:  # --method-option fastv:k=3 reached the method
            assert row["schedule"]["language"]["start_layer"] == 2


def test_accuracy_per_family_and_percent_of_vanilla(table):
    out, _ = table
    rows = {row["label"]: row for row in json.loads((out / "proxy_accuracy.json").read_text())["rows"]}
    vanilla = rows["vanilla"]
    # 3 of the first 12 test answers and 6 of the first 12 easy-VQA ones are "no"; easy-VQA is not in "overall"
    assert vanilla["accuracy"]["overall"] == pytest.approx(3 / 12)
    assert set(vanilla["accuracy"]) >= {"attribute", "counting", "existence", "spatial", "text", "choice"}
    if HAS_EASY_VQA:
        assert vanilla["accuracy"]["easy-vqa"] == pytest.approx(6 / 12)
    assert all(v == pytest.approx(100.0) for v in vanilla["percent_of_vanilla"].values() if v is not None)
    assert vanilla["percent_of_vanilla"]["overall"] == pytest.approx(100.0)
    assert rows["ficoco-v@64"]["percent_of_vanilla"]["overall"] == pytest.approx(100.0)  # it always says no
    assert rows["ficoco-v@64"]["llm_final_visual"] == 64 and vanilla["llm_final_visual"] == 576


def test_matched_rows_meet_ficoco_v_tflops_or_are_skipped(table):
    out, _ = table
    rows = {row["label"]: row for row in json.loads((out / "proxy_accuracy.json").read_text())["rows"]}
    matched = [row for row in rows.values() if row["kind"] == "matched"]
    expected = {matched_label(m, r) for m in ("fastv", "ficoco-vl") for r in (384, 64)}
    assert {row["label"] for row in matched} == expected
    for row in matched:
        target = rows[f"{REFERENCE}@{row['retain']}"]["llm_tflops"]
        assert row["target_llm_tflops"] == pytest.approx(target)
        if row["skipped"]:
            assert "cannot meet" in row["skipped"] and "accuracy" not in row
        else:
            assert 0.9 * target <= row["llm_tflops"] <= target * (1 + 1e-9)
            assert row["accuracy"]["overall"] == pytest.approx(3 / 12)
    assert not rows["fastv@tflops(384)"]["skipped"]  # reachable on this model
    assert rows["fastv@tflops(64)"]["skipped"]  # FastV's first layers alone cost more


def test_plan_covers_every_method_and_budget():
    shape = LlavaShape.from_config(tiny_llava_config())
    planned = plan_variants(shape, DEFAULT_METHODS, (384, 192), text_tokens=14)
    rows = {row["label"]: row for row, _ in planned}
    for name in DEFAULT_METHODS:
        assert {f"{name}@384", f"{name}@192"} <= set(rows)
    decoder = {"ficoco-l", "fastv", "ficoco-vl"}
    assert {row["method"] for row in rows.values() if row["kind"] == "matched"} == decoder
    for row, method in planned:
        assert (method is None) == (row["kind"] == "vanilla" or bool(row["skipped"]))
        if row["kind"] == "retain":
            cost = budget.method_cost(shape, method, 14)
            assert row["tflops"] == pytest.approx(cost.llm_tflops + cost.vision_tflops)


def test_cli_errors_are_one_line(says_no, tmp_path):
    runner = CliRunner()
    nowhere = tmp_path / "nowhere"
    missing = runner.invoke(main, ["proxy-accuracy", "--model", str(nowhere), "--out", str(tmp_path)])
    assert missing.exit_code != 0 and "Traceback" not in missing.output
    assert missing.output.strip().splitlines() == [f"Error: model folder not found: {nowhere}"]
    unknown = runner.invoke(main, ["proxy-accuracy", "--model", str(says_no), "--out", str(tmp_path),
                                   "--methods", "ficoco-v,nope"])
    assert unknown.exit_code != 0 and len(unknown.output.strip().splitlines()) == 1
    assert "unknown method 'nope'" in unknown.output
    malformed = runner.invoke(main, ["proxy-accuracy", "--model", str(says_no), "--out", str(tmp_path),
                                     "--method-option", "fastv=3"])
    assert malformed.exit_code != 0 and "expected METHOD:KEY=VALUE" in malformed.output
    assert not (tmp_path / "proxy_accuracy.json").exists()


def test_missing_easy_vqa_package_is_a_clear_error(monkeypatch):
    from ficoco.proxy import easyvqa
    from ficoco.proxy.table import load_samples

    def missing():
        raise ImportError(easyvqa._MISSING)

    monkeypatch.setattr(easyvqa, "_package", missing)
    with pytest.raises(RuntimeError, match="pip install easy-vqa .*--no-easy-vqa"):
        load_samples("test", 1, easy_vqa=True)
    assert list(load_samples("test", 1, easy_vqa=False)) == ["procedural"]


def test_an_interrupted_run_resumes_where_it_stopped(says_no, tmp_path, monkeypatch):
    """Each evaluated row is saved as it comes; a rerun with the same settings evaluates only the
    rows the interruption lost and writes the same table; other settings are refused, not overwritten."""
    from ficoco.proxy import table as proxy_table

    real = proxy_table.accuracy
    calls: list[str] = []

    def interrupted_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(getattr(args[3], "name", "vanilla"))
        return real(*args, **kwargs)

    options = dict(split="test", size=6, retains=(64,), methods=("ficoco-v", "tome", "fastv"), device="cpu",
                   batch_size=4, easy_vqa=False, log=lambda _: None)
    monkeypatch.setattr(proxy_table, "accuracy", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        proxy_table.run(str(says_no), str(tmp_path), **options)
    saved = json.loads((tmp_path / proxy_table.PARTIAL).read_text())
    assert [row["label"] for row in saved["rows"] if "accuracy" in row] == ["vanilla", "ficoco-v@64", "tome@64"]
    calls.clear()
    monkeypatch.setattr(proxy_table, "accuracy", lambda *a, **k: (calls.append(a[3].name), real(*a, **k))[1])
    report = proxy_table.run(str(says_no), str(tmp_path), **options)
    assert calls == ["fastv"]  # the matched row of fastv is planned after it (or skipped)
    assert not (tmp_path / proxy_table.PARTIAL).exists()
    labels = [row["label"] for row in report["rows"] if "accuracy" in row]
    assert labels[:4] == ["vanilla", "ficoco-v@64", "tome@64", "fastv@64"]
    # the model answers "no" whatever it sees: every row scores what vanilla scores
    assert {row["accuracy"]["overall"] for row in report["rows"] if "accuracy" in row} == \
        {report["rows"][0]["accuracy"]["overall"]}
    (tmp_path / proxy_table.PARTIAL).write_text(json.dumps({"settings": {**saved["settings"], "size": 99}, "rows": []}))
    with pytest.raises(ValueError, match="other settings \\(size\\)"):
        proxy_table.run(str(says_no), str(tmp_path), **options)


def test_prompt_batches_built_once_answer_as_built_each_time():
    """Answers from prompt batches built once equal answers built per call, for methods that
    rewrite the prompt (encoder-side, resolution) and one that does not."""
    from ficoco.proxy.evaluate import accuracy, prompt_batches
    from ficoco.proxy.scenes import make_split
    from ficoco.proxy.recipe import rendered

    model, processor = tiny_llava(seed=1), tiny_llava_processor()
    samples = [rendered(example) for example in make_split("test", 5)]
    batches = prompt_batches(model, processor, samples, 2)
    for name in ("ficoco-v", "downsample", "fastv"):
        method = ficoco_method(name)
        assert accuracy(model, processor, samples, method, 2, batches=batches) == \
            accuracy(model, processor, samples, method, 2)
    with pytest.raises(ValueError, match="prompt batches"):
        accuracy(model, processor, samples, None, 3, batches=batches)


def ficoco_method(name: str):
    import ficoco

    return ficoco.get_method(name, retain=64)
