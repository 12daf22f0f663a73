"""Replay a LLaVA vision tower as CUDA graphs.

The vision tower sees fixed-shape inputs (``[B, 3, 336, 336]``) and, with an encoder-side method
attached, a fixed per-layer schedule, so its whole forward pass -- reductions included -- is one
static sequence of kernels. At small batch the tower is bound by Python and kernel launches (a
reduction step is a few hundred small kernels); replaying a captured graph removes that cost for
vanilla, oracle and every method alike.

One graph is captured per (shape, dtype, call options) on first use. Outputs live in the graph's
memory and are cloned before being returned. Capture happens under the hooks attached at that
moment: attach the method first, then graph the tower (and un-graph before detaching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: Tensor
    output: object


def _clone_output(output):
    if isinstance(output, Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone_output(x) for x in output)
    if isinstance(output, list):
        return [_clone_output(x) for x in output]
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):  # ModelOutput
        cloned = type(output)(**{k: _clone_output(v) for k, v in output.items()})
        return cloned
    return output


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Tensor):
        raise TypeError("tensor call options cannot be graphed")
    return value


class GraphedVisionTower:
    """Installs an instance-level ``forward`` on ``tower`` that replays captured CUDA graphs.

    Use as a context manager or call :meth:`remove`. Inputs on the CPU, or calls with autograd
    enabled, run the ordinary forward.
    """

    def __init__(self, tower: nn.Module, warmup: int = 2) -> None:
        if "forward" in tower.__dict__:
            raise RuntimeError("the vision tower's forward is already replaced")
        self.tower, self.warmup = tower, warmup
        self.original = tower.forward
        self.captured: dict[tuple, _Captured] = {}
        tower.forward = self._forward

    def _forward(self, pixel_values: Tensor, *args, **kwargs):
        if args or not pixel_values.is_cuda or torch.is_grad_enabled():
            return self.original(pixel_values, *args, **kwargs)
        try:
            key = (tuple(pixel_values.shape), pixel_values.dtype, tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))
        except TypeError:
            return self.original(pixel_values, **kwargs)
        entry = self.captured.get(key)
        if entry is None:
            entry = self._capture(pixel_values, kwargs)
            self.captured[key] = entry
        entry.static_input.copy_(pixel_values)
        entry.graph.replay()
        return _clone_output(entry.output)

    def _capture(self, pixel_values: Tensor, kwargs: dict) -> _Captured:
        static_input = pixel_values.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.original(static_input, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.original(static_input, **kwargs)
        return _Captured(graph, static_input, output)

    def remove(self) -> None:
        self.tower.__dict__.pop("forward", None)
        self.captured.clear()

    def __enter__(self) -> "GraphedVisionTower":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def graph_vision_tower(model: nn.Module, warmup: int = 2) -> GraphedVisionTower:
    """Replay ``model``'s vision tower (LlavaForConditionalGeneration or LlavaModel) as CUDA graphs."""
    llava = getattr(model, "model", model)
    tower = getattr(llava, "vision_tower", None)
    if tower is None:
        raise TypeError(f"{type(model).__name__} has no vision_tower")
    return GraphedVisionTower(tower, warmup)
