"""Answer-loss curves of the proxy-model training attempts (docs/proxy-model.md), from their logs.

    python benchmarks/plot_proxy_training.py docs/proxy/training-attempts.png

Reads the ``step N  answer loss X ...`` lines that ``ficoco train-proxy`` prints. A second stage
(``--init-from``) is drawn after the step the run it continues stopped at (stage after stage), so a
multi-run recipe reads as one curve.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOGS = Path(__file__).resolve().parent.parent / "docs" / "proxy"
STEP = re.compile(r"^step\s+(\d+)\s+answer loss ([0-9.]+)")
STOPPED = re.compile(r"at step (\d+) of")

# log file -> (label, first-stage log it continues, or None)
ATTEMPTS = {
    "attempt1-v1.log": ("1: one question per image (v1 data)", None),
    "attempt2-classhead-lr5e-4.log": ("2: + patch-class head (v1)", None),
    "attempt3-multiturn-lr5e-4.log": ("3: + 6 turns (v1)", None),
    "attempt3-stage2.log": ("3, stage 2 (v1)", "attempt3-multiturn-lr5e-4.log"),
    "attempt4-v2-align.log": ("4: v2 data, alignment loss, two runs sharing a GPU", None),
    "attempt5-stage1-lr5e-4.log": ("5: v2, 12 turns, lr 5e-4", None),
    "attempt5-stage1-lr1e-3.log": ("5: v2, 12 turns, lr 1e-3 (shipped, stage 1)", None),
    "attempt5-stage2.log": ("5, stage 2 (shipped, stage 2)", "attempt5-stage1-lr1e-3.log"),
    "attempt6-stage1-cls-layers.log": ("6a: + [CLS] scene loss at layers 12, 16, 20", None),
    "attempt6-stage1-attention.log": ("6b: + [CLS]-attention saliency loss", None),
    "attempt6-stage2-attention.log": ("6b, stage 2", "attempt6-stage1-attention.log"),
    "attempt6-stage3-attention.log": ("7: stage 2 + saliency loss, lr 3e-4 (shipped, stage 3)",
                                      "attempt5-stage2.log"),
    "attempt8-stage4-tokendrop0.25.log": ("8': stage 3 + renumbered token dropping, p 0.25",
                                          "attempt6-stage3-attention.log"),
    "attempt8-stage4-tokendrop0.5.log": ("8: stage 3 + renumbered token dropping, p 0.5 (shipped, stage 4)",
                                         "attempt6-stage3-attention.log"),
    "attempt9-textured-lr3e-4.log": ("9: stage 4 on textured backgrounds, lr 3e-4", "attempt8-stage4-tokendrop0.5.log"),
    "attempt9-textured-lr1e-3.log": ("9': the same, lr 1e-3", "attempt8-stage4-tokendrop0.5.log"),
}


def read_curve(path: Path) -> tuple[list[int], list[float], int]:
    """Steps and answer losses logged in ``path``, and the last step trained."""
    steps, losses, last = [], [], 0
    for line in path.read_text().splitlines():
        if match := STEP.match(line):
            steps.append(int(match[1]))
            losses.append(float(match[2]))
            last = max(last, int(match[1]))
        elif match := STOPPED.search(line):
            last = int(match[1])
    return steps, losses, last


def start_step(name: str) -> int:
    """The step at which the run logged in ``name`` starts on the drawn axis: after every earlier
    stage of its recipe."""
    previous = ATTEMPTS[name][1]
    return 0 if previous is None else start_step(previous) + read_curve(LOGS / previous)[2] + 1


def main(out: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more attempts than the default ten colours
    for name, (label, _) in ATTEMPTS.items():
        path = LOGS / name
        if not path.is_file():
            raise FileNotFoundError(f"training log {path} is missing")
        steps, losses, _ = read_curve(path)
        offset = start_step(name)
        ax.plot([s + offset for s in steps], losses, label=label, linewidth=2 if "shipped" in label else 1)
    ax.set_xlabel("optimizer step (batch 128 except attempts 1-2; each later stage drawn after the one it continues)")
    ax.set_ylabel("answer loss (next-token CE on answers)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Proxy LLaVA training attempts (one H100 or H200 GPU per run)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(LOGS / "training-attempts.png"))
