"""Benchmark readers: every test writes its own small files in the real on-disk schema (lmms-lab
parquet shards, ``save_to_disk`` folders, LLaVA-1.5 question files + image folders, MMBench tsv,
the MME release folder) and reads them back."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from ficoco.evaluation.formats import FORMATS
from ficoco.evaluation.read import detect_format, read_benchmark
from ficoco.evaluation.records import BenchmarkDataError, Record
from ficoco.evaluation.tasks import TASKS, available_tasks

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

VQA = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (10, 20, 30)]
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def cell(color):
    return {"bytes": png(color), "path": None}


def write_parquet(path: Path, rows: list[dict], *, list_image=False, row_group_size=2, hf_meta=True):
    """Rows as the lmms-lab shards hold them: the image column is the Hugging Face Image struct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = []
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name == "image" or re.fullmatch(r"image_\d", name):  # image_1 .. image_7: MMMU's image columns
            fields.append(pa.field(name, pa.list_(IMAGE_TYPE) if list_image else IMAGE_TYPE))
        else:
            fields.append(pa.field(name, pa.infer_type(values)))
    metadata = None
    if hf_meta:
        features = {n: ({"_type": "Image"} if n == "image" or re.fullmatch(r"image_\d", n) else
                        {"dtype": "string", "_type": "Value"}) for n in rows[0]}
        metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields, metadata=metadata))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_image(path: Path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(color))
    return path


def pixel(record: Record):
    img = record.image()
    assert img.mode == "RGB"
    return img.getpixel((0, 0))


# ------------------------------------------------------------------------------------------
# lmms-lab parquet fixtures, one per task (column names from the lmms-lab dataset cards)


def hf_textvqa(root: Path):
    base = {"image_id": "003a8ae2ef43b901", "question_tokens": ["x"], "image_width": 6, "image_height": 4,
            "flickr_original_url": "u", "flickr_300k_url": "u", "image_classes": ["Camera"], "set_name": "val",
            "ocr_tokens": ["DAKOTA", "DIGITAL"]}
    rows = [
        {**base, "question_id": 34602, "question": "what is the brand of this camera?", "image": cell(COLORS[0]),
         "answers": ["dakota"] * 7 + ["dakota digital"] * 3},
        {**base, "question_id": 34603, "question": "Who is the AUTHOR?", "image": cell(COLORS[1]),
         "answers": ["bob", "alice", "alice", "bob", "bob"]},
        {**base, "question_id": 34604, "question": "what time is it?", "image": cell(COLORS[2]),
         "answers": ["noon"] * 10},
    ]
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", rows)
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [{**rows[0], "question": "TRAIN"}])
    return {"split": None, "count": 3, "ids": ["34602", "34603", "34604"],
            "question": "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL" + VQA,
            "answer": "dakota", "n_answers": 10,
            "second_question": "Who is the author?\nReference OCR token: DAKOTA, DIGITAL" + VQA, "second_answer": "bob", "category": None}


def hf_vqav2(root: Path):
    def answers(*texts):
        return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]

    rows = [
        {"question_type": "how many", "multiple_choice_answer": "2", "answers": answers("2", "2", "3"),
         "image_id": 1, "answer_type": "number", "question_id": 1000, "question": "How many dogs are there?",
         "image": cell(COLORS[0])},
        {"question_type": "is the", "multiple_choice_answer": "yes", "answers": answers("yes", "no", "yes"),
         "image_id": 2, "answer_type": "yes/no", "question_id": 1001, "question": "Is the man happy?",
         "image": cell(COLORS[1])},
        {"question_type": "what", "multiple_choice_answer": "red", "answers": answers("red"),
         "image_id": 3, "answer_type": "other", "question_id": 1002, "question": "What color is the bus?",
         "image": cell(COLORS[2])},
    ]
    write_parquet(root / "data" / "validation-00000-of-00002.parquet", rows[:2])
    write_parquet(root / "data" / "validation-00001-of-00002.parquet", rows[2:])
    return {"split": None, "count": 3, "ids": ["1000", "1001", "1002"], "question": "How many dogs are there?" + VQA,
            "answer": "2", "n_answers": 3, "second_question": "Is the man happy?" + VQA, "second_answer": "yes",
            "category": "number"}


def hf_vizwiz(root: Path):
    post = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + VQA
    rows = [
        {"question_id": "VizWiz_val_00000000", "image": cell(COLORS[0]), "question": "what is this?",
         "answers": ["cup", "mug", "cup", "unanswerable"], "category": "other"},
        {"question_id": "VizWiz_val_00000001", "image": cell(COLORS[1]), "question": "What color is this shirt?",
         "answers": ["unanswerable", "blue", "unanswerable"], "category": "unanswerable"},
    ]
    write_parquet(root / "data" / "val-00000-of-00001-7775fd61bc6a3d98.parquet", rows)
    write_parquet(root / "data" / "test-00000-of-00001-8bb04d0d8c47d4ab.parquet",
                  [{**r, "answers": [], "question": "TEST"} for r in rows])
    return {"split": None, "count": 2, "ids": ["VizWiz_val_00000000", "VizWiz_val_00000001"],
            "question": "What is this?" + post, "answer": "cup", "n_answers": 4,
            "second_question": "What color is this shirt?" + post, "second_answer": "unanswerable", "category": "other"}


def hf_pope(root: Path):
    rows = []
    for i, cat in enumerate(["adversarial", "adversarial", "popular", "random"]):
        rows.append({"id": str(i), "question_id": str(i + 1), "question": "Is there a snowboard in the image? ",
                     "answer": "yes" if i % 2 == 0 else "no", "image_source": f"COCO_val2014_{i}",
                     "image": cell(COLORS[i]), "category": cat})
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return {"split": None, "count": 4, "ids": ["1", "2", "3", "4"],
            "question": "Is there a snowboard in the image?" + VQA, "answer": "yes", "n_answers": 1,
            "second_question": "Is there a snowboard in the image?" + VQA, "second_answer": "no",
            "category": "adversarial"}


