"""MMMU (lmms-eval ``mmmu_val``): the official answer parsing and aggregation, the images a
question refers to, and ``ficoco eval`` end to end on the LLaVA and Qwen proxies over a small
lmms-lab parquet written here."""

from __future__ import annotations

import io
import json
import re

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from click.testing import CliRunner  # noqa: E402

from ficoco.cli import main  # noqa: E402
from ficoco.evaluation.prompt_format import bare_question  # noqa: E402
from ficoco.evaluation.read import read_benchmark  # noqa: E402
from ficoco.evaluation.records import BenchmarkDataError  # noqa: E402
from ficoco.evaluation.tasks import SCORERS  # noqa: E402
from ficoco.evaluation.tasks.mmmu import open_correct, parse_choice, parse_open, score_mmmu  # noqa: E402

pytestmark = pytest.mark.xdist_group("mmmu")
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OPTIONS = {"A": "four", "B": "one", "C": "three", "D": "six"}


def _png(image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_mmmu(root, rows: list[dict]):
    """lmms-lab/MMMU's validation shard: ``image_1`` .. ``image_7`` as image structs (null where unused)."""
    full = [{"explanation": "", "topic_difficulty": "Easy", "subfield": "s", "img_type": "['Diagrams']",
             **{f"image_{i}": None for i in range(1, 8)}, **r} for r in rows]
    schema = pa.schema([(k, IMAGE if re.fullmatch(r"image_\d", k) else pa.string()) for k in full[0]])
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=schema), root / "data" / "validation-00000-of-00001.parquet")
    return root


# ---------------------------------------------------------------------------------- scoring


def test_choice_parsing_follows_the_official_rules():
    letters = list(OPTIONS)
    assert parse_choice("(B)", letters, OPTIONS, "x") == ("B", True)
    assert parse_choice("The answer is C.", letters, OPTIONS, "x") == ("C", True)
    assert parse_choice("A", letters, OPTIONS, "x") == ("A", True)
    # several letters: the last one mentioned, brackets first
    assert parse_choice("(A) or rather (D)", letters, OPTIONS, "x") == ("D", True)
    assert parse_choice("B is wrong, D is right", letters, OPTIONS, "x") == ("D", True)
    # the option text counts only in answers of more than five words
    assert parse_choice("I count exactly three of them here", letters, OPTIONS, "x") == ("C", True)
    letter, parsed = parse_choice("three", letters, OPTIONS, "validation_Math_7")
    assert not parsed and letter in letters
    assert parse_choice("three", letters, OPTIONS, "validation_Math_7")[0] == letter  # seeded by the id
    assert parse_choice("b", letters, OPTIONS, "x")[1] is False  # letters are upper case, as MMMU's


def test_open_answers_match_numbers_and_text():
    assert open_correct("24", parse_open("The area is 24.0 square units."))
    assert open_correct("1,200", parse_open("so the total = 1200"))
    assert not open_correct("24", parse_open("It is 25."))
    assert open_correct("Paris", parse_open("The capital is paris"))
    assert not open_correct("a", parse_open("banana"))  # a one-letter answer must stand alone
    assert open_correct("3.14159", parse_open("approximately 3.14"))  # two decimals


def test_accuracy_per_subject_and_discipline():
    rows = [
        {"sample_id": "validation_Art_1", "question_type": "multiple-choice", "answer": "B", "options": OPTIONS,
         "prediction": "(B)"},
        {"sample_id": "validation_Art_Theory_2", "question_type": "multiple-choice", "answer": "A",
         "options": OPTIONS, "prediction": "D."},
        {"sample_id": "validation_Math_3", "question_type": "open", "answer": "12", "prediction": "12"},
        {"sample_id": "validation_Physics_4", "question_type": "open", "answer": "9.8", "prediction": ""},
    ]
    result = SCORERS["mmmu_val"](rows)
    assert result == score_mmmu(rows)
    assert result["metric"] == "accuracy" and result["score"] == 50.0 and result["n"] == 4
    assert result["n_unparsed"] == 1  # the empty open answer
    assert result["per_subject"] == {"Art": 100.0, "Art_Theory": 0.0, "Math": 100.0, "Physics": 0.0}
    assert result["per_discipline"] == {"Art and Design": 50.0, "Science": 50.0}


# ---------------------------------------------------------------------------------- reading


