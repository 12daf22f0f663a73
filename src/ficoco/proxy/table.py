"""Issue 4's accuracy table for the trained proxy model: accuracy per question family of vanilla
and of every method at every retained count, and of the decoder-side methods at ficoco-v's cost.

``ficoco proxy-accuracy`` runs :func:`run`. The rows:

- ``vanilla``;
- ``<method>@<retain>``: every requested method (encoder- and decoder-side) at every count;
- ``<method>@tflops(<retain>)``: every decoder-side method (one with an LLM reduction: ficoco-l,
  fastv, ficoco-vl) with the schedule :func:`ficoco.measure.budget.solve_for_tflops` finds for the LLM
  prefill TFLOPs that ficoco-v costs at ``<retain>``, the paper's (and ``ficoco flops``')
  TFLOPs axis: spread over the method's own layers where that can get so cheap, else with every
  removal at its first reducing layer (the row's ``spread``). A method that cannot get that cheap
  either way is kept as a skipped row with the solver's reason.

TFLOPs come from :mod:`ficoco.measure.budget` on the checkpoint's own shape, one image and the mean text
length of the procedural prompts; the LLM prefill and the vision side (tower + projector) are
reported apart and summed. Accuracy is exact match after normalisation
(:func:`ficoco.proxy.evaluate.accuracy`) on the first ``size`` samples of a fixed procedural split,
per family and overall; easy-VQA's test questions, when asked for, are a column of their own and
are not part of ``overall``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..measure import budget
from ..evaluation.report import plot_results
from ..evaluation.runner import mean_text_tokens, variants_for
from ..methods import DECODER_METHODS, ENCODER_METHODS, Method, get_method
from ..prompts import chat_prompt
from .easyvqa import load_easy_vqa
from .evaluate import accuracy, prompt_batches
from .recipe import EASY_VQA_FAMILY as EASY_VQA  # the column of easy-VQA's test questions
from .recipe import easy_vqa_rendered, rendered
from .scenes import FAMILIES, make_split

DEFAULT_METHODS = ENCODER_METHODS + DECODER_METHODS
REFERENCE = "ficoco-v"  # the method whose cost the matched-TFLOPs rows meet
FILES = ("proxy_accuracy.json", "proxy_accuracy.md", "proxy_accuracy.png")
#: rows of a run under way, saved after each one, so that an interrupted run resumes
PARTIAL = "proxy_accuracy.partial.json"


def matched_label(method: str, retain: int) -> str:
    return f"{method}@tflops({retain})"


def load_samples(split: str = "test", size: int | None = None, easy_vqa: bool = True,
                 render: Callable = rendered) -> dict[str, list]:
    """``{"procedural": [...], "easy-vqa": [...]}``: the first ``size`` samples of the procedural
    ``split`` (all of it without ``size``), rendered by ``render`` (336 px; the Qwen proxy's: each
    at its own size), and as many of easy-VQA's test questions (none unless ``easy_vqa``;
    RuntimeError without the easy-vqa package)."""
    procedural = [render(example) for example in make_split(split, size)]
    samples = {"procedural": procedural}
    if easy_vqa:
        try:
            questions = load_easy_vqa("test")[:len(procedural)]
        except ImportError as err:
            raise RuntimeError(f"{err} (or leave easy-VQA out: --no-easy-vqa)") from None
        samples[EASY_VQA] = [easy_vqa_rendered(s) for s in questions]
    return samples


def _cost_fields(cost: budget.MethodCost) -> dict:
    return {"llm_input_visual": cost.llm_input_visual, "llm_final_visual": cost.llm_final_visual,
            "llm_tflops": cost.llm_tflops, "vision_tflops": cost.vision_tflops,
            "tflops": cost.llm_tflops + cost.vision_tflops}


def _schedule(method: Method | None) -> dict:
    """Where a method reduces, as built (the solver may move a decoder method's ``end_layer``)."""
    out = {}
    for side in ("vision", "language"):
        reduction = getattr(method, side, None)
        if reduction is not None:
            out[side] = {"retain": reduction.retain, "start_layer": reduction.start_layer,
                         "end_layer": reduction.end_layer}
    if method is not None and method.input is not None:
        out["input"] = {"retain": method.input.retain}
    return out


def plan_variants(shape: budget.Shape, methods: Sequence[str], retains: Sequence[int | float], text_tokens: int,
                  options: Mapping[str, Mapping] | None = None) -> list[tuple[dict, Method | None]]:
    """``[(row, method)]`` for every variant, costed on ``shape``; ``method`` is None for vanilla
    and for skipped rows (``row["skipped"]`` then says why: e.g. a budget the method's schedule
    cannot reach on this model). ``retains``: token counts, or shares of each image's tokens."""
    options = {name: dict(opts) for name, opts in (options or {}).items()}
    planned = []
    for variant in variants_for(methods, retains, options):
        method = variant.build()
        try:
            cost = (budget.method_cost(shape, method, text_tokens) if method
                    else budget.vanilla_cost(shape, text_tokens))
        except ValueError as err:  # the method refuses this budget on this model: a row that says why
            planned.append(({"label": variant.label, "method": variant.method, "kind": "retain",
                             "retain": variant.retain, "schedule": _schedule(method), "skipped": str(err)}, None))
            continue
        row = {"label": variant.label, "method": variant.method, "kind": "vanilla" if method is None else "retain",
               "retain": variant.retain, "schedule": _schedule(method), "skipped": None, **_cost_fields(cost)}
        planned.append((row, method))
    decoder_side = [name for name in dict.fromkeys(methods)
                    if name != "vanilla" and get_method(name, **options.get(name, {})).language is not None]
    for retain in retains:
        try:
            reference = budget.method_cost(shape, get_method(REFERENCE, retain=retain, **options.get(REFERENCE, {})),
                                           text_tokens)
        except ValueError as err:
            reference, reason = None, f"{REFERENCE}@{retain} does not fit this model: {err}"
        for name in decoder_side:
            row = {"label": matched_label(name, retain), "method": name, "kind": "matched", "retain": retain,
                   "target_llm_tflops": reference.llm_tflops if reference else None, "schedule": {}, "skipped": None}
            method = None
            if reference is not None:
                for spread in budget.SPREADS:  # the method's own layers where they can get that cheap
                    try:
                        method, cost = budget.solve_for_tflops(shape, name, reference.llm_tflops, text_tokens,
                                                               spread=spread, **options.get(name, {}))
                    except ValueError as err:
                        row["skipped"] = str(err)
                        continue
                    row.update(schedule=_schedule(method), spread=spread, skipped=None, **_cost_fields(cost))
                    break
            else:
                row["skipped"] = reason
            planned.append((row, method))
    return planned


def _percent(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else 100.0 * value / base


def evaluate_variants(model, processor, samples: Mapping[str, Sequence], planned: Sequence[tuple[dict, Method | None]],
                      batch_size: int = 64, log: Callable[[str], None] = print, *,
                      done: Mapping[str, dict] | None = None,
                      save: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Fill each planned row with ``accuracy`` (per family, ``overall`` of the procedural samples,
    ``easy-vqa``) and ``percent_of_vanilla`` (same keys); skipped rows get neither. ``done``:
    rows already evaluated with the same settings (by label: an interrupted run's), taken as they
    are; ``save(rows)`` is called after each newly evaluated row, so an interruption loses at most
    the row under way. Each sample set's prompt batches are built once for every variant."""
    rows = []
    batches: dict[str, list[dict]] = {}

    def score(name: str, method: Method | None) -> dict[str, float]:
        if name not in batches:
            batches[name] = prompt_batches(model, processor, samples[name], batch_size)
        return accuracy(model, processor, samples[name], method, batch_size, batches=batches[name])

    for row, method in planned:
        row = dict(row)
        if row["skipped"]:
            log(f"{row['label']:<22} skipped: {row['skipped']}")
            rows.append(row)
            continue
        if row["kind"] != "vanilla" and method is None:
            raise ValueError(f"{row['label']}: no method to evaluate")
        earlier = (done or {}).get(row["label"])
        if earlier is not None and "accuracy" in earlier:
            row["accuracy"], row["seconds"] = earlier["accuracy"], earlier.get("seconds")
            rows.append(row)
            log(f"{row['label']:<22} overall {100 * row['accuracy']['overall']:5.1f}%  (from the interrupted run)")
            continue
        started = time.perf_counter()
        scores = score("procedural", method)
        if samples.get(EASY_VQA):
            scores[EASY_VQA] = score(EASY_VQA, method)["overall"]
        row["accuracy"] = scores
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        log(f"{row['label']:<22} overall {100 * scores['overall']:5.1f}%  "
            f"LLM {row['llm_tflops']:.4g} TFLOPs  {row['llm_final_visual']} visual tokens")
        if save is not None:
            save(rows)
    vanilla = next((r["accuracy"] for r in rows if r["kind"] == "vanilla" and "accuracy" in r), None)
    for row in rows:
        if "accuracy" in row and vanilla is not None:
            row["percent_of_vanilla"] = {k: _percent(v, vanilla.get(k)) for k, v in row["accuracy"].items()}
    return rows


def _families(rows: Sequence[dict]) -> list[str]:
    seen = {k for r in rows for k in r.get("accuracy", {})}
    return [f for f in FAMILIES if f in seen] + sorted(seen - set(FAMILIES) - {"overall", EASY_VQA})


def markdown(report: Mapping) -> str:
    """One row per variant: retained visual tokens, LLM / vision TFLOPs, accuracy (%) per family,
    overall and its % of vanilla, then easy-VQA; skipped rows are listed under the table."""
    rows = report["rows"]
    families = _families(rows)
    easy = any(EASY_VQA in r.get("accuracy", {}) for r in rows)
    header = (["variant", "visual tokens", "LLM TFLOPs", "vision TFLOPs"] + families + ["overall", "% vanilla"]
              + ([EASY_VQA, f"{EASY_VQA} % vanilla"] if easy else []))

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    def ratio(value):
        return "-" if value is None else f"{value:.1f}"

    lines = [f"Proxy model `{report['model']}`: {report['split']} split, {report['size']} samples"
             + (f" (+{report['easy_vqa_size']} easy-VQA test questions, not in overall)" if easy else "")
             + f", {report['text_tokens']} text tokens, {report['device']}. Accuracy in %, exact match. "
             + (f"Visual tokens and TFLOPs are counted for one {report['cost_image_size']} image (each sample has its "
                f"own size). " if report.get("cost_image_size") else "")
             + f"`method@tflops(N)`: the decoder-side method solved to {REFERENCE}@N's LLM prefill TFLOPs.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for r in rows:
        if r["skipped"]:
            notes.append(f"- `{r['label']}` skipped: {r['skipped']}")
            continue
        acc, rel = r["accuracy"], r.get("percent_of_vanilla", {})
        cells = [r["label"], str(r["llm_final_visual"]), f"{r['llm_tflops']:.4g}", f"{r['vision_tflops']:.4g}"]
        cells += [pct(acc.get(f)) for f in families] + [pct(acc["overall"]), ratio(rel.get("overall"))]
        if easy:
            cells += [pct(acc.get(EASY_VQA)), ratio(rel.get(EASY_VQA))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(report: Mapping, path: str) -> None:
    """Accuracy vs LLM prefill TFLOPs (:func:`ficoco.evaluation.report.plot_results`): a panel for
    the procedural overall and one for easy-VQA, a line per method (its matched-TFLOPs rows a line
    of their own), vanilla a single marker."""
    points = []
    for r in report["rows"]:
        if "accuracy" not in r:
            continue
        name = f"{r['method']} matched" if r["kind"] == "matched" else r["method"]
        variant = name if r["kind"] == "vanilla" else f"{name}@{r['retain']}"
        for panel, key in (("procedural (overall)", "overall"), (EASY_VQA, EASY_VQA)):
            if key in r["accuracy"]:
                points.append({"task": panel, "variant": variant, "llm_tflops": r["llm_tflops"],
                               "score": {"score": 100 * r["accuracy"][key]}})
    plot_results(points, path)


def write(report: Mapping, out_dir: str) -> list[Path]:
    """``proxy_accuracy.json``, ``.md`` and ``.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in FILES]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(markdown(report))
    plot(report, str(paths[2]))
    return paths


#: the default budgets: LLaVA-1.5's counts of 576 tokens; shares of each image's tokens for Qwen-VL
DEFAULT_RETAINS = {"llava": (192, 128, 64), "qwen": (0.5, 0.25, 0.125)}
#: the image size a Qwen-VL proxy's TFLOPs are counted at (the scenes' own size)
QWEN_COST_SIZE = (336, 336)


def run(model_path: str, out_dir: str, *, split: str = "test", size: int | None = None,
        retains: Sequence[int | float] | None = None, methods: Sequence[str] = DEFAULT_METHODS, device: str | None = None,
        batch_size: int = 64, easy_vqa: bool = True, options: Mapping[str, Mapping] | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Evaluate the checkpoint at ``model_path`` (LLaVA-1.5 or Qwen-VL; fp16 on CUDA, fp32 on
    CPU; ``device`` None: CUDA when present) and write the table, JSON and plot to ``out_dir``;
    returns the report. ``retains`` default: :data:`DEFAULT_RETAINS` of the family. A Qwen-VL
    model reads each scene at its own size (:func:`ficoco.proxy.qwen.rendered_at_size`) and is
    costed at :data:`QWEN_COST_SIZE`. ``options``: per-method keyword options, e.g.
    ``{"ficoco-v": {"start_layer": 2}}``."""
    import torch
    import transformers

    from ..adapters.families import family_of_model_type
    from ..checkpoint import checkpoint_config, load_model, load_processor
    from .qwen import rendered_at_size

    for name in methods:
        if name != "vanilla":
            get_method(name, **dict((options or {}).get(name, {})))  # fail fast on an unknown method
    model_type = checkpoint_config(model_path).get("model_type")
    family_of_model_type(model_type, model_path)  # one line naming the supported families
    qwen = model_type in budget.QWEN_MODEL_TYPES
    family = "qwen" if qwen else "llava"
    retains = tuple(DEFAULT_RETAINS[family] if retains is None else retains)
    if importlib.util.find_spec("matplotlib") is None:  # the plot comes last: fail before the work, not after
        raise RuntimeError("the plot needs matplotlib: pip install matplotlib")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
    samples = load_samples(split, size, easy_vqa, rendered_at_size if qwen else rendered)
    processor = load_processor(model_path)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = load_model(model_path, dtype=dtype, device=device).eval()
    shape = budget.shape_of(model.config, QWEN_COST_SIZE if qwen else None, processor.image_processor)
    questions = [sample.question for sample in samples["procedural"][:32]]
    text_tokens = mean_text_tokens(processor, [chat_prompt(processor, q) for q in questions])
    planned = plan_variants(shape, methods, retains, text_tokens, options)
    log(f"{len(planned)} variants on {len(samples['procedural'])} {split} samples"
        + (f" + {len(samples[EASY_VQA])} easy-VQA questions" if easy_vqa else "") + f" ({device})")
    settings = {
        "model": str(model_path), "family": family, "split": split,
        "cost_image_size": "x".join(map(str, QWEN_COST_SIZE)) if qwen else None, "size": len(samples["procedural"]),
        "easy_vqa_size": len(samples.get(EASY_VQA, ())), "device": device, "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size, "torch": torch.__version__, "transformers": transformers.__version__,
        "text_tokens": text_tokens, "options": {k: dict(v) for k, v in (options or {}).items()},
    }
    partial = Path(out_dir) / PARTIAL
    done = _interrupted_rows(partial, settings, log)

    def save(rows: list[dict]) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))

    rows = evaluate_variants(model, processor, samples, planned, batch_size, log, done=done, save=save)
    report = {
        **{k: v for k, v in settings.items() if k != "options"},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "retains": list(retains), "methods": list(methods), "matched_to": REFERENCE,
        "matched_on": "llm_tflops", "vanilla_llm_tflops": budget.vanilla_cost(shape, text_tokens).llm_tflops,
        "rows": rows,
    }
    for path in write(report, out_dir):
        log(f"wrote {path}")
    partial.unlink(missing_ok=True)
    return report


def _interrupted_rows(partial: Path, settings: Mapping, log: Callable[[str], None]) -> dict[str, dict]:
    """The rows an interrupted run with the same settings saved in ``partial``, by label; a saved
    run with other settings is refused rather than overwritten."""
    if not partial.exists():
        return {}
    try:
        saved = json.loads(partial.read_text())
        earlier, rows = saved["settings"], saved["rows"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{partial} is not an interrupted table run ({err}); move it away to start afresh") from None
    differing = sorted(k for k in set(settings) | set(earlier) if settings.get(k) != earlier.get(k))
    if differing:
        raise ValueError(f"{partial} holds an interrupted run with other settings ({', '.join(differing)}); finish "
                         f"it with the same settings, or move it away to start afresh")
    done = {row["label"]: row for row in rows if "accuracy" in row}
    log(f"resuming: {len(done)} rows from the interrupted run in {partial}")
    return done