def hf_mme(root: Path):
    rows = [
        {"question_id": "code_reasoning/0020.png", "image": cell(COLORS[0]),
         "question": "Is a python code shown in the picture? Please answer yes or no.", "answer": "Yes",
         "category": "code_reasoning"},
        {"question_id": "code_reasoning/0020.png", "image": cell(COLORS[0]),
         "question": "Is a c++ code shown in the picture? Please answer yes or no.", "answer": "No",
         "category": "code_reasoning"},
        {"question_id": "artwork/10002.jpg", "image": cell(COLORS[2]),
         "question": "Is this artwork created by courbet, gustave? Please answer yes or no.", "answer": "Yes",
         "category": "artwork"},
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return {"split": None, "count": 3, "ids": ["code_reasoning/0020.png", "code_reasoning/0020.png#1",
                                               "artwork/10002.jpg"],
            "question": "Is a python code shown in the picture?" + VQA, "answer": "Yes", "n_answers": 1,
            "second_question": "Is a c++ code shown in the picture?" + VQA, "second_answer": "No",
            "category": "code_reasoning"}


def sqa_row(question, choices, answer, hint, color, category="Physical property"):
    return {"image": cell(color), "question": question, "choices": choices, "answer": answer, "hint": hint,
            "task": "closed choice", "grade": "grade2", "subject": "natural science", "topic": "physics",
            "category": category, "skill": "Identify properties", "lecture": "L", "solution": "S"}


def hf_scienceqa(root: Path):
    rows = [
        sqa_row("Which property do these three objects have in common?", ["shiny", "slippery", "opaque"], 2,
                "Select the best answer.", COLORS[0]),
        sqa_row("What is the capital of Wyoming?", ["Phoenix", "Baton Rouge", "Honolulu", "Cheyenne"], 3, "",
                COLORS[1], "States"),
    ]
    write_parquet(root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    write_parquet(root / "ScienceQA-IMG" / "validation-00000-of-00001.parquet", rows[:1])
    write_parquet(root / "ScienceQA-FULL" / "test-00000-of-00001.parquet", rows * 2)
    return {"split": None, "count": 2, "ids": ["0", "1"],
            "question": "Context: Select the best answer.\nWhich property do these three objects have in common?"
                        "\nA. shiny\nB. slippery\nC. opaque" + LETTER,
            "answer": "C", "n_answers": 1, "options": {"A": "shiny", "B": "slippery", "C": "opaque"},
            "second_question": "What is the capital of Wyoming?\nA. Phoenix\nB. Baton Rouge\nC. Honolulu\nD. Cheyenne"
                               + LETTER,
            "second_answer": "D", "category": "Physical property"}


def hf_seedbench(root: Path):
    rows = [
        {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
         "data_id": "1454426_2591111986", "data_type": "image", "question": "How many towels are in the image?",
         "question_id": "101669", "question_type_id": 5, "image": [cell(COLORS[0])], "segment": None},
        {"answer": "C", "choice_a": "Moving something up", "choice_b": "Pushing something", "choice_c": "Tearing",
         "choice_d": "Folding", "data_id": "v1.webm", "data_type": "video", "question": "What is the action?",
         "question_id": "201000", "question_type_id": 10, "image": [cell(COLORS[1]), cell(COLORS[2])],
         "segment": None},
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows, list_image=True)
    return {"split": None, "count": 2, "ids": ["101669", "201000"],
            "question": "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four" + LETTER,
            "answer": "A", "n_answers": 1, "options": {"A": "One", "B": "Two", "C": "Three", "D": "Four"},
            "second_question": "What is the action?\nA. Moving something up\nB. Pushing something\nC. Tearing"
                               "\nD. Folding" + LETTER,
            "second_answer": "C", "category": "Instances Counting", "second_images": 2}


def hf_gqa(root: Path):
    instructions = [
        {"id": "201307251", "imageId": "n161313", "question": "Is it overcast?", "answer": "no",
         "fullAnswer": "No, it is clear.", "isBalanced": True},
        {"id": "201640614", "imageId": "n235859", "question": "Who is wearing the dress?", "answer": "woman",
         "fullAnswer": "The woman is wearing a dress.", "isBalanced": True},
        {"id": "202225914", "imageId": "n161313", "question": "Is the sky blue?", "answer": "yes",
         "fullAnswer": "Yes, the sky is blue.", "isBalanced": True},
    ]
    images = [{"id": "n235859", "image": cell(COLORS[1])}, {"id": "n999", "image": cell(COLORS[4])},
              {"id": "n161313", "image": cell(COLORS[0])}]
    write_parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", instructions)
    write_parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", images, row_group_size=1)
    return {"split": None, "count": 3, "ids": ["201307251", "201640614", "202225914"],
            "question": "Is it overcast?" + VQA, "answer": "no", "n_answers": 1,
            "second_question": "Who is wearing the dress?" + VQA, "second_answer": "woman", "category": None,
            "colors": [COLORS[0], COLORS[1], COLORS[0]]}


def mmbench_rows(lang: str):
    return [
        {"index": 0 if lang == "cn" else "0", "question": "What is the main color?", "hint": "The picture is a flag.",
         "A": "red", "B": "green", "C": "blue", "D": "white", "answer": "A", "category": "attribute_recognition",
         "image": cell(COLORS[0]), "source": "reasoning", "L2-category": "attribute", "comment": None, "split": "dev"},
        {"index": 1 if lang == "cn" else "1", "question": "Is it day?", "hint": None, "A": "yes", "B": "no",
         "C": "unknown", "D": None, "answer": "B", "category": "scene", "image": cell(COLORS[1]),
         "source": "coco", "L2-category": "coarse", "comment": None, "split": "dev"},
    ]


def hf_mmbench(lang):
    def write(root: Path):
        write_parquet(root / "en" / "dev-00000-of-00001.parquet", mmbench_rows("en"))
        write_parquet(root / "cn" / "dev-00000-of-00001.parquet",
                      [{**r, "question": "CN " + r["question"]} for r in mmbench_rows("cn")])
        post = LETTER if lang == "en" else "\n请直接使用所提供的选项字母作为答案回答。"
        prefix = "" if lang == "en" else "CN "
        return {"split": None, "count": 2, "ids": ["0", "1"],
                "question": f"The picture is a flag. {prefix}What is the main color? There are several options:"
                            f"\nA. red\nB. green\nC. blue\nD. white\n{post}",
                "answer": "A", "n_answers": 1, "options": {"A": "red", "B": "green", "C": "blue", "D": "white"},
                "second_question": f"{prefix}Is it day? There are several options:\nA. yes\nB. no\nC. unknown\n{post}",
                "second_answer": "B", "category": "attribute_recognition"}

    return write


def hf_mmvet(root: Path):
    pre = ("First please perform reasoning, and think step by step to provide best answer to the following "
           "question: \n\n")
    rows = [
        {"question_id": "v1_0", "image": cell(COLORS[0]), "question": "What is x in the equation?",
         "answer": "-1 <AND> -5", "image_source": "x", "capability": "ocr,math"},
        {"question_id": "v1_1", "image": cell(COLORS[1]), "question": "What is d in the last equation?",
         "answer": "1.25=5/4", "image_source": "x", "capability": "ocr,math"},
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return {"split": None, "count": 2, "ids": ["v1_0", "v1_1"], "question": pre + "What is x in the equation?",
            "answer": "-1 <AND> -5", "n_answers": 1, "second_question": pre + "What is d in the last equation?",
            "second_answer": "1.25=5/4", "category": "ocr,math"}


def hf_llava_wild(root: Path):
    rows = [
        {"question_id": "0", "question": "What is the name of this famous sight in the photo?",
         "image": cell(COLORS[0]), "caption": "A sight.", "gpt_answer": "Diamond Head.", "category": "conv",
         "image_id": "001"},
        {"question_id": "1", "question": "Describe the photo in detail.", "image": cell(COLORS[1]),
         "caption": "A photo.", "gpt_answer": "It shows a crater.", "category": "detail", "image_id": "001"},
    ]
    write_parquet(root / "data" / "train-00000-of-00001.parquet", rows)
    return {"split": None, "count": 2, "ids": ["0", "1"],
            "question": "What is the name of this famous sight in the photo?", "answer": "Diamond Head.",
            "n_answers": 1, "second_question": "Describe the photo in detail.", "second_answer": "It shows a crater.",
            "category": "conv"}


def hf_mmmu(root: Path):
    """lmms-lab/MMMU: images in image_1..image_7 (empty where unused), the ones shown being those the
    question and options refer to; options as a Python list literal."""
    rows = [
        {"id": "validation_Art_Theory_1", "question": "<image 1> Which style is this?", "options": "['Baroque', 'Rococo']",
         "answer": "B", "question_type": "multiple-choice", "image_1": cell(COLORS[0]), "image_2": cell(COLORS[5]),
         "subfield": "Art history", "img_type": "['Paintings']"},
        {"id": "validation_Math_2", "question": "What is the area of <image 2>?", "options": "[]", "answer": "12",
         "question_type": "open", "image_1": None, "image_2": cell(COLORS[1]), "subfield": "Geometry",
         "img_type": "['Diagrams']"},
    ]
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", rows)
    write_parquet(root / "data" / "dev-00000-of-00001.parquet", [{**rows[0], "id": "dev_Art_Theory_1"}])
    return {"split": None, "count": 2, "ids": ["validation_Art_Theory_1", "validation_Math_2"],
            "question": "<image 1> Which style is this?\nA. Baroque\nB. Rococo\n\n" + LETTER.strip(),
            "answer": "B", "n_answers": 1, "options": {"A": "Baroque", "B": "Rococo"},
            "second_question": "What is the area of <image 2>?\n\n" + VQA.strip(), "second_answer": "12",
            "category": "Art_Theory"}


HF_WRITERS = {
    "textvqa_val": hf_textvqa, "vqav2_val": hf_vqav2, "vizwiz_vqa_val": hf_vizwiz, "pope": hf_pope, "mme": hf_mme,
    "scienceqa_img": hf_scienceqa, "seedbench": hf_seedbench, "gqa": hf_gqa, "mmbench_en_dev": hf_mmbench("en"),
    "mmbench_cn_dev": hf_mmbench("cn"), "mmvet": hf_mmvet, "llava_in_the_wild": hf_llava_wild, "mmmu_val": hf_mmmu,
}


def test_every_task_has_a_parquet_fixture():
    """Every image benchmark here; the video benchmarks' layouts are in test_video_qa.py."""
    assert set(available_tasks()) == set(TASKS)
    assert set(HF_WRITERS) == {t for t, spec in TASKS.items() if spec.modality == "image"}


@pytest.mark.parametrize("task", sorted(HF_WRITERS))
def test_parquet_layout_of_each_task(task, tmp_path):
    expected = HF_WRITERS[task](tmp_path)
    assert detect_format(task, tmp_path) == "parquet"
    records = read_benchmark(task, tmp_path)
    assert [r.sample_id for r in records] == expected["ids"]
    first, second = records[0], records[1]
    assert first.task == task
    assert first.question == expected["question"]
    assert second.question == expected["second_question"]
    assert first.answer == expected["answer"]
    assert second.answer == expected["second_answer"]
    assert len(first.answers) == expected["n_answers"]
    assert first.category == expected["category"]
    if "options" in expected:
        assert first.options == expected["options"]
    assert first.meta["format"] == "parquet"
    colors = expected.get("colors", COLORS)
    if task == "mme":
        colors = [COLORS[0], COLORS[0], COLORS[2]]
    assert pixel(first) == colors[0]
    if "second_images" in expected:
        frames = second.images()
        assert [f.getpixel((0, 0)) for f in frames] == [COLORS[1], COLORS[2]]
        with pytest.raises(BenchmarkDataError, match="2 images"):
            second.image()
    else:
        assert pixel(second) == colors[1]
    assert [pixel(r) for r in records[2:]] == colors[2:len(records)]


@pytest.mark.parametrize("task", sorted(HF_WRITERS))
def test_limit(task, tmp_path):
    expected = HF_WRITERS[task](tmp_path)
    assert len(read_benchmark(task, tmp_path, limit=1)) == 1
    assert read_benchmark(task, tmp_path, limit=1)[0].sample_id == expected["ids"][0]
    assert read_benchmark(task, tmp_path, limit=0) == []
    assert len(read_benchmark(task, tmp_path, limit=100)) == expected["count"]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_limit_is_rejected(bad, tmp_path):
    hf_pope(tmp_path)
    with pytest.raises(ValueError, match="limit"):
        read_benchmark("pope", tmp_path, limit=bad)


def test_split_selection_reads_the_requested_shards(tmp_path):
    hf_textvqa(tmp_path / "tv")
    train = read_benchmark("textvqa_val", tmp_path / "tv", split="train", ocr_tokens=False)
    assert [r.question for r in train] == ["Train" + VQA]
    hf_scienceqa(tmp_path / "sqa")
    assert len(read_benchmark("scienceqa_img", tmp_path / "sqa", split="validation")) == 1
    with pytest.raises(BenchmarkDataError, match=r"split 'test'.*splits found: train, validation"):
        read_benchmark("textvqa_val", tmp_path / "tv", split="test")


def test_pope_category_splits(tmp_path):
    hf_pope(tmp_path)
    adversarial = read_benchmark("pope", tmp_path, split="adversarial")
    assert [r.sample_id for r in adversarial] == ["1", "2"]
    assert {r.category for r in adversarial} == {"adversarial"}
    popular = read_benchmark("pope", tmp_path, split="popular")
    assert [r.sample_id for r in popular] == ["3"] and pixel(popular[0]) == COLORS[2]
    assert len(read_benchmark("pope", tmp_path, split="random", limit=5)) == 1


def test_pope_full_config_files_are_split_named(tmp_path):
    rows = [{"question_id": "7", "question": "Is there a dog in the image?", "answer": "no", "image": cell(COLORS[3]),
             "category": "popular"}]
    write_parquet(tmp_path / "Full" / "popular-00000-of-00001.parquet", rows)
    records = read_benchmark("pope", tmp_path, split="popular")
    assert [r.sample_id for r in records] == ["7"] and pixel(records[0]) == COLORS[3]


def test_config_folder_is_respected(tmp_path):
    hf_scienceqa(tmp_path)  # ScienceQA-FULL holds twice the rows: it must not be read
    assert len(read_benchmark("scienceqa_img", tmp_path)) == 2
    hf_mmbench("en")(tmp_path / "mmb")
    assert read_benchmark("mmbench_cn_dev", tmp_path / "mmb")[0].meta["raw_question"].startswith("CN ")
    assert not read_benchmark("mmbench_en_dev", tmp_path / "mmb")[0].meta["raw_question"].startswith("CN ")
    only_cn = tmp_path / "only_cn"
    write_parquet(only_cn / "cn" / "dev-00000-of-00001.parquet", mmbench_rows("cn"))
    with pytest.raises(BenchmarkDataError, match="config.*cn.*not 'en'"):
        read_benchmark("mmbench_en_dev", only_cn)


def test_single_parquet_file_and_refs_convert_layout(tmp_path):
    hf_mmvet(tmp_path)
    shard = tmp_path / "data" / "test-00000-of-00001.parquet"
    assert detect_format("mmvet", shard) == "parquet"
    assert [r.sample_id for r in read_benchmark("mmvet", shard)] == ["v1_0", "v1_1"]
    with pytest.raises(BenchmarkDataError, match="holds split 'test', not 'train'"):
        read_benchmark("mmvet", shard, split="train")
    converted = tmp_path / "converted"
    rows = pq.read_table(shard).to_pylist()
    write_parquet(converted / "default" / "test" / "0000.parquet", rows)
    assert [r.answer for r in read_benchmark("mmvet", converted)] == ["-1 <AND> -5", "1.25=5/4"]


def test_images_across_row_groups_and_shards_map_to_their_rows(tmp_path):
    rows = [{"question_id": str(i), "question": f"q{i}", "answer": "a", "image": cell(COLORS[i]),
             "category": "c"} for i in range(7)]
    write_parquet(tmp_path / "data" / "test-00000-of-00002.parquet", rows[:5], row_group_size=2)
    write_parquet(tmp_path / "data" / "test-00001-of-00002.parquet", rows[5:], row_group_size=1)
    records = read_benchmark("mme", tmp_path)
    order = [6, 0, 3, 5, 1, 4, 2]  # random access, not only sequential
    assert [pixel(records[i]) for i in order] == [COLORS[i] for i in order]
    assert "row 4" in records[4].image_sources[0]


def test_mmbench_prompt_details(tmp_path):
    rows = mmbench_rows("en")
    rows[0]["hint"] = "nan"  # lmms-eval's English template drops a literal 'nan' hint
    rows[1]["D"] = "nan"
    write_parquet(tmp_path / "en" / "dev-00000-of-00001.parquet", rows)
    first, second = read_benchmark("mmbench_en_dev", tmp_path)
    assert first.question.startswith("What is the main color? There are several options:\nA. red")
    assert second.options == {"A": "yes", "B": "no", "C": "unknown"}
    assert first.meta["source"] == "reasoning" and first.meta["L2-category"] == "attribute"


def test_mmbench_l2_categories_reach_the_score_from_lmms_lab_parquet(tmp_path):
    """lmms-lab's parquet spells the column "L2-category"; the scorer's per-L2 breakdown must see it."""
    from ficoco.evaluation.runner import scorer_row
    from ficoco.evaluation.tasks import SCORERS

    hf_mmbench("en")(tmp_path)
    records = read_benchmark("mmbench_en_dev", tmp_path)
    rows = [scorer_row(record, record.answer) for record in records]
    assert [row["l2-category"] for row in rows] == ["attribute", "coarse"]
    score = SCORERS["mmbench_en_dev"](rows)
    assert set(score["per_l2_category"]) == {"attribute", "coarse"}


def test_textvqa_prompts_with_and_without_the_ocr_tokens(tmp_path):
    """LLaVA-1.5's published TextVQA numbers use prompts with the reference OCR tokens: the default
    where the files have them; ``ocr_tokens=False`` gives lmms-eval's default prompt; each record
    says which."""
    hf_textvqa(tmp_path)
    default = read_benchmark("textvqa_val", tmp_path)[0]
    assert default.question == "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL" + VQA
    assert default.meta["ocr_reference"] is True
    plain = read_benchmark("textvqa_val", tmp_path, ocr_tokens=False)[0]
    assert plain.question == "What is the brand of this camera?" + VQA and plain.meta["ocr_reference"] is False
    bare = tmp_path / "no-ocr"
    rows = pq.read_table(tmp_path / "data" / "validation-00000-of-00001.parquet").drop(["ocr_tokens"]).to_pylist()
    write_parquet(bare / "data" / "validation-00000-of-00001.parquet", rows)
    assert read_benchmark("textvqa_val", bare)[0].meta["ocr_reference"] is False
    with pytest.raises(BenchmarkDataError, match="ocr_tokens=True needs the 'ocr_tokens' column"):
        read_benchmark("textvqa_val", bare, ocr_tokens=True)
    with pytest.raises(ValueError, match="ocr_tokens is a TextVQA option, not gqa's"):
        read_benchmark("gqa", tmp_path, ocr_tokens=True)


def test_prompt_overrides(tmp_path):
    hf_gqa(tmp_path)
    record = read_benchmark("gqa", tmp_path, pre_prompt="Q: ", post_prompt=" A:")[0]
    assert record.question == "Q: Is it overcast? A:"
    hf_mme(tmp_path / "mme")
    assert read_benchmark("mme", tmp_path / "mme", post_prompt="")[0].question == (
        "Is a python code shown in the picture? Please answer yes or no.")


# ------------------------------------------------------------------------------------------
# save_to_disk folders (the layout ``datasets`` writes: state.json + Arrow stream files)


def save_to_disk(folder: Path, rows: list[dict]):
    folder.mkdir(parents=True, exist_ok=True)
    fields = [pa.field(n, IMAGE_TYPE if n == "image" else pa.infer_type([r[n] for r in rows])) for n in rows[0]]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}))
    features = {f.name: {"_type": "Image"} if f.name == "image" else {"dtype": str(f.type), "_type": "Value"}
                for f in fields}
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}))


