"""Official-script scoring (ficoco.evaluation.metrics, .vqa_eval and the scorers of ficoco.evaluation.tasks):
every expected number is worked by hand."""

from __future__ import annotations

import pytest

from ficoco.evaluation.metrics import extract_option, score_exact_match
from ficoco.evaluation.tasks import SCORERS, TASKS, score_judged, score_multiple_choice
from ficoco.evaluation.tasks.mmbench import score_mmbench
from ficoco.evaluation.tasks.mme import (
    MME_COGNITION,
    MME_PERCEPTION,
    parse_mme_answer,
    score_mme,
)
from ficoco.evaluation.tasks.pope import parse_yes_no, score_pope
from ficoco.evaluation.vqa_eval import normalize_vqa_answer, score_vqa, vqa_accuracy

# ------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # final period dropped, "two" -> "2"
        ("the cat", "cat"),  # article dropped
        ("An Apple", "apple"),  # lower-cased, article dropped
        ("1,000", "1000"),  # comma between digits deleted
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("none", "0"),
        ("dont", "don't"),  # contraction table
        ("it's", "it 's"),  # EvalAI tokenizer splits "'s"
        ("red/blue", "red blue"),  # "/" touches no space -> becomes a space
        ("a (red) car", "red car"),  # " (" and ") " touch spaces -> deleted
        ("Yes!\n", "yes"),
    ],
)
def test_normalize_vqa_answer_evalai(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_normalize_vqa_answer_without_tokenizer_keeps_apostrophe_s():
    # vqaEval.py (and lmms-eval VQAv2) has no tokenizer step: "'" is not in the punctuation list.
    assert normalize_vqa_answer("it's", tokenize=False) == "it's"
    assert normalize_vqa_answer("Two dogs.", tokenize=False) == "2 dogs"
    # "?" touches no space and there is no digit,digit -> replaced by a space, then split away.
    assert normalize_vqa_answer("what?yes", tokenize=False) == "what yes"
    # "digit,digit" anywhere makes every listed mark vanish instead of becoming a space
    assert normalize_vqa_answer("1,000", tokenize=False) == "1000"
    assert normalize_vqa_answer("red/blue 1,2", tokenize=False) == "redblue 12"
    assert normalize_vqa_answer("red/blue 1, 2", tokenize=False) == "red blue 1 2"


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # m of the 10 answers equal the prediction. Leaving out a matching answer leaves m-1
        # matches, leaving out another leaves m; each subset scores min(1, matches/3).
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # = 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = (2/3 + 16/3)/10 = 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # = (2 + 7)/10 = 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # = 1.0
    ],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_values_worked_out():
    answers = ["dog", "Dog", "cat"] + ["bird"] * 7
    # "a dog." -> "dog"; "Dog" -> "dog": 2 matches -> 0.6 (see above)
    assert vqa_accuracy("a dog.", answers) == pytest.approx(0.6)
    # answers may be VQAv2-style dicts
    assert vqa_accuracy("dog", [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]) == pytest.approx(0.6)


def test_vqa_accuracy_official_vqaeval_rule():
    # vqaEval.py always normalises the prediction (punctuation, then lower case, number words,
    # articles): "Yes" against ten "yes", and "two" against ten "2", both match
    assert vqa_accuracy("Yes", ["yes"] * 10, rule="vqaeval") == 1.0
    assert vqa_accuracy("two", ["2"] * 10, rule="vqaeval") == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    # the human answers only get the punctuation step, and only when they differ: nine "two"
    # stay "two" and do not match the normalised "2"; lmms-eval normalises them too
    assert vqa_accuracy("2", ["two"] * 9 + ["3"], rule="vqaeval") == 0.0
    assert vqa_accuracy("2", ["two"] * 9 + ["3"]) == 1.0
    # unanimous answers are compared raw: a unanimous "Yes" is not matched by "yes"
    assert vqa_accuracy("yes", ["Yes"] * 10, rule="vqaeval") == 0.0
    with pytest.raises(ValueError, match="unknown VQA answer rule 'official'; one of lmms-eval, vqaeval"):
        vqa_accuracy("yes", ["yes"], rule="official")


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_score_vqa_mean_and_answer_types():
    records = [
        {"prediction": "Two", "answers": ["2", "2"] + ["3"] * 8, "answer_type": "number"},  # 0.6
        {"prediction": "yes", "answers": ["yes"] * 10, "answer_type": "yes/no"},  # 1.0
        {"prediction": "no", "answers": ["yes"] * 10, "answer_type": "yes/no"},  # 0.0
    ]
    result = score_vqa(records)
    # (0.6 + 1.0 + 0.0) / 3 = 0.5333.. -> 53.33 %
    assert result["score"] == pytest.approx(160 / 3)
    assert result["n"] == 3
    assert result["per_answer_type"] == pytest.approx({"number": 60.0, "yes/no": 50.0})
    assert "unanswerability" not in result


