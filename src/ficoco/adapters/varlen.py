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

Once attention is one call, the tower's time is its linear layers, and Qwen2.5-VL-7B's are slower
than their work: its MLP width, 3420, is not a multiple of 8, so cuBLAS cannot use its fastest
half-precision kernels for the MLP's three products (on an H200 they ran at about a third of the
rate of the tower's other products). :func:`fast_vision_attention` therefore also pads each
block's MLP width with zero units up to a multiple of :data:`MLP_ALIGNMENT` (``align_mlp``): a
zero unit adds exactly zero (its input weights and bias are zero, the activation maps 0 to 0 and
its output weights are zero), so the tower computes the same function; only the order of
floating-point sums inside the products may change.
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
#: the MLP width is padded up to a multiple of this (cuBLAS' tensor-core kernels want multiples of 8
#: half-precision elements; 64 also fills whole tiles)
MLP_ALIGNMENT = 64


def _native_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch
        return None
    return varlen_attn


#: a keyword a caller may pass through the tower's attention module to this attention: a function
#: ``keep(query, key, row_logsumexp)`` that receives the queries and keys exactly as the attention
#: used them, ``[S, H, d]`` each (RoPE applied: no copy), and each query row's log-sum-exp,
#: ``[H, S]`` float32 (natural log, over the row's segment) where the native kernel computed it
#: anyway, else ``None``. A reduction's statistics reuse all three rather than recompute them.
ATTENTION_INPUTS_KWARG = "ficoco_keep_attention_inputs"


def _logsumexp_request():
    """``AuxRequest(lse=True)`` where this torch's variable-length attention can return it."""
    try:
        from torch.nn.attention.varlen import AuxRequest
    except ImportError:
        return None
    return AuxRequest(lse=True)


def _heads_by_tokens(lse: Tensor, heads: int, total: int) -> Tensor | None:
    """The kernel's log-sum-exp as ``[H, S]`` float32 (it is ``[H, S]``; a layout this does not
    recognise gives ``None``, and the statistics then compute it themselves)."""
    if tuple(lse.shape) == (heads, total):
        return lse.float()
    if tuple(lse.shape) == (total, heads):
        return lse.float().t()
    return None


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
    keep_inputs = kwargs.get(ATTENTION_INPUTS_KWARG)
    if use_native and native is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seq_lens_q.to(torch.int32)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        request = _logsumexp_request() if keep_inputs is not None else None
        if request is None:
            if keep_inputs is not None:
                keep_inputs(q, k, None)
            return native(q, k, v, cu, cu, longest, longest, scale=scaling)[None], None
        out, lse = native(q, k, v, cu, cu, longest, longest, scale=scaling, return_aux=request)
        keep_inputs(q, k, _heads_by_tokens(lse, heads, total))
        return out[None], None
    if keep_inputs is not None:
        keep_inputs(q, k, None)
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


#: set on a tower whose blocks ``fast_vision_attention(compile_blocks=True)`` compiled: the
#: ``torch.compile`` backend a reduction in it may compile its attention statistics with
STATISTICS_BACKEND_ATTRIBUTE = "_ficoco_statistics_backend"


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


def _padded_linear(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    """A copy of ``linear`` with zero rows / columns appended up to the given sizes."""
    weight = linear.weight
    padded = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:linear.out_features, :linear.in_features] = weight
        if linear.bias is not None:
            padded.bias.zero_()
            padded.bias[:linear.out_features] = linear.bias
    padded.requires_grad_(weight.requires_grad)
    return padded


