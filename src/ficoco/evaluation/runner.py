"""``ficoco eval``: run methods and budgets over benchmarks, resumably, and tabulate.

Per (task, variant) the predictions go to ``<out>/<task>/<variant>.jsonl``, one JSON line per
sample, flushed and fsync'ed after every batch. A rerun skips the samples already there, and a
line cut short by a kill is dropped before appending, so nothing is lost or written twice. Scores
come from each task's scorer (:data:`ficoco.evaluation.tasks.SCORERS`); TFLOPs from
:mod:`ficoco.measure.budget` at the mean text length of the task's prompts.
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
from ..prompts import chat_prompt
from .metrics import unparsed_share
from .prompt_format import check_task_prompts
from .records import Record
from .report import csv_table, markdown_table, warnings
from .tasks import SCORERS, TASKS

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
    for key in _SCORER_FIELDS:
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
def answer_batch(model, processor, records: Sequence[Record], max_new_tokens: int) -> list[str]:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(processor, r.question) for r in records]
    batch = processor(images=[r.image() for r in records], text=prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return [text.strip() for text in processor.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]


def _text_tokens(processor, records: Sequence[Record]) -> int:
    if not records:
        return 0
    sample = records[: min(len(records), 32)]
    ids = processor.tokenizer([chat_prompt(processor, r.question) for r in sample])["input_ids"]
    image = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    return round(sum(sum(t != image for t in row) for row in ids) / len(ids))


def run_task(model, processor, task: str, records: Sequence[Record], variant: Variant, out_dir: Path, *,
             batch_size: int = 8, judge=None, progress: Callable[[int], None] | None = None,
             max_new_tokens: int | None = None, shard: Shard = Shard()) -> dict | None:
    """Answer every record not yet predicted (this process's shard of them), then, on the main
    process, score all of this run's records. Other processes return ``None``."""
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
    tokens = max_new_tokens or MAX_NEW_TOKENS[TASKS[task].kind]
    method = variant.build()
    handle = attach(model, method) if method is not None else None
    try:
        with open(path, "a", encoding="utf-8") as fh:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                predictions = answer_batch(model, processor, chunk, tokens)
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
    scorer = SCORERS[task]
    score = scorer(wanted, judge=judge) if task in ("mmvet", "llava_in_the_wild") else scorer(wanted)
    # a Qwen-VL model is costed at the first sample's image size (its images differ in token count)
    shape = budget.shape_of(model.config, records[0].image().size if budget.is_qwen(model.config) else None,
                            getattr(processor, "image_processor", None))
    text = _text_tokens(processor, records)
    cost = budget.method_cost(shape, method, text) if method else budget.vanilla_cost(shape, text)
    return {"task": task, "variant": variant.label, "n": len(wanted), "score": score,
            "unparsed": unparsed_share(score), "llm_tflops": cost.llm_tflops, "text_tokens": text,
            "predictions": str(folder),
            **({"ocr_reference": all(r.meta.get("ocr_reference") for r in records)}
               if any("ocr_reference" in r.meta for r in records) else {})}


def evaluate(model, processor, tasks: dict[str, Sequence[Record]], variants: Sequence[Variant], out_dir: str, *,
             batch_size: int = 8, judge=None, show_progress: bool = True, shard: Shard | None = None,
             log: Callable[[str], None] | None = None) -> dict | None:
    """Every task × variant; the main process writes ``results.json``, ``results.md`` and
    ``results.csv`` in ``out_dir`` and returns the summary (other processes return ``None``).
    Under ``accelerate launch`` every process answers its shard of the samples.

    Before anything runs, each task's prompts are checked against the model's tokenizer
    (:func:`~ficoco.evaluation.prompt_format.check_task_prompts`): mostly unknown words raise
    ``ValueError``. ``log`` receives the warnings: some unknown words, and every result where more
    than 10% of the answers could not be parsed (``results.md`` flags those cells too)."""
    from tqdm.auto import tqdm

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
                                  progress=bar.update, shard=shard)
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
