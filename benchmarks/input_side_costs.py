"""What an LLM-input reduction costs on LLaVA-1.5-7B (random bf16 weights) on the host and on the
GPU, one method at a time, against the plain oracle (the same token count, truncated):

    python benchmarks/input_side_costs.py --methods pool,prumerge+,cdpruner --retain 64 --batch 8

Per method it prints:

- ``vision``: the median time of the vision side (tower, projector, reduction) by CUDA events, as
  ``ficoco bench`` times it, and ``launch`` the host's time to queue it (no synchronisation):
  where the two are close, the vision side is bound by Python and kernel launches;
- ``hook host``: the host's time in the projector's reduction hook (methods that reduce at the
  projector): what the host spends launching the reduction;
- ``hook kernels``: the GPU time of the kernels that hook launched (one profiled call, after every
  timing: a profiler session leaves later launches slower);
- ``host reads``: device-to-host copies and stream synchronisations inside the hook;
- ``prompt host``: the host's time to find the instruction's tokens in the prompt before the
  encoder is queued (``remember_prompt``; methods that read the instruction), during which the
  GPU has nothing to do.

``--graph-vision`` replays the tower and the reduction of the projected tokens as CUDA graphs, as
``ficoco bench --graph-vision`` does.

Where the vision side is launch-bound, a reduction costs about its host time, not its kernels'.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack, contextmanager

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import ficoco
from ficoco.measure import bench, bench_models
from ficoco.methods.baselines import oracle

RANGE = "input_side_costs.hook"


class HookTimer:
    """Brackets the projector's forward hooks that ficoco registered: one hook prepended before
    them, one appended after them (host time, and a profiler range around them)."""

    def __init__(self, projector: torch.nn.Module) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self._range = None
        self._handles = [projector.register_forward_hook(self._enter, prepend=True),
                         projector.register_forward_hook(self._exit)]

    def _enter(self, module, args, output) -> None:
        self._range = record_function(RANGE)
        self._range.__enter__()
        self._start = time.perf_counter()

    def _exit(self, module, args, output) -> None:
        self.times.append((time.perf_counter() - self._start) * 1e3)
        self._range.__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def hook_profile(events) -> tuple[float, int]:
    """``(kernel ms, host reads)`` of the last :data:`RANGE` in ``events``."""
    ranges = [e for e in events if e.name == RANGE and e.device_type == DeviceType.CPU]
    if not ranges:
        return float("nan"), 0
    kernels, reads, todo = 0.0, 0, list(ranges[-1].cpu_children)
    while todo:
        op = todo.pop()
        todo.extend(op.cpu_children)
        kernels += op.self_device_time_total
        if "Synchronize" in op.name or "DtoH" in op.name or op.name == "aten::_local_scalar_dense":
            reads += 1
    return kernels / 1e3, reads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="pool,prumerge,prumerge+,divprune,cdpruner,topk")
    parser.add_argument("--retain", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--graph-vision", action="store_true", help="the tower and the input reduction as CUDA graphs")
    args = parser.parse_args()
    attached.graph = args.graph_vision
    model = bench.random_model("llava-1.5-7b")
    inputs = attached.inputs = bench.make_inputs(args.batch, 64, "cuda", torch.bfloat16)
    projector = model.model.multi_modal_projector
    names = ["oracle", *args.methods.split(",")]
    rows = {}
    # every timing first: a profiler session leaves the launches slower for the rest of the process
    for name in names:
        with attached(model, name, args.retain) as (handle, prompt), torch.inference_mode():
            timer = HookTimer(projector)
            prompt_times: list[float] = []
            if handle.input is not None:  # an instance attribute over the method, removed below
                remember = handle.input.remember_prompt

                def timed_remember(*a, **k):
                    start = time.perf_counter()
                    remember(*a, **k)
                    prompt_times.append((time.perf_counter() - start) * 1e3)

                handle.input.remember_prompt = timed_remember
            try:
                launches: list[float] = []

                def vision():
                    start = time.perf_counter()
                    out = bench_models.encode_visual(model, inputs, handle, prompt)
                    launches.append((time.perf_counter() - start) * 1e3)
                    return out

                times = bench.cuda_times(vision, 3, args.repeats)
                host = statistics.median(timer.times[-args.repeats:]) if timer.times else float("nan")
                prompt_ms = statistics.median(prompt_times[-args.repeats:]) if prompt_times else float("nan")
                rows[name] = [statistics.median(times), statistics.median(launches[-args.repeats:]), host, prompt_ms]
            finally:
                timer.remove()
                if handle.input is not None:
                    del handle.input.remember_prompt
    for name in names:
        with attached(model, name, args.retain) as (handle, prompt), torch.inference_mode():
            timer = HookTimer(projector)
            try:
                bench_models.encode_visual(model, inputs, handle, prompt)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    bench_models.encode_visual(model, inputs, handle, prompt)
                    torch.cuda.synchronize()
                rows[name] += list(hook_profile(prof.events()))
            finally:
                timer.remove()
    print(f"{'method':>12} {'vision':>9} {'launch':>9} {'hook host':>10} {'prompt host':>12} {'hook kernels':>13} "
          f"{'host reads':>11}")
    for name, (vision_ms, launch_ms, host, prompt_ms, kernels, reads) in rows.items():
        print(f"{name:>12} {vision_ms:7.2f}ms {launch_ms:7.2f}ms {host:8.2f}ms {prompt_ms:10.2f}ms {kernels:11.2f}ms "
              f"{reads:11d}")


@contextmanager
def attached(model, name: str, retain: int):
    method = oracle(retain) if name == "oracle" else ficoco.get_method(name, retain=retain)
    with ficoco.apply(model, method) as handle, ExitStack() as graphs:
        if attached.graph:  # after attaching: the tower's graph captures the hooks
            graphs.enter_context(ficoco.graph_vision_tower(model))
            if handle.input is not None:
                graphs.enter_context(ficoco.graph_input_reduction(handle))
        inputs = attached.inputs
        yield handle, (handle.prepare_inputs(**inputs) if handle.input is not None else None)

if __name__ == "__main__":
    main()
