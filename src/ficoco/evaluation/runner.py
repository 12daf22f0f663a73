"""``ficoco eval``: run methods and budgets over benchmarks, resumably, and tabulate.

Per (task, variant) the predictions go to ``<out>/<task>/<variant>.jsonl``, one JSON line per
sample, flushed and fsync'ed after every batch. A rerun skips the samples already there, and a
line cut short by a kill is dropped before appending, so nothing is lost or written twice. Scores
come from each task's scorer (:data:`ficoco.evaluation.tasks.SCORERS`); the verdicts of a video
QA judge go to ``<variant>.judged.jsonl`` beside the predictions, one line per answer as it is
judged, so a rerun asks the judge only about answers it has not judged. TFLOPs come from
:mod:`ficoco.measure.budget` at the mean text length of the task's prompts, for one image at the
first sample's size (video benchmarks are not costed: ``llm_tflops`` is ``None``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from ..measure import budget
from ..adapters import attach
from ..methods import Method, get_method, takes_budget
from ..prompts import chat_prompt, video_chat_prompt
from .metrics import unparsed_share
from .model_inputs import image_inputs, read_frames, to_model, video_inputs, visual_token_ids
from .prompt_format import check_task_prompts
from .records import Record
from .report import csv_table, markdown_table, warnings
from .tasks import REGISTRY, SCORERS, TASKS
from .video_frames import check_takes_video, frame_groups
from .video_qa import check_verdict, judge_name, judge_question

#: generation length per kind of task (short answers vs free-form)
MAX_NEW_TOKENS = MappingProxyType({"vqa": 16, "yes_no": 8, "multiple_choice": 8, "open": 512})
#: meta fields the scorers read (MME pairs, MMBench circular groups, SEED dimensions, ...)
_SCORER_FIELDS = ("index", "image_id", "question_id", "answerable", "answer_type", "l2-category", "data_type",
                  "context", "caption", "split", "capability")
#: other spellings of a scorer field in the benchmarks' files (lmms-lab's MMBench parquet: "L2-category")
_FIELD_ALIASES = MappingProxyType({"l2-category": ("L2-category", "l2_category")})


@dataclass(frozen=True)
class Variant:
    """A method at a budget, or vanilla."""

    method: str = "vanilla"
    retain: int | float | None = None  # a count, or a share of each image's tokens
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.method == "vanilla" or self.retain is None:  # vanilla, and controls without a budget (zero)
            return self.method
        return f"{self.method}@{self.retain}"

    def build(self) -> Method | None:
        if self.method == "vanilla":
            return None
        budget = {} if self.retain is None else {"retain": self.retain}
        return get_method(self.method, **budget, **self.options)


def variants_for(methods: Iterable[str], retains: Iterable[int | float], options: dict | None = None) -> list[Variant]:
    """Vanilla first, then every method at every budget (once for a control without one: ``zero``)."""
    out = [Variant()]
    for name in methods:
        if name == "vanilla":
            continue
        opts = dict((options or {}).get(name, {}))
        out += [Variant(name, retain, opts) for retain in retains] if takes_budget(name) else [Variant(name, None, opts)]
    return out


def scorer_row(record: Record, prediction: str) -> dict:
    """What the scorers read about one answered sample (JSON-serialisable)."""
    row = {"sample_id": record.sample_id, "prediction": prediction, "answer": record.answer,
           "answers": list(record.answers), "options": dict(record.options), "category": record.category,
           "question": record.question}
    task = REGISTRY.get(record.task)
    for key in _SCORER_FIELDS + (task.scorer_fields if task is not None else ()):
        value = next((record.meta[k] for k in (key, *_FIELD_ALIASES.get(key, ())) if record.meta.get(k) is not None),
                     None)
        if value is not None:
            try:
                json.dumps(value)
            except TypeError:
                continue
            row[key] = value
    return row


@dataclass(frozen=True)
class Shard:
    """This process's share of the samples under ``accelerate launch`` (rank ``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Shard":
        """The shard of this process: from accelerate's state when launched with several processes."""
        try:
            from accelerate import PartialState
        except ImportError:
            return cls()
        # without GPUs, processes started by accelerate's (torchrun) launcher form a gloo group on the CPU
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes)

    def take(self, items: Sequence) -> list:
        return list(items[self.rank::self.world])

    def file_name(self, label: str) -> str:
        return f"{label}.jsonl" if self.world == 1 else f"{label}.rank{self.rank}-of-{self.world}.jsonl"

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def load_all_predictions(folder: Path, label: str) -> dict[str, dict]:
    """Predictions of ``label`` from its single file and from every per-process shard file."""
    rows: dict[str, dict] = {}
    for path in sorted(folder.glob(f"{label}*.jsonl")):
        if path.name == f"{label}.jsonl" or path.name.startswith(f"{label}.rank"):
            rows.update(load_predictions(path))
    return rows