def pope_rows():
    return [{"question_id": str(i), "question": f"Is there a cat{i} in the image?", "answer": "yes",
             "image": cell(COLORS[i]), "category": cat} for i, cat in enumerate(["random", "popular", "random"])]


def test_save_to_disk_dataset_dict(tmp_path):
    save_to_disk(tmp_path / "test", pope_rows())
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    assert detect_format("pope", tmp_path) == "hf_disk"
    records = read_benchmark("pope", tmp_path)
    assert [r.question for r in records][:1] == ["Is there a cat0 in the image?" + VQA]
    assert [pixel(r) for r in records] == COLORS[:3]
    assert [r.sample_id for r in read_benchmark("pope", tmp_path, split="random")] == ["0", "2"]
    with pytest.raises(BenchmarkDataError, match="no split 'validation'"):
        read_benchmark("pope", tmp_path, split="validation")


def test_save_to_disk_single_dataset_and_gqa_parts(tmp_path):
    save_to_disk(tmp_path / "pope", pope_rows())
    records = read_benchmark("pope", tmp_path / "pope", limit=2)
    assert len(records) == 2 and records[1].meta["format"] == "hf_disk" and pixel(records[1]) == COLORS[1]
    gqa = tmp_path / "gqa"
    save_to_disk(gqa / "testdev_balanced_instructions",
                 [{"id": "1", "imageId": "n2", "question": "Is it red?", "answer": "yes"}])
    save_to_disk(gqa / "testdev_balanced_images", [{"id": "n1", "image": cell(COLORS[0])},
                                                    {"id": "n2", "image": cell(COLORS[5])}])
    assert detect_format("gqa", gqa) == "hf_disk"
    (record,) = read_benchmark("gqa", gqa)
    assert record.question == "Is it red?" + VQA and pixel(record) == COLORS[5]


