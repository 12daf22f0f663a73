"""PruMerge and PruMerge+ with no budget (each image its own outlier count, the official default)
on the embedded LLaVA proxy: accuracy on the first 300 procedural test questions, as
``ficoco proxy-accuracy --size 300 --no-easy-vqa`` scores them (greedy, exact match, batches of
64, CPU, float32), and the visual tokens each image handed the LLM. ``ficoco proxy-accuracy``
costs every row by its budget, which an adaptive count does not have, hence this script. From the
repository root::

    PYTHONPATH=src python docs/proxy/baselines/prumerge/adaptive.py
"""

from __future__ import annotations

import torch

import ficoco
from ficoco.checkpoint import load_model, load_processor
from ficoco.proxy.evaluate import answer, normalize_answer
from ficoco.proxy.table import load_samples

MODEL = "src/ficoco/assets/proxy-llava"
BATCH = 64


def main() -> None:
    samples = load_samples("test", 300, easy_vqa=False)["procedural"]
    processor = load_processor(MODEL)
    model = load_model(MODEL, dtype=torch.float32, device="cpu").eval()
    for name in ("prumerge", "prumerge+"):
        counts: list[int] = []
        correct: dict[str, list[bool]] = {}
        with ficoco.apply(model, name) as handle:  # retain=None: the adaptive count
            for start in range(0, len(samples), BATCH):
                chunk = samples[start:start + BATCH]
                for sample, predicted in zip(chunk, answer(model, processor, chunk)):
                    hit = normalize_answer(predicted) == normalize_answer(sample.answer)
                    correct.setdefault(sample.family, []).append(hit)
                counts += handle.vision_trace.counts.tolist()  # tokens each image handed on, extra token included
        hits = [hit for family in correct.values() for hit in family]
        families = "  ".join(f"{family} {100 * sum(v) / len(v):.1f}" for family, v in sorted(correct.items()))
        print(f"{name:<10} overall {100 * sum(hits) / len(hits):.1f}%  {families}")
        print(f"{'':<10} visual tokens per image: mean {sum(counts) / len(counts):.1f}, min {min(counts)}, "
              f"max {max(counts)} ({len(counts)} images)")


if __name__ == "__main__":
    main()
