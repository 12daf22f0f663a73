"""An exact conversion of a LLaVA checkpoint whose LLM head size vLLM's CPU attention lacks.

vLLM 0.32's CPU decoder attention (the only one on CPU) takes head sizes 32, 64, 80, 96, 112,
128, 160, 192, 224, 256 and 512; ficoco's shipped proxy LLaVA has 4 heads of 56. This module
pads every attention head of the Llama LLM to a supported size with zeros so that the padded
model computes the same function, in Hugging Face transformers as in vLLM:

- q, k, v: each head's rows ``[first half | second half]`` (RoPE's NeoX halves, rotated as pairs
  ``(j, j + D/2)``) become ``[first half | 0 | second half | 0]``, so the rotated pairs stay
  pairs ``(j, j + D'/2)``; ``o_proj`` reads its input columns from the same places;
- RoPE: with ``rope_theta' = rope_theta ** (D' / D)`` the padded head's frequencies
  ``theta' ** (-2i / D')`` equal the original ``theta ** (-2i / D)`` for ``i < D/2``; the extra
  frequencies only rotate the zero dims. (No ``partial_rotary_factor``, which vLLM's CPU
  backend crashes on in bf16.)
- attention scale: both libraries scale by ``head_dim ** -0.5``, so ``q_proj`` is multiplied by
  ``sqrt(D' / D)`` (written in float32, so that the scaling adds no fp16 rounding).

The vision tower, the projector, the tokenizer and the processor are copied unchanged. Only
plain RoPE (``rope_type="default"``) and the Llama LLM of LLaVA-1.5 are converted; anything
else is refused with one line.

Qwen2.5-VL's LLM (Qwen2) takes its head size from ``hidden_size / num_attention_heads`` in both
libraries, so :func:`widen_qwen_llm` pads the heads by widening the LLM: the residual stream gets
zero dimensions (embeddings, every projection that writes it, the merger's output), and every
RMSNorm of the LLM, which now averages its squares over more dimensions, gets its weight
multiplied by ``sqrt(old width / new width)`` and ``rms_norm_eps`` by ``old width / new width``
(the text config's; the vision tower's norms keep theirs). M-RoPE's sections keep their
frequencies; the new ones, rotating only zero dimensions, join the last section.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

#: head sizes vLLM 0.32's CPU attention backend supports (``v1/attention/backends/cpu_attn.py``)
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_ATTENTION = re.compile(r"(?:^|\.)language_model\.(?:model\.)?layers\.\d+\.self_attn\.(q|k|v|o)_proj\.(weight|bias)$")


def supported_head_dim(head_dim: int) -> int:
    """The smallest head size vLLM's CPU attention supports that is ``>= head_dim``."""
    for size in CPU_ATTENTION_HEAD_SIZES:
        if size >= head_dim:
            return size
    raise ValueError(f"head_dim {head_dim} exceeds every head size vLLM's CPU attention supports")


def _text_geometry(config: dict, new_head_dim: int) -> tuple[int, int, int, float]:
    """``(heads, kv_heads, head_dim, rope_theta)`` of the LLM, after checking it can be padded."""
    if config.get("model_type") != "llava":
        raise ValueError(f"only LLaVA checkpoints are converted, got model_type {config.get('model_type')!r}")
    text = config.get("text_config") or {}
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"only a Llama LLM is converted, got {text.get('model_type')!r}")
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"only plain RoPE (rope_type 'default', full rotary) is converted, got {rope}")
    if head_dim % 2 or new_head_dim % 2 or new_head_dim < head_dim:
        raise ValueError(f"cannot pad head_dim {head_dim} to {new_head_dim}: the new size must be even and larger")
    return heads, kv_heads, head_dim, float(rope.get("rope_theta", 10000.0))


def _spread_heads(weight: torch.Tensor, heads: int, head_dim: int, new_head_dim: int, dim: int) -> torch.Tensor:
    """``weight`` with its ``heads x head_dim`` axis ``dim`` laid out as ``heads x new_head_dim``:
    each head's halves at ``[0, D/2)`` and ``[D'/2, D'/2 + D/2)``, zeros elsewhere."""
    moved = weight.movedim(dim, 0)
    rest = moved.shape[1:]
    per_head = moved.reshape(heads, head_dim, *rest)
    half, new_half = head_dim // 2, new_head_dim // 2
    padded = per_head.new_zeros(heads, new_head_dim, *rest)
    padded[:, :half] = per_head[:, :half]
    padded[:, new_half:new_half + half] = per_head[:, half:]
    return padded.reshape(heads * new_head_dim, *rest).movedim(0, dim).contiguous()