def test_save_to_disk_with_datasets_library(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "category": datasets.Value("string"),
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({k: [r[k] for r in pope_rows()] for k in features}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path))
    records = read_benchmark("pope", tmp_path)
    assert [pixel(r) for r in records] == COLORS[:3]


# ------------------------------------------------------------------------------------------
# LLaVA-1.5 evaluation files (question files as in LLaVA's eval.zip, image folders as in
# docs/Evaluation.md / scripts/v1_5/eval/*.sh)


def llava_textvqa(root: Path):
    text = "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL\n" + VQA.strip()
    write_jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": text, "category": "default"},
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": "What does it say?\nReference OCR token: DAKOTA, DIGITAL\n" + VQA.strip(), "category": "default"},
    ])
    write_image(root / "train_images" / "003a8ae2ef43b901.jpg", COLORS[0])
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": ["dakota"] * 6 + ["nikon"] * 4},
        {"question": "what does it say?", "image_id": "003a8ae2ef43b901", "question_id": 34603,
         "answers": ["dakota digital"] * 10},
    ]}))
    return {"ids": ["003a8ae2ef43b901", "003a8ae2ef43b901#1"], "question": text, "answer": "dakota",
            "second_answer": "dakota digital", "category": None, "colors": [COLORS[0], COLORS[0]]}


