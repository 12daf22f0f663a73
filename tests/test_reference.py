"""The hooked model against a slow, explicit re-implementation of the reduced forward pass.

The reference runs every layer by hand from its submodules (layer norms, projections, MLP) with
explicit attention maps, performs each reduction between a layer's attention and its MLP exactly
as docs/spec.md §3/§4 describe, handles one sample at a time with no padding, and tracks original
positions with plain Python. The hooked, batched, padded, SDPA model must give the same logits.
"""

from __future__ import annotations

import sys

import pytest
import torch

import ficoco
from ficoco.methods import ModelGeometry
from ficoco.stages import AttentionProbe, FeatureProbe, TokenGroup

from .conftest import IMAGE_TOKEN, PATCHES, batch_inputs
from .test_models import build

GRID = (24, 24)


def explicit_attention(q, k, v, scale, bias=None, causal=False):
    """``[1, H, L, d]`` queries, ``[1, Hk, L, d]`` keys/values → output ``[1, L, H*d]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        length = q.shape[2]
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(1, q.shape[2], -1)


def heads(x, n):
    return x.view(1, x.shape[1], n, -1).transpose(1, 2)


def reference_image_features(model, pixel_values, method, plan):
    """Image features ``[N', D_llm]`` of one image, reduced inside the encoder by hand."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixel_values[None]))
    sizes, positions = torch.ones(1, PATCHES), torch.arange(PATCHES)[None]
    prop = method.vision is not None and method.vision.proportional_attention
    for index, layer in enumerate(vm.encoder.layers):
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        bias = torch.cat([torch.zeros(1, 1), sizes.log()], dim=1)[:, None, None, :] if prop else None
        n_heads = attn.num_heads
        h = h + attn.out_proj(explicit_attention(heads(q, n_heads), heads(k, n_heads), heads(v, n_heads), attn.scale, bias))
        after_mlp = method.vision is not None and method.vision.reduce_at == "output"
        if after_mlp:  # VisionZip: the layer's output is reduced
            h = h + layer.mlp(layer.layer_norm2(h))
        if index in plan:
            length = h.shape[1]
            if method.vision.score_with_next_layer:  # PruMerge: the next layer's queries and keys of this output
                following = vm.encoder.layers[index + 1]
                x_next = following.layer_norm1(h)
                q, k = following.self_attn.q_proj(x_next), following.self_attn.k_proj(x_next)
            probe = AttentionProbe(q.view(1, length, n_heads, -1), k.view(1, length, n_heads, -1), attn.scale,
                                   torch.arange(1, length)[None], cls_index=0,
                                   key_bias=bias[:, 0, 0] if prop else None)
            tokens = TokenGroup(h[:, 1:], sizes, positions, GRID)
            removed = plan[index]
            if method.vision.adaptive:  # the image's own count (the plan holds 0)
                removed = int(method.vision.reduction.adaptive_removals(tokens, probe)[0])
            result = method.vision.reduction(tokens, probe, removed)
            h = torch.cat([h[:, :1], result.tokens.features], dim=1)
            sizes, positions = result.tokens.sizes, result.tokens.positions
        if not after_mlp:
            h = h + layer.mlp(layer.layer_norm2(h))
        if index == len(vm.encoder.layers) - 2:  # vision_feature_layer = -2
            features = h[:, 1:]
    return model.model.multi_modal_projector(features)[0], sizes[0], positions[0]


def reference_logits(model, prompt, pixel_values, method):
    """Logits of one unpadded prompt with the method applied by hand."""
    llava = model.model
    lm = llava.language_model
    geometry = ModelGeometry(24, 22, PATCHES, len(lm.layers))
    plan = method.plan(geometry)
    if plan.vision:
        features, sizes, positions = reference_image_features(model, pixel_values, method, plan.vision)
    else:
        features = llava.get_image_features(pixel_values=pixel_values[None]).pooler_output[0]
        sizes, positions = torch.ones(PATCHES), torch.arange(PATCHES)
    if plan.input_removed:  # the projected tokens, reduced by hand with the text after the image
        after = [t for t in prompt[len(prompt) - prompt[::-1].index(IMAGE_TOKEN):]]
        text = lm.embed_tokens(torch.tensor([after]))
        probe = FeatureProbe(lambda: (text, torch.ones(1, len(after), dtype=torch.bool)))
        result = method.input.reduction(TokenGroup(features[None], sizes[None], positions[None], GRID), probe,
                                        plan.input_removed)
        features, sizes, positions = result.tokens.features[0], result.tokens.sizes[0], result.tokens.positions[0]
    kept = features.shape[0]
    ids, seen = [], 0
    for token in prompt:  # keep the first `kept` placeholders of the image
        seen += token == IMAGE_TOKEN
        if token != IMAGE_TOKEN or seen <= kept:
            ids.append(token)
    ids = torch.tensor([ids])
    h = lm.embed_tokens(ids)
    h[ids == IMAGE_TOKEN] = features
    original = list(range(ids.shape[1]))
    visual = [t == IMAGE_TOKEN for t in ids[0].tolist()]
    raters = []
    if method.language is not None and method.language.raters is not None:  # SparseVLM, from the input embeddings
        image = [i for i, is_v in enumerate(visual) if is_v]
        text = list(range(image[-1] + 1, len(visual)))
        relevance = torch.stack([torch.stack([h[0, i] @ h[0, m] for m in text]).softmax(0) for i in image]).mean(0)
        raters = [m for m, r in zip(text, relevance.tolist()) if r > relevance.mean().item()] or text
    sizes, positions = sizes[None], positions[None]
    rotary = sys.modules[type(lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
    for index, layer in enumerate(lm.layers):
        attn, cfg = layer.self_attn, lm.config
        x = layer.input_layernorm(h)
        cos, sin = lm.rotary_emb(x, position_ids=torch.tensor([original]))
        q = heads(attn.q_proj(x), cfg.num_attention_heads)
        k = heads(attn.k_proj(x), cfg.num_key_value_heads)
        raw_q, raw_k = q, k  # before RoPE, as the hooked model's probe receives them

        def rope(t, rows, cos=cos, sin=sin):  # the probe's rotation of [1, R, heads, d] at sequence rows
            c, s = (cos, sin) if rows is None else (cos[:, rows[0]], sin[:, rows[0]])
            return rotary(t.transpose(1, 2), t.transpose(1, 2), c, s)[0].transpose(1, 2)

        q, k = rotary(q, k, cos, sin)
        v = heads(attn.v_proj(x), cfg.num_key_value_heads)
        h = h + attn.o_proj(explicit_attention(q, k, v, attn.scaling, causal=True))
        llm_after_mlp = method.language is not None and method.language.reduce_at == "output"
        if llm_after_mlp:  # DART: the layer's output is reduced
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if index in plan.language and method.language.score_with_next_layer:  # PyramidDrop: the next layer's view
            following = lm.layers[index + 1]
            x_next = following.input_layernorm(h)
            raw_q = heads(following.self_attn.q_proj(x_next), cfg.num_attention_heads)
            raw_k = heads(following.self_attn.k_proj(x_next), cfg.num_key_value_heads)
        if index in plan.language:
            cand = [i for i, is_v in enumerate(visual) if is_v]
            text = [i for i in range(max(cand) + 1, len(visual))]
            probe = AttentionProbe(raw_q.transpose(1, 2), raw_k.transpose(1, 2), attn.scaling, torch.tensor([cand]),
                                   causal=True, text_rows=torch.tensor([text]),
                                   text_valid=torch.ones(1, len(text), dtype=torch.bool),
                                   last_row=torch.tensor([len(visual) - 1]), rope=rope, hidden=h,
                                   hidden_weight=lm.norm.weight,
                                   rater_rows=torch.tensor([[original.index(r) for r in raters]]) if raters else None)
            result = method.language.reduction(TokenGroup(h[:, cand], sizes, positions, GRID), probe, plan.language[index])
            kept_rows = [cand[i] for i in result.kept[0].tolist()]
            h = h.clone()
            h[0, kept_rows] = result.tokens.features[0, : len(kept_rows)]
            survivors = dict(zip(kept_rows, range(len(kept_rows))))
            if result.new_token_slot is not None:
                slot = cand[int(result.new_token_slot[0])]
                h[0, slot] = result.tokens.features[0, -1]
                survivors[slot] = len(kept_rows)
            keep = [i for i in range(len(visual)) if not visual[i] or i in survivors]
            order = [survivors[i] for i in keep if i in survivors]
            sizes, positions = result.tokens.sizes[:, order], result.tokens.positions[:, order]
            h = h[:, keep]
            original = [original[i] for i in keep]
            visual = [visual[i] for i in keep]
        if not llm_after_mlp:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))[0]


@pytest.mark.parametrize("use_cache", [True, False])  # keys from the KV cache, or rotated by the probe
@pytest.mark.parametrize("key", ["ficoco-v", "ficoco-v-prop", "tome", "evit", "ficoco-l", "fastv", "ficoco-vl", "random-llm",
                                 "topk", "visionzip", "prumerge", "prumerge+", "prumerge-adaptive",
                                 "prumerge+-adaptive", "dart", "pdrop", "sparsevlm", "pool", "divprune", "cdpruner",
                                 "zero"])
def test_hooked_model_matches_explicit_reference(model, images, prompts, key, use_cache):
    method = build(key)
    inputs = batch_inputs(prompts, images, "left")
    with ficoco.apply(model, method), torch.inference_mode():
        batched = model(**inputs, use_cache=use_cache).logits
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            expected = reference_logits(model, prompt, images[row], method)
            torch.testing.assert_close(batched[row, -expected.shape[0]:], expected, rtol=1e-4, atol=1e-4)
