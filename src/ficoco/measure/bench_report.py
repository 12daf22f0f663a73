"""Turn benchmark JSON files (``ficoco bench``) into Markdown tables and a latency plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def load(paths: list[str]) -> dict:
    """Merge several result files of one preset (e.g. batch 1/8 and batch 32 runs, or a Qwen-VL
    preset's runs with the tower's stock attention and the one-call path; those have no
    generation rows)."""
    merged: dict = {"prefill": [], "generate": [], "flops": [], "runs": []}
    for path in paths:
        data = json.loads(Path(path).read_text())
        merged["preset"] = data["preset"]
        merged["environment"] = data["environment"]
        merged["runs"].append({"file": Path(path).name, "settings": data["settings"], "date": data["environment"]["date"]})
        merged["prefill"] += data["prefill"]
        merged["generate"] += data.get("generate", [])
        merged["flops"] += data.get("flops", [])
    return merged


def _label(row) -> str:
    """The variant's name, with the tower attention it ran on when the run compared several."""
    return row["variant"] if row.get("attention") is None else f"{row['variant']} ({row['attention']})"


def _index(rows):
    return {(_label(r), r["retain"], r["batch"]): r for r in rows}


def _vanilla(prefill: dict, batch: int, attention: str | None):
    """The vanilla row at ``batch`` (576 tokens on LLaVA, a share of 1.0 on Qwen-VL)."""
    name = "vanilla" if attention is None else f"vanilla ({attention})"
    return next((row for (label, _, b), row in prefill.items() if label == name and b == batch), None)


def _with_attention(name: str, attention: str | None) -> str:
    return name if attention is None else f"{name} ({attention})"


def target_rows(data: dict) -> list[dict]:
    """Per method and retained count: prefill / oracle at each batch, and speedup over vanilla."""
    prefill = _index(data["prefill"])
    batches = sorted({r["batch"] for r in data["prefill"]})
    out = []
    order = {name: i for i, name in enumerate(dict.fromkeys(_label(r) for r in data["prefill"]))}
    for (label, retain, batch), row in sorted(prefill.items(), key=lambda kv: (order[kv[0][0]], -kv[0][1], kv[0][2])):
        variant, attention = row["variant"], row.get("attention")
        if variant == "vanilla" or batch != batches[0]:
            continue
        entry = {"method": label, "retain": retain}
        for b in batches:
            # the method's own schedule without scoring where the run has it, else the LLM fed `retain` tokens
            reference = variant if variant.startswith("oracle") else "oracle"
            own = f"oracle[{variant}]"
            if not variant.startswith("oracle") and (_with_attention(own, attention), retain, b) in prefill:
                reference = own
            mine = prefill.get((label, retain, b))
            oracle = prefill.get((_with_attention(reference, attention), retain, b))
            vanilla = _vanilla(prefill, b, attention)
            if mine and oracle:
                entry[f"overhead_b{b}"] = mine["prefill_ms"] / oracle["prefill_ms"]
            if mine and vanilla:
                entry[f"speedup_b{b}"] = vanilla["prefill_ms"] / mine["prefill_ms"]
                entry[f"llm_speedup_b{b}"] = vanilla["llm_ms"] / mine["llm_ms"]
        out.append(entry)
    return out