def llava_vqav2(root: Path):
    write_jsonl(root / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg",
         "text": "Is the ball flying towards the batter?" + VQA, "category": "default"},
        {"question_id": 262144001, "image": "COCO_test2015_000000262145.jpg", "text": "What sport is this?" + VQA,
         "category": "default"},
    ])
    write_image(root / "test2015" / "COCO_test2015_000000262144.jpg", COLORS[0])
    write_image(root / "test2015" / "COCO_test2015_000000262145.jpg", COLORS[1])
    return {"ids": ["262144000", "262144001"], "question": "Is the ball flying towards the batter?" + VQA,
            "answer": None, "second_answer": None, "category": None}


def llava_vizwiz(root: Path):
    post = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + VQA
    write_jsonl(root / "llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "What is this?" + post, "category": "default"},
        {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "What color?" + post, "category": "default"},
    ])
    write_image(root / "test" / "VizWiz_test_00000000.jpg", COLORS[0])
    write_image(root / "test" / "VizWiz_test_00000001.jpg", COLORS[1])
    return {"ids": ["0", "1"], "question": "What is this?" + post, "answer": None, "second_answer": None,
            "category": None}


def llava_pope(root: Path):
    questions, labels = [], {"adversarial": [], "popular": []}
    for i, (cat, obj, label) in enumerate([("adversarial", "snowboard", "yes"), ("adversarial", "dog", "no"),
                                           ("popular", "car", "no")]):
        image = f"COCO_val2014_00000031019{i}.jpg"
        questions.append({"question_id": i + 1, "image": image, "text": f"Is there a {obj} in the image?" + VQA,
                          "category": cat})
        labels[cat].append({"question_id": len(labels[cat]) + 1, "image": image,
                            "text": f"Is there a {obj} in the image?", "label": label})
        write_image(root / "val2014" / image, COLORS[i])
    write_jsonl(root / "llava_pope_test.jsonl", questions)
    for cat, rows in labels.items():
        write_jsonl(root / "coco" / f"coco_pope_{cat}.json", rows)
    return {"ids": ["1", "2", "3"], "question": "Is there a snowboard in the image?" + VQA, "answer": "yes",
            "second_answer": "no", "category": "adversarial"}


def llava_mme(root: Path):
    release = root / "MME_Benchmark_release_version"
    write_image(release / "code_reasoning" / "0020.png", COLORS[0])
    (release / "code_reasoning" / "0020.txt").write_text(
        "Is a python code shown in the picture? Please answer yes or no.\tYes\n"
        "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n")
    write_image(release / "artwork" / "images" / "14777.jpg", COLORS[2])
    (release / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN" / "14777.txt").write_text(
        "Does this artwork belong to the type of religious?  Please answer yes or no.\tYes\n")
    write_jsonl(root / "llava_mme.jsonl", [
        {"question_id": "code_reasoning/0020.png", "image": "code_reasoning/0020.png",
         "text": "Is a python code shown in the picture?" + VQA, "category": "code_reasoning"},
        {"question_id": "code_reasoning/0020.png", "image": "code_reasoning/0020.png",
         "text": "Is a c++ code shown in the picture?" + VQA, "category": "code_reasoning"},
        {"question_id": "artwork/images/14777.jpg", "image": "artwork/images/14777.jpg",
         "text": "Does this artwork belong to the type of religious?" + VQA, "category": "artwork"},
    ])
    return {"ids": ["code_reasoning/0020.png", "code_reasoning/0020.png#1", "artwork/images/14777.jpg"],
            "question": "Is a python code shown in the picture?" + VQA, "answer": "Yes", "second_answer": "No",
            "category": "code_reasoning", "colors": [COLORS[0], COLORS[0], COLORS[2]]}