def test_prompts_images_and_bare_questions(tmp_path):
    from PIL import Image

    red, blue = (Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255)))
    write_mmmu(tmp_path, [
        {"id": "validation_Design_1", "question": "Compare <image 2> with the options.", "question_type":
         "multiple-choice", "options": "['<image 1>', 'neither']", "answer": "A", "image_1": _png(red),
         "image_2": _png(blue), "image_3": _png(red)},
        {"id": "validation_Math_2", "question": "What is x?", "question_type": "open", "options": "[]",
         "answer": "4", "image_1": _png(blue)},
    ])
    first, second = read_benchmark("mmmu_val", tmp_path)
    assert first.question == ("Compare <image 2> with the options.\nA. <image 1>\nB. neither\n\n"
                              "Answer with the option's letter from the given choices directly.")
    assert first.options == {"A": "<image 1>", "B": "neither"} and first.category == "Design"
    # the images referred to (an option's too), in order of their number; image_3 is not referred to
    assert [im.getpixel((0, 0)) for im in first.images()] == [(255, 0, 0), (0, 0, 255)]
    assert second.question == "What is x?\n\nAnswer the question using a single word or phrase."
    assert second.images() == [] and second.meta["question_type"] == "open"
    assert bare_question(first.question).rstrip() == "Compare <image 2> with the options.\nA. <image 1>\nB. neither"
    assert bare_question(second.question).rstrip() == "What is x?"
    write_mmmu(tmp_path / "bad", [{"id": "validation_Math_9", "question": "q", "question_type": "multiple-choice",
                                   "options": "['unclosed", "answer": "A"}])
    with pytest.raises(BenchmarkDataError, match="row 0: mmmu_val: options .* are not a list literal"):
        read_benchmark("mmmu_val", tmp_path / "bad")


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mmmu_dir(tmp_path_factory):
    """Four MMMU questions in the proxies' own question language: one with no image first (the
    Qwen model is then costed at the next question's image), an open count, a multiple choice,
    and an open question over two images."""
    from ficoco.proxy.scenes import make_split

    split = make_split("test", 60)
    count, choice, text = (next(e for e in split if e.family == f) for f in ("counting", "choice", "text"))
    options = re.findall(r"[A-D]\. (\w+)", choice.question)
    return write_mmmu(tmp_path_factory.mktemp("mmmu"), [
        {"id": "validation_Math_0", "question": "how many circles are there?", "question_type": "open",
         "options": "[]", "answer": "one"},
        {"id": "validation_Math_1", "question": f"<image 1> {count.question}", "question_type": "open",
         "options": "[]", "answer": count.answer, "image_1": _png(count.image())},
        {"id": "validation_Art_Theory_2", "question": "<image 1> " + choice.question.split(" A. ")[0],
         "question_type": "multiple-choice", "options": str(options), "answer": choice.answer,
         "image_1": _png(choice.image())},
        {"id": "validation_Math_3", "question": f"<image 1> <image 2> {text.question}", "question_type": "open",
         "options": "[]", "answer": text.answer, "image_1": _png(text.image()), "image_2": _png(count.image())},
    ])


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_ficoco_eval_runs_mmmu(family, mmmu_dir, tmp_path):
    """Both proxies answer the four questions, batched by their number of images (0, 1, 2); the
    table has MMMU's accuracy and LLM TFLOPs; per-subject and per-discipline scores are in
    results.json."""
    from ficoco.assets import embedded_model_dir

    methods = ["--methods", "ficoco-v", "--retain", "64" if family == "llava" else "0.25"]
    out = CliRunner().invoke(main, ["eval", str(embedded_model_dir(family)), "--data", f"mmmu_val={mmmu_dir}",
                                    *methods, "--batch-size", "4", "--no-plot", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "| variant | LLM TFLOPs (mean) | MMMU accuracy |" in out.stdout
    results = {r["variant"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert set(results) == {"vanilla", f"ficoco-v@{methods[-1]}"}
    vanilla = results["vanilla"]
    assert vanilla["n"] == 4 and vanilla["llm_tflops"] > results[f"ficoco-v@{methods[-1]}"]["llm_tflops"]
    assert set(vanilla["score"]["per_subject"]) == {"Math", "Art_Theory"}
    assert set(vanilla["score"]["per_discipline"]) == {"Science", "Art and Design"}
    lines = [json.loads(line) for line in (tmp_path / "mmmu_val" / "vanilla.jsonl").read_text().splitlines()]
    assert [line["question_type"] for line in lines] == ["open", "open", "multiple-choice", "open"]
    assert all(line["prediction"] for line in lines)
    # the open questions are the proxies' own: they answer at least one of them right
    assert vanilla["score"]["per_subject"]["Math"] > 0
