"""Replay the parts of a reduced forward pass that have static shapes as CUDA graphs.

At small batch a reduction step is bound by Python and kernel launches (a few hundred small
kernels), not by GPU work. Two parts of a LLaVA forward have fixed shapes for a fixed batch and
schedule, so they can be captured once and replayed:

- the vision tower (:func:`graph_vision_tower`): fixed ``[B, 3, 336, 336]`` inputs and, with an
  encoder-side method attached, a fixed per-layer schedule, so its whole forward -- reductions
  included -- is one static sequence of kernels. It replays for vanilla, oracle and every method
  alike. Capture happens under the hooks attached at that moment: attach the method first, then
  graph the tower (and un-graph before detaching).
- each decoder-side reduction step (:func:`graph_language_steps`): the scoring, correlation and
  merging between one decoder layer's attention and its MLP, a pure function of that layer's
  hidden states, queries, keys and RoPE tables. The decoder layers themselves run as usual.
- an LLM-input reduction (:func:`graph_input_reduction`): pooling, DivPrune or CDPruner on the
  projector's output, a pure function of the projected tokens and (CDPruner) the instruction's
  embeddings; one graph per batch and instruction length. The projector itself runs as usual.

One graph is captured per (shapes, dtypes, options) on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: tuple[Tensor | None, ...]
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


def _signature(inputs: tuple[Tensor | None, ...]) -> tuple:
    return tuple(None if x is None else (tuple(x.shape), x.dtype, x.device) for x in inputs)


class CapturedCalls:
    """Replays ``fn(*inputs)`` as one CUDA graph per (caller's key, input shapes and dtypes).

    ``fn`` must be a pure function of its tensor inputs (``None`` entries pass through unchanged)
    with no host synchronisation: it runs eagerly ``warmup`` times on a side stream, is captured
    once, and afterwards each call copies the inputs into the graph's static buffers and replays
    it. The graphs of one instance run one after another on the current stream, so they share one
    memory pool for their intermediates and one buffer per input slot for their static inputs
    (each graph reads a prefix of it, filled just before its replay): 26 captured decoder steps
    hold one copy of a layer's inputs, not 26. Every captured output stays allocated, so no graph
    overwrites another's result.

    Args:
        warmup: eager runs before capture (lets cuBLAS and friends allocate their workspaces).
        clone: return copies of the outputs. Without it the returned tensors live in the graph's
            memory and are overwritten by its next replay: use them before calling again.
    """

    def __init__(self, warmup: int = 2, clone: bool = True) -> None:
        self.warmup, self.clone = warmup, clone
        self.captured: dict[tuple, _Captured] = {}
        self._pool = None
        self._input_buffers: dict[tuple, Tensor] = {}

    def __call__(self, key, fn: Callable, *inputs: Tensor | None):
        full_key = (key, _signature(inputs))
        entry = self.captured.get(full_key)
        if entry is None:
            entry = self._capture(fn, inputs)
            self.captured[full_key] = entry
        for static, value in zip(entry.static_inputs, inputs):
            if static is not None:
                static.copy_(value)
        entry.graph.replay()  # capture records kernels without running them: the first call replays too
        return _clone_output(entry.output) if self.clone else entry.output

    def _capture(self, fn: Callable, inputs: tuple[Tensor | None, ...]) -> _Captured:
        static_inputs = tuple(None if x is None else self._static_input(slot, x) for slot, x in enumerate(inputs))
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = fn(*static_inputs)
        return _Captured(graph, static_inputs, output)

    def _static_input(self, slot: int, value: Tensor) -> Tensor:
        """A contiguous view of ``value``'s shape at the start of this slot's shared buffer, filled
        with ``value``. A larger input gets a new buffer; graphs captured on the old one keep it."""
        key = (slot, value.dtype, value.device)
        buffer = self._input_buffers.get(key)
        if buffer is None or buffer.numel() < value.numel():
            buffer = torch.empty(value.numel(), dtype=value.dtype, device=value.device)
            self._input_buffers[key] = buffer
        static = buffer[: value.numel()].view(value.shape)
        static.copy_(value)
        return static

    def clear(self) -> None:
        self.captured.clear()
        self._input_buffers.clear()
        self._pool = None


class _GraphedPart:
    """What the graphed vision tower and the graphed decoder steps share: a :class:`CapturedCalls`
    (``self.calls``), its captured graphs, and removal on leaving a ``with`` block."""

    calls: CapturedCalls

    @property
    def captured(self) -> dict:
        return self.calls.captured

    def remove(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class GraphedVisionTower(_GraphedPart):
    """Installs an instance-level ``forward`` on ``tower`` that replays captured CUDA graphs.

    Use as a context manager or call :meth:`remove`. Inputs on the CPU, or calls with autograd
    enabled, run the ordinary forward.
    """

    def __init__(self, tower: nn.Module, warmup: int = 2) -> None:
        if "forward" in tower.__dict__:
            raise RuntimeError("the vision tower's forward is already replaced")
        self.tower = tower
        self.original = tower.forward
        self.calls = CapturedCalls(warmup)
        tower.forward = self._forward

    def _forward(self, pixel_values: Tensor, *args, **kwargs):
        if args or not pixel_values.is_cuda or torch.is_grad_enabled():
            return self.original(pixel_values, *args, **kwargs)
        try:
            options = tuple(sorted((k, _freeze(v)) for k, v in kwargs.items()))
        except TypeError:
            return self.original(pixel_values, **kwargs)
        return self.calls(options, lambda x: self.original(x, **kwargs), pixel_values)

    def remove(self) -> None:
        self.tower.__dict__.pop("forward", None)
        self.calls.clear()


def graph_vision_tower(model: nn.Module, warmup: int = 2) -> GraphedVisionTower:
    """Replay ``model``'s vision tower (LlavaForConditionalGeneration or LlavaModel) as CUDA graphs."""
    llava = getattr(model, "model", model)
    tower = getattr(llava, "vision_tower", None)
    if tower is None:
        raise TypeError(f"{type(model).__name__} has no vision_tower")
    return GraphedVisionTower(tower, warmup)


class _GraphedSteps(_GraphedPart):
    """A reduction side of an attachment (its ``step_graphs`` slot) replaying its steps through
    one :class:`CapturedCalls` while this is in effect."""

    def __init__(self, side, what: str, warmup: int, clone: bool) -> None:
        if side.step_graphs is not None:
            raise RuntimeError(f"this attachment's {what} is already graphed")
        self.side = side
        self.calls = CapturedCalls(warmup, clone=clone)
        side.step_graphs = self.calls

    def remove(self) -> None:
        if self.side.step_graphs is self.calls:
            self.side.step_graphs = None
        self.calls.clear()


class GraphedLanguageSteps(_GraphedSteps):
    """Makes an attached decoder-side reduction replay each reduction step as a CUDA graph.

    One graph per (decoder layer, batch shape); prefill inputs on the CPU, calls with autograd
    enabled and ``record=True`` attachments run the steps eagerly. Use as a context manager or call
    :meth:`remove` (before detaching the method).
    """

    def __init__(self, language_side, warmup: int = 2) -> None:
        # the step's outputs are consumed (written into the residual stream, gathered into the
        # bookkeeping) before the same layer's graph replays again, so they need no copy
        super().__init__(language_side, "decoder steps", warmup, clone=False)


def graph_language_steps(handle) -> GraphedLanguageSteps:
    """Replay the decoder-side reduction steps of ``handle`` (from :func:`ficoco.attach`) as CUDA graphs."""
    language_side = getattr(handle, "language", None)
    if language_side is None:
        raise ValueError(f"method {handle.method.name!r} does not reduce inside the LLM decoder: nothing to graph")
    return GraphedLanguageSteps(language_side)


class GraphedInputReduction(_GraphedSteps):
    """Makes an attached LLM-input reduction (LLaVA's projector hook) replay as a CUDA graph.

    One graph per (images, tokens, instruction length); inputs on the CPU, calls with autograd
    enabled, ``record=True`` attachments and filters that decide their counts on the host run
    eagerly. Use as a context manager or call :meth:`remove` (before detaching the method).
    """

    def __init__(self, input_side, warmup: int = 2) -> None:
        # copies out: the trace keeps positions and sizes past the call
        super().__init__(input_side, "input reduction", warmup, clone=True)


def graph_input_reduction(handle) -> GraphedInputReduction:
    """Replay the LLM-input reduction of ``handle`` (from :func:`ficoco.attach`) as CUDA graphs."""
    input_side = getattr(handle, "input", None)
    if input_side is None or not hasattr(input_side, "step_graphs"):
        raise ValueError(f"method {handle.method.name!r} has no LLM-input reduction on a projector hook: "
                         "nothing to graph")
    return GraphedInputReduction(input_side)
