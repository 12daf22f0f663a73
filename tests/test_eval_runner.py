"""``ficoco eval``: resumable predictions, scores, tables and plot on fixture benchmarks written
here in the lmms-lab parquet schema and LLaVA's own file layout, with the embedded proxy model."""

from __future__ import annotations

import io
import json

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from click.testing import CliRunner  # noqa: E402

from ficoco.cli import main  # noqa: E402
from ficoco.evaluation.readers import read_benchmark  # noqa: E402
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


def test_evaluate_writes_scores_tables_and_predictions(loaded, benchmarks, tmp_path):
    model, processor = loaded
    # the model's own prompt format: the benchmarks' post-prompt words are not in its vocabulary
    tasks = {name: read_benchmark(name, path, post_prompt="") for name, path in benchmarks.items()}
    variants = variants_for(["ficoco-v", "fastv"], [64])
    summary = evaluate(model, processor, tasks, variants, str(tmp_path), batch_size=4, show_progress=False)
    rows = {(r["task"], r["variant"]): r for r in summary["results"]}
    assert set(rows) == {(t, v) for t in ("pope", "mme") for v in ("vanilla", "ficoco-v@64", "fastv@64")}
    assert rows[("pope", "vanilla")]["n"] == 6 and "f1" in json.dumps(rows[("pope", "vanilla")]["score"]).lower()
    assert rows[("mme", "vanilla")]["score"]["metric"]
    assert rows[("pope", "ficoco-v@64")]["llm_tflops"] < rows[("pope", "vanilla")]["llm_tflops"]
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0].startswith("| variant | LLM TFLOPs (mean) | pope | mme | % of vanilla |")
    assert "| vanilla |" in table and "| 100.00 |" in table.splitlines()[2]
    assert (tmp_path / "results.csv").read_text().startswith("variant,")
    predictions = load_predictions(tmp_path / "pope" / "vanilla.jsonl")
    assert sorted(predictions) == [str(i) for i in range(6)]


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
    out = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", f"pope={benchmarks['pope']}", "--methods",
                                    "ficoco-v", "--retain", "64", "--limit", "4", "--batch-size", "2", "--out",
                                    str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "| ficoco-v@64 |" in out.stdout
    assert (tmp_path / "accuracy-vs-tflops.png").read_bytes()[:4] == b"\x89PNG"
    assert len(load_predictions(tmp_path / "pope" / "vanilla.jsonl")) == 4


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
    # FiCoCo-L at 192 tokens keeps the proxy model's accuracy (docs/proxy/proxy_accuracy.md)
    assert _pope_accuracy(scores["ficoco-l@192"]) >= vanilla - 0.1, scores["ficoco-l@192"]


def _pope_accuracy(score: dict) -> float:
    return score["overall"]["accuracy"] / 100  # all splits pooled, as a fraction
