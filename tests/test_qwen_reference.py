"""The hooked Qwen-VL towers against a slow, explicit re-implementation of the reduced forward pass.

The reference runs one image at a time, block by block, with no hooks: attention through each
block's own module with segment boundaries and rotary tables rebuilt by plain loops, and at each
reducing block the method's stages fed by a *dense* probe that forms the full attention map of the
block and averages it over merge groups by hand (where the library's probe computes only the rows
it needs). DeepStack features are taken at their blocks and merged by the same compress. The
kept tokens of each image, their raster places, the merged features handed to the LLM and the
DeepStack features must match the hooked model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ficoco
from ficoco.methods import ModelGeometry
from ficoco.stages import TokenGroup
from ficoco.testing import QWEN_GENERATIONS, tiny_qwen_vl

from .qwen_inputs import images_for, pixels

pytestmark = pytest.mark.xdist_group("qwen-vl")

CASES = {
    "ficoco-v": dict(retain=0.4),
    "tome": dict(retain=0.5),
    "evit": dict(retain=0.5),
    "topk": dict(retain=0.3),
    "visionzip": dict(retain=0.5),
}


class DenseGroupProbe:
    """Group statistics from the full attention map of one image (slow and obvious)."""

    def __init__(self, q, k, scale, group):
        # q, k: [S, H, d] rotated, S = groups * group
        logits = torch.einsum("shd,thd->hst", q.float(), k.float()) * scale  # [H, S, S]
        self.attention = logits.softmax(-1).mean(0)  # [S, S]
        self.logits = logits.mean(0)
        self.keys = k.float().mean(1)  # [S, d]
        self.group = group
        self.n = q.shape[0] // group

    @property
    def num_candidates(self):
        return self.n

    @property
    def mean_logits(self):
        per_patch = self.logits.mean(dim=1)  # v_p = mean over all keys
        return torch.stack([per_patch[i * self.group:(i + 1) * self.group].mean() for i in range(self.n)])[None]

    @property
    def mean_keys(self):
        return torch.stack([self.keys[i * self.group:(i + 1) * self.group].mean(0) for i in range(self.n)])[None]

    @property
    def received_attention(self):
        per_patch = self.attention.mean(dim=0)  # column means
        return torch.stack([per_patch[i * self.group:(i + 1) * self.group].sum() for i in range(self.n)])[None]

    def attention_rows(self, rows):
        out = torch.zeros(1, rows.shape[1], self.n)
        for r, i in enumerate(rows[0].tolist()):
            for j in range(self.n):
                block = self.attention[i * self.group:(i + 1) * self.group, j * self.group:(j + 1) * self.group]
                out[0, r, j] = block.sum(dim=1).mean()
        return out

    @property
    def cls_attention(self):
        raise ValueError("no [CLS]")


def explicit_visionzip(probe, raster, kept, share):
    """VisionZip on merge groups, written out: ``(kept places, {contextual place: [places merged
    into it]})``. Dominant: the groups that receive the most attention (no [CLS]); contextual: every
    ``step``-th of the rest walked in raster order (``raster``: each place's raster index); every
    other group goes to the contextual group whose head- and patch-averaged key is most similar."""
    n = probe.num_candidates
    contextual = round(kept * share)
    received = probe.received_attention[0].tolist()
    top = sorted(range(n), key=lambda i: -received[i])[:kept - contextual]
    rest = sorted((i for i in range(n) if i not in top), key=lambda i: raster[i])
    step = max(1, len(rest) // contextual)
    targets = rest[0::step][:contextual]
    keys = F.normalize(probe.mean_keys[0], dim=-1)
    assigned = {t: [] for t in targets}
    for i in rest:
        if i not in assigned:
            sims = [float(keys[i] @ keys[t]) for t in targets]
            assigned[targets[sims.index(max(sims))]].append(i)
    return top + targets, assigned


def _rotate(module_file, q, k, cos, sin):
    return module_file.apply_rotary_pos_emb_vision(q, k, cos, sin)


def reference_image(model, method, pixel_values, grid):
    """``(kept raster indices, merged tokens, DeepStack features)`` of one image, explicitly."""
    import sys

    from transformers.vision_utils import (get_vision_interpolation_indices_and_weights, get_vision_position_ids,
                                           get_vision_window_index)

    tower = model.model.visual
    attn_module = sys.modules[type(tower.blocks[0].attn).__module__]
    merge, group = tower.spatial_merge_size, tower.spatial_merge_size ** 2
    grid_thw = torch.tensor([grid])
    t, h, w = grid
    side = (h // merge, w // merge)
    n_groups = t * side[0] * side[1]
    x = tower.patch_embed(pixel_values)
    if hasattr(tower, "pos_embed"):  # Qwen3-VL: learned positions, resampled to the grid
        index, weight = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=merge)
        x = x + (tower.pos_embed(index) * weight[:, :, None]).sum(1).to(x.dtype)
    rope = tower.rotary_pos_emb(x, get_vision_position_ids(grid_thw, merge))
    order = list(range(n_groups))  # group at each sequence place
    window_of = [0] * n_groups
    full_blocks = set(range(len(tower.blocks)))
    if getattr(tower, "window_size", None) and getattr(tower, "fullatt_block_indexes", None):
        window_index, cu = get_vision_window_index(grid_thw, merge, tower.window_size, tower.patch_size)
        order = window_index.tolist()
        bounds = (cu // group).tolist()
        window_of = [next(wi for wi in range(len(bounds) - 1) if bounds[wi] <= place < bounds[wi + 1])
                     for place in range(n_groups)]
        full_blocks = set(tower.fullatt_block_indexes)
    rows = [g * group + k for g in order for k in range(group)]
    x, cos, sin = x[rows], rope[0][rows], rope[1][rows]
    groups = list(order)  # raster index of the group at each place
    windows = list(window_of)
    sizes = torch.ones(1, n_groups)
    positions = torch.tensor(order)[None]
    deepstack_layers = list(getattr(tower, "deepstack_visual_indexes", []) or [])
    deepstack = []
    geometry_plan = method.plan(ModelGeometry(len(tower.blocks), len(tower.blocks) - 1, n_groups,
                                                              len(model.model.language_model.layers),
                                                              frozenset(tower.fullatt_block_indexes)
                                                              if getattr(tower, "fullatt_block_indexes", None) else None))
    for index, block in enumerate(tower.blocks):
        segments = [len(groups) * group] if index in full_blocks else \
            [sum(1 for wi in windows if wi == w_id) * group for w_id in sorted(set(windows), key=windows.index)]
        cu = torch.tensor([0] + torch.tensor(segments).cumsum(0).tolist(), dtype=torch.int32)
        hidden = block.norm1(x)
        x = x + block.attn(hidden, cu_seqlens=cu, max_seqlen=max(segments), position_embeddings=(cos, sin))
        removed = geometry_plan.vision.get(index, 0)
        if removed:
            heads = block.attn.num_heads
            qkv = block.attn.qkv(hidden).view(x.shape[0], 3, heads, -1)
            q, k = _rotate(attn_module, qkv[:, 0], qkv[:, 1], cos, sin)
            probe = DenseGroupProbe(q, k, block.attn.scaling, group)
            if method.vision.reduce_at == "output":  # VisionZip: the block's output, after its MLP
                x = x + block.mlp(block.norm2(x))
            if method.name == "visionzip":
                places, assigned = explicit_visionzip(probe, groups, len(groups) - removed,
                                                      method.vision.reduction.filter.contextual_share)
                survivors = sorted(places)

                def merged(rows, survivors=survivors, assigned=assigned):
                    # [G, D'] -> the survivors', a contextual one plus the mean of what it received
                    return torch.stack([rows[s] + rows[assigned[s]].mean(0) if assigned.get(s) else rows[s]
                                        for s in survivors])

                x = merged(x.view(len(groups), -1)).reshape(-1, x.shape[-1])
                deepstack = [merged(d) for d in deepstack]
                keep_rows = [s * group + kk for s in survivors for kk in range(group)]
                cos, sin = cos[keep_rows], sin[keep_rows]
                groups = [groups[s] for s in survivors]
                windows = [windows[s] for s in survivors]
                if index in deepstack_layers:
                    deepstack.append(tower.deepstack_merger_list[deepstack_layers.index(index)](x))
                continue
            tokens = TokenGroup(x.reshape(1, len(groups), -1), sizes, positions, side)
            result = method.vision.reduction(tokens, probe, removed)
            slots = result.kept[0].tolist() + ([int(result.new_token_slot[0])] if result.new_token_slot is not None else [])
            features = result.tokens.features[0]
            by_slot = dict(zip(slots, range(len(slots))))
            survivors = sorted(slots)
            new_x = torch.cat([features[by_slot[s]].view(group, -1) for s in survivors])
            for i, features_ds in enumerate(deepstack):
                ds_tokens = TokenGroup(features_ds[None], sizes, positions, side)
                merged = method.vision.reduction.compress(ds_tokens.select(result.filter_result.targets),
                                                          ds_tokens.select(result.filter_result.sources),
                                                          result.correlation).features[0]
                deepstack[i] = torch.stack([merged[by_slot[s]] for s in survivors])
            new_sizes = result.tokens.sizes[0]
            new_positions = result.tokens.positions[0]
            sizes = torch.stack([new_sizes[by_slot[s]] for s in survivors])[None]
            positions = torch.stack([new_positions[by_slot[s]] for s in survivors])[None]
            x = new_x
            keep_rows = [s * group + kk for s in survivors for kk in range(group)]
            cos, sin = cos[keep_rows], sin[keep_rows]
            groups = [groups[s] for s in survivors]
            windows = [windows[s] for s in survivors]
        if not (removed and method.vision.reduce_at == "output"):
            x = x + block.mlp(block.norm2(x))
        if index in deepstack_layers:
            deepstack.append(tower.deepstack_merger_list[deepstack_layers.index(index)](x))
    merged = tower.merger(x)
    raster_order = sorted(range(len(groups)), key=lambda i: groups[i])
    return (torch.tensor([groups[i] for i in raster_order]), merged[raster_order],
            [d[raster_order] for d in deepstack])


@pytest.mark.parametrize("generation", QWEN_GENERATIONS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_hooked_tower_matches_explicit_reference(generation, name):
    model = tiny_qwen_vl(generation, seed=3)
    visual = pixels(generation, images_for(generation, ((8, 6), (4, 6)), seed=5))
    grids = visual["image_grid_thw"].tolist()
    with ficoco.apply(model, name, **CASES[name]) as handle, torch.inference_mode():
        out = model.model.get_image_features(visual["pixel_values"], visual["image_grid_thw"], return_dict=True)
        trace = handle.vision_trace
        method = handle.method
    pooled = out.pooler_output
    stacks = getattr(out, "deepstack_features", None)
    start = 0
    for item, grid in enumerate(grids):
        patches = grid[0] * grid[1] * grid[2]
        with torch.inference_mode():
            kept, merged, deepstack = reference_image(model, method, visual["pixel_values"][start:start + patches],
                                                      tuple(grid))
        start += patches
        assert torch.equal(trace.kept[item], kept), (item, trace.kept[item], kept)
        torch.testing.assert_close(pooled[item], merged, rtol=1e-4, atol=1e-4)
        if stacks:
            offset = sum(int(k.numel()) for k in trace.kept[:item])
            for layer, features in enumerate(deepstack):
                stack = stacks[layer]
                got = stack[item] if isinstance(stack, (tuple, list)) else stack[offset:offset + features.shape[0]]
                torch.testing.assert_close(got, features, rtol=1e-4, atol=1e-4)


INPUT_CASES = {"pool": dict(retain=0.25), "divprune": dict(retain=0.5), "cdpruner": dict(retain=0.5)}


def reference_input(name, share, x, grid, text, deepstack):
    """``(kept raster indices, tokens, DeepStack features)`` of one image's merged tokens ``x``
    (``[n, D]``, raster order, from the stock tower) under an LLM-input method, written out:
    pooling bin by bin, DivPrune's greedy loop over Python lists, CDPruner's greedy determinant
    maximisation with relevance to ``text`` (``[M, D]``, the instruction's input embeddings)."""
    from .test_input_stages import explicit_bins, greedy_log_det, official_divprune

    side = (grid[1] // 2, grid[2] // 2)
    kept = max(1, round(share * x.shape[0]))
    if name == "pool":
        bins = explicit_bins(side, kept)
        means = [lambda rows, cells=cells: rows[cells].mean(0) for cells in bins]
        return ([cells[0] for cells in bins], torch.stack([m(x) for m in means]),
                [torch.stack([m(d) for m in means]) for d in deepstack])
    if name == "divprune":
        chosen = official_divprune(x, kept)
    else:
        cos = [[F.cosine_similarity(x[i], text[m], dim=0).item() for m in range(text.shape[0])]
               for i in range(x.shape[0])]
        r = [-sum(c) / len(c) for c in cos]
        r = torch.tensor([(v - min(r) + 1e-6) / (max(r) - min(r)) for v in r], dtype=torch.float64)
        unit = F.normalize(x.double(), dim=-1)
        chosen = sorted(greedy_log_det(r[:, None] * (unit @ unit.T) * r[None, :], kept))
    return chosen, x[chosen], [d[chosen] for d in deepstack]


@pytest.mark.parametrize("generation", QWEN_GENERATIONS)
@pytest.mark.parametrize("name", sorted(INPUT_CASES))
def test_input_reduction_matches_explicit_reference(generation, name):
    """Two images of different grids in a left-padded batch through the hooked model: what the LLM
    receives (its input embeddings at the kept placeholders, the DeepStack features) and the kept
    raster places equal the explicit method on each image's stock merger output alone."""
    from .qwen_inputs import image_batch

    model = tiny_qwen_vl(generation, seed=3)
    inputs = image_batch(generation, shapes=((8, 6), (4, 6)), seed=5)
    received = {}

    def spy(module, args, kwargs):
        received["embeds"] = kwargs["inputs_embeds"].clone()
        stack = kwargs.get("deepstack_visual_embeds")
        received["deepstack"] = [] if stack is None else [d.clone() for d in stack]

    with ficoco.apply(model, name, **INPUT_CASES[name]) as handle, torch.inference_mode():
        hook = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
        trace = handle.input_trace
        cut = handle.prepare_inputs(**image_batch(generation, shapes=((8, 6), (4, 6)), seed=5))
    image = cut["input_ids"] == model.config.image_token_id
    start, offset = 0, 0
    for item, grid in enumerate(inputs["image_grid_thw"].tolist()):
        patches = grid[0] * grid[1] * grid[2]
        with torch.inference_mode():
            stock = model.model.visual(inputs["pixel_values"][start:start + patches], grid_thw=torch.tensor([grid]))
            columns = image[item].nonzero()[:, 0]
            after = torch.arange(int(columns[-1]) + 1, image.shape[1])
            after = after[cut["attention_mask"][item, after].bool()]  # the instruction: the text after the image
            text = model.model.get_input_embeddings()(cut["input_ids"][item, after])
            stack = list(getattr(stock, "deepstack_features", None) or [])
            kept, tokens, deepstack = reference_input(name, INPUT_CASES[name]["retain"], stock.pooler_output,
                                                      grid, text, stack)
        start += patches
        assert trace.kept[item].tolist() == kept, (item, trace.kept[item], kept)
        torch.testing.assert_close(received["embeds"][item, columns], tokens, rtol=1e-5, atol=1e-5)
        for layer, features in enumerate(deepstack):
            torch.testing.assert_close(received["deepstack"][layer][offset:offset + len(kept)], features,
                                       rtol=1e-5, atol=1e-5)
        offset += len(kept)
