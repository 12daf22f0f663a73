"""Benchmark scoring that reproduces the official evaluation scripts.

Every scorer takes ``records``: an iterable of mappings (one per question) holding the model's
``prediction`` (the generated text) and the benchmark's ground truth, and returns a plain ``dict``.
Each result carries ``metric`` (name of the headline number), ``score`` (that number) and ``n``
(records scored), plus benchmark-specific breakdowns. Units follow the papers' tables:

* accuracies, precision, recall, F1, yes-ratio: **percent** (0-100);
* MME: **points** (per subtask ``accuracy + accuracy+``, 0-200; perception sums 10 subtasks, max
  2000; cognition sums 4, max 800);
* LLaVA-Bench: the relative score in percent (mean model score / mean reference score x 100).

Every result also carries ``n_unparsed``: the answers the benchmark's own parser could not read
(POPE: neither yes nor no, counted as "yes" by POPE's rule; MME: neither yes nor no; multiple
choice: no option letter; VQA, GQA and the judged tasks: an empty answer). A score computed over
many unparsed answers measures the answer format, not the model: :func:`unparsed_share` gives the
share, and the evaluation runner reports and flags it.

``SCORERS`` maps lmms-eval task names to scorers; call ``SCORERS[task](records, **kwargs)``.

Sources (facts and formulas, not code, were taken from them):

* VQA answer normalisation and accuracy: ``GT-Vision-Lab/VQA``,
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``; the EvalAI answer processor of
  ``EvolvingLMMs-Lab/lmms-eval`` ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py`` and its use in
  ``tasks/{textvqa,vqav2,vizwiz_vqa}/utils.py``; unanswerability metrics from the VizWiz API's
  ``vqaEval.py``.
* POPE: ``haotian-liu/LLaVA`` ``llava/eval/eval_pope.py`` (the same rule as POPE's own
  ``evaluate.py``); split field as in lmms-eval ``tasks/pope``.
* MME: lmms-eval ``tasks/mme/utils.py`` (answer parser, subtask lists, acc + acc+).
* ScienceQA-IMG / SEED-Bench: lmms-eval ``tasks/scienceqa/utils.py`` / ``tasks/seedbench/utils.py``.
* GQA: lmms-eval ``tasks/gqa/gqa.yaml`` (``exact_match``, ignore case and punctuation) with
  ``lmms_eval/api/metrics.py`` and the stripping of generations in ``lmms_eval/api/task.py``.
* MMBench: lmms-eval ``tasks/mmbench/mmbench_evals.py`` (circular evaluation, rule-based
  option matching ``can_infer``).
* MM-Vet / LLaVA-Bench: lmms-eval ``tasks/mmvet/utils.py`` / ``tasks/llava-in-the-wild/utils.py``
  (aggregation only; the GPT judge is the caller's ``judge``).
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

__all__ = (
    "Record",
    "SCORERS",
    "MME_PERCEPTION",
    "MME_COGNITION",
    "MMVET_CAPABILITIES",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "score_vqa",
    "score_textvqa",
    "score_vqav2",
    "score_vizwiz",
    "parse_yes_no",
    "score_pope",
    "parse_mme_answer",
    "score_mme",
    "extract_option",
    "score_multiple_choice",
    "score_scienceqa",
    "score_seedbench",
    "score_mmbench",
    "score_exact_match",
    "score_gqa",
    "score_judged",
    "score_mmvet",
    "score_llava_bench",
    "unparsed_share",
    "answer_format",
    "is_unparsed",
)

Record = Mapping[str, Any]
"""One scored question: a mapping with at least ``prediction`` and the benchmark's ground truth."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _as_list(records: Iterable[Record]) -> list[Record]:
    rows = list(records)
    if not rows:
        raise ValueError("no records to score")
    return rows


def _text(value: Any) -> str:
    """A generation as text; ``None`` (no output) becomes ``""`` as in lmms-eval."""
    return "" if value is None else str(value)