def test_vizwiz_unanswerable_and_unanswerability_metrics():
    records = [
        {"prediction": "Unanswerable.", "answers": ["unanswerable"] * 10, "answerable": 0},
        {"prediction": "a red mug", "answers": ["unanswerable"] * 10, "answerable": 0},
        {"prediction": "red mug", "answers": ["red mug"] * 10, "answerable": 1},
        {"prediction": "blue", "answers": ["red"] * 10, "answerable": 1},
    ]
    result = SCORERS["vizwiz_vqa_val"](records)
    # accuracies 1, 0, 1, 0 -> 50 %; one prediction normalises to "unanswerable"
    assert result["score"] == pytest.approx(50.0)
    assert result["unanswerable_predictions"] == 1
    # positive class = unanswerable: TP = 1, FP = 0, FN = 1 -> F1 = 2/(2+0+1) = 2/3
    # AP = R*P + (1-R)*positives/N = 0.5*1 + 0.5*(2/4) = 0.75
    assert result["unanswerability"]["f1"] == pytest.approx(200 / 3)
    assert result["unanswerability"]["average_precision"] == pytest.approx(75.0)


def test_vqav2_and_textvqa_differ_only_in_tokenizer():
    record = {"prediction": "it's", "answers": ["it's"] * 10}
    assert SCORERS["vqav2_val"]([record])["score"] == 100.0  # "it's" == "it's"
    assert SCORERS["textvqa_val"]([record])["score"] == 100.0  # "it 's" == "it 's"
    # the tokenizer deletes "," outright, vqaEval turns a lone "," into a space:
    tokenized = {"prediction": "red,blue", "answers": ["redblue"] * 10}
    assert SCORERS["textvqa_val"]([tokenized])["score"] == 100.0
    assert SCORERS["vqav2_val"]([tokenized])["score"] == 0.0  # "red blue" != "redblue"


