"""Honest reporting: result tables that flag unparsed answers, prompt formats, the vocabulary
check, and loading checkpoints with one clear error per problem."""

from __future__ import annotations

import json

import pytest
import torch

from ficoco.checkpoint import check_supported, is_proxy_checkpoint, load_processor, resolve_device, resolve_dtype
from ficoco.evaluation.prompt_format import bare_question, in_prompt_format, resolve_prompt_format
from ficoco.evaluation.records import OPTION_POST, VQA_POST, Record
from ficoco.evaluation.report import column_title, csv_table, flagged, markdown_table, significant, warnings
from ficoco.evaluation.tasks.mmbench import MMBENCH_CN_POST
from ficoco.evaluation.tasks.mmvet import MMVET_PRE
from ficoco.evaluation.tasks.vizwiz_vqa import VIZWIZ_POST
from ficoco.prompts import vocabulary_check


def _result(task, variant, score, n_unparsed, n=10, tflops=3.3):
    return {"task": task, "variant": variant, "n": n, "llm_tflops": tflops,
            "score": {"metric": "f1 (mean over splits)", "score": score, "n": n, "n_unparsed": n_unparsed,
                      "per_split": {"adversarial": {}, "popular": {}, "random": {}}}}


# -- the result table ------------------------------------------------------------------------


def test_significant_figures():
    assert [significant(v) for v in (8.4512, 3.3, 0.0041234, 28.58, 0, None)] == [
        "8.45", "3.30", "0.00412", "28.6", "0", "-"]


def test_column_titles_name_the_metric():
    assert column_title("pope", {"metric": "f1 (mean over splits)", "per_split": {"a": 1, "b": 2, "c": 3}}) == \
        "POPE F1 (mean of 3 splits)"
    assert column_title("mme", {"metric": "perception"}) == "MME perception score"
    assert column_title("textvqa_val", {"metric": "vqa_accuracy"}) == "TextVQA VQA accuracy"
    assert column_title("custom_task", None) == "custom_task"


def test_table_flags_cells_with_many_unparsed_answers():
    """The failure this guards against: vanilla answered noise, POPE scored it F1 66.67, and the
    reduced variant "kept 100% of vanilla". The cells must say so."""
    results = [_result("pope", "vanilla", 66.67, 10, tflops=0.00799),
               _result("pope", "ficoco-v@64", 66.67, 10, tflops=0.000746),
               _result("mme", "vanilla", 150.0, 0, tflops=0.00799), _result("mme", "ficoco-v@64", 140.0, 1, tflops=0.000746)]
    results[2]["score"]["metric"] = results[3]["score"]["metric"] = "perception"
    table = markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| variant | LLM TFLOPs (mean) | POPE F1 (mean of 3 splits) | MME perception score | % of vanilla |"
    assert lines[2].startswith("| vanilla | 0.00799 |") and "66.67 ⚠" in lines[2]  # no "0.00" TFLOPs
    assert "| vanilla | 100.0% ⚠ | 0.0% |" in table
    assert "| ficoco-v@64 | 100.0% ⚠ | 10.0% |" in table  # 10% is the threshold, not above it
    assert [(t, v) for t, v, _ in flagged(results)] == [("pope", "vanilla"), ("pope", "ficoco-v@64")]
    notes = warnings(results)
    assert len(notes) == 2 and all("could not be parsed" in n for n in notes)
    assert table.count("measures the answer format, not the model") == 2
    header = csv_table(results).splitlines()[0]
    assert header.endswith("unparsed POPE,unparsed MME")


def test_clean_results_carry_no_warning():
    table = markdown_table([_result("pope", "vanilla", 85.0, 0)])
    assert "⚠" not in table and "Warning" not in table and "| vanilla | 0.0% |" in table


# -- prompt formats --------------------------------------------------------------------------


@pytest.mark.parametrize("instruction", [VQA_POST, OPTION_POST, VIZWIZ_POST, MMBENCH_CN_POST])
def test_bare_question_drops_every_answer_instruction(instruction):
    assert bare_question("is there a cat?" + instruction) == "is there a cat?"
    assert bare_question(MMVET_PRE + "what is it?") == "what is it?"
    assert bare_question("no instruction here") == "no instruction here"