def llava_scienceqa(root: Path):
    entries = [
        {"id": "4", "conversations": [
            {"from": "human", "value": "Which figure of speech is used in this text?\nA. chiasmus\nB. apostrophe"},
            {"from": "gpt", "value": "B"}]},
        {"id": "46", "image": "46/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: Select the best answer.\nWhich property do these three "
                                       "objects have in common?\nA. shiny\nB. slippery\nC. opaque"},
            {"from": "gpt", "value": "C"}]},
        {"id": "62", "image": "62/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the capital of Wyoming?\nA. Phoenix\nB. Cheyenne"},
            {"from": "gpt", "value": "B"}]},
    ]
    (root / "llava_test_CQM-A.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "llava_test_CQM-A.json").write_text(json.dumps(entries, indent=2))
    write_image(root / "images" / "test" / "46" / "image.png", COLORS[0])
    write_image(root / "images" / "test" / "62" / "image.png", COLORS[1])
    return {"ids": ["46", "62"],
            "question": "Context: Select the best answer.\nWhich property do these three objects have in common?\n"
                        "A. shiny\nB. slippery\nC. opaque" + LETTER,
            "answer": "C", "second_answer": "B", "category": None,
            "options": {"A": "shiny", "B": "slippery", "C": "opaque"}}


def llava_seedbench(root: Path):
    text = "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four" + LETTER
    write_jsonl(root / "llava-seed-bench.jsonl", [
        {"image": "SEED-Bench-image/1454426_2591111986.jpg", "text": text, "category": "Instances Counting",
         "question_id": "101669"},
        {"image": "SEED-Bench-video-image/v1.png", "text": "What happens?\nA. a\nB. b\nC. c\nD. d" + LETTER,
         "category": "Action Recognition", "question_id": "201000"},
    ])
    write_image(root / "SEED-Bench-image" / "1454426_2591111986.jpg", COLORS[0])
    write_image(root / "SEED-Bench-video-image" / "v1.png", COLORS[1])
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": [
        {"question_id": "101669", "answer": "A", "data_type": "image", "question_type_id": 5},
        {"question_id": "201000", "answer": "D", "data_type": "video", "question_type_id": 10}]}))
    return {"ids": ["101669", "201000"], "question": text, "answer": "A", "second_answer": "D",
            "category": "Instances Counting", "options": {"A": "One", "B": "Two", "C": "Three", "D": "Four"}}


def llava_gqa(root: Path):
    write_jsonl(root / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?" + VQA, "category": "default"},
        {"question_id": "201640614", "image": "n235859.jpg", "text": "Who is wearing the dress?" + VQA,
         "category": "default"},
    ])
    write_image(root / "data" / "images" / "n161313.jpg", COLORS[0])
    write_image(root / "data" / "images" / "n235859.jpg", COLORS[1])
    (root / "data" / "testdev_balanced_questions.json").write_text(json.dumps({
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "fullAnswer": "No."},
        "201640614": {"imageId": "n235859", "question": "Who is wearing the dress?", "answer": "woman"}}))
    return {"ids": ["201307251", "201640614"], "question": "Is it overcast?" + VQA, "answer": "no",
            "second_answer": "woman", "category": None}


def mmbench_tsv(lang):
    def write(root: Path):
        name = "mmbench_dev_20230712.tsv" if lang == "en" else "mmbench_dev_cn_20231003.tsv"
        b64 = [base64.b64encode(png(c)).decode() for c in COLORS[:2]]
        header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]
        rows = [
            ["0", "What is the main color?", "The picture is a flag.", "red", "green", "blue", "white", "A",
             "attribute_recognition", b64[0], "reasoning", "attribute", "", "dev"],
            ["1", "Is it day?", "", "yes", "no", "unknown", "", "B", "scene", b64[1], "coco", "coarse", "", "dev"],
            ["1000001", "Is it day? (circular)", "", "no", "yes", "", "", "A", "scene", "1", "coco", "coarse", "",
             "dev"],
        ]
        root.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
        post = LETTER if lang == "en" else "\n请直接使用所提供的选项字母作为答案回答。"
        return {"ids": ["0", "1", "1000001"],
                "question": "The picture is a flag. What is the main color? There are several options:\nA. red\n"
                            f"B. green\nC. blue\nD. white\n{post}",
                "answer": "A", "second_answer": "B", "category": "attribute_recognition",
                "options": {"A": "red", "B": "green", "C": "blue", "D": "white"},
                "colors": [COLORS[0], COLORS[1], COLORS[1]], "format": "tsv"}

    return write


def llava_mmvet(root: Path):
    write_jsonl(root / "llava-mm-vet.jsonl", [
        {"image": "v1_0.png", "text": "What is x in the equation?", "category": "conv", "question_id": 0},
        {"image": "v1_1.png", "text": "What is d in the last equation?", "category": "conv", "question_id": 1},
    ])
    write_image(root / "images" / "v1_0.png", COLORS[0])
    write_image(root / "images" / "v1_1.png", COLORS[1])
    (root / "mm-vet.json").write_text(json.dumps({
        "v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "q", "answer": "-1 <AND> -5"},
        "v1_1": {"imagename": "v1_1.png", "capability": ["ocr"], "question": "q", "answer": "1.25=5/4"}}))
    return {"ids": ["0", "1"], "question": "What is x in the equation?", "answer": "-1 <AND> -5",
            "second_answer": "1.25=5/4", "category": "ocr,math"}


def llava_wild(root: Path):
    write_jsonl(root / "questions.jsonl", [
        {"image": "001.jpg", "text": "What is the name of this famous sight in the photo?", "category": "conv",
         "question_id": 0},
        {"image": "002.jpg", "text": "Describe the photo in detail.", "category": "detail", "question_id": 1},
    ])
    write_jsonl(root / "answers_gpt4.jsonl", [{"question_id": 0, "text": "Diamond Head."},
                                              {"question_id": 1, "text": "A crater."}])
    write_jsonl(root / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "c"}])
    write_image(root / "images" / "001.jpg", COLORS[0])
    write_image(root / "images" / "002.jpg", COLORS[1])
    return {"ids": ["0", "1"], "question": "What is the name of this famous sight in the photo?",
            "answer": "Diamond Head.", "second_answer": "A crater.", "category": "conv"}


LLAVA_WRITERS = {
    "textvqa_val": llava_textvqa, "vqav2_val": llava_vqav2, "vizwiz_vqa_val": llava_vizwiz, "pope": llava_pope,
    "mme": llava_mme, "scienceqa_img": llava_scienceqa, "seedbench": llava_seedbench, "gqa": llava_gqa,
    "mmbench_en_dev": mmbench_tsv("en"), "mmbench_cn_dev": mmbench_tsv("cn"), "mmvet": llava_mmvet,
    "llava_in_the_wild": llava_wild,
}


def test_every_task_has_a_llava_fixture():
    """Every image benchmark with LLaVA-1.5 files (MMMU has none); the video benchmarks' Video-LLaVA
    files are in test_video_qa.py."""
    assert set(LLAVA_WRITERS) == {t for t, spec in TASKS.items() if spec.modality == "image" and spec.llava_files}


@pytest.mark.parametrize("task", sorted(LLAVA_WRITERS))
@pytest.mark.parametrize("point_at", ["folder", "file"])
def test_llava_layout_of_each_task(task, point_at, tmp_path):
    expected = LLAVA_WRITERS[task](tmp_path)
    path = tmp_path if point_at == "folder" else tmp_path / TASKS[task].llava_files[0]
    fmt = expected.get("format", "llava")
    assert detect_format(task, path) == fmt
    records = read_benchmark(task, path)
    assert [r.sample_id for r in records] == expected["ids"]
    assert records[0].question == expected["question"]
    assert records[0].answer == expected["answer"]
    assert records[1].answer == expected["second_answer"]
    assert records[0].category == expected["category"]
    if expected["answer"] is not None:
        assert records[0].answers[0] == expected["answer"] or expected["answer"] in records[0].answers
    if "options" in expected:
        assert records[0].options == expected["options"]
    assert records[0].meta["format"] == fmt
    colors = expected.get("colors", COLORS)
    assert [pixel(r) for r in records] == colors[:len(records)]
    assert len(read_benchmark(task, path, limit=1)) == 1