# ------------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a dog in the image", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("no, it is not", "no"),
        ("Not at all", None),  # "Not" is not in POPE's list ("No", "not", "no")
        ("I see a cat", None),
        ("", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_score_pope_confusion_matrices():
    random_split = [
        ("Yes", "yes"),  # TP
        ("Yes.", "yes"),  # TP
        ("No", "yes"),  # FN
        ("No", "no"),  # TN
        ("Yes", "no"),  # FP
        ("I see a cat", "no"),  # unparsed -> "yes" -> FP
    ]
    adversarial = [("yes", "yes"), ("no", "no")]  # TP, TN
    records = [{"prediction": p, "answer": a, "category": "random"} for p, a in random_split]
    records += [{"prediction": p, "answer": a.capitalize(), "category": "adversarial"} for p, a in adversarial]
    result = score_pope(records)

    r = result["per_split"]["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 2, 1, 1)
    assert r["accuracy"] == pytest.approx(50.0)  # (2+1)/6
    assert r["precision"] == pytest.approx(50.0)  # 2/(2+2)
    assert r["recall"] == pytest.approx(200 / 3)  # 2/(2+1)
    assert r["f1"] == pytest.approx(100 * 4 / 7)  # 2*(1/2)(2/3)/(1/2+2/3) = (2/3)/(7/6) = 4/7
    assert r["yes_ratio"] == pytest.approx(200 / 3)  # 4 predicted yes of 6

    a = result["per_split"]["adversarial"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == (100.0, 100.0, 100.0, 100.0, 50.0)

    o = result["overall"]  # pooled: TP 3, FP 2, TN 2, FN 1
    assert o["accuracy"] == pytest.approx(62.5)  # 5/8
    assert o["precision"] == pytest.approx(60.0)  # 3/5
    assert o["recall"] == pytest.approx(75.0)  # 3/4
    assert o["f1"] == pytest.approx(100 * 2 / 3)  # 2*.6*.75/1.35 = 0.9/1.35
    assert o["yes_ratio"] == pytest.approx(62.5)  # 5/8

    assert result["score"] == pytest.approx((100 * 4 / 7 + 100) / 2)  # mean F1 of the splits
    assert result["n_unparsed"] == 1
    assert result["n"] == 8


def test_score_pope_rejects_bad_gold():
    with pytest.raises(ValueError):
        score_pope([{"prediction": "yes", "answer": "maybe"}])


def test_score_pope_zero_division_is_zero():
    # all predicted "no": precision 0/0 -> 0 (lmms-eval), recall 0/1 -> 0, F1 -> 0
    result = score_pope([{"prediction": "no", "answer": "yes"}, {"prediction": "no", "answer": "no"}])
    assert result["per_split"]["all"]["precision"] == 0.0
    assert result["per_split"]["all"]["f1"] == 0.0
    assert result["per_split"]["all"]["accuracy"] == 50.0


# ------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("n", "no"),
        ("Y", "yes"),
        ("Yes, it is.", "yes"),
        ("Nope", "no"),
        ("Maybe", "other"),
    ],
)
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def test_score_mme_acc_and_acc_plus():
    def rec(cat, image, pred, gold):
        return {"category": cat, "question_id": image, "prediction": pred, "answer": gold}

    records = [
        # existence: img1 both right, img2 one right, img3 none right
        rec("existence", "e/1.jpg", "Yes", "Yes"),
        rec("existence", "e/1.jpg", "No", "No"),
        rec("existence", "e/2.jpg", "Yes", "Yes"),
        rec("existence", "e/2.jpg", "Yes", "No"),
        rec("existence", "e/3.jpg", "No", "Yes"),
        rec("existence", "e/3.jpg", "I am not sure", "No"),  # "other" -> wrong
        # code_reasoning: one image, both right
        rec("code_reasoning", "c/1.png", "yes", "Yes"),
        rec("code_reasoning", "c/1.png", "no", "No"),
    ]
    result = score_mme(records)
    ex = result["per_subtask"]["existence"]
    assert ex["accuracy"] == pytest.approx(50.0)  # 3 of 6 questions
    assert ex["accuracy_plus"] == pytest.approx(100 / 3)  # 1 of 3 images
    assert ex["score"] == pytest.approx(50 + 100 / 3)
    assert result["per_subtask"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert result["perception"] == pytest.approx(50 + 100 / 3)
    assert result["cognition"] == pytest.approx(200.0)
    assert result["total"] == pytest.approx(250 + 100 / 3)
    assert result["score"] == result["perception"]
    assert result["n_other"] == 1


def test_score_mme_checks_pairs_and_subtasks():
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4
    with pytest.raises(ValueError, match="two questions"):
        score_mme([{"category": "count", "image_id": 1, "prediction": "Yes", "answer": "Yes"}])
    with pytest.raises(ValueError, match="unknown MME subtask"):
        score_mme([{"category": "counting", "image_id": 1, "prediction": "Yes", "answer": "Yes"}] * 2)


# ----------------------------------------------------------------------- option extraction

COLORS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize(
    ("prediction", "options", "expected"),
    [
        ("B", COLORS, "B"),
        ("The answer is B.", COLORS, "B"),  # token "B." (letter + ".")
        ("Answer: A", COLORS, "A"),  # one bare letter, 2 tokens
        ("(A)", COLORS, "A"),
        ("A.", COLORS, "A"),
        ("(c) blue", COLORS, "C"),  # "(c)" is not "(C)"; the option text "blue" decides
        ("(c)", COLORS, None),  # letters are case-sensitive, no option text present
        ("It is green", COLORS, "B"),  # option text without a letter
        ("A or B", COLORS, None),  # two bare letters: ambiguous
        ("A. red or B. green", COLORS, None),  # two "X." letters, two option texts
        ("red and blue", COLORS, None),  # two option texts
        ("A cat sits on the mat", {"A": "dog", "B": "cat"}, "B"),  # "A" is an article here
        ("nothing matches", COLORS, None),
    ],
)
def test_extract_option(prediction, options, expected):
    assert extract_option(prediction, options) == expected


def test_score_multiple_choice_scienceqa_rule():
    records = [
        {"prediction": "A", "answer": 0},  # right
        {"prediction": "b", "answer": 1},  # right: whole answer is the letter, any case
        {"prediction": "C. blue", "answer": 2},  # right: "X." prefix
        {"prediction": "c. blue", "answer": 2},  # no letter: lower-case before "."
        {"prediction": "The answer is D", "answer": 3},  # no letter under ScienceQA's rule
    ]
    result = SCORERS["scienceqa_img"](records)
    assert result["score"] == pytest.approx(60.0)  # 3 of 5
    assert result["n_unparsed"] == 2


def test_score_multiple_choice_seedbench_rule():
    records = [
        {"prediction": "B", "answer": "B", "data_type": "image"},  # right
        {"prediction": "Bananas", "answer": "B", "data_type": "image"},  # first char "B": right
        {"prediction": "The answer is C", "answer": "C", "data_type": "image"},  # "T": wrong
        {"prediction": "d", "answer": "D", "data_type": "video"},  # right (case-insensitive)
    ]
    result = SCORERS["seedbench"](records)
    assert result["score"] == pytest.approx(75.0)
    assert result["per_data_type"] == pytest.approx({"image": 200 / 3, "video": 100.0})


def test_score_multiple_choice_extract_rule():
    records = [
        {"prediction": "The answer is B.", "answer": "B", "options": COLORS},  # right
        {"prediction": "It is blue", "answer": "B", "options": COLORS},  # C: wrong
        {"prediction": "A or B", "answer": "A", "options": ["red", "green"]},  # None: wrong
    ]
    result = score_multiple_choice(records)
    assert result["score"] == pytest.approx(100 / 3)
    assert result["n_unparsed"] == 1
    with pytest.raises(ValueError):
        score_multiple_choice(records, rule="nope")


# --------------------------------------------------------------------------------- MMBench


def _circular(qid: int, texts: list[str], gold_text: str, preds: list[str], category: str) -> list[dict]:
    """4 circular variants: variant k rotates the options by k; its gold letter moves with it."""
    out = []
    for k, pred in enumerate(preds):
        rotated = texts[k:] + texts[:k]
        options = dict(zip("ABCD", rotated))
        gold = "ABCD"[rotated.index(gold_text)]
        index = qid + k * 1_000_000
        out.append({"index": index, "prediction": pred, "answer": gold, "options": options, "category": category})
    return out


def test_mmbench_circular_evaluation():
    texts = ["red", "green", "blue", "yellow"]
    # gold "blue": letters per variant are C, B, A, D
    q1 = _circular(1, texts, "blue", ["C", "B", "A", "A"], "color")  # variant 3 wrong -> question wrong
    q2 = _circular(2, texts, "blue", ["C", "(B)", "A.", "Answer: D"], "color")  # all right
    q3 = _circular(3, texts, "blue", ["C", "B", "A", "I don't know"], "shape")  # one unparsed
    records = q1 + q2 + q3
    result = score_mmbench(records)
    assert result["n"] == 3 and result["n_records"] == 12
    assert result["score"] == pytest.approx(100 / 3)  # only q2
    assert result["n_unresolved"] == 1  # q3 failed only for want of a matcher
    assert result["per_category"] == pytest.approx({"color": 50.0, "shape": 0.0})

    # a fallback matcher (GPT in MMBench) resolves q3's last variant (gold "D")
    seen = []

    def fallback(record):
        seen.append(record["index"])
        return "D"

    with_fallback = score_mmbench(records, fallback=fallback)
    assert with_fallback["score"] == pytest.approx(200 / 3)
    assert seen == [3_000_003]  # consulted only for the unparsed variant
    assert SCORERS["mmbench_en_dev"](records)["score"] == pytest.approx(100 / 3)


def test_mmbench_options_from_letter_columns_and_wrong_parse_short_circuits():
    rows = [
        {"index": 7, "prediction": "I don't know", "answer": "A", "A": "cat", "B": "dog", "C": "nan", "D": None},
        {"index": 1_000_007, "prediction": "A", "answer": "B", "A": "dog", "B": "cat", "C": "nan", "D": None},
    ]
    calls = []
    # variant 2 parses to a wrong letter, so the question fails before any fallback is asked
    result = score_mmbench(rows, fallback=lambda r: calls.append(r) or "A")
    assert result["score"] == 0.0 and calls == []
    # "cat" in the text picks option A by text (the "nan" option C is ignored)
    rows[0]["prediction"] = "a cat"
    rows[1]["prediction"] = "the cat"
    assert score_mmbench(rows)["score"] == 100.0


# ------------------------------------------------------------------------------------- GQA


def test_score_exact_match_gqa():
    records = [
        {"prediction": "Yes.", "answer": "yes"},  # "yes" == "yes"
        {"prediction": " Left ", "answer": "left"},  # stripped
        {"prediction": "T-shirt", "answer": "tshirt"},  # punctuation deleted
        {"prediction": "on the left", "answer": "left"},  # no article removal here
    ]
    result = score_exact_match(records)
    assert result["score"] == pytest.approx(75.0)
    assert SCORERS["gqa"](records)["score"] == pytest.approx(75.0)


# ------------------------------------------------------------------------------ GPT-judged


def test_judged_without_judge_is_skipped():
    records = [{"question": "q", "answer": "a", "prediction": "p"}]
    for task in ("mmvet", "llava_in_the_wild", "tgif_qa", "msvd_qa", "msrvtt_qa", "activitynetqa"):
        result = SCORERS[task](records)
        assert result["skipped"] is True
        assert result["score"] is None
        assert "no judge" in result["reason"]


def test_mmvet_judge_aggregation():
    records = [
        {"question": "q1", "answer": "a1", "prediction": "p1", "capability": "rec,ocr"},
        {"question": "q2", "answer": "a2", "prediction": "p2", "capability": "ocr"},
        {"question": "q3", "answer": "a3", "prediction": "p3", "capability": ["rec", "know"]},
    ]
    marks = {"p1": 1.0, "p2": 0.5, "p3": 0.0}
    result = score_judged(records, judge=lambda q, ref, pred: marks[pred])
    assert result["skipped"] is False
    assert result["score"] == pytest.approx(50.0)  # (1 + 0.5 + 0)/3
    # rec: (1 + 0)/2; ocr: (1 + 0.5)/2; know: 0/1
    assert result["per_capability"] == pytest.approx({"rec": 50.0, "ocr": 75.0, "know": 0.0})
    with pytest.raises(ValueError):
        score_judged(records, judge=lambda q, ref, pred: 7)


def test_llava_bench_relative_score():
    records = [
        {"question": "q1", "answer": "ref1", "prediction": "p1", "category": "conv", "context": "c1"},
        {"question": "q2", "answer": "ref2", "prediction": "p2", "category": "detail", "caption": ["c2", "c3"]},
    ]
    pairs = {"p1": (8, 6), "p2": (10, 9)}
    contexts = []

    def judge(question, reference, prediction, *, context):
        contexts.append(context)
        return pairs[prediction]

    result = SCORERS["llava_in_the_wild"](records, judge=judge)
    # means: reference (8+10)/2 = 9, model (6+9)/2 = 7.5 -> 7.5/9 = 83.33 %
    assert result["score"] == pytest.approx(250 / 3)
    assert result["per_category"]["conv"]["relative_score"] == pytest.approx(75.0)  # 6/8
    assert result["per_category"]["detail"]["relative_score"] == pytest.approx(90.0)  # 9/10
    assert contexts == ["c1", "c2\nc3"]
    with pytest.raises(ValueError):
        SCORERS["llava_in_the_wild"](records, judge=lambda *a, **k: 0.5)


# -------------------------------------------------------------------------------- registry


def test_registry_names_and_immutability():
    assert set(SCORERS) == {
        "textvqa_val",
        "vqav2_val",
        "vizwiz_vqa_val",
        "pope",
        "mme",
        "scienceqa_img",
        "seedbench",
        "gqa",
        "mmbench_en_dev",
        "mmbench_cn_dev",
        "mmvet",
        "llava_in_the_wild",
        "mmmu_val",
        "tgif_qa",
        "msvd_qa",
        "msrvtt_qa",
        "activitynetqa",
    }
    with pytest.raises(TypeError):
        SCORERS["new"] = score_vqa  # type: ignore[index]


def test_empty_records_rejected():
    with pytest.raises(ValueError):
        score_pope([])


# ------------------------------------------------------------------------------ unparsed answers


def _records_for(task: str, predictions: list[str]) -> list[dict]:
    """Two-or-more valid records of ``task`` with the given predictions."""
    if task == "pope":
        return [{"prediction": p, "answer": "yes", "category": "random"} for p in predictions]
    if task == "mme":
        return [{"prediction": p, "answer": "Yes", "category": "existence", "image_id": i // 2}
                for i, p in enumerate(predictions)]
    if task in ("scienceqa_img", "seedbench"):
        return [{"prediction": p, "answer": "A", "options": {"A": "cat", "B": "dog"}} for p in predictions]
    if task.startswith("mmbench"):
        return [{"prediction": p, "answer": "A", "index": i, "A": "cat", "B": "dog"} for i, p in enumerate(predictions)]
    if task in ("mmvet", "llava_in_the_wild"):
        return [{"prediction": p, "answer": "a cat", "question": "what?"} for p in predictions]
    if task == "gqa":
        return [{"prediction": p, "answer": "cat"} for p in predictions]
    if task == "mmmu_val":
        return [{"prediction": p, "answer": "A", "sample_id": f"validation_Art_{i}", "question_type": "multiple-choice",
                 "options": {"A": "cat", "B": "dog"}} for i, p in enumerate(predictions)]
    if TASKS[task].modality == "video":
        return [{"prediction": p, "answer": "a cat", "question": "what?"} for p in predictions]
    return [{"prediction": p, "answers": ["cat"] * 10} for p in predictions]


@pytest.mark.parametrize("task", sorted(SCORERS))
def test_every_scorer_counts_unparsed_answers(task):
    """Every benchmark says how many answers its parser could not read: a garbage answer ("maybe so"
    has no yes/no and no option letter; "" is empty) counts, a well-formed one does not."""
    from ficoco.evaluation.metrics import unparsed_share
    from ficoco.evaluation.tasks import is_unparsed

    good = {"pope": "yes", "mme": "Yes", "scienceqa_img": "A", "seedbench": "A", "mmbench_en_dev": "A",
            "mmbench_cn_dev": "A", "mmmu_val": "A"}.get(task, "cat")
    free_form = ("textvqa_val", "vqav2_val", "vizwiz_vqa_val", "gqa", "mmvet", "llava_in_the_wild", "mmmu_val")
    bad = "" if task in free_form or TASKS[task].modality == "video" else "maybe so"
    if task == "seedbench":
        bad = ""  # SEED-Bench reads the first character: only an empty answer has none
    result = SCORERS[task](_records_for(task, [good, bad, bad, good]))
    assert result["n_unparsed"] == 2, result
    assert unparsed_share(result) == 0.5
    assert is_unparsed(task, bad) and not is_unparsed(task, good)


def test_unparsed_share_is_none_without_a_count():
    from ficoco.evaluation.metrics import unparsed_share

    assert unparsed_share({"score": 1.0, "n": 4}) is None
    assert unparsed_share({"n_unparsed": 1, "n": 4, "n_records": 8}) == 0.125  # MMBench: per record


def test_answer_format_by_task_name():
    from ficoco.evaluation.tasks import answer_format, is_unparsed

    assert answer_format("pope_adv") == "yes/no" and answer_format("mme") == "yes/no"
    assert answer_format("mmbench_en_test") == "an option letter" and answer_format("textvqa_val") == "any text"
    assert is_unparsed("pope_pop", "b") and not is_unparsed("pope_pop", "No, there is not.")
    assert is_unparsed("mme", "maybe") and not is_unparsed("mme", "y")
