"""Which prompt a model is asked in, and whether it can read it.

Benchmarks add instructions to each question (POPE's "Answer the question using a single word or
phrase.", multiple choice's "Answer with the option's letter ..."), and real LLaVA checkpoints were
trained to follow them. The embedded proxy model was not: it knows only the procedural dataset's
question language and answers bare questions. Asked with a benchmark's instruction it answers
noise. So:

- ``prompt_format="benchmark"`` asks the benchmark's own prompt (lmms-eval's);
- ``"model"`` drops the benchmark instructions and asks the bare question;
- ``"auto"`` is ``"model"`` for a checkpoint made by ``ficoco train-proxy`` and ``"benchmark"``
  for any other.

:func:`check_task_prompts` then refuses a task whose prompts the model's tokenizer mostly cannot
represent, and warns about one with some unknown words, before anything is run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..checkpoint import is_proxy_checkpoint
from ..prompts import VocabularyCheck, vocabulary_check
from .records import OPTION_POST, VQA_POST, Record
from .tasks.activitynet_qa import ACTIVITYNET_POST
from .tasks.mmbench import MMBENCH_CN_POST
from .tasks.mmvet import MMVET_PRE
from .tasks.vizwiz_vqa import VIZWIZ_POST

PROMPT_FORMATS = ("auto", "benchmark", "model")
# longest first, so that VizWiz's two sentences go before the VQA sentence they end with
_SUFFIXES = tuple(sorted((VQA_POST, OPTION_POST, VIZWIZ_POST, MMBENCH_CN_POST, ACTIVITYNET_POST), key=len,
                          reverse=True))
_PREFIXES = (MMVET_PRE,)
#: records per task whose words are checked against the tokenizer
CHECKED_RECORDS = 256


def resolve_prompt_format(setting: str, model_path: str | Path) -> str:
    """``"benchmark"`` or ``"model"`` for ``setting`` (one of :data:`PROMPT_FORMATS`)."""
    if setting not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}; got {setting!r}")
    if setting == "auto":
        return "model" if is_proxy_checkpoint(model_path) else "benchmark"
    return setting


def bare_question(text: str) -> str:
    """``text`` without the benchmark instructions ficoco's readers add (pre- and post-prompts)."""
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
    for suffix in _SUFFIXES:
        if text.endswith(suffix):
            return text[:-len(suffix)]
    return text


def in_prompt_format(records: Sequence[Record], prompt_format: str) -> list[Record]:
    """``records`` asked in ``prompt_format`` (``"benchmark"`` leaves them as they are)."""
    if prompt_format == "benchmark":
        return list(records)
    if prompt_format != "model":
        raise ValueError(f"prompt format must be 'benchmark' or 'model' here; got {prompt_format!r}")
    return [dataclasses.replace(r, question=bare_question(r.question)) for r in records]


def check_task_prompts(tokenizer, tasks: Mapping[str, Sequence[Record]],
                       warn: Callable[[str], None] | None = None) -> dict[str, VocabularyCheck]:
    """Check the question words of each task (its first :data:`CHECKED_RECORDS` records) against
    ``tokenizer``: raise ``ValueError`` for a task whose words are mostly unknown to it (the model
    would answer noise), pass a warning to ``warn`` for one with some unknown words."""
    checks = {}
    for task, records in tasks.items():
        check = vocabulary_check(tokenizer, (r.question for r in records[:CHECKED_RECORDS]))
        checks[task] = check
        if check.mostly_unknown:
            raise ValueError(f"{task}: the model cannot read these prompts: {check.describe()}. It would answer "
                             f"noise; use a checkpoint trained on this language (the embedded proxy knows only its "
                             f"procedural questions)")
        if check.unknown and warn is not None:
            warn(f"{task}: {check.describe()}; its answers to those prompts may be noise")
    return checks