def test_llava_annotations_fill_all_answers(tmp_path):
    llava_textvqa(tmp_path)
    records = read_benchmark("textvqa_val", tmp_path)
    assert records[0].answers == ["dakota"] * 6 + ["nikon"] * 4
    assert records[1].meta["textvqa_question_id"] == 34603
    without = tmp_path / "no_annotations"
    llava_textvqa(without)
    (without / "TextVQA_0.5.1_val.json").unlink()
    assert [r.answer for r in read_benchmark("textvqa_val", without)] == [None, None]


def test_llava_pope_category_split_and_label_mismatch(tmp_path):
    llava_pope(tmp_path)
    popular = read_benchmark("pope", tmp_path, split="popular")
    assert [(r.sample_id, r.answer) for r in popular] == [("3", "no")]
    write_jsonl(tmp_path / "coco" / "coco_pope_adversarial.json",
                [{"question_id": 1, "image": "COCO_val2014_000000310190.jpg", "text": "t", "label": "yes"}])
    with pytest.raises(BenchmarkDataError, match=r"coco_pope_adversarial\.json has 1 labels"):
        read_benchmark("pope", tmp_path)
    with pytest.raises(ValueError, match="split='validation' cannot be selected"):
        read_benchmark("pope", tmp_path, split="validation")


def test_llava_explicit_annotation_files(tmp_path):
    llava_vizwiz(tmp_path)
    ann = tmp_path / "Annotations" / "test.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps([
        {"image": "VizWiz_test_00000000.jpg", "question": "q", "answers": [{"answer": "cup"}, {"answer": "cup"},
                                                                          {"answer": "mug"}]},
        {"image": "VizWiz_test_00000001.jpg", "question": "q", "answers": [{"answer": "red"}]}]))
    records = read_benchmark("vizwiz_vqa_val", tmp_path, annotation_file=ann)
    assert [r.answer for r in records] == ["cup", "red"] and records[0].answers == ["cup", "cup", "mug"]
    vqa = tmp_path / "vqav2"
    llava_vqav2(vqa)
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 262144000, "multiple_choice_answer": "yes", "answer_type": "yes/no",
         "answers": [{"answer": "yes", "answer_id": 1}, {"answer": "no", "answer_id": 2}]}]}))
    with pytest.raises(BenchmarkDataError, match="no entry for sample 262144001"):
        read_benchmark("vqav2_val", vqa, annotation_file=vqa / "v2_mscoco_val2014_annotations.json")
    data = json.loads((vqa / "v2_mscoco_val2014_annotations.json").read_text())
    data["annotations"].append({"question_id": 262144001, "answers": [{"answer": "baseball"}] * 3,
                                "answer_type": "other"})
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(data))
    records = read_benchmark("vqav2_val", vqa, annotation_file=vqa / "v2_mscoco_val2014_annotations.json")
    assert [(r.answer, r.category) for r in records] == [("yes", "yes/no"), ("baseball", "other")]
    assert records[0].answers == ["yes", "no"]


def test_llava_scienceqa_falls_back_to_problems_json(tmp_path):
    llava_scienceqa(tmp_path)
    entries = json.loads((tmp_path / "llava_test_CQM-A.json").read_text())
    for e in entries:
        e["conversations"] = e["conversations"][:1]
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(entries))
    (tmp_path / "problems.json").write_text(json.dumps({
        "4": {"answer": 1, "category": "Figurative language"},
        "46": {"answer": 2, "category": "Physical property", "subject": "natural science"},
        "62": {"answer": 1, "category": "Geography"}}))
    records = read_benchmark("scienceqa_img", tmp_path)
    assert [(r.answer, r.category) for r in records] == [("C", "Physical property"), ("B", "Geography")]
    assert records[0].meta["subject"] == "natural science"


def test_llava_explicit_image_folder_and_prompt_overrides_rejected(tmp_path):
    llava_gqa(tmp_path)
    moved = tmp_path / "elsewhere"
    (tmp_path / "data" / "images").rename(moved)
    with pytest.raises(BenchmarkDataError, match="no image folder"):
        read_benchmark("gqa", tmp_path)
    assert pixel(read_benchmark("gqa", tmp_path, image_folder=moved)[1]) == COLORS[1]
    with pytest.raises(ValueError, match="finished text"):
        read_benchmark("gqa", tmp_path, image_folder=moved, post_prompt="")


def test_mme_release_folder(tmp_path):
    llava_mme(tmp_path)
    release = tmp_path / "MME_Benchmark_release_version"
    assert detect_format("mme", release) == "mme_folder"
    records = read_benchmark("mme", release)
    assert [r.sample_id for r in records] == ["artwork/images/14777.jpg", "code_reasoning/0020.png",
                                              "code_reasoning/0020.png#1"]
    assert records[0].question == "Does this artwork belong to the type of religious? " + VQA
    assert records[1].question == "Is a python code shown in the picture?" + VQA
    assert [(r.answer, r.category) for r in records] == [("Yes", "artwork"), ("Yes", "code_reasoning"),
                                                         ("No", "code_reasoning")]
    assert [pixel(r) for r in records] == [COLORS[2], COLORS[0], COLORS[0]]
    assert records[1].meta["raw_question"].endswith("Please answer yes or no.")
    assert len(read_benchmark("mme", release, limit=2)) == 2
    (release / "code_reasoning" / "0021.txt").write_text("q? Please answer yes or no.\tYes\n")
    with pytest.raises(BenchmarkDataError, match="0021"):
        read_benchmark("mme", release)
    (release / "code_reasoning" / "0021.txt").write_text("no tab here\n")
    write_image(release / "code_reasoning" / "0021.png", COLORS[3])
    with pytest.raises(BenchmarkDataError, match=r"0021\.txt: line 1"):
        read_benchmark("mme", release)


# ------------------------------------------------------------------------------------------
# errors


