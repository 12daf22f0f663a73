"""List where each method's prefill makes the host wait for the GPU, on the tiny CPU model.

    python benchmarks/host_syncs.py pool cdpruner prumerge+

A wait in the middle of a prefill (a tensor's value read on the host: ``.item()``, ``bool(t)``,
``.tolist()``, ``nonzero``, ``bincount`` without ``minlength``...) lets the GPU finish everything
queued and then idle while the host launches what follows, one kernel at a time; at LLaVA-1.5-7B's
batch 8 one such wait after the vision tower cost pooling ~2 ms of prefill (docs/benchmarks.md,
"Sixth session"). Each line is one such operation and the ficoco / transformers frames that led to
it. What this cannot see on the CPU: ``torch.tensor(python_list, device=cuda)`` (a copy from
pageable memory, after which PyTorch synchronises the stream), which the GPU profile
(``benchmarks/profile_reduction.py``) shows as ``Memcpy HtoD (Pageable -> Device)``.
"""

from __future__ import annotations

import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ficoco
from ficoco.testing import tiny_llava

IMAGE_TOKEN, PATCHES = 95, 576
READS_ON_HOST = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "_unique2", "bincount",
                 "equal", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Prints each operation in ``READS_ON_HOST`` with the innermost ficoco / transformers frames."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READS_ON_HOST:
            frames = [f for f in traceback.extract_stack() if "ficoco" in f.filename or "transformers" in f.filename]
            print(f"  {name:<20} " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                                                 for f in reversed(frames[-3:])))
        return func(*args, **(kwargs or {}))


def main(methods: list[str]) -> None:
    model = tiny_llava().eval()
    ids = torch.tensor([[1] + [7] * 5 + [IMAGE_TOKEN] * PATCHES + [9] * 12] * 2)
    pixels = torch.randn(2, 3, 336, 336)
    for name in methods:
        print(f"==== {name}")
        with ficoco.apply(model, name, retain=64), torch.inference_mode(), HostReads():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


if __name__ == "__main__":
    main(sys.argv[1:] or ["topk", "pool", "divprune", "cdpruner", "prumerge+"])
