"""VQA accuracy as the official evaluators compute it: answer normalisation, 10-answer accuracy,
and the scorer of TextVQA, VQAv2 and VizWiz (:func:`score_vqa`).

Sources (facts and formulas, not code, were taken from them): ``GT-Vision-Lab/VQA``,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``; the EvalAI answer processor of
``EvolvingLMMs-Lab/lmms-eval`` ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py`` and its use in
``tasks/{textvqa,vqav2,vizwiz_vqa}/utils.py``; unanswerability metrics from the VizWiz API's
``vqaEval.py``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .metrics import ScoredRecord, as_list, count_empty, percent
from .records import as_text

__all__ = ("VQA_RULES", "normalize_vqa_answer", "score_vqa", "vqa_accuracy")


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
    text = as_text(text)
    if tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean_whitespace(text)
    return _process_digit_article(_process_punctuation(text))


def _answer_text(answer: Any) -> str:
    # VQAv2 rows hold {"answer": ..., "answer_id": ...} dicts; TextVQA/VizWiz rows hold strings.
    if isinstance(answer, Mapping):
        return as_text(answer.get("answer"))
    return as_text(answer)


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
    prediction = as_text(prediction)
    if rule == "lmms-eval":
        gts = [normalize_vqa_answer(a, tokenize=tokenize) for a in raw]
        pred = normalize_vqa_answer(prediction, tokenize=tokenize)
    else:
        pred = _process_digit_article(_process_punctuation(_clean_whitespace(prediction)))
        gts = [_process_punctuation(a) for a in raw] if len(set(raw)) > 1 else raw
    total = sum(gt == pred for gt in gts)
    return sum(min(1.0, (total - (gt == pred)) / 3.0) for gt in gts) / len(gts)


def _unanswerability(rows: list[ScoredRecord], preds: list[str]) -> dict[str, float] | None:
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
    records: Iterable[ScoredRecord],
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
    rows = as_list(records)
    accs, preds = [], []
    by_type: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("answers") is None:
            raise ValueError("VQA records need 'answers' (the human answers)")
        acc = vqa_accuracy(
            as_text(row.get("prediction")), row["answers"], tokenize=tokenize, rule=rule
        )
        accs.append(acc)
        preds.append(normalize_vqa_answer(as_text(row.get("prediction")), tokenize=tokenize))
        if row.get("answer_type") is not None:
            by_type[str(row["answer_type"])].append(acc)
    accuracy = percent(sum(accs), len(accs))
    result: dict[str, Any] = {
        "metric": "vqa_accuracy",
        "score": accuracy,
        "accuracy": accuracy,
        "n": len(rows),
        "n_unparsed": count_empty(rows),
        "unanswerable_predictions": sum(p == "unanswerable" for p in preds),
    }
    if by_type:
        result["per_answer_type"] = {k: percent(sum(v), len(v)) for k, v in sorted(by_type.items())}
    unans = _unanswerability(rows, preds)
    if unans is not None:
        result["unanswerability"] = unans
    return result
