"""Count the ATen operations (≈ GPU kernel launches) each method adds to one prefill, per reducing
layer, on the tiny CPU model: the host-side cost that dominates small-batch GPU latency.

    python benchmarks/count_reduction_ops.py

Prints, for each method, the ops of one batched prefill with the method attached minus the ops of
the same prefill with its truncation oracle (same per-layer schedule, no scoring/merging work),
and that difference divided by the number of reducing layers. A CPU-only measurement: no timing, so it is reproducible anywhere.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ficoco
from ficoco.measure import budget
from ficoco.measure.flops import LlavaShape
from ficoco.methods.baselines import oracle
from ficoco.testing import tiny_llava

IMAGE_TOKEN, PATCHES = 95, 576


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def prompt(visual: int, text_before: int = 5, text_after: int = 12) -> list[int]:
    return [1] + [7] * text_before + [IMAGE_TOKEN] * visual + [9] * text_after


def count(model, method, batch: int = 4) -> collections.Counter:
    ids = torch.tensor([prompt(PATCHES)] * batch)
    pixels = torch.randn(batch, 3, 336, 336)
    handle = ficoco.attach(model, method) if method is not None else None
    try:
        with torch.inference_mode(), CountOps() as counter:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    finally:
        if handle is not None:
            handle.remove()
    return counter.ops


def main() -> None:
    model = tiny_llava().eval()
    geometry = budget.geometry(LlavaShape.from_config(model.config))
    vanilla = sum(count(model, None).values())
    print(f"vanilla prefill: {vanilla} ops")
    for name, options in [("fastv", {"k": 2}), ("ficoco-l", {"start_layer": 2}),
                          ("ficoco-vl", {"language_start_layer": 2}), ("ficoco-v", {}), ("tome", {}),
                          ("evit", {}), ("random", {})]:
        method = ficoco.get_method(name, retain=64, **options)
        twin = oracle(like=method)
        ops, base = count(model, method), count(model, twin)
        plan = method.plan(geometry)
        reducing = len(plan.language or {}) + len(plan.vision or {})
        extra = sum(ops.values()) - sum(base.values())
        top = ", ".join(f"{k} {v}" for k, v in (ops - base).most_common(8))
        print(f"{name:<10} +{extra:5d} ops over oracle[{name}], {reducing:2d} reducing layers, "
              f"{extra / max(reducing, 1):6.1f} per layer   [{top}]")


if __name__ == "__main__":
    main()