def markdown(data: dict) -> str:
    prefill = _index(data["prefill"])
    batches = sorted({r["batch"] for r in data["prefill"]})
    variants = []
    for r in data["prefill"]:
        key = (_label(r), r["retain"])
        if key not in variants:
            variants.append(key)
    lines = []
    head = "| variant | retain | " + " | ".join(f"b{b} total | b{b} vision | b{b} LLM" for b in batches) + \
           " | calc. LLM TFLOPs | KV MB/img | peak GB (b" + str(batches[-1]) + ") |"
    lines += ["### Prefill latency (ms, median)", "", head, "|" + "---|" * (head.count("|") - 1)]
    for variant, retain in variants:
        cells = []
        for b in batches:
            r = prefill.get((variant, retain, b))
            cells += [f"{r['prefill_ms']:.1f}", f"{r['vision_ms']:.1f}", f"{r['llm_ms']:.1f}"] if r else ["-"] * 3
        last = prefill.get((variant, retain, batches[-1])) or prefill.get((variant, retain, batches[0]))
        lines.append(f"| {variant} | {retain} | " + " | ".join(cells) +
                     f" | {last['calculator_llm_tflops']:.2f} | {last.get('kv_cache_mb', float('nan')):.1f} "
                     f"| {last['peak_memory_gb']:.1f} |")
    lines += ["", "### Overhead vs the oracle and speedup vs vanilla (prefill, vision + LLM)", "",
              "Overhead = method / oracle at the same retained count: `oracle[method]`, the same per-layer schedule "
              "with truncation instead of scoring, where the run has it (decoder-side methods; every method on "
              "Qwen-VL), else `oracle`, the LLM fed `retain` tokens. Speedup = vanilla / method, for the whole prefill and for the LLM part alone.", ""]
    head = "| method | retain | " + " | ".join(f"overhead b{b}" for b in batches) + " | " + \
           " | ".join(f"speedup b{b}" for b in batches) + " | " + " | ".join(f"LLM speedup b{b}" for b in batches) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for row in target_rows(data):
        cells = [f"{row.get(f'overhead_b{b}', float('nan')):.2f}x" for b in batches]
        cells += [f"{row.get(f'speedup_b{b}', float('nan')):.2f}x" for b in batches]
        cells += [f"{row.get(f'llm_speedup_b{b}', float('nan')):.2f}x" for b in batches]
        lines.append(f"| {row['method']} | {row['retain']} | " + " | ".join(cells) + " |")
    if data["generate"]:
        gens = defaultdict(dict)
        for g in data["generate"]:  # rows of older results have no "cache" field: dynamic
            gens[(g["variant"], g["retain"], g.get("cache", "dynamic"))][g["new_tokens"]] = g
        counts = sorted({g["new_tokens"] for g in data["generate"]})
        batch = data["generate"][0]["batch"]
        lines += ["", f"### Generation throughput (images/s, batch {batch}, greedy, HF `generate`)", "",
                  "| variant | retain | KV cache | " + " | ".join(f"{n} new token(s)" for n in counts) + " |",
                  "|---|---|---|" + "---|" * len(counts)]
        for (variant, retain, cache), by_count in gens.items():
            lines.append(f"| {variant} | {retain} | {cache} | " +
                         " | ".join(f"{by_count[n]['images_per_s']:.1f}" if n in by_count else "-" for n in counts) + " |")
    if data["flops"]:
        lines += ["", "### LLM FLOPs: FlopCounterMode on the GPU model vs the calculator (batch 1)", "",
                  "| method | retain | measured TFLOPs | calculator TFLOPs | ratio |", "|---|---|---|---|---|"]
        for f in data["flops"]:
            lines.append(f"| {f['method']} | {f['retain']} | {f['measured_tflops']:.3f} | {f['calculator_tflops']:.3f} "
                         f"| {f['ratio']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str, batch: int = 8) -> None:
    """Prefill latency vs retained visual tokens at ``batch``: vanilla, oracle and every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["prefill"] if r["batch"] == batch]
    series = defaultdict(list)
    for r in rows:
        series[r["variant"]].append((r["retain"], r["prefill_ms"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    vanilla = series.pop("vanilla", [])
    if vanilla:
        ax.axhline(vanilla[0][1], color="black", linestyle="--", label="vanilla (576)")
    for name, points in sorted(series.items()):
        points.sort()
        style = dict(linestyle=":", marker="s", color="gray") if name == "oracle" else dict(marker="o")
        if name.startswith("oracle["):
            style = dict(linestyle=":", marker="x", alpha=0.6)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    ax.set_xlabel("visual tokens retained (after the last reduction)")
    ax.set_ylabel(f"prefill latency, batch {batch} (ms)")
    ax.set_title(f"{data['preset']} shapes, {data['environment']['gpu']}, bf16, SDPA")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