def load_predictions(path: Path) -> dict[str, dict]:
    """``{sample_id: row}`` from a predictions file, repairing a last line cut short by a kill."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if good_end < len(raw):  # an unfinished last line: drop it so appends start clean
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
        raw = raw[:good_end]
    rows = {}
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err}); delete the file to start over") from None
        rows[row["sample_id"]] = row
    return rows


@torch.inference_mode()
def answer_batch(model, processor, records: Sequence[Record], max_new_tokens: int, *,
                 max_frames: int | None = None) -> list[str]:
    """Greedy answers to ``records`` in order: samples with images are batched by their number of
    images (decoder-side reductions need it alike in every row), video samples show the frames
    their model's convention picks (:mod:`ficoco.evaluation.model_inputs`), at most ``max_frames``,
    batched by frame count where the family's processor needs one count per call."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    groups: dict[object, list[int]] = {}
    images: dict[int, list] = {}
    for i, r in enumerate(records):
        if getattr(r, "videos", list)():
            groups.setdefault("video", []).append(i)
        else:
            images[i] = r.images() if hasattr(r, "images") else [r.image()]  # decoded once, here
            groups.setdefault(len(images[i]), []).append(i)
    jobs: list[tuple[list[int], dict]] = []  # (rows, processor outputs) per generate call
    for key, rows in groups.items():
        chosen = [records[i] for i in rows]
        if key == "video":
            model_type = getattr(model.config, "model_type", None)
            frames = [read_frames(r.video(), model_type, r.task, r.sample_id, max_frames) for r in chosen]
            for group in frame_groups(model_type, [len(f.indices) for f in frames]):
                jobs.append(([rows[i] for i in group], video_inputs(
                    processor, model_type, [chosen[i].question for i in group], [frames[i] for i in group])))
        else:
            jobs.append((rows, image_inputs(processor, [r.question for r in chosen], [images[i] for i in rows])))
    answers: list[str] = [""] * len(records)
    for rows, batch in jobs:
        batch = to_model(batch, model)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(rows, texts):
            answers[i] = text.strip()
    return answers


def mean_text_tokens(processor, prompts: Sequence[str]) -> int:
    """Mean count of text tokens (not image or video placeholders) in the first 32 ``prompts``."""
    if not prompts:
        return 0
    ids = processor.tokenizer(list(prompts[:32]))["input_ids"]
    visual = visual_token_ids(processor)
    return round(sum(sum(t not in visual for t in row) for row in ids) / len(ids))


def _record_prompts(processor, records: Sequence[Record]) -> list[str]:
    """The chat prompt of each record (a video prompt for a video sample)."""
    return [video_chat_prompt(processor, r.question) if r.videos() else chat_prompt(processor, r.question)
            for r in records]


