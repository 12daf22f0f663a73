"""``ficoco eval``: resumable predictions, scores, tables and plot on fixture benchmarks written
here in the lmms-lab parquet schema and LLaVA's own file layout, with the embedded proxy model."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

# under pytest-xdist (--dist loadgroup) one worker runs this module: its module fixtures are costly
pytestmark = pytest.mark.xdist_group("eval-runner")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from click.testing import CliRunner  # noqa: E402

from ficoco.cli import main  # noqa: E402
from ficoco.evaluation.prompt_format import in_prompt_format  # noqa: E402
from ficoco.evaluation.read import read_benchmark  # noqa: E402
from ficoco.evaluation.runner import Variant, evaluate, load_predictions, run_task, variants_for  # noqa: E402

from .test_readers import write_jsonl  # noqa: E402


def _write(path, columns: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path.parent


def _scene_png(example) -> dict:
    buffer = io.BytesIO()
    example.image().save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": f"{example.index}.png"}


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    """POPE and MME in the lmms-lab parquet schema, over procedural test scenes with questions the
    embedded model was trained to answer (no benchmark post-prompt: its vocabulary lacks those words)."""
    from ficoco.proxy.scenes import COLORS, make_split

    root = tmp_path_factory.mktemp("bench")
    existence = [e for e in make_split("test", 60) if e.family == "existence"][:6]
    pope = _write(root / "pope" / "data" / "test-00000-of-00001.parquet", {
        "question_id": [str(i) for i in range(6)],
        "question": [e.question for e in existence],
        "answer": [e.answer for e in existence],
        "category": ["adversarial", "adversarial", "popular", "popular", "random", "random"],
        "image": [_scene_png(e) for e in existence],
    })
    mme_rows = {"question_id": [], "question": [], "answer": [], "category": [], "image": []}
    for example, category in zip(existence[:2], ("existence", "color")):  # MME: a yes and a no per image
        scene = example.scene
        present = scene.objects[0]
        absent = next(c for c in COLORS if all(o.color != c for o in scene.objects))
        for question, answer in ((f"is there a {present.color} {present.shape} in the image?", "Yes"),
                                 (f"is there a {absent} {present.shape} in the image?", "No")):
            mme_rows["question_id"].append(f"{category}/{example.index}.png")
            mme_rows["question"].append(question)
            mme_rows["answer"].append(answer)
            mme_rows["category"].append(category)
            mme_rows["image"].append(_scene_png(example))
    mme = _write(root / "mme" / "data" / "test-00000-of-00001.parquet", mme_rows)
    return {"pope": str(pope), "mme": str(mme)}


@pytest.fixture(scope="module")
def checkpoint(embedded_checkpoint):
    return embedded_checkpoint


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def own_format_run(loaded, benchmarks, tmp_path_factory):
    """POPE and MME asked in the embedded model's own prompt format (the bare questions), with
    vanilla, FiCoCo-V and FastV at 64 tokens: ``(summary, out folder, console warnings)``."""
    model, processor = loaded
    tasks = {name: in_prompt_format(read_benchmark(name, path), "model") for name, path in benchmarks.items()}
    out, logged = tmp_path_factory.mktemp("own-format"), []
    summary = evaluate(model, processor, tasks, variants_for(["ficoco-v", "fastv"], [64]), str(out), batch_size=4,
                       show_progress=False, log=logged.append)
    return summary, out, logged


@pytest.fixture(scope="module")
def benchmark_format_run(loaded, benchmarks, tmp_path_factory):
    """POPE with its own instruction ("Answer the question using a single word or phrase."), which
    the embedded model never saw: ``(summary, out folder, console warnings)``."""
    model, processor = loaded
    tasks = {"pope": read_benchmark("pope", benchmarks["pope"])}
    out, logged = tmp_path_factory.mktemp("benchmark-format"), []
    summary = evaluate(model, processor, tasks, variants_for(["ficoco-v"], [64]), str(out), batch_size=6,
                       show_progress=False, log=logged.append)
    return summary, out, logged


def test_evaluate_writes_scores_tables_and_predictions(own_format_run):
    summary, out, logged = own_format_run
    rows = {(r["task"], r["variant"]): r for r in summary["results"]}
    assert set(rows) == {(t, v) for t in ("pope", "mme") for v in ("vanilla", "ficoco-v@64", "fastv@64")}
    assert rows[("pope", "vanilla")]["n"] == 6 and "f1" in json.dumps(rows[("pope", "vanilla")]["score"]).lower()
    assert rows[("mme", "vanilla")]["score"]["metric"]
    assert rows[("pope", "ficoco-v@64")]["llm_tflops"] < rows[("pope", "vanilla")]["llm_tflops"]
    table = (out / "results.md").read_text()
    lines = table.splitlines()
    # every column names its benchmark and metric; TFLOPs keep three significant figures
    assert lines[0] == ("| variant | LLM TFLOPs (mean) | POPE F1 (mean of 3 splits) | MME perception score "
                        "| % of vanilla |")
    assert "| 100.00 |" in lines[2]
    tflops = lines[2].split("|")[2].strip()
    assert float(tflops) > 0 and len(tflops.replace("0.", "").lstrip("0").replace(".", "")) == 3, tflops
    # the embedded model answers its own kind of question: every answer parsed, no warning
    assert "Unparsed answers" in table and "| vanilla | 0.0% | 0.0% |" in table
    assert "⚠" not in table and not summary["warnings"] and not logged
    assert all(r["unparsed"] == 0 for r in summary["results"])
    csv_text = (out / "results.csv").read_text()
    assert csv_text.startswith("variant,") and "unparsed POPE" in csv_text.splitlines()[0]
    predictions = load_predictions(out / "pope" / "vanilla.jsonl")
    assert sorted(predictions) == [str(i) for i in range(6)]


def test_garbage_answers_are_flagged_not_scored_as_good(benchmark_format_run):
    """With a prompt it cannot follow the embedded model answers noise; POPE counts unparsed answers
    as "yes", which alone gives F1 66.67. The table must say the cell is unparsed noise."""
    summary, out, logged = benchmark_format_run
    vanilla = next(r for r in summary["results"] if r["variant"] == "vanilla")
    assert vanilla["unparsed"] > 0.10
    assert vanilla["score"]["n_unparsed"] == round(vanilla["unparsed"] * 6)
    table = (out / "results.md").read_text()
    assert "⚠" in table and "**Warning: answers the benchmarks could not parse.**" in table
    assert "POPE vanilla:" in table and "measures the answer format, not the model" in table
    assert any("POPE vanilla" in line and "could not be parsed" in line for line in logged)
    assert any("unknown to the model's tokenizer" in line and "'phrase'" in line for line in logged)
    assert summary["warnings"] and json.loads((out / "results.json").read_text())["warnings"] == summary["warnings"]


def test_prompts_the_model_cannot_read_are_refused_before_any_work(loaded, benchmarks, tmp_path):
    model, processor = loaded
    records = read_benchmark("pope", benchmarks["pope"], post_prompt="\nRépondez par un seul mot, s'il vous plaît.")
    french = [dataclasses.replace(r, question="Quelle forme voyez-vous dans cette image colorée ?") for r in records]
    with pytest.raises(ValueError, match="pope: the model cannot read these prompts"):
        evaluate(model, processor, {"pope": french}, variants_for([], []), str(tmp_path), show_progress=False)
    assert not (tmp_path / "pope").exists()


def test_resume_refuses_predictions_made_with_other_prompts(loaded, benchmarks, tmp_path):
    model, processor = loaded
    records = read_benchmark("pope", benchmarks["pope"], limit=2)
    run_task(model, processor, "pope", records, Variant(), tmp_path, batch_size=2)
    with pytest.raises(ValueError, match="made with other prompts"):
        run_task(model, processor, "pope", in_prompt_format(records, "model"), Variant(), tmp_path)


def test_resume_after_a_kill_loses_and_duplicates_nothing(loaded, benchmarks, tmp_path):
    model, processor = loaded
    records = read_benchmark("pope", benchmarks["pope"])
    variant = Variant("ficoco-v", 64)

    class Killed(Exception):
        pass

    def kill_after_first_batch(n):
        raise Killed

    with pytest.raises(Killed):
        run_task(model, processor, "pope", records, variant, tmp_path, batch_size=2, progress=kill_after_first_batch)
    path = tmp_path / "pope" / "ficoco-v@64.jsonl"
    first = load_predictions(path)
    assert len(first) == 2
    with open(path, "a") as fh:  # a line cut short by the kill
        fh.write('{"sample_id": "4", "predic')
    result = run_task(model, processor, "pope", records, variant, tmp_path, batch_size=2)
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(line)["sample_id"] for line in lines}) == 6
    final = load_predictions(path)
    assert all(final[k] == v for k, v in first.items())  # earlier answers kept as they were
    assert result["n"] == 6


def test_cli_eval_end_to_end(checkpoint, benchmarks, tmp_path):
    """With the embedded model (the default MODEL_PATH) ``--prompt-format auto`` asks the bare
    questions; ``benchmark`` asks POPE's own prompt and the console flags the noise it gets."""
    out = CliRunner().invoke(main, ["eval", "--data", f"pope={benchmarks['pope']}", "--methods",
                                    "ficoco-v", "--retain", "64", "--limit", "4", "--batch-size", "2", "--out",
                                    str(tmp_path / "auto")])
    assert out.exit_code == 0, out.output
    assert "prompt format: model" in out.stdout and "| ficoco-v@64 |" in out.stdout
    assert "warning" not in out.stderr and "⚠" not in out.stdout
    assert (tmp_path / "auto" / "accuracy-vs-tflops.png").read_bytes()[:4] == b"\x89PNG"
    assert len(load_predictions(tmp_path / "auto" / "pope" / "vanilla.jsonl")) == 4
    noise = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", f"pope={benchmarks['pope']}", "--methods",
                                      "ficoco-v", "--retain", "64", "--limit", "4", "--batch-size", "4",
                                      "--prompt-format", "benchmark", "--no-plot", "--out", str(tmp_path / "bench")])
    assert noise.exit_code == 0, noise.output
    assert "prompt format: benchmark" in noise.stdout and "⚠" in noise.stdout
    assert "warning: ⚠ POPE vanilla" in noise.stderr and "could not be parsed" in noise.stderr