def pad_attention_heads(source: str | Path, target: str | Path, head_dim: int | None = None) -> Path:
    """Write to ``target`` the LLaVA checkpoint ``source`` with its LLM's attention heads padded
    to ``head_dim`` (default: the smallest size vLLM's CPU attention supports); the padded model
    computes the same logits (to float rounding). ``target`` is replaced if it exists. A
    Qwen2.5-VL checkpoint goes to :func:`widen_qwen_llm`.

    Returns the target folder."""
    source, target = Path(source), Path(target)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{source} has no config.json: not a checkpoint folder")
    if source.resolve() == target.resolve():
        raise ValueError("the converted checkpoint needs a folder of its own")
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "qwen2_5_vl":
        return widen_qwen_llm(source, target, head_dim)
    text = config.get("text_config") or {}
    old = text.get("head_dim") or (text.get("hidden_size", 0) // max(1, text.get("num_attention_heads", 1)))
    new = supported_head_dim(old) if head_dim is None else head_dim
    heads, kv_heads, old, theta = _text_geometry(config, new)
    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{source} has no *.safetensors weights")
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    scale = math.sqrt(new / old)
    for path in weights:
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            match = _ATTENTION.search(name)
            if match is None or new == old:
                continue
            proj, kind = match.groups()
            count = heads if proj in ("q", "o") else kv_heads
            if proj == "o":
                if kind == "weight":  # o_proj reads the heads along its input axis; its bias is per output
                    tensors[name] = _spread_heads(tensor, count, old, new, dim=1)
                continue
            padded = _spread_heads(tensor, count, old, new, dim=0)
            if proj == "q":
                padded = padded.float() * scale
            tensors[name] = padded
        save_file(tensors, str(target / path.name), metadata={"format": "pt"})
    text = config["text_config"]
    text["head_dim"] = new
    rope = dict(text.get("rope_parameters") or {"rope_type": "default"})
    rope["rope_theta"] = theta ** (new / old)
    text["rope_parameters"] = rope
    text.pop("rope_theta", None)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


_QWEN_LLM = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?(embed_tokens\.weight|norm\.weight|layers\.\d+\."
                       r"(?:input_layernorm|post_attention_layernorm|self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                       r"\.(?:weight|bias))$")
_QWEN_MERGER_OUT = re.compile(r"(?:^|\.)visual\.merger\.mlp\.2\.(weight|bias)$")


def _pad_axis(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` with axis ``dim`` zero-padded at its end to ``size``."""
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def _widen(name: str, tensor: torch.Tensor, geometry: tuple[int, int, int, int, int]) -> torch.Tensor:
    """One LLM (or merger-output) tensor of a Qwen2.5-VL checkpoint, widened (see the module's text)."""
    heads, kv_heads, head_dim, width, new_width = geometry
    new_head_dim = new_width // heads
    if name.endswith(("embed_tokens.weight",)):
        return _pad_axis(tensor, 1, new_width)
    if name.endswith(("norm.weight", "layernorm.weight")):
        return _pad_axis(tensor.float() * math.sqrt(width / new_width), 0, new_width)
    if ".mlp." in name and "visual." not in name:
        return _pad_axis(tensor, 0 if "down_proj" in name else 1, new_width)
    if "visual." in name:  # the merger's output: the LLM's input width
        return _pad_axis(tensor, 0, new_width)
    proj = name.rsplit(".", 2)[-2][0]
    if proj == "o":  # reads the heads, writes the residual stream
        return _pad_axis(_spread_heads(tensor, heads, head_dim, new_head_dim, dim=1), 0, new_width)
    padded = _spread_heads(tensor, heads if proj == "q" else kv_heads, head_dim, new_head_dim, dim=0)
    if tensor.dim() == 2:
        padded = _pad_axis(padded, 1, new_width)
    return padded.float() * math.sqrt(new_head_dim / head_dim) if proj == "q" else padded


def widen_qwen_llm(source: str | Path, target: str | Path, head_dim: int | None = None) -> Path:
    """Write to ``target`` the Qwen2.5-VL checkpoint ``source`` with its LLM widened so that its
    heads have ``head_dim`` dimensions (default: the smallest size vLLM's CPU attention supports);
    the widened model computes the same logits (to float rounding). The vision tower (but the
    merger's output width), the tokenizer and the processor are copied unchanged.

    Returns the target folder."""
    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    if text.get("model_type", "qwen2_5_vl_text") not in ("qwen2_5_vl_text", "qwen2_5_vl"):
        raise ValueError(f"only Qwen2.5-VL's own LLM is converted, got {text.get('model_type')!r}")
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    width = text["hidden_size"]
    old = width // heads
    new = supported_head_dim(old) if head_dim is None else head_dim
    rope = dict(text.get("rope_parameters") or {})
    section = list(rope.get("mrope_section") or ())
    if rope.get("rope_type", "default") != "default" or sum(section) != old // 2 or rope.get("mrope_interleaved"):
        raise ValueError(f"only M-RoPE in contiguous sections over the head's {old // 2} frequencies is converted, "
                         f"got {rope}")
    if old % 2 or new % 2 or new < old:
        raise ValueError(f"cannot pad head_dim {old} to {new}: the new size must be even and larger")
    if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) is False:
        raise ValueError("only a Qwen2.5-VL LLM whose output head is its embedding table is converted")
    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{source} has no *.safetensors weights")
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    geometry = (heads, kv_heads, old, width, heads * new)
    for path in weights:
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            if _QWEN_LLM.search(name) or _QWEN_MERGER_OUT.search(name):
                tensors[name] = _widen(name, tensor, geometry)
            elif name.endswith("lm_head.weight"):
                raise ValueError("only a Qwen2.5-VL LLM whose output head is its embedding table is converted")
        save_file(tensors, str(target / path.name), metadata={"format": "pt"})
    text["hidden_size"] = vision["out_hidden_size"] = heads * new
    # mean(x^2) over the wider stream is width / new width of the original: eps follows it
    text["rms_norm_eps"] = float(text.get("rms_norm_eps", 1e-6)) * width / (heads * new)
    rope["rope_theta"] = float(rope.get("rope_theta", 10000.0)) ** (new / old)
    section[-1] += (new - old) // 2  # the new frequencies rotate only zero dimensions
    rope["mrope_section"] = section
    text["rope_parameters"] = rope
    text.pop("rope_theta", None)
    text.pop("head_dim", None)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target
