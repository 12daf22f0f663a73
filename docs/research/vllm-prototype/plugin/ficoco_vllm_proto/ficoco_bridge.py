"""Run a ficoco encoder-side method (FiCoCo-V, ToMe, EViT, random) inside vLLM's CLIP encoder.

Reuses ficoco's own ``VisionSide`` (adapters/vision.py) and its methods unchanged; only the parts
that differ between HF's and vLLM's CLIP layers are replaced:

- vLLM fuses q/k/v into ``self_attn.qkv_proj`` (QKVParallelLinear returning ``(out, bias)``):
  one forward hook there keeps the layer's queries and keys;
- vLLM's ``CLIPEncoderLayer.forward(hidden_states)`` takes no attention mask, and its
  ``self_attn.attn`` (MMEncoderAttention -> torch SDPA on CPU) none either: proportional attention
  (ToMe) is done by replacing that module's ``forward`` with SDPA plus the ``log(size)`` key bias.

Everything else (the ``layer_norm2`` pre-hook that reduces the residual stream in place, the
layer post-hook that drops rows) works as in HF: vLLM's CLIPEncoderLayer passes the same tensor to
``layer_norm2`` and keeps it as the MLP residual.
"""

from __future__ import annotations

import torch.nn.functional as F
from ficoco.adapters.hooks import HookSet
from ficoco.adapters.vision import VisionSide
from ficoco.methods import ModelGeometry, get_method


def _method(opts: dict):
    name = opts["method"].split(":", 1)[1]
    options = {k: v for k, v in opts.items() if k not in ("method", "where", "seed")}
    method = get_method(name, **options)
    if method.language is not None:
        raise ValueError(f"{name} reduces inside the LLM; this plugin runs pre-LLM (encoder) methods only")
    return method


def _layout(hf_config):
    vcfg = hf_config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    num_layers = vcfg.num_hidden_layers  # the HF tower's depth (vLLM builds only up to the feature layer)
    fl = hf_config.vision_feature_layer
    if not isinstance(fl, int):
        raise ValueError("one vision_feature_layer is needed")
    feature_index = (fl if fl >= 0 else num_layers + 1 + fl) - 1
    return side, num_layers, feature_index


def plan_for(hf_config, opts: dict):
    side, num_layers, feature_index = _layout(hf_config)
    method = _method(opts)
    geometry = ModelGeometry(num_layers, feature_index, side * side, hf_config.text_config.num_hidden_layers)
    cls_to_llm = int(getattr(hf_config, "vision_feature_select_strategy", "default") == "full")
    return method.plan(geometry), cls_to_llm


class _VllmVisionSide(VisionSide):
    def install(self, hooks: HookSet) -> None:
        self.patched = []
        if not self.removals:
            return
        hooks.pre(self.layers[0], self._start_batch)
        first = min(self.removals)
        for index, layer in enumerate(self.layers):
            if self.stage.proportional_attention and index > first:
                self._bias_attention(layer.self_attn.attn)
            if index in self.removals:
                attn = layer.self_attn
                if attn.num_heads_per_partition != attn.num_heads:
                    raise NotImplementedError("tensor-parallel vision tower: run it with mm_encoder_tp_mode='data'")
                hooks.post(attn.qkv_proj, self._keep_qk)
                hooks.pre(layer.layer_norm2, self._reducer(index, self.removals[index], attn))
                hooks.post(layer, self._drop_rows, prepend=True)
        hooks.post(self.layers[-1], self._finish_batch)

    def _keep_qk(self, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.queries, self.keys, _ = out.chunk(3, dim=-1)

    def _bias_attention(self, attn_module) -> None:
        side, original = self, attn_module.forward

        def forward(query, key, value, *args, **kwargs):
            bias = side._key_bias()
            if bias is None:
                return original(query, key, value, *args, **kwargs)
            b, lq = query.shape[:2]
            h, d = attn_module.num_heads, attn_module.head_size
            q, k, v = (x.view(b, x.shape[1], h, d).transpose(1, 2) for x in (query, key, value))
            mask = bias.to(q.dtype)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn_module.scale)
            return out.transpose(1, 2).reshape(b, lq, h * d)

        attn_module.forward = forward  # instance attribute: nn.Module.__call__ finds it first
        self.patched.append(attn_module)

    def uninstall(self) -> None:
        for module in self.patched:
            del module.forward
        self.patched = []


class VllmVisionBridge:
    def __init__(self, hf_config, opts: dict, encoder_layers) -> None:
        side, _, _ = _layout(hf_config)
        method = _method(opts)
        self.plan, _ = plan_for(hf_config, opts)
        self.hooks = HookSet()
        self.side = _VllmVisionSide(encoder_layers, method.vision, self.plan.vision, grid=(side, side), has_cls=True)
        self.side.install(self.hooks)

    def remove(self) -> None:
        self.hooks.remove()
        self.side.uninstall()