def test_cli_eval_on_the_qwen_proxy(benchmarks, tmp_path):
    """``ficoco eval`` picks the Qwen-VL family from the checkpoint, takes budgets as shares of each
    image's tokens, asks the proxy's own prompts and costs the LLM at the sample's image size."""
    from ficoco.assets import embedded_model_dir

    out = CliRunner().invoke(main, ["eval", str(embedded_model_dir("qwen")), "--data", f"pope={benchmarks['pope']}",
                                    "--methods", "ficoco-v", "--retain", "0.25", "--limit", "4", "--batch-size", "4",
                                    "--no-plot", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "prompt format: model" in out.stdout and "| ficoco-v@0.25 |" in out.stdout
    rows = {r["variant"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["ficoco-v@0.25"]["llm_tflops"] < 0.5 * rows["vanilla"]["llm_tflops"]
    assert len(load_predictions(tmp_path / "pope" / "ficoco-v@0.25.jsonl")) == 4


def test_cli_eval_bad_data_argument(checkpoint, tmp_path):
    out = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", "pope", "--out", str(tmp_path)])
    assert out.exit_code != 0 and "TASK=PATH" in out.output
    missing = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", f"pope={tmp_path / 'nope'}"])
    assert missing.exit_code != 0 and "nope" in missing.output and "Traceback" not in missing.output


def test_two_processes_under_accelerate_launch(checkpoint, benchmarks, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (its torchrun launcher; with no GPU the
    processes join a CPU group): each process answers its shard, the main one merges and scores; a
    second launch finds everything done and re-scores the same numbers."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not installed")
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "-m", "ficoco.cli", "eval", str(checkpoint), "--data",
               f"pope={benchmarks['pope']}", "--methods", "ficoco-v", "--retain", "64", "--batch-size", "2",
               "--out", str(tmp_path), "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "pope").iterdir())
    assert shards == ["ficoco-v@64.rank0-of-2.jsonl", "ficoco-v@64.rank1-of-2.jsonl",
                      "vanilla.rank0-of-2.jsonl", "vanilla.rank1-of-2.jsonl"]
    lines = [json.loads(line) for name in shards[:2] for line in (tmp_path / "pope" / name).read_text().splitlines()]
    assert sorted(row["sample_id"] for row in lines) == [str(i) for i in range(6)]  # each sample exactly once
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["processes"] == 2 and {r["n"] for r in results["results"]} == {6}
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "results.json").read_text())
    assert [r["score"] for r in again["results"]] == [r["score"] for r in results["results"]]


def test_embedded_model_scores_llava_format_pope_end_to_end(checkpoint, tmp_path):
    """POPE in LLaVA-1.5's layout (question .jsonl, val2014/ images, coco/coco_pope_*.json labels)
    built from the procedural test split's yes/no existence questions: the reader joins the labels,
    the embedded model answers, the official POPE scorer counts, and the numbers are the model's
    real accuracy on those questions (it answers them near-perfectly in its own prompt format)."""
    from ficoco.proxy.scenes import make_split

    existence = [e for e in make_split("test", 150) if e.family == "existence"][:24]
    categories = ("adversarial", "popular", "random")
    questions, labels = [], {c: [] for c in categories}
    (tmp_path / "pope" / "val2014").mkdir(parents=True)
    for i, example in enumerate(existence):
        image, category = f"COCO_val2014_{i:012d}.png", categories[i % 3]
        example.image().save(tmp_path / "pope" / "val2014" / image)
        questions.append({"question_id": i + 1, "image": image, "text": example.question, "category": category})
        labels[category].append({"question_id": len(labels[category]) + 1, "image": image,
                                 "text": example.question, "label": example.answer})
    write_jsonl(tmp_path / "pope" / "llava_pope_test.jsonl", questions)
    for category, rows in labels.items():
        write_jsonl(tmp_path / "pope" / "coco" / f"coco_pope_{category}.json", rows)
    out = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", f"pope={tmp_path / 'pope'}", "--methods",
                                    "ficoco-l", "--retain", "192", "--batch-size", "12", "--out", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    scores = {r["variant"]: r["score"] for r in results}
    assert {r["n"] for r in results} == {24}
    text = json.dumps(scores).lower()
    assert "adversarial" in text and "random" in text  # scored per POPE split
    vanilla = _pope_accuracy(scores["vanilla"])
    assert vanilla >= 0.9, scores["vanilla"]
    # FiCoCo-L at 192 tokens keeps the proxy model's accuracy (docs/proxy/cpu-fp32-2026-11-30/proxy_accuracy.md)
    assert _pope_accuracy(scores["ficoco-l@192"]) >= vanilla - 0.1, scores["ficoco-l@192"]


def _pope_accuracy(score: dict) -> float:
    return score["overall"]["accuracy"] / 100  # all splits pooled, as a fraction