def _first(record: Record, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return default


def _pct(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def _count_empty(rows: Sequence[Record]) -> int:
    """Answers with no text at all: what "unparsed" means for free-form answers."""
    return sum(not _text(row.get("prediction")).strip() for row in rows)


def unparsed_share(score: Mapping[str, Any]) -> float | None:
    """Share (0-1) of the answers behind ``score`` that its parser could not read, or ``None``
    when the result does not say (``n_unparsed`` over the records scored)."""
    unparsed = score.get("n_unparsed")
    total = score.get("n_records", score.get("n"))
    if unparsed is None or not total:
        return None
    return unparsed / total


# --------------------------------------------------------------------------------------------
# VQA normalisation (VQA API / EvalAI answer processor)
# --------------------------------------------------------------------------------------------

# The official contraction table, ``key=value`` pairs. It keeps the official quirks: keys with
# capitals ("Im", "Ive", ...) can never match because words are lower-cased first, and
# "somebody'd" maps to "somebodyd".
_CONTRACTIONS: Mapping[str, str] = MappingProxyType(
    dict(
        pair.split("=", 1)
        for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've
    hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've
    Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've
    itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
    mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
    oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
    shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
    shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
    somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
    someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
    twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't
    whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
    wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
    whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
    wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
    y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
    youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()
    )
)
_NUMBER_WORDS: Mapping[str, str] = MappingProxyType(
    {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
    | {"none": "0"}
)
_ARTICLES = frozenset({"a", "an", "the"})
# Removed (or turned into a space, see _process_punctuation); "." is handled separately and "'"
# and ":" are kept.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-*ahead* for the
# text "<=digit", which can never match at a ".", so the effective rule is "a period not followed
# by a digit". The official call passes re.UNICODE (= 32) positionally as ``count``.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_MAX_SUBS = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    # Decisions look at the *input* text, as the official loop does: a mark is deleted when it
    # touches a space somewhere in the input or when the input has "digit,digit"; otherwise each
    # occurrence becomes a space.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_SUBS)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str, *, tokenize: bool = True) -> str:
    """Normalise a VQA answer as the official evaluators do before comparing strings.

    Steps: (tokenize only) lower-case, delete "," and "?", split "'s" into " 's"; newlines and
    tabs to spaces and strip; punctuation (21 marks, deleted or replaced by a space; all deleted
    when the text contains "digit,digit"); periods not followed by a digit deleted; lower-case,
    number words "none"/"zero".."ten" to digits, articles "a"/"an"/"the" dropped, contractions
    restored from the official table ("dont" -> "don't"); words re-joined with single spaces.

    Args:
        text: answer or prediction.
        tokenize: True gives the EvalAI answer processor (lmms-eval TextVQA and VizWiz, LLaVA's
            m4c evaluator); False gives ``vqaEval.py``'s processing (also lmms-eval VQAv2), which
            skips the first step.

    Examples: ``"Two dogs."`` -> ``"2 dogs"``, ``"the cat"`` -> ``"cat"``, ``"1,000"`` -> ``"1000"``,
    ``"it's"`` -> ``"it 's"`` (tokenize) / ``"it's"`` (not).
    """
    text = _text(text)
    if tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean_whitespace(text)
    return _process_digit_article(_process_punctuation(text))


def _answer_text(answer: Any) -> str:
    # VQAv2 rows hold {"answer": ..., "answer_id": ...} dicts; TextVQA/VizWiz rows hold strings.
    if isinstance(answer, Mapping):
        return _text(answer.get("answer"))
    return _text(answer)


#: the answer-matching rules :func:`vqa_accuracy` offers
VQA_RULES = ("lmms-eval", "vqaeval")


def vqa_accuracy(
    prediction: str,
    answers: Sequence[Any],
    *,
    tokenize: bool = True,
    rule: str = "lmms-eval",
) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10), in [0, 1].

    For each human answer i, count the *other* answers equal to the (normalised) prediction,
    score ``min(1, matches / 3)``; return the mean over the leave-one-out subsets.

    Args:
        prediction: the model's answer.
        answers: the human answers, as strings or ``{"answer": ...}`` mappings.
        tokenize: see :func:`normalize_vqa_answer` (``rule="lmms-eval"`` only).
        rule: ``"lmms-eval"`` normalises the prediction and every answer alike (lmms-eval, the
            EvalAI processor); ``"vqaeval"`` is the official ``vqaEval.py``: the prediction always
            gets the punctuation and digit/article steps, the human answers only the punctuation
            step and only when they are not all identical (so a unanimous ``"2"`` matches ``"two"``
            but nine ``"two"`` and a ``"3"`` do not match ``"2"``).
    """
    if rule not in VQA_RULES:
        raise ValueError(f"unknown VQA answer rule {rule!r}; one of {', '.join(VQA_RULES)}")
    raw = [_answer_text(a) for a in answers]
    if not raw:
        raise ValueError("vqa_accuracy needs at least one human answer")
    prediction = _text(prediction)
    if rule == "lmms-eval":
        gts = [normalize_vqa_answer(a, tokenize=tokenize) for a in raw]
        pred = normalize_vqa_answer(prediction, tokenize=tokenize)
    else:
        pred = _process_digit_article(_process_punctuation(_clean_whitespace(prediction)))
        gts = [_process_punctuation(a) for a in raw] if len(set(raw)) > 1 else raw
    total = sum(gt == pred for gt in gts)
    return sum(min(1.0, (total - (gt == pred)) / 3.0) for gt in gts) / len(gts)


def _unanswerability(rows: list[Record], preds: list[str]) -> dict[str, float] | None:
    """VizWiz unanswerability F1 and average precision (positive class: unanswerable), percent.

    The prediction is binary (normalised answer == "unanswerable"), so sklearn's
    ``average_precision_score`` reduces to R1*P1 + (1 - R1)*positives/N, with (P1, R1) the
    precision/recall of the binary prediction.
    """
    if not all("answerable" in r and r["answerable"] is not None for r in rows):
        return None
    gold = [int(r["answerable"]) == 0 for r in rows]
    flagged = [p == "unanswerable" for p in preds]
    positives = sum(gold)
    if positives == 0:
        return None
    tp = sum(g and f for g, f in zip(gold, flagged))
    fp = sum(f and not g for g, f in zip(gold, flagged))
    fn = positives - tp
    n = len(rows)
    base = positives / n
    if tp + fp == 0:
        ap = base
    else:
        recall = tp / positives
        ap = recall * tp / (tp + fp) + (1.0 - recall) * base
    f1 = 2 * tp / (2 * tp + fp + fn)
    return {"f1": 100.0 * f1, "average_precision": 100.0 * ap}


def score_vqa(
    records: Iterable[Record],
    *,
    tokenize: bool = True,
    rule: str = "lmms-eval",
) -> dict[str, Any]:
    """Mean VQA accuracy (percent) for TextVQA / VQAv2 / VizWiz.

    Records: ``prediction`` and ``answers`` (the human answers); optional ``answer_type`` adds
    ``per_answer_type``; optional ``answerable`` (0/1, VizWiz) adds ``unanswerability`` (F1 and
    average precision of predicting "unanswerable", percent, as the VizWiz API reports).
    ``unanswerable_predictions`` counts predictions that normalise to "unanswerable".
    """
    rows = _as_list(records)
    accs, preds = [], []
    by_type: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("answers") is None:
            raise ValueError("VQA records need 'answers' (the human answers)")
        acc = vqa_accuracy(
            _text(row.get("prediction")), row["answers"], tokenize=tokenize, rule=rule
        )
        accs.append(acc)
        preds.append(normalize_vqa_answer(_text(row.get("prediction")), tokenize=tokenize))
        if row.get("answer_type") is not None:
            by_type[str(row["answer_type"])].append(acc)
    accuracy = _pct(sum(accs), len(accs))
    result: dict[str, Any] = {
        "metric": "vqa_accuracy",
        "score": accuracy,
        "accuracy": accuracy,
        "n": len(rows),
        "n_unparsed": _count_empty(rows),
        "unanswerable_predictions": sum(p == "unanswerable" for p in preds),
    }
    if by_type:
        result["per_answer_type"] = {k: _pct(sum(v), len(v)) for k, v in sorted(by_type.items())}
    unans = _unanswerability(rows, preds)
    if unans is not None:
        result["unanswerability"] = unans
    return result


def score_textvqa(records: Iterable[Record]) -> dict[str, Any]:
    """TextVQA val as lmms-eval ``textvqa_val``: EvalAI processor on prediction and answers."""
    return score_vqa(records, tokenize=True)


def score_vqav2(records: Iterable[Record]) -> dict[str, Any]:
    """VQAv2 val as lmms-eval ``vqav2_val``: ``vqaEval.py`` punctuation/digit/article steps only."""
    return score_vqa(records, tokenize=False)


def score_vizwiz(records: Iterable[Record]) -> dict[str, Any]:
    """VizWiz-VQA val as lmms-eval ``vizwiz_vqa_val``.

    "unanswerable" is an ordinary answer string (the prompt asks the model to reply
    'Unanswerable', which normalises to it); see :func:`score_vqa` for the unanswerability extras.
    """
    return score_vqa(records, tokenize=True)


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------

_POPE_NEGATIONS = frozenset({"No", "not", "no"})


def parse_yes_no(text: str) -> Literal["yes", "no"] | None:
    """Read a yes/no answer the way POPE's evaluation does.

    Keep the text before the first ".", delete commas, split on single spaces; any of the words
    "No", "not", "no" (case as written) means "no". Otherwise "yes" if a word is yes (any case,
    surrounding punctuation ignored), else None. POPE's script scores None as "yes"
    (:func:`score_pope` does too and counts them in ``n_unparsed``).
    """
    text = _text(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if any(w in _POPE_NEGATIONS for w in words):
        return "no"
    if any(w.strip(string.punctuation).lower() == "yes" for w in words):
        return "yes"
    return None


def _binary_metrics(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """pairs: (predicted, gold) with values "yes"/"no"; "yes" is the positive class."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {
        "accuracy": _pct(tp + tn, n),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": _pct(tp + fp, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


_POPE_MEANED = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def score_pope(records: Iterable[Record]) -> dict[str, Any]:
    """POPE: accuracy, precision, recall, F1 (positive class "yes") and yes-ratio, percent.

    Records: ``prediction``, ``answer`` (or ``label``) "yes"/"no", and the split in ``category``
    (or ``split``): adversarial / popular / random; without one all records form split "all".
    Predictions go through :func:`parse_yes_no`; unparsed ones count as "yes" (POPE's rule).
    yes-ratio is the share of *predicted* "yes" (POPE/LLaVA; lmms-eval's aggregator uses the
    gold labels instead). An undefined precision/recall/F1 (0/0) is reported as 0, as lmms-eval does.

    Returns ``per_split`` (each with the metrics and tp/fp/tn/fn), ``overall`` (all records
    pooled, like lmms-eval's ``pope`` task), ``mean`` (unweighted mean of the splits' metrics) and
    ``score`` = mean F1 over the splits (how LLaVA-1.5 reports POPE).
    """
    rows = _as_list(records)
    by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
    unparsed = 0
    for row in rows:
        gold = str(_first(row, "answer", "label", default="")).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"POPE gold answer must be yes/no, got {gold!r}")
        parsed = parse_yes_no(_text(row.get("prediction")))
        unparsed += parsed is None
        split = str(_first(row, "category", "split", default="all"))
        by_split[split].append((parsed or "yes", gold))
    per_split = {name: _binary_metrics(pairs) for name, pairs in sorted(by_split.items())}
    overall = _binary_metrics([pair for pairs in by_split.values() for pair in pairs])
    mean = {k: sum(s[k] for s in per_split.values()) / len(per_split) for k in _POPE_MEANED}
    return {
        "metric": "f1 (mean over splits)",
        "score": mean["f1"],
        "per_split": per_split,
        "overall": overall,
        "mean": mean,
        "n": len(rows),
        "n_unparsed": unparsed,
    }


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> Literal["yes", "no", "other"]:
    """lmms-eval's MME answer parser: lower-case, strip, delete "."; "yes"/"no" as is, a lone
    "y"/"n", else "yes"/"no" if found in the first 4 characters (yes checked first), else "other"."""
    text = _text(text).lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text  # type: ignore[return-value]
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")  # type: ignore[return-value]
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme(records: Iterable[Record]) -> dict[str, Any]:
    """MME: per-subtask score = accuracy + accuracy+ (both percent), perception and cognition sums.

    Records: ``prediction``, ``answer`` ("Yes"/"No"), ``category`` (subtask, spelled as in MME:
    see ``MME_PERCEPTION`` / ``MME_COGNITION``) and the image the question is about in
    ``image_id`` (or, as in lmms-eval, ``question_id``, which there is the image path). Each image
    must have exactly two questions; accuracy+ is the share of images with both right.
    ``score`` is the perception total; ``total`` adds cognition.
    """
    rows = _as_list(records)
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    by_task: dict[str, dict[Any, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other = 0
    for row in rows:
        task = str(row.get("category"))
        if task not in known:
            raise ValueError(f"unknown MME subtask {task!r}; expected one of {sorted(known)}")
        gold = _text(row.get("answer")).lower().strip().replace(".", "")
        if gold not in ("yes", "no"):
            raise ValueError(f"MME gold answer must be yes/no, got {row.get('answer')!r}")
        pred = parse_mme_answer(_text(row.get("prediction")))
        other += pred == "other"
        image = _first(row, "image_id", "question_id")
        if image is None:
            raise ValueError("MME records need 'image_id' or 'question_id' to pair the questions")
        by_task[task][image].append(pred == gold)
    per_subtask = {}
    for task, images in by_task.items():
        for image, marks in images.items():
            if len(marks) != 2:
                raise ValueError(f"MME pairs two questions per image; {task}/{image} has {len(marks)}")
        answers = [m for marks in images.values() for m in marks]
        acc = _pct(sum(answers), len(answers))
        acc_plus = _pct(sum(all(marks) for marks in images.values()), len(images))
        per_subtask[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus, "n": len(answers)}
    perception = sum(per_subtask[t]["score"] for t in MME_PERCEPTION if t in per_subtask)
    cognition = sum(per_subtask[t]["score"] for t in MME_COGNITION if t in per_subtask)
    ordered = {t: per_subtask[t] for t in MME_PERCEPTION + MME_COGNITION if t in per_subtask}
    return {
        "metric": "perception",
        "score": perception,
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "per_subtask": ordered,
        "n": len(rows),
        "n_other": other,
        "n_unparsed": other,
    }


# --------------------------------------------------------------------------------------------
# Multiple choice: option extraction (MMBench rules), ScienceQA, SEED-Bench
# --------------------------------------------------------------------------------------------

# (prefix, suffix) around a letter, tried in this order after the bare letter.
_LETTER_WRAPPINGS = (
    ("", "."),
    ("", ","),
    ("", ":"),
    ("", ")"),
    ("", ")."),
    ("(", ")"),
    ("(", ")."),
    (":", ""),
    (":", ","),
    (":", "."),
    (":", ")"),
    (":", ")."),
)
_OPTION_LETTERS = "ABCDE"


def _valid_option(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip().lower() not in ("", "nan")


def _record_options(record: Record) -> dict[str, str]:
    """A record's options: its ``options`` mapping, else its "A".."E" fields (MMBench columns)."""
    options = record.get("options")
    if options is None:
        options = {k: record[k] for k in _OPTION_LETTERS if k in record}
    elif not isinstance(options, Mapping):
        options = {chr(ord("A") + i): v for i, v in enumerate(options)}
    return {str(k): str(v) for k, v in options.items() if _valid_option(v)}


def extract_option(prediction: str, options: Mapping[str, str], *, letters: str = _OPTION_LETTERS) -> str | None:
    """The option letter a free-form answer picks, by MMBench's rules (``can_infer``), or None.

    1. Split on whitespace. If exactly one token is a bare letter ("A"), return it, unless the
       token "A" is present and there are more than 3 tokens ("A" may be the article).
    2. Otherwise try the wrappings "A." "A," "A:" "A)" "A)." "(A)" "(A)." ":A" ":A," ":A." ":A)"
       ":A)." in that order; the first one that exactly one letter takes gives the answer.
    3. Otherwise, if exactly one option's text occurs (case-insensitively) in the answer, its letter.

    Letters are matched case-sensitively (as in MMBench: "(c)" is not "(C)"; the option text may
    still match). Ambiguous answers ("A or B") give None.

    Args:
        prediction: the model's answer.
        options: letter -> option text; empty / "nan" options are ignored.
        letters: candidate letters for steps 1-2 (MMBench uses "ABCDE" whatever the option count).
    """
    prediction = _text(prediction)
    tokens = [t.strip() for t in prediction.split()]

    def takers(prefix: str, suffix: str) -> list[str]:
        return [c for c in letters if prefix + c + suffix in tokens]

    bare = takers("", "")
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _LETTER_WRAPPINGS:
        found = takers(prefix, suffix)
        if len(found) == 1:
            return found[0]
    lowered = prediction.lower()
    hits = [k for k, v in options.items() if _valid_option(v) and str(v).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def _gold_letter(answer: Any) -> str:
    # ScienceQA stores the answer as an option index; the others as a letter.
    if isinstance(answer, int) and not isinstance(answer, bool):
        return chr(ord("A") + answer)
    return _text(answer).strip().upper()


def _scienceqa_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    # lmms-eval sqa_process_results: the whole answer is the letter (any case), or it starts with
    # an upper-case letter followed by ".".
    text = prediction.strip()
    if len(text) == 1:
        return text.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return text[0]
    return None


def _seedbench_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    # lmms-eval seed_process_result: the first character of the stripped answer.
    text = prediction.strip()
    return text[0].upper() if text else None


def _extract_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    return extract_option(prediction, options)


_CHOICE_RULES: Mapping[str, Callable[[str, Mapping[str, str]], str | None]] = MappingProxyType(
    {"extract": _extract_letter, "scienceqa": _scienceqa_letter, "seedbench": _seedbench_letter}
)


def score_multiple_choice(
    records: Iterable[Record],
    *,
    rule: Literal["extract", "scienceqa", "seedbench"] = "extract",
) -> dict[str, Any]:
    """Accuracy (percent) of single-answer multiple choice by letter match.

    Records: ``prediction``, ``answer`` (a letter, or an option index as in ScienceQA); for
    ``rule="extract"`` also the options (``options`` mapping/list or "A".."E" fields). Optional
    ``data_type`` (SEED-Bench: image/video) and ``category`` add ``per_data_type`` /
    ``per_category``.

    Rules: ``"scienceqa"`` (lmms-eval ScienceQA: the answer is the letter, any case, or starts
    with "X."), ``"seedbench"`` (lmms-eval SEED-Bench: first character), ``"extract"``
    (:func:`extract_option`). ``n_unparsed`` counts answers giving no letter (scored wrong).
    """
    try:
        pick = _CHOICE_RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(_CHOICE_RULES)}") from None
    rows = _as_list(records)
    marks: list[bool] = []
    groups: dict[str, dict[str, list[bool]]] = {"data_type": defaultdict(list), "category": defaultdict(list)}
    unparsed = 0
    for row in rows:
        letter = pick(_text(row.get("prediction")), _record_options(row))
        unparsed += letter is None
        ok = letter is not None and letter.upper() == _gold_letter(row.get("answer"))
        marks.append(ok)
        for key, bucket in groups.items():
            if row.get(key) is not None:
                bucket[str(row[key])].append(ok)
    accuracy = _pct(sum(marks), len(marks))
    result: dict[str, Any] = {
        "metric": "accuracy",
        "score": accuracy,
        "accuracy": accuracy,
        "n": len(rows),
        "n_unparsed": unparsed,
    }
    for key, bucket in groups.items():
        if bucket:
            result[f"per_{key}"] = {k: _pct(sum(v), len(v)) for k, v in sorted(bucket.items())}
    return result


def score_scienceqa(records: Iterable[Record]) -> dict[str, Any]:
    """ScienceQA-IMG as lmms-eval ``scienceqa_img``."""
    return score_multiple_choice(records, rule="scienceqa")


def score_seedbench(records: Iterable[Record]) -> dict[str, Any]:
    """SEED-Bench as lmms-eval ``seedbench`` (``per_data_type`` gives seed_image / seed_video)."""
    return score_multiple_choice(records, rule="seedbench")


# --------------------------------------------------------------------------------------------
# MMBench circular evaluation
# --------------------------------------------------------------------------------------------

_CIRCULAR_BASE = 1_000_000


def score_mmbench(
    records: Iterable[Record],
    *,
    fallback: Callable[[Record], str | None] | None = None,
) -> dict[str, Any]:
    """MMBench with circular evaluation, accuracy in percent.

    Records: ``index``, ``prediction``, ``answer`` (letter), options (``options`` mapping or
    "A".."E" fields), optional ``category`` / ``l2-category`` (``l2_category`` accepted).
    A circular variant of question ``q`` has ``index = q + k * 1_000_000``; a question is
    correct only if every variant's answer maps to its gold letter.

    Per group, as MMBench does: predictions are first matched by :func:`extract_option`; any
    matched-but-wrong variant fails the question. Variants left unmatched go to ``fallback``
    (in lmms-eval, a GPT matcher; here any callable ``record -> letter | None``); without one, they
    count as wrong, and ``n_unresolved`` counts the questions that failed only for that reason.
    ``n_unparsed`` counts the records (variants) whose answer gave no letter, before any fallback.
    Categories come from the original question (``index < 1_000_000``, else the lowest index).
    """
    rows = _as_list(records)
    groups: dict[int, list[Record]] = defaultdict(list)
    for row in rows:
        groups[int(row["index"]) % _CIRCULAR_BASE].append(row)
    hits: dict[int, bool] = {}
    unresolved = unparsed = 0
    for key, members in groups.items():
        members.sort(key=lambda r: int(r["index"]))
        golds = [_gold_letter(r.get("answer")) for r in members]
        picks = [extract_option(_text(r.get("prediction")).strip(), _record_options(r)) for r in members]
        unparsed += sum(p is None for p in picks)
        if any(p is not None and p != g for p, g in zip(picks, golds)):
            hits[key] = False
            continue
        ok = True
        for member, pick, gold in zip(members, picks, golds):
            if pick is not None:
                continue
            resolved = fallback(member) if fallback is not None else None
            if resolved is None or _text(resolved).strip().upper() != gold:
                ok = False
                if fallback is None:
                    unresolved += 1
                break
        hits[key] = ok
    accuracy = _pct(sum(hits.values()), len(hits))
    result: dict[str, Any] = {
        "metric": "circular_accuracy",
        "score": accuracy,
        "accuracy": accuracy,
        "n": len(hits),
        "n_records": len(rows),
        "n_unresolved": unresolved,
        "n_unparsed": unparsed,
    }
    for out_key, fields in (("per_category", ("category",)), ("per_l2_category", ("l2-category", "l2_category"))):
        bucket: dict[str, list[bool]] = defaultdict(list)
        for key, members in groups.items():
            value = _first(members[0], *fields)
            if value is not None:
                bucket[str(value)].append(hits[key])
        if bucket:
            result[out_key] = {k: _pct(sum(v), len(v)) for k, v in sorted(bucket.items())}
    return result


# --------------------------------------------------------------------------------------------
# GQA exact match
# --------------------------------------------------------------------------------------------

_DROP_PUNCTUATION: Mapping[int, None] = MappingProxyType(str.maketrans("", "", string.punctuation))


def _exact_match_form(text: str) -> str:
    return _text(text).strip().lower().translate(_DROP_PUNCTUATION)


def score_exact_match(records: Iterable[Record]) -> dict[str, Any]:
    """Exact match (percent) as lmms-eval's GQA: strip, lower-case, delete ASCII punctuation
    (``string.punctuation``), compare. Records: ``prediction``, ``answer``."""
    rows = _as_list(records)
    marks = [_exact_match_form(_text(r.get("prediction"))) == _exact_match_form(_text(r.get("answer"))) for r in rows]
    accuracy = _pct(sum(marks), len(marks))
    return {"metric": "exact_match", "score": accuracy, "accuracy": accuracy, "n": len(rows),
            "n_unparsed": _count_empty(rows)}


def score_gqa(records: Iterable[Record]) -> dict[str, Any]:
    """GQA testdev-balanced as lmms-eval ``gqa``."""
    return score_exact_match(records)


# --------------------------------------------------------------------------------------------
# GPT-judged benchmarks: MM-Vet, LLaVA-Bench (in-the-wild)
# --------------------------------------------------------------------------------------------

MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")

Judge = Callable[..., Any]
"""``judge(question, reference, prediction)``; see :func:`score_judged` for the return value."""


def _capabilities(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {c.strip() for c in value.split(",") if c.strip()}
    return {str(c).strip() for c in value}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def score_judged(
    records: Iterable[Record],
    judge: Judge | None = None,
    *,
    protocol: Literal["mmvet", "llava_bench"] = "mmvet",
) -> dict[str, Any]:
    """Aggregate GPT-judge scores as MM-Vet or LLaVA-Bench do; skip cleanly without a judge.

    Records: ``question``, ``answer`` (MM-Vet ground truth / LLaVA-Bench reference answer;
    ``gpt_answer`` accepted), ``prediction``; MM-Vet: optional ``capability`` ("rec,ocr" or a
    list); LLaVA-Bench: optional ``category`` (conv / detail / complex) and ``context`` (or
    ``caption``: the image description the judge is shown).

    ``judge``:

    * ``"mmvet"``: ``judge(question, reference, prediction) -> float`` in [0, 1] (MM-Vet's
      correctness scale). ``score`` = mean x 100; ``per_capability`` likewise over the records
      having each capability.
    * ``"llava_bench"``: ``judge(question, reference, prediction, context=...)`` ->
      ``(reference_score, prediction_score)``, each on the judge's 1-10 scale. ``score`` =
      mean prediction score / mean reference score x 100, also ``per_category``.

    Without a judge: ``{"skipped": True, "reason": ..., "score": None, ...}``; no number is made up.
    A judge returning something outside its scale raises ``ValueError``.
    """
    rows = _as_list(records)
    name = {"mmvet": "MM-Vet", "llava_bench": "LLaVA-Bench (in-the-wild)"}.get(protocol)
    if name is None:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'mmvet' or 'llava_bench'")
    metric = "gpt_score" if protocol == "mmvet" else "relative_score"
    if judge is None:
        return {
            "skipped": True,
            "reason": (
                f"{name} is scored by a GPT judge and no judge was configured; pass judge=... "
                "to score it. No score is reported."
            ),
            "metric": metric,
            "score": None,
            "n": len(rows),
            "n_unparsed": _count_empty(rows),
        }
    if protocol == "mmvet":
        scores, caps = [], []
        for row in rows:
            value = judge(
                _text(row.get("question")), _text(_first(row, "answer", "gpt_answer")), _text(row.get("prediction"))
            )
            if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"MM-Vet judge must return a number in [0, 1], got {value!r}")
            scores.append(float(value))
            caps.append(_capabilities(row.get("capability", row.get("capabilities"))))
        per_cap = {}
        for cap in MMVET_CAPABILITIES:
            chosen = [s for s, c in zip(scores, caps) if cap in c]
            if chosen:
                per_cap[cap] = _pct(sum(chosen), len(chosen))
        total = _pct(sum(scores), len(scores))
        return {"skipped": False, "metric": metric, "score": total, "per_capability": per_cap, "n": len(rows),
                "n_unparsed": _count_empty(rows)}

    pairs: list[tuple[float, float]] = []
    by_cat: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        context = _first(row, "context", "caption", default="")
        if not isinstance(context, str):
            context = "\n".join(str(c) for c in context)
        value = judge(
            _text(row.get("question")),
            _text(_first(row, "answer", "gpt_answer")),
            _text(row.get("prediction")),
            context=context,
        )
        if not (isinstance(value, Sequence) and len(value) == 2 and all(_is_number(v) for v in value)):
            raise ValueError(f"LLaVA-Bench judge must return (reference_score, prediction_score), got {value!r}")
        pair = (float(value[0]), float(value[1]))
        pairs.append(pair)
        if row.get("category") is not None:
            by_cat[str(row["category"])].append(pair)

    def relative(items: list[tuple[float, float]]) -> dict[str, float]:
        ref = sum(p[0] for p in items) / len(items)
        pred = sum(p[1] for p in items) / len(items)
        if ref <= 0:
            raise ValueError("LLaVA-Bench reference scores average to <= 0; the relative score is undefined")
        return {"relative_score": 100.0 * pred / ref, "reference_mean": ref, "prediction_mean": pred, "n": len(items)}

    overall = relative(pairs)
    return {
        "skipped": False,
        "metric": metric,
        "score": overall["relative_score"],
        "reference_mean": overall["reference_mean"],
        "prediction_mean": overall["prediction_mean"],
        "per_category": {k: relative(v) for k, v in sorted(by_cat.items())},
        "n": len(rows),
        "n_unparsed": _count_empty(rows),
    }


def score_mmvet(records: Iterable[Record], judge: Judge | None = None) -> dict[str, Any]:
    """MM-Vet as lmms-eval ``mmvet``; see :func:`score_judged`."""
    return score_judged(records, judge, protocol="mmvet")


def score_llava_bench(records: Iterable[Record], judge: Judge | None = None) -> dict[str, Any]:
    """LLaVA-Bench (in-the-wild) as lmms-eval ``llava_in_the_wild``; see :func:`score_judged`."""
    return score_judged(records, judge, protocol="llava_bench")


# --------------------------------------------------------------------------------------------
# Answer format of a task, without its ground truth
# --------------------------------------------------------------------------------------------


def answer_format(task: str) -> str:
    """What answers of the lmms-eval task ``task`` must look like to be parsed: ``"yes/no"`` (POPE
    and its splits, MME), ``"an option letter"`` (ScienceQA, SEED-Bench, MMBench) or ``"any text"``."""
    name = task.lower()
    if name.startswith(("pope", "mme")):
        return "yes/no"
    if name.startswith(("scienceqa", "seedbench", "mmbench")):
        return "an option letter"
    return "any text"


def is_unparsed(task: str, prediction: str) -> bool:
    """Whether the scorer of ``task`` could not read ``prediction`` (see ``n_unparsed``), judged
    from the answer alone: what a model wrapper can check before any scoring."""
    text = _text(prediction)
    kind = answer_format(task)
    if kind == "yes/no":
        return parse_mme_answer(text) == "other" if task.lower().startswith("mme") else parse_yes_no(text) is None
    if kind == "an option letter":
        return extract_option(text.strip(), {}) is None
    return not text.strip()


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SCORERS: Mapping[str, Callable[..., dict[str, Any]]] = MappingProxyType(
    {
        "textvqa_val": score_textvqa,
        "vqav2_val": score_vqav2,
        "vizwiz_vqa_val": score_vizwiz,
        "pope": score_pope,
        "mme": score_mme,
        "scienceqa_img": score_scienceqa,
        "seedbench": score_seedbench,
        "gqa": score_gqa,
        "mmbench_en_dev": score_mmbench,
        "mmbench_cn_dev": score_mmbench,
        "mmvet": score_mmvet,
        "llava_in_the_wild": score_llava_bench,
    }
)
"""lmms-eval task name -> scorer. Judged tasks take ``judge=``; MMBench takes ``fallback=``."""