def test_unknown_task_and_format(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'okvqa'.*textvqa_val"):
        read_benchmark("okvqa", tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        read_benchmark("pope", tmp_path, format="csv")
    assert set(FORMATS) == {"parquet", "hf_disk", "llava", "tsv", "mme_folder"}


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(BenchmarkDataError, match="nope does not exist") as info:
        read_benchmark("pope", missing)
    assert info.value.path == str(missing)
    assert isinstance(info.value, ValueError)


def test_no_data_found(tmp_path):
    (tmp_path / "README.md").write_text("nothing here")
    with pytest.raises(BenchmarkDataError, match="no benchmark data for pope"):
        read_benchmark("pope", tmp_path)
    with pytest.raises(BenchmarkDataError, match="no .parquet files"):
        read_benchmark("pope", tmp_path, format="parquet")
    with pytest.raises(BenchmarkDataError, match="cannot tell the pope question file"):
        read_benchmark("pope", tmp_path, format="llava")


def test_missing_required_column_is_named_with_the_columns_found(tmp_path):
    rows = [{"question_id": "1", "query": "Is there a dog?", "answer": "no", "image": cell(COLORS[0]),
             "category": "random"}]
    shard = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(BenchmarkDataError) as info:
        read_benchmark("pope", tmp_path)
    message = str(info.value)
    assert "'question'" in message and "query, answer, image, category" in message and str(shard) in message
    rows[0]["question"] = rows[0].pop("query")
    del rows[0]["answer"]
    write_parquet(shard, rows)
    with pytest.raises(BenchmarkDataError, match="'answer' required by pope is missing"):
        read_benchmark("pope", tmp_path)


def test_missing_column_in_tsv_and_jsonl(tmp_path):
    (tmp_path / "mmbench_dev_20230712.tsv").write_text("index\tquestion\tA\tB\tanswer\n0\tq\ta\tb\tA\n")
    with pytest.raises(BenchmarkDataError, match="'image' required by mmbench_en_dev.*index, question, A, B"):
        read_benchmark("mmbench_en_dev", tmp_path)
    write_jsonl(tmp_path / "llava_pope_test.jsonl", [{"question_id": 1, "text": "q"}])
    (tmp_path / "val2014").mkdir()
    with pytest.raises(BenchmarkDataError, match="line 1: key 'image' is missing; keys found: question_id, text"):
        read_benchmark("pope", tmp_path)


def test_malformed_jsonl_line_names_the_line(tmp_path):
    llava_gqa(tmp_path)
    qfile = tmp_path / "llava_gqa_testdev_balanced.jsonl"
    qfile.write_text(qfile.read_text() + "\n{\"question_id\": \"3\", \"image\": \n")
    with pytest.raises(BenchmarkDataError, match=r"llava_gqa_testdev_balanced\.jsonl: line 4: not valid JSON"):
        read_benchmark("gqa", tmp_path)
    qfile.write_text('["not", "an", "object"]\n')
    with pytest.raises(BenchmarkDataError, match="line 1: expected a JSON object"):
        read_benchmark("gqa", tmp_path)
    (tmp_path / "llava_test_CQM-A.json").write_text('[{"id": "1",\n "conversations": ]')
    with pytest.raises(BenchmarkDataError, match=r"llava_test_CQM-A\.json: line 2: not valid JSON"):
        read_benchmark("scienceqa_img", tmp_path / "llava_test_CQM-A.json", image_folder=tmp_path)


def test_missing_image_file(tmp_path):
    llava_mmvet(tmp_path)
    (tmp_path / "images" / "v1_1.png").unlink()
    with pytest.raises(BenchmarkDataError, match=r"sample 1 .*image file not found: .*v1_1\.png"):
        read_benchmark("mmvet", tmp_path)
    records = read_benchmark("mmvet", tmp_path, check_images=False)
    assert pixel(records[0]) == COLORS[0]
    with pytest.raises(BenchmarkDataError, match=r"sample 1: image file not found: .*v1_1\.png"):
        records[1].image()
    assert len(read_benchmark("mmvet", tmp_path, limit=1)) == 1  # only the kept records are checked


def test_gqa_missing_image_or_images_part(tmp_path):
    hf_gqa(tmp_path)
    write_parquet(tmp_path / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
                  [{"id": "n161313", "image": cell(COLORS[0])}])
    with pytest.raises(BenchmarkDataError, match="sample 201640614: image 'n235859' is missing"):
        read_benchmark("gqa", tmp_path)
    for f in (tmp_path / "testdev_balanced_images").iterdir():
        f.unlink()
    (tmp_path / "testdev_balanced_images").rmdir()
    with pytest.raises(BenchmarkDataError, match="testdev_balanced_images"):
        read_benchmark("gqa", tmp_path)


def test_corrupt_images_name_the_sample_and_file(tmp_path):
    rows = [{"question_id": "q7", "question": "Is it?", "answer": "yes", "category": "random",
             "image": {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}},
            {"question_id": "q8", "question": "Is it?", "answer": "yes", "category": "random",
             "image": {"bytes": png(COLORS[0])[:40], "path": None}}]
    shard = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    bad, truncated = read_benchmark("pope", tmp_path)
    for record, row in ((bad, 0), (truncated, 1)):
        with pytest.raises(BenchmarkDataError) as info:
            record.image()
        assert f"sample {record.sample_id}" in str(info.value) and f"{shard} row {row}" in str(info.value)
    llava_mmvet(tmp_path / "llava")
    (tmp_path / "llava" / "images" / "v1_0.png").write_bytes(b"not an image at all")
    record = read_benchmark("mmvet", tmp_path / "llava")[0]
    with pytest.raises(BenchmarkDataError, match=r"sample 0: image .*v1_0\.png is corrupt"):
        record.image()
    mmbench_tsv("en")(tmp_path / "tsv")
    tsv = tmp_path / "tsv" / "mmbench_dev_20230712.tsv"
    tsv.write_text(tsv.read_text().replace(base64.b64encode(png(COLORS[0])).decode(), "@@@notbase64@@@"))
    with pytest.raises(BenchmarkDataError, match="sample 0: image .*line 2"):
        read_benchmark("mmbench_en_dev", tmp_path / "tsv")[0].image()


def test_unreadable_parquet_is_a_benchmark_error_not_an_arrow_traceback(tmp_path):
    shard = tmp_path / "data" / "test-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"this is not parquet")
    with pytest.raises(BenchmarkDataError, match="could not be read as parquet"):
        read_benchmark("pope", tmp_path)
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(BenchmarkDataError, match="Git LFS pointer"):
        read_benchmark("pope", tmp_path)


def test_image_that_went_missing_after_reading(tmp_path):
    hf_mmvet(tmp_path)
    records = read_benchmark("mmvet", tmp_path)
    (tmp_path / "data" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(BenchmarkDataError, match="test-00000-of-00001.parquet"):
        records[0].image()


def test_sample_without_image(tmp_path):
    rows = [{"question_id": "1", "question": "q", "answer": "a", "image": None}]
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    (record,) = read_benchmark("mmvet", tmp_path)
    with pytest.raises(BenchmarkDataError, match="sample 1 has no image"):
        record.image()


def test_records_are_frozen_and_registry_is_read_only():
    record = Record("pope", "1", "q")
    with pytest.raises(AttributeError):
        record.question = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        TASKS["new"] = TASKS["pope"]  # type: ignore[index]
    with pytest.raises(BenchmarkDataError, match="has no image"):
        record.image()
