"""The benchmarks of the paper's evaluation, one module per benchmark (as lmms-eval's ``tasks/``),
and the registry that :func:`~ficoco.evaluation.read.read_benchmark`, the runner and the
lmms-eval plugin look tasks up in.

Each module holds everything specific to its benchmark: its :class:`~ficoco.evaluation.records.TaskSpec`
(lmms-eval task name, lmms-lab dataset, prompts, LLaVA file names), the row builder that makes
lmms-eval's prompt from a parquet / ``save_to_disk`` row, the join of LLaVA-1.5's question file
with its ground truth, the benchmark's answer parsing and its scorer, gathered in a
:class:`~ficoco.evaluation.records.Task`:

=============================  ============================================================
lmms-eval task                 module
=============================  ============================================================
``textvqa_val``                :mod:`.textvqa`
``vqav2_val``                  :mod:`.vqav2`
``vizwiz_vqa_val``             :mod:`.vizwiz_vqa`
``pope``                       :mod:`.pope`
``mme``                        :mod:`.mme`
``scienceqa_img``              :mod:`.scienceqa`
``seedbench``                  :mod:`.seedbench`
``gqa``                        :mod:`.gqa`
``mmbench_en_dev`` / ``_cn_``  :mod:`.mmbench`
``mmvet``                      :mod:`.mmvet`
``llava_in_the_wild``          :mod:`.llava_in_the_wild`
``mmmu_val``                   :mod:`.mmmu`
``tgif_qa`` (video)            :mod:`.tgif_qa`
``msvd_qa`` (video)            :mod:`.msvd_qa`
``msrvtt_qa`` (video)          :mod:`.msrvtt_qa`
``activitynetqa`` (video)      :mod:`.activitynet_qa`
=============================  ============================================================

The video QA tasks (TGIF-QA, MSVD-QA and MSRVTT-QA have no lmms-eval task; their names are
ficoco's) share Video-LLaVA's GPT-judged protocol (:mod:`ficoco.evaluation.video_qa`).

``SCORERS`` maps lmms-eval task names to scorers; call ``SCORERS[task](records, **kwargs)``
(see :mod:`ficoco.evaluation.metrics` for what records and results hold).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal

from ..metrics import Judge, ScoredRecord, as_list, choice_accuracy, extract_option
from ..records import Task, TaskSpec, as_text
from . import (
    activitynet_qa,
    gqa,
    llava_in_the_wild,
    mmbench,
    mme,
    mmmu,
    mmvet,
    msrvtt_qa,
    msvd_qa,
    pope,
    scienceqa,
    seedbench,
    textvqa,
    tgif_qa,
    vizwiz_vqa,
    vqav2,
)
from .mme import parse_mme_answer
from .pope import parse_yes_no

__all__ = [
    "JOINERS",
    "REGISTRY",
    "SCORERS",
    "TASKS",
    "answer_format",
    "available_tasks",
    "is_unparsed",
    "score_judged",
    "score_multiple_choice",
    "task_spec",
]

#: lmms-eval task name -> :class:`~ficoco.evaluation.records.Task`, in the paper's order
REGISTRY: Mapping[str, Task] = MappingProxyType({task.spec.name: task for task in (
    textvqa.TASK, vqav2.TASK, vizwiz_vqa.TASK, pope.TASK, mme.TASK, scienceqa.TASK, seedbench.TASK, gqa.TASK,
    mmbench.TASK_EN, mmbench.TASK_CN, mmvet.TASK, llava_in_the_wild.TASK, mmmu.TASK,
    tgif_qa.TASK, msvd_qa.TASK, msrvtt_qa.TASK, activitynet_qa.TASK,
)})

#: lmms-eval task name -> what the benchmark looks like on disk and how lmms-eval prompts it
TASKS: Mapping[str, TaskSpec] = MappingProxyType({name: task.spec for name, task in REGISTRY.items()})

#: lmms-eval task name -> the join of a LLaVA question file with its ground truth (not MMBench: its
#: LLaVA file is the release ``.tsv``)
JOINERS: Mapping[str, Callable[..., None]] = MappingProxyType(
    {name: task.join_llava for name, task in REGISTRY.items() if task.join_llava is not None})

SCORERS: Mapping[str, Callable[..., dict[str, Any]]] = MappingProxyType(
    {name: task.score for name, task in REGISTRY.items()})
"""lmms-eval task name -> scorer. Judged tasks take ``judge=`` (the protocol in the task's
``judge``); MMBench takes ``fallback=``."""


def available_tasks() -> tuple[str, ...]:
    """The lmms-eval task names :func:`~ficoco.evaluation.read.read_benchmark` knows."""
    return tuple(TASKS)


def task_spec(task: str) -> TaskSpec:
    """The spec of the lmms-eval task ``task``; ``ValueError`` naming the known tasks otherwise."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


# --------------------------------------------------------------------------------------------
# Scorers by kind of answer
# --------------------------------------------------------------------------------------------


def _extract_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    return extract_option(prediction, options)


_CHOICE_RULES: Mapping[str, Callable[[str, Mapping[str, str]], str | None]] = MappingProxyType(
    {"extract": _extract_letter, "scienceqa": scienceqa.scienceqa_letter, "seedbench": seedbench.seedbench_letter}
)


def score_multiple_choice(
    records: Iterable[ScoredRecord],
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
    (:func:`~ficoco.evaluation.metrics.extract_option`). ``n_unparsed`` counts answers giving no letter (scored wrong).
    """
    try:
        pick = _CHOICE_RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(_CHOICE_RULES)}") from None
    return choice_accuracy(records, pick)


def score_judged(
    records: Iterable[ScoredRecord],
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
    rows = as_list(records)
    scorer = {"mmvet": mmvet.score_mmvet, "llava_bench": llava_in_the_wild.score_llava_bench}.get(protocol)
    if scorer is None:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'mmvet' or 'llava_bench'")
    return scorer(rows, judge)


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
    text = as_text(prediction)
    kind = answer_format(task)
    if kind == "yes/no":
        return parse_mme_answer(text) == "other" if task.lower().startswith("mme") else parse_yes_no(text) is None
    if kind == "an option letter":
        return extract_option(text.strip(), {}) is None
    return not text.strip()
