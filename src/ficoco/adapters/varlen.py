"""One attention call per block for the Qwen-VL vision towers.

Without flash-attn installed, transformers runs these towers' attention one SDPA call per segment
(each image, or each 112-pixel window of Qwen2.5-VL) in a Python loop: a 1280x720 image has 84
windows, so a batch of 8 makes 672 small calls in each of 28 window blocks, and the tower runs far
slower than its matrix work. Given an attention implementation whose name contains "flash", the
towers instead pass the segment boundaries (``cu_seqlens``) to one call. :func:`fast_vision_attention`
registers such an implementation with transformers' attention interface and switches the tower to
it (and back on :meth:`FastVisionAttention.remove`):

- on CUDA in half precision, when this torch has it, PyTorch's own variable-length attention
  (``torch.nn.attention.varlen.varlen_attn``, FlashAttention kernels, no padding);
- otherwise one SDPA call over the segments laid side by side: equal segments (same-size images)
  as a plain batch, unequal ones (windows at the image border) padded to the longest with a key
  mask.

Both compute what the per-segment loop computes (up to floating-point rounding); the tests hold
them to the stock path on every generation, with and without a reduction attached.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: the registered name; "flash" in it makes the towers hand over ``cu_seqlens`` (transformers'
#: ``is_flash_attention_requested``)
ATTENTION_NAME = "ficoco_flash_varlen"
#: the same with the native kernel never used (one padded SDPA call): for training, as the native
#: variable-length kernel's backward is not in every torch release
PADDED_ATTENTION_NAME = "ficoco_flash_padded"
KERNELS = {"auto": ATTENTION_NAME, "padded": PADDED_ATTENTION_NAME}


def _native_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch
        return None
    return varlen_attn


def segment_layout(cu_seqlens: Tensor, total: int, longest: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(segment, position, key_valid)`` of ``total`` packed tokens cut at ``cu_seqlens``: each
    token's segment and place in it, and ``[segments, longest]`` which padded places are real."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    count = lengths.shape[0]
    segment = torch.repeat_interleave(torch.arange(count, device=cu.device), lengths, output_size=total)
    position = torch.arange(total, device=cu.device) - cu[:-1][segment]
    key_valid = torch.arange(longest, device=cu.device)[None, :] < lengths[:, None]
    return segment, position, key_valid


def varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, *,
                     scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                     cu_seq_lens_k: Tensor | None = None, max_length_q: int | None = None,
                     max_length_k: int | None = None, is_causal: bool = False, use_native: bool = True,
                     **kwargs) -> tuple[Tensor, None]:
    """Non-causal attention within each segment of a packed sequence, in one call.

    Args:
        query, key, value: ``[1, H, S, d]`` (the towers' layout).
        cu_seq_lens_q / cu_seq_lens_k: ``[segments + 1]`` boundaries (equal for these towers).
        max_length_q: the longest segment.
        use_native: whether PyTorch's variable-length kernel may be used (CUDA, half precision).
    Returns:
        ``([1, S, H, d], None)``, as transformers' attention functions return.
    """
    if is_causal or dropout:
        raise ValueError("the one-call vision attention is for non-causal inference (no dropout)")
    if cu_seq_lens_q is None:  # one segment: plain attention
        cu_seq_lens_q = torch.tensor([0, query.shape[2]], device=query.device, dtype=torch.int32)
        max_length_q = query.shape[2]
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("the one-call vision attention needs the same segments for queries and keys")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [S, H, d]
    total, heads, dim = q.shape
    longest = int(max_length_q)
    native = _native_varlen()
    if use_native and native is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seq_lens_q.to(torch.int32)
        out = native(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, scale=scaling)
        return out[None], None
    segments = cu_seq_lens_q.shape[0] - 1
    if segments * longest == total:  # equal segments (images of one size): a plain batch, no mask
        batched = [x.reshape(segments, longest, heads, dim).transpose(1, 2) for x in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*batched, scale=scaling)
        return out.transpose(1, 2).reshape(1, total, heads, dim), None
    segment, position, key_valid = segment_layout(cu_seq_lens_q, total, longest)
    padded = []
    for x in (q, k, v):
        laid = x.new_zeros(segments, longest, heads, dim)
        laid[segment, position] = x
        padded.append(laid.transpose(1, 2))
    out = torch.nn.functional.scaled_dot_product_attention(*padded, attn_mask=key_valid[:, None, None, :],
                                                           scale=scaling)
    return out.transpose(1, 2)[segment, position][None], None


def padded_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask=None,
                     **kwargs) -> tuple[Tensor, None]:
    """:func:`varlen_attention` through one padded SDPA call, never the native kernel."""
    return varlen_attention(module, query, key, value, attention_mask, **kwargs, use_native=False)


def register() -> None:
    """Make :data:`ATTENTION_NAME` and :data:`PADDED_ATTENTION_NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention)
    AttentionInterface.register(PADDED_ATTENTION_NAME, padded_attention)


def _compiled_unless_hooked(block: nn.Module, backend: str):
    """``block.forward`` compiled, except while a module inside the block carries hooks (a
    reduction happens in this block: its hooks change Python state the compiled graph would not
    replay), when the block runs eagerly. Hooks on the block itself run outside its forward."""
    eager = block.forward
    compiled = torch.compile(eager, dynamic=True, backend=backend)
    inner = [m for m in block.modules() if m is not block]

    def forward(*args, **kwargs):
        if any(m._forward_hooks or m._forward_pre_hooks for m in inner):
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    return forward


class FastVisionAttention:
    """The one-call attention switched on for a model's vision tower; :meth:`remove` switches back."""

    def __init__(self, model: nn.Module, kernel: str = "auto", compile_blocks: bool = False,
                 compile_backend: str = "inductor") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r} for the one-call vision attention; one of {', '.join(KERNELS)}")
        core = getattr(model, "model", model)
        tower = getattr(core, "visual", None)
        if tower is None or not hasattr(tower, "blocks"):
            raise TypeError(f"{type(model).__name__} has no Qwen-VL vision tower: the one-call attention is for "
                            f"Qwen2-VL, Qwen2.5-VL and Qwen3-VL")
        register()
        self.config = tower.config
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = KERNELS[kernel]
        # each block's forward compiled on the instance (deleting the attribute restores the class's):
        # the towers' remaining time is elementwise float32 work (rotary, norms) that compiling fuses
        self.compiled = []
        if compile_blocks:
            for block in tower.blocks:
                block.forward = _compiled_unless_hooked(block, compile_backend)
                self.compiled.append(block)

    def remove(self) -> None:
        if self.config is not None:
            self.config._attn_implementation = self.previous
            self.config = None
        for block in self.compiled:
            del block.forward
        self.compiled = []

    def __enter__(self) -> "FastVisionAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def fast_vision_attention(model: nn.Module, kernel: str = "auto", compile_blocks: bool = False,
                          compile_backend: str = "inductor") -> FastVisionAttention:
    """Run ``model``'s vision tower with one attention call per block (see the module docstring).
    ``kernel="padded"`` always takes the padded SDPA call (e.g. for training). ``compile_blocks``
    also compiles each block's forward with ``torch.compile(dynamic=True, backend=compile_backend)``;
    a block where an attached method reduces runs eagerly. :meth:`FastVisionAttention.remove`
    undoes both."""
    return FastVisionAttention(model, kernel, compile_blocks, compile_backend)
