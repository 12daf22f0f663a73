"""Video-LLaVA's GPT-assisted video QA protocol (TGIF-QA, MSVD-QA, MSRVTT-QA, ActivityNet-QA),
shared by the four tasks: the judge, its prompt, and the aggregation.

A judge is any callable ``judge(question, answer, prediction) -> (yes, score)``: whether the
prediction matches the reference answer (``bool``) and how well, from 0 to 5. Video-LLaVA
(``videollava/eval/video/eval_video_qa.py``) asks gpt-3.5-turbo with the prompt of
:data:`JUDGE_SYSTEM` / :data:`JUDGE_USER` and reads its reply as a Python dict ``{'pred':
'yes'|'no', 'score': n}``; lmms-eval's ``activitynetqa`` uses the same prompt. Accuracy is the
share of "yes" verdicts, the score the mean of the scores (each truncated to an integer with
``int()``, as both scripts do).

:class:`OpenAIJudge` asks any OpenAI-compatible chat-completions endpoint (``OPENAI_API_KEY``,
``OPENAI_BASE_URL`` or ``--judge-url``, model ``FICOCO_JUDGE_MODEL`` or ``--judge-model``, by
default Video-LLaVA's gpt-3.5-turbo), at temperature 0 with 64 new tokens (lmms-eval's settings;
Video-LLaVA left OpenAI's defaults), retrying failed requests and unreadable replies; it never
makes a verdict up. ``ficoco eval`` keeps every verdict next to the predictions, so a rerun asks
the judge only about answers it has not judged yet.
"""

from __future__ import annotations

import ast
import json
import os
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .metrics import ScoredRecord, as_list, count_empty, first_of, is_number, judge_skipped, percent
from .records import Built, as_text, is_missing, single_answer

VideoQAJudge = Callable[[str, str, str], tuple[bool, float]]
"""``judge(question, answer, prediction) -> (yes, score)``, ``score`` in [0, 5]."""

JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine if "
    "they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the meaningful "
    "match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases as valid "
    "matches.\n- Evaluate the correctness of the prediction compared to the answer.")
JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\nCorrect Answer: "
    "{answer}\nPredicted Answer: {prediction}\n\nProvide your evaluation only as a yes/no and score where the score "
    "is an integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the "
    "response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a "
    "string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR "
    "EXPLANATION. Only provide the Python dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}.")
DEFAULT_MODEL = "gpt-3.5-turbo"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: ActivityNet-QA's question types (its ``type`` field)
ACTIVITYNET_TYPES = ("motion", "spatial relation", "temporal relation", "yes/no", "color", "object", "location",
                     "number", "other")


class JudgeError(RuntimeError):
    """The judge could not give a verdict (the request or its reply failed every attempt)."""


def row_builder(lmms_eval_prompt: bool) -> Callable[[dict, str, str], Built]:
    """The row builder of a video QA parquet (``question``, ``answer``, ``video_name``, optional
    ``question_id`` and ``type``): the prompt is lmms-eval's ``activitynetqa`` one (the question
    capitalised, with a question mark) where ``lmms_eval_prompt``, else the question as it is
    (Video-LLaVA's), between the task's pre- and post-prompt."""

    def build(row, pre, post):
        question = as_text(row["question"])
        text = f"{question.capitalize()}?" if lmms_eval_prompt else question
        answer, answers = single_answer(row)
        raw_id = None if is_missing(row.get("question_id")) else as_text(row["question_id"])
        return Built(raw_id, f"{pre}{text}{post}", question, answer, answers,
                     video_names=(as_text(row["video_name"]),))

    return build