def judged_rows(rows: Sequence[dict], judge, path: Path) -> list[dict]:
    """``rows`` with ``judge_yes`` / ``judge_score`` from ``judge`` (a video QA judge). Verdicts
    already in ``path`` from the same judge on the same answer are reused; every new one is
    appended to it (flushed and fsync'ed) as soon as it is given, so an interrupted judging loses
    nothing."""
    name = judge_name(judge)
    known = {}
    for row in load_predictions(path).values() if path.exists() else ():
        if row.get("judge") == name:
            known[row["sample_id"]] = row
    out = []
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            seen = known.get(row["sample_id"])
            if seen is not None and seen.get("prediction") == row.get("prediction"):
                yes, score = check_verdict((seen["yes"], seen["score"]))
            else:
                yes, score = check_verdict(judge(judge_question(row), row.get("answer") or "", row.get("prediction")))
                fh.write(json.dumps({"sample_id": row["sample_id"], "judge": name, "prediction": row.get("prediction"),
                                     "yes": yes, "score": score}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            out.append({**row, "judge_yes": yes, "judge_score": score})
    return out


def _score(task: str, rows: list[dict], folder: Path, label: str, judge, video_judge) -> dict:
    protocol = REGISTRY[task].judge
    if protocol == "video_qa":
        if video_judge is not None:
            rows = judged_rows(rows, video_judge, folder / f"{label}.judged.jsonl")
        return SCORERS[task](rows)
    return SCORERS[task](rows, judge=judge) if protocol is not None else SCORERS[task](rows)


def run_task(model, processor, task: str, records: Sequence[Record], variant: Variant, out_dir: Path, *,
             batch_size: int = 8, judge=None, progress: Callable[[int], None] | None = None,
             max_new_tokens: int | None = None, shard: Shard = Shard(), video_judge=None,
             max_frames: int | None = None) -> dict | None:
    """Answer every record not yet predicted (this process's shard of them), then, on the main
    process, score all of this run's records. Other processes return ``None``.

    ``judge`` scores MM-Vet / LLaVA-Bench, ``video_judge`` the video QA benchmarks
    (:mod:`ficoco.evaluation.video_qa`); without one, a judged task's result is marked skipped.
    ``max_frames`` caps the frames of a video (the model's convention otherwise)."""
    folder = out_dir / task
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / shard.file_name(variant.label)
    done = load_all_predictions(folder, variant.label)  # any process's earlier work counts
    changed = [r.sample_id for r in records if r.sample_id in done and done[r.sample_id].get("question", r.question)
               != r.question]
    if changed:
        raise ValueError(f"{task} {variant.label}: the predictions in {folder} were made with other prompts (e.g. "
                         f"sample {changed[0]}: another prompt format?); use another --out folder or delete them")
    todo = [r for r in shard.take(records) if r.sample_id not in done]
    spec = TASKS[task]
    tokens = max_new_tokens or spec.max_new_tokens or MAX_NEW_TOKENS[spec.kind]
    method = variant.build()
    handle = attach(model, method) if method is not None else None
    try:
        with open(path, "a", encoding="utf-8") as fh:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                predictions = answer_batch(model, processor, chunk, tokens, max_frames=max_frames)
                fh.write("".join(json.dumps(scorer_row(r, p)) + "\n" for r, p in zip(chunk, predictions)))
                fh.flush()
                os.fsync(fh.fileno())
                if progress is not None:
                    progress(len(chunk))
    finally:
        if handle is not None:
            handle.remove()
    shard.barrier()
    if shard.rank != 0:
        return None
    rows = load_all_predictions(folder, variant.label)
    missing = [r.sample_id for r in records if r.sample_id not in rows]
    if missing:
        raise RuntimeError(f"{task} {variant.label}: {len(missing)} samples have no prediction (e.g. {missing[0]})")
    wanted = [rows[r.sample_id] for r in records]
    score = _score(task, wanted, folder, variant.label, judge, video_judge)
    text = mean_text_tokens(processor, _record_prompts(processor, records[:32]))
    tflops = None
    if spec.modality == "image" and budget.is_costed(model.config):  # (LLaVA-NeXT is not costed: None)
        # a Qwen-VL model is costed at the first image's size (its images differ in token count)
        first = next((r for r in records if r.image_sources), None)
        size = first.images()[0].size if first is not None and budget.is_qwen(model.config) else None
        shape = budget.shape_of(model.config, size, getattr(processor, "image_processor", None))
        tflops = (budget.method_cost(shape, method, text) if method else budget.vanilla_cost(shape, text)).llm_tflops
    return {"task": task, "variant": variant.label, "n": len(wanted), "score": score,
            "unparsed": unparsed_share(score), "llm_tflops": tflops, "text_tokens": text,
            "predictions": str(folder),
            **({"ocr_reference": all(r.meta.get("ocr_reference") for r in records)}
               if any("ocr_reference" in r.meta for r in records) else {})}


def check_video_variants(model, task: str, variants: Sequence[Variant]) -> None:
    """``ValueError`` in one line, before anything is answered, when a variant's method cannot run
    on ``model``'s videos (LLaVA-OneVision and LLaVA-NeXT-Video refuse reductions before the LLM on
    videos): the method is attached, asked, and detached."""
    for variant in variants:
        method = variant.build()
        if method is None:
            continue
        handle = attach(model, method)
        try:
            check = getattr(handle, "check_videos", None)  # only families that refuse some methods on videos
            if check is not None:
                try:
                    check()
                except ValueError as err:
                    raise ValueError(f"{task} is a video benchmark: {err}") from None
        finally:
            handle.remove()


def evaluate(model, processor, tasks: dict[str, Sequence[Record]], variants: Sequence[Variant], out_dir: str, *,
             batch_size: int = 8, judge=None, show_progress: bool = True, shard: Shard | None = None,
             log: Callable[[str], None] | None = None, video_judge=None, max_frames: int | None = None) -> dict | None:
    """Every task × variant; the main process writes ``results.json``, ``results.md`` and
    ``results.csv`` in ``out_dir`` and returns the summary (other processes return ``None``).
    Under ``accelerate launch`` every process answers its shard of the samples.

    Before anything runs, each task's prompts are checked against the model's tokenizer
    (:func:`~ficoco.evaluation.prompt_format.check_task_prompts`): mostly unknown words raise
    ``ValueError``. ``log`` receives the warnings: some unknown words, and every result where more
    than 10% of the answers could not be parsed (``results.md`` flags those cells too). A video
    benchmark given a model that takes no video, or a method the model cannot run on videos
    (:func:`check_video_variants`), is refused first, in one line. ``judge`` /
    ``video_judge`` / ``max_frames``: see :func:`run_task`."""
    from tqdm.auto import tqdm

    for task in tasks:
        if TASKS[task].modality == "video":
            check_takes_video(getattr(model.config, "model_type", None), task)
            check_video_variants(model, task, variants)
    shard = shard or Shard.current()
    check_task_prompts(processor.tokenizer, tasks, warn=log if shard.rank == 0 else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for task, records in tasks.items():
        for variant in variants:
            mine = {r.sample_id for r in shard.take(records)}
            with tqdm(total=len(mine), desc=f"{task} {variant.label} [{shard.rank}/{shard.world}]",
                      disable=not show_progress) as bar:
                bar.update(len(load_all_predictions(out / task, variant.label).keys() & mine))
                result = run_task(model, processor, task, records, variant, out, batch_size=batch_size, judge=judge,
                                  progress=bar.update, shard=shard, video_judge=video_judge, max_frames=max_frames)
            if result is not None:
                results.append(result)
    if shard.rank != 0:
        return None
    summary = {"results": results, "processes": shard.world, "warnings": warnings(results)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown_table(results))
    (out / "results.csv").write_text(csv_table(results))
    if log is not None:
        for line in summary["warnings"]:
            log(line)
    return summary