def aligned_mlp_layers(mlp: nn.Module, alignment: int = MLP_ALIGNMENT) -> dict[str, nn.Linear]:
    """For a vision block's MLP (Qwen2-VL's ``fc1``/``fc2``, Qwen2.5-VL's ``gate_proj``/``up_proj``/
    ``down_proj``, Qwen3-VL's ``linear_fc1``/``linear_fc2``): its linear layers with the inner width
    padded by zero units up to a multiple of ``alignment``, by attribute name; ``{}`` when the
    width is already a multiple or the MLP does not have that shape (the activation must map 0 to 0)."""
    linears = {name: child for name, child in mlp.named_children() if isinstance(child, nn.Linear)}
    others = [child for child in mlp.children() if not isinstance(child, nn.Linear)]
    if len(linears) < 2 or len(others) != 1:
        return {}
    contracting = [n for n, layer in linears.items() if layer.out_features < layer.in_features]
    if len(contracting) != 1:
        return {}
    inner, hidden = linears[contracting[0]].in_features, linears[contracting[0]].out_features
    widening = [n for n, layer in linears.items() if (layer.in_features, layer.out_features) == (hidden, inner)]
    if len(widening) + 1 != len(linears) or inner % alignment == 0:
        return {}
    probe = linears[contracting[0]].weight.new_zeros(1)
    if not bool((others[0](probe) == 0).all()):  # a zero unit must stay zero
        return {}
    width = -(-inner // alignment) * alignment
    padded = {n: _padded_linear(linears[n], width, hidden) for n in widening}
    padded[contracting[0]] = _padded_linear(linears[contracting[0]], hidden, width)
    return padded


class FastVisionAttention:
    """The one-call attention switched on for a model's vision tower; :meth:`remove` switches back."""

    def __init__(self, model: nn.Module, kernel: str = "auto", compile_blocks: bool = False,
                 compile_backend: str = "inductor", align_mlp: bool = True) -> None:
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
        # (mlp, attribute, original layer) for each swapped layer, to put back on remove()
        self.swapped: list[tuple[nn.Module, str, nn.Linear]] = []
        if align_mlp:
            for block in tower.blocks:
                mlp = getattr(block, "mlp", None)
                for name, layer in (aligned_mlp_layers(mlp) if mlp is not None else {}).items():
                    self.swapped.append((mlp, name, getattr(mlp, name)))
                    setattr(mlp, name, layer)
        # each block's forward compiled on the instance (deleting the attribute restores the class's):
        # the towers' remaining time is elementwise float32 work (rotary, norms) that compiling fuses
        self.compiled = []
        self.tower = tower
        if compile_blocks:
            for block in tower.blocks:
                block.forward = _compiled_unless_hooked(block, compile_backend)
                self.compiled.append(block)
            # the blocks where a method reduces run eagerly; its attention statistics are compiled
            # instead (read by the reduction's probe, see ficoco.stages.AttentionProbe)
            setattr(tower, STATISTICS_BACKEND_ATTRIBUTE, compile_backend)

    def remove(self) -> None:
        if self.config is not None:
            self.config._attn_implementation = self.previous
            self.config = None
        for mlp, name, original in reversed(self.swapped):
            setattr(mlp, name, original)
        self.swapped = []
        for block in self.compiled:
            del block.forward
        self.compiled = []
        if self.tower is not None:
            self.tower.__dict__.pop(STATISTICS_BACKEND_ATTRIBUTE, None)
            self.tower = None

    def __enter__(self) -> "FastVisionAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def fast_vision_attention(model: nn.Module, kernel: str = "auto", compile_blocks: bool = False,
                          compile_backend: str = "inductor", align_mlp: bool = True) -> FastVisionAttention:
    """Run ``model``'s vision tower with one attention call per block (see the module docstring).
    ``kernel="padded"`` always takes the padded SDPA call (e.g. for training). ``align_mlp`` pads
    each block's MLP width with zero units to a multiple of :data:`MLP_ALIGNMENT` (the same
    function; while attached, the padded layers are what ``state_dict()`` holds). ``compile_blocks``
    also compiles each block's forward with ``torch.compile(dynamic=True, backend=compile_backend)``;
    a block where an attached method reduces runs eagerly. :meth:`FastVisionAttention.remove`
    undoes all three."""
    return FastVisionAttention(model, kernel, compile_blocks, compile_backend, align_mlp)
