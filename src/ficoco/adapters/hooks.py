"""Hook handles the adapters own (detaching removes exactly what was attached) and the small tensor
helpers they share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class HookSet:
    """Registers forward (pre-)hooks and removes all of them at once."""

    def __init__(self) -> None:
        self._handles: list = []

    def pre(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module: nn.Module, fn: Callable, *, prepend: bool = False, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, prepend=prepend, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)


def replace_hidden_output(output, fn: Callable[[Tensor], Tensor]):
    """Apply ``fn`` to a layer's hidden-state output, whether the layer returns a tensor or a tuple
    whose first element is the hidden states (older transformers)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def write_rows(hidden: Tensor, rows: Tensor, values: Tensor) -> None:
    """``hidden[b, rows[b]] = values[b]`` in place (``rows`` ``[B, K]``, ``values`` ``[B, K, D]``).

    Used on a layer's residual stream between attention and MLP: the layer keeps a reference to the
    same tensor as its MLP residual, so merged tokens flow through the rest of the layer."""
    hidden.scatter_(1, rows[..., None].expand(-1, -1, hidden.shape[-1]), values.to(hidden.dtype))


def host_to_device(values: list[int], device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """``values`` as a tensor on ``device`` without waiting for the device: a CUDA copy from
    pageable memory makes PyTorch synchronise the stream, a pinned non-blocking one does not. In the
    middle of the tower that wait would let the GPU run dry while Python prepares the next kernels."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