def judge_messages(question: str, answer: str, prediction: str) -> list[dict]:
    """The chat messages Video-LLaVA sends the judge about one answer."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=question, answer=answer, prediction=prediction)}]


def parse_verdict(reply: str) -> tuple[bool, float]:
    """``(yes, score)`` from the judge's reply, a Python dict ``{'pred': 'yes', 'score': 4}``
    (text around the braces is ignored, as lmms-eval does; ``pred`` containing "yes" is yes, else
    containing "no" is no). ``ValueError`` for anything else."""
    try:
        body = "{" + reply.split("{", 1)[1].split("}", 1)[0] + "}"
        verdict = ast.literal_eval(body)
        pred, score = str(verdict["pred"]).lower(), float(int(verdict["score"]))
    except (IndexError, ValueError, SyntaxError, KeyError, TypeError) as exc:
        raise ValueError(f"not a {{'pred': ..., 'score': ...}} verdict: {reply!r}") from exc
    if "yes" in pred:
        return True, score
    if "no" in pred:
        return False, score
    raise ValueError(f"the verdict's 'pred' is neither yes nor no: {reply!r}")


def _post_json(url: str, headers: Mapping[str, str], payload: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=dict(headers), method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


class OpenAIJudge:
    """Video-LLaVA's judge on an OpenAI-compatible ``/chat/completions`` endpoint.

    ``transport(url, headers, payload, timeout) -> response JSON`` does the request (standard
    library HTTP by default; tests pass their own). Each call tries ``attempts`` times, waiting
    ``wait`` seconds between tries, then raises :class:`JudgeError`."""

    def __init__(self, api_key: str, *, model: str = DEFAULT_MODEL, base_url: str = DEFAULT_BASE_URL,
                 timeout: float = 60.0, attempts: int = 5, wait: float = 5.0, max_tokens: int = 64,
                 transport: Callable[[str, Mapping[str, str], dict, float], dict] = _post_json) -> None:
        if not api_key:
            raise ValueError("the OpenAI judge needs an API key (OPENAI_API_KEY)")
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.timeout, self.attempts, self.wait, self.max_tokens = timeout, attempts, wait, max_tokens
        self._transport = transport

    @property
    def name(self) -> str:
        """What the verdicts kept beside the predictions are labelled with."""
        return f"openai:{self.model}"

    @classmethod
    def from_env(cls, model: str | None = None, base_url: str | None = None, **options) -> "OpenAIJudge":
        """Configured from ``OPENAI_API_KEY``, ``OPENAI_BASE_URL`` and ``FICOCO_JUDGE_MODEL``
        (arguments win over the environment)."""
        key = os.environ.get("OPENAI_API_KEY", "")
        if not key:
            raise ValueError("--judge openai needs OPENAI_API_KEY in the environment (and OPENAI_BASE_URL or "
                             "--judge-url for an endpoint other than OpenAI's)")
        return cls(key, model=model or os.environ.get("FICOCO_JUDGE_MODEL") or DEFAULT_MODEL,
                   base_url=base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL, **options)

    def __call__(self, question: str, answer: str, prediction: str) -> tuple[bool, float]:
        payload = {"model": self.model, "messages": judge_messages(question, answer, prediction), "temperature": 0,
                   "max_tokens": self.max_tokens}
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.wait)
            try:
                reply = self._transport(self.url, self._headers, payload, self.timeout)
                return parse_verdict(as_text(reply["choices"][0]["message"]["content"]))
            except (urllib.error.URLError, OSError, KeyError, IndexError, TypeError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        raise JudgeError(f"the judge ({self.name} at {self.url}) gave no verdict after {self.attempts} attempts "
                         f"({problem})")


def judge_name(judge: Any) -> str:
    """The label of a judge's verdicts: its ``name``, else its qualified name."""
    return str(getattr(judge, "name", None) or getattr(judge, "__qualname__", None) or type(judge).__qualname__)


def check_verdict(value: Any) -> tuple[bool, float]:
    """A judge's return value as ``(yes, score)``; ``ValueError`` when it is not one."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], bool)
            and is_number(value[1]) and 0.0 <= float(value[1]) <= 5.0):
        raise ValueError(f"a video QA judge returns (yes: bool, score in [0, 5]), got {value!r}")
    return value[0], float(value[1])


def judge_question(row: ScoredRecord) -> str:
    """The question as the judge sees it: the benchmark's own, without the model's instructions."""
    return as_text(first_of(row, "raw_question", "question"))


def score_video_qa(records: Iterable[ScoredRecord], judge: VideoQAJudge | None = None, *,
                   name: str = "video QA") -> dict[str, Any]:
    """Accuracy (percent of "yes" verdicts) and mean score (0-5) of a video QA benchmark.

    Records: ``prediction``, ``answer``, ``question`` (or ``raw_question``, preferred), optional
    ``type`` (ActivityNet-QA's question type: adds ``per_type``) and, where a verdict is already
    known, ``judge_yes`` / ``judge_score`` (then ``judge`` is not asked). Without a judge and with
    records not yet judged: skipped, no score."""
    rows = as_list(records)
    if judge is None and not all("judge_yes" in r for r in rows):
        return judge_skipped(rows, name, "gpt_accuracy")
    verdicts = []
    for row in rows:
        if "judge_yes" in row:
            verdicts.append(check_verdict((row["judge_yes"], row["judge_score"])))
        else:
            verdicts.append(check_verdict(judge(judge_question(row), as_text(row.get("answer")),
                                                as_text(row.get("prediction")))))
    by_type: dict[str, list[tuple[bool, float]]] = defaultdict(list)
    for row, verdict in zip(rows, verdicts):
        if row.get("type") is not None:
            kind = str(row["type"])
            by_type[ACTIVITYNET_TYPES[int(kind)] if kind.isdigit() and int(kind) < len(ACTIVITYNET_TYPES)
                    else kind].append(verdict)

    def summary(items: list[tuple[bool, float]]) -> dict[str, float]:
        return {"accuracy": percent(sum(y for y, _ in items), len(items)),
                "mean_score": sum(int(s) for _, s in items) / len(items), "n": len(items)}

    overall = summary(verdicts)
    result = {"skipped": False, "metric": "gpt_accuracy", "score": overall["accuracy"], **overall,
              "n_yes": sum(y for y, _ in verdicts), "n_unparsed": count_empty(rows)}
    if by_type:
        result["per_type"] = {k: summary(v) for k, v in sorted(by_type.items())}
    return result
