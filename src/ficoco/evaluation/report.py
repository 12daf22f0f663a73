"""The tables, warnings and plot of ``ficoco eval``'s results.

A result is one ``{"task", "variant", "n", "score", "llm_tflops", ...}`` row per benchmark and
variant (see :func:`ficoco.evaluation.runner.run_task`). The markdown table has the paper's layout:
a row per method@budget, LLM TFLOPs, a column per benchmark named with its metric, and the mean
share of vanilla. A second table gives, for every cell, the share of answers the benchmark's parser
could not read. A cell where that share exceeds :data:`UNPARSED_WARN_SHARE` is flagged in both
tables and listed in a warning: its score measures the answer format, not the model.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from .metrics import unparsed_share

#: share of unparsed answers above which a result is flagged
UNPARSED_WARN_SHARE = 0.10
FLAG = "⚠"

#: how the papers name each benchmark
TASK_TITLES: Mapping[str, str] = MappingProxyType({
    "textvqa_val": "TextVQA", "vqav2_val": "VQAv2", "vizwiz_vqa_val": "VizWiz", "pope": "POPE", "mme": "MME",
    "scienceqa_img": "SQA-IMG", "seedbench": "SEED", "gqa": "GQA", "mmbench_en_dev": "MMB", "mmbench_cn_dev": "MMB-CN",
    "mmvet": "MM-Vet", "llava_in_the_wild": "LLaVA-W", "mmmu_val": "MMMU", "tgif_qa": "TGIF-QA", "msvd_qa": "MSVD-QA",
    "msrvtt_qa": "MSRVTT-QA", "activitynetqa": "ActivityNet-QA",
})
_METRIC_TITLES: Mapping[str, str] = MappingProxyType({
    "vqa_accuracy": "VQA accuracy", "perception": "perception score", "accuracy": "accuracy",
    "circular_accuracy": "circular accuracy", "exact_match": "exact match", "gpt_score": "GPT score",
    "relative_score": "relative score", "gpt_accuracy": "GPT accuracy",
})


def headline(score: Mapping) -> float | None:
    """The number a table shows for one scorer result (``None`` when it was skipped)."""
    return None if score.get("skipped") else score.get("score")


def column_title(task: str, score: Mapping | None) -> str:
    """``"POPE F1 (mean of 3 splits)"``: the benchmark and the metric of its headline number."""
    title = TASK_TITLES.get(task, task)
    if not score:
        return title
    metric = str(score.get("metric", ""))
    if metric.startswith("f1"):
        splits = len(score.get("per_split") or {})
        return f"{title} F1 (mean of {splits} split{'s' * (splits != 1)})"
    return f"{title} {_METRIC_TITLES.get(metric, metric)}".strip()


def significant(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures (``0.00412``, ``3.30``, ``28.6``), ``-`` for None."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    text = f"{value:#.{digits}g}"
    return text.rstrip(".") if "e" not in text else f"{value:.{digits - 1}e}"


def _fixed(value: float | None, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _ordered(results: Sequence[Mapping]) -> tuple[list[str], list[str], dict[tuple[str, str], Mapping]]:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    return tasks, variants, {(r["task"], r["variant"]): r for r in results}


def flagged(results: Sequence[Mapping], threshold: float = UNPARSED_WARN_SHARE) -> list[tuple[str, str, float]]:
    """``(task, variant, share)`` of every result whose unparsed share exceeds ``threshold``."""
    out = []
    for r in results:
        share = r.get("unparsed", unparsed_share(r["score"]))
        if share is not None and share > threshold:
            out.append((r["task"], r["variant"], share))
    return out


def warnings(results: Sequence[Mapping], threshold: float = UNPARSED_WARN_SHARE) -> list[str]:
    """One line per flagged result, for the console and the foot of ``results.md``."""
    return [f"{FLAG} {TASK_TITLES.get(task, task)} {variant}: {100 * share:.0f}% of the answers could not be parsed "
            f"(more than {100 * threshold:.0f}%): its score measures the answer format, not the model"
            for task, variant, share in flagged(results, threshold)]


def table_rows(results: Sequence[Mapping]) -> tuple[list[str], list[list]]:
    """Header and rows of the score table: variant, mean LLM TFLOPs, a score per task, % of vanilla."""
    tasks, variants, by_key = _ordered(results)
    titles = [column_title(t, next((by_key[t, v]["score"] for v in variants if (t, v) in by_key), None))
              for t in tasks]
    header = ["variant", "LLM TFLOPs (mean)"] + titles + ["% of vanilla"]
    rows = []
    for variant in variants:
        cells = [by_key.get((t, variant)) for t in tasks]
        flops = [c["llm_tflops"] for c in cells if c and c.get("llm_tflops") is not None]  # videos: not costed
        scores = [headline(c["score"]) if c else None for c in cells]
        ratios = []
        for task, value in zip(tasks, scores):
            base = by_key.get((task, "vanilla"))
            base_value = headline(base["score"]) if base else None
            if value is not None and base_value:
                ratios.append(value / base_value)
        rows.append([variant, sum(flops) / len(flops) if flops else None] + scores +
                    [100 * sum(ratios) / len(ratios) if ratios else None])
    return header, rows


def markdown_table(results: Sequence[Mapping], threshold: float = UNPARSED_WARN_SHARE) -> str:
    """Scores in the paper's layout, then the unparsed-answer shares, then the warnings."""
    header, rows = table_rows(results)
    tasks, variants, by_key = _ordered(results)
    bad = {(t, v) for t, v, _ in flagged(results, threshold)}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        variant = row[0]
        scores = [_fixed(value) + (f" {FLAG}" if (task, variant) in bad else "")
                  for task, value in zip(tasks, row[2:-1])]
        lines.append("| " + " | ".join([variant, significant(row[1]), *scores, _fixed(row[-1])]) + " |")
    lines += ["", "Unparsed answers (share of answers the benchmark's parser could not read; POPE counts them as "
              "\"yes\", the other benchmarks as wrong):", "",
              "| " + " | ".join(["variant"] + [TASK_TITLES.get(t, t) for t in tasks]) + " |",
              "|" + "---|" * (len(tasks) + 1)]
    for variant in variants:
        cells = []
        for task in tasks:
            result = by_key.get((task, variant))
            share = None if result is None else result.get("unparsed", unparsed_share(result["score"]))
            cells.append(_percent(share) + (f" {FLAG}" if (task, variant) in bad else ""))
        lines.append("| " + " | ".join([variant, *cells]) + " |")
    lines += _video_qa_table(results)
    skipped = sorted({TASK_TITLES.get(r["task"], r["task"]) for r in results if r["score"].get("skipped")})
    if skipped:
        lines += ["", f"Not scored (no judge configured; predictions kept): {', '.join(skipped)}"]
    uncosted = sorted({TASK_TITLES.get(r["task"], r["task"]) for r in results if r.get("llm_tflops") is None})
    if uncosted:
        lines += ["", f"Not in the TFLOPs column (video inputs are not costed): {', '.join(uncosted)}"]
    prompts = {r["task"]: r["ocr_reference"] for r in results if "ocr_reference" in r}
    for task, with_ocr in prompts.items():
        lines += ["", f"{TASK_TITLES.get(task, task)} prompts: " + ("with the reference OCR tokens (LLaVA-1.5's setting)"
                                                                   if with_ocr else "without the reference OCR tokens")]
    notes = warnings(results, threshold)
    if notes:
        lines += ["", "**Warning: answers the benchmarks could not parse.**", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _video_qa_table(results: Sequence[Mapping]) -> list[str]:
    """Lines of the judged video QA results: accuracy / mean score per benchmark and variant, as
    Video-LLaVA's tables give them (none when no such result was judged)."""
    judged = [r for r in results if r["score"].get("metric") == "gpt_accuracy" and not r["score"].get("skipped")]
    if not judged:
        return []
    tasks, variants, _ = _ordered(judged)
    by_key = {(r["task"], r["variant"]): r["score"] for r in judged}
    lines = ["", "GPT-judged video QA (Video-LLaVA's protocol): accuracy / mean score (0-5):", "",
             "| " + " | ".join(["variant"] + [TASK_TITLES.get(t, t) for t in tasks]) + " |",
             "|" + "---|" * (len(tasks) + 1)]
    for variant in variants:
        cells = [f"{by_key[t, variant]['accuracy']:.1f} / {by_key[t, variant]['mean_score']:.2f}"
                 if (t, variant) in by_key else "-" for t in tasks]
        lines.append("| " + " | ".join([variant, *cells]) + " |")
    return lines


def csv_table(results: Sequence[Mapping]) -> str:
    """The score table, then one ``unparsed <task>`` column per task (shares 0-1)."""
    header, rows = table_rows(results)
    tasks, _, by_key = _ordered(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header + [f"unparsed {TASK_TITLES.get(t, t)}" for t in tasks])
    for row in rows:
        shares = []
        for task in tasks:
            result = by_key.get((task, row[0]))
            shares.append("" if result is None else result.get("unparsed", unparsed_share(result["score"])))
        writer.writerow([("" if v is None else v) for v in row] + [("" if s is None else s) for s in shares])
    return buffer.getvalue()


def plot_results(results: Sequence[Mapping], path: str) -> None:
    """Accuracy vs LLM TFLOPs, one panel per benchmark, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lines: dict[str, list[tuple[float, float]]] = {}
        titled = None
        for r in results:
            value = headline(r["score"])
            if r["task"] == task and value is not None and r.get("llm_tflops") is not None:
                titled = titled or r["score"]
                lines.setdefault(r["variant"].split("@")[0], []).append((r["llm_tflops"], value))
        for name, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                    linestyle="--" if name == "vanilla" else "-")
        ax.set_title(column_title(task, titled), fontsize=9)
        ax.set_xlabel("LLM prefill TFLOPs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