def test_prompt_format_auto_follows_the_checkpoint(tmp_path, embedded_checkpoint, checkpoint_with_processor):
    assert is_proxy_checkpoint(embedded_checkpoint) and not is_proxy_checkpoint(checkpoint_with_processor)
    assert resolve_prompt_format("auto", embedded_checkpoint) == "model"
    assert resolve_prompt_format("auto", checkpoint_with_processor) == "benchmark"
    assert resolve_prompt_format("benchmark", embedded_checkpoint) == "benchmark"
    with pytest.raises(ValueError, match="prompt format must be one of"):
        resolve_prompt_format("raw", embedded_checkpoint)
    records = [Record("pope", "1", "is there a cat?" + VQA_POST)]
    assert in_prompt_format(records, "model")[0].question == "is there a cat?"
    assert in_prompt_format(records, "benchmark") == records


# -- vocabulary ------------------------------------------------------------------------------


def test_vocabulary_check_names_unknown_words(embedded_checkpoint):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(embedded_checkpoint).tokenizer
    own = vocabulary_check(tokenizer, ["is there a red circle in the image?"])
    assert own.unknown == () and own.share == 0 and not own.mostly_unknown
    pope = vocabulary_check(tokenizer, ["is there a red circle?" + VQA_POST])
    assert set(pope.unknown) == {"question", "using", "single", "or", "phrase"} and not pope.mostly_unknown
    assert "5 of 16 words (31%)" in pope.describe()  # punctuation marks count as words
    french = vocabulary_check(tokenizer, ["Quelle est la couleur du carré ?"])
    assert french.mostly_unknown and french.unknown_count == 6


def test_vocabulary_check_is_silent_for_tokenizers_without_unknown_token():
    class ByteLevel:
        unk_token_id = None

    check = vocabulary_check(ByteLevel(), ["anything at all"])
    assert check.unknown == () and check.words == 3


# -- loading checkpoints ---------------------------------------------------------------------


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"sees no CUDA GPU; use --device cpu"):
            resolve_device("cuda:0")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fp8")


def test_checkpoint_problems_are_named(tmp_path, checkpoint, checkpoint_with_processor):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_processor(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_processor(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"has no processor: it lacks an image processor .* and a tokenizer"):
        load_processor(checkpoint)  # weights and config only
    assert load_processor(checkpoint_with_processor).tokenizer is not None
    config = json.loads((checkpoint / "config.json").read_text())
    check_supported(config, checkpoint)
    assert check_supported({"model_type": "qwen2_5_vl"}, "x").name.startswith("Qwen2-VL")
    assert check_supported({"model_type": "llava_next"}, "x").name == "LLaVA-NeXT"
    with pytest.raises(ValueError, match=r"'idefics3' checkpoint \(Idefics3ForConditionalGeneration\); ficoco "
                                         r"runs LLaVA-1.5 \(llava\); LLaVA-NeXT \(llava_next\); "
                                         r"LLaVA-NeXT-Video \(llava_next_video\); "
                                         r"LLaVA-OneVision \(llava_onevision\); Video-LLaVA \(video_llava\); "
                                         r"Qwen2-VL / Qwen2.5-VL"):
        check_supported({"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"]}, "x")


def test_results_say_which_textvqa_prompts_they_used():
    from ficoco.evaluation.report import markdown_table

    def result(with_ocr):
        return {"task": "textvqa_val", "variant": "vanilla", "score": {"accuracy": 50.0}, "llm_tflops": 1.0,
                "unparsed": 0.0, "ocr_reference": with_ocr}

    assert "TextVQA prompts: with the reference OCR tokens (LLaVA-1.5's setting)" in markdown_table([result(True)])
    assert "TextVQA prompts: without the reference OCR tokens" in markdown_table([result(False)])
    no_textvqa = {**result(True), "task": "pope"}
    del no_textvqa["ocr_reference"]
    assert "OCR" not in markdown_table([no_textvqa])
