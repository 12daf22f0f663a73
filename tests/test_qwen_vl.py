"""Every method inside real (tiny) Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: the LLaVA-1.5 matrix
(reduction off == vanilla, detach restores, batched == one by one with mixed image sizes and
padding on both sides, eager == SDPA, generate() == manual prefill + cached decoding, exact token
counts) plus what is Qwen's own: kept tokens keep their M-RoPE positions, decoding continues at
the right position, videos and several images per prompt, and the tower's reduction against an
explicit one-image-at-a-time re-implementation."""

from __future__ import annotations

import inspect

import pytest
import torch

import ficoco
from ficoco.testing import QWEN_GENERATIONS, QWEN_TOKENS, tiny_qwen_vl

from .qwen_inputs import image_batch, sample_of, tokens_of, video_and_images

pytestmark = pytest.mark.xdist_group("qwen-vl")

# the three images bring 48, 16 and 60 tokens (Qwen3-VL alike, with 16-pixel patches)
METHODS = {
    "ficoco-v": dict(retain=0.5),
    "ficoco-v-count": dict(retain=8),
    "ficoco-l": dict(retain=0.5, start_layer=2),
    "ficoco-vl": dict(retain=0.25, language_start_layer=2),
    "tome": dict(retain=0.5),
    "evit": dict(retain=0.5),
    "fastv": dict(retain=0.5),
    "random": dict(retain=0.5),
    "topk": dict(retain=0.5),
    "dart": dict(retain=0.5),
    "pdrop": dict(retain=0.25, layers=(2, 4, 6)),
    "visionzip": dict(retain=0.5),
    # at the LLM input, on the merger's tokens: 0.25 pools the 6x8, 4x4 and 10x6 grids into 3x4, 2x2, 5x3 bins
    "pool": dict(retain=0.25),
    "divprune": dict(retain=0.5),
    "cdpruner": dict(retain=0.5),
    "zero": dict(),
    "sparsevlm": dict(retain=0.5),
}
ENCODER = ("ficoco-v", "ficoco-v-count", "tome", "evit", "random", "topk", "visionzip")
INPUT = ("pool", "divprune", "cdpruner", "zero")


def build(key: str, **overrides) -> ficoco.Method:
    return ficoco.get_method(key.removesuffix("-count"), **{**METHODS[key], **overrides})


@pytest.fixture(scope="module", params=QWEN_GENERATIONS)
def generation(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each generation saved with ``save_pretrained``, as a real checkpoint is."""
    paths = {}
    for name in QWEN_GENERATIONS:
        paths[name] = tmp_path_factory.mktemp(name)
        tiny_qwen_vl(name, seed=0).save_pretrained(paths[name])
    return paths


def _load(path, attn):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: _load(path, "sdpa") for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def eager_models(checkpoints):
    return {name: _load(path, "eager") for name, path in checkpoints.items()}


def logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


def output_valid(handle, inputs) -> torch.Tensor:
    """``[B, L']`` which output positions are real tokens."""
    if handle is not None and handle.kept_valid is not None:
        return handle.kept_valid
    prepared = handle.prepare_inputs(**inputs) if handle is not None else inputs
    return prepared["attention_mask"].bool()


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- attaching ------------------------------------------------------------------------------------


def test_family_is_picked_from_the_model(models, generation):
    model = models[generation]
    with ficoco.apply(model, build("ficoco-v")) as handle:
        assert handle.family == "qwen-vl"
        # no [CLS]: FiCoCo-V's [CLS] term is the mean-key stand-in, EViT ranks by attention received
        assert handle.method.vision.reduction.filter.semantic_term == "key_proxy"
    with ficoco.apply(model, build("evit")) as handle:
        assert handle.method.vision.reduction.filter.importance == "received"


@pytest.mark.parametrize("key", list(METHODS))
def test_detach_restores_the_model(models, generation, key):
    model = models[generation]
    inputs = image_batch(generation)
    vanilla = logits(model, inputs)
    before = hook_count(model)
    with ficoco.apply(model, build(key)) as handle:
        reduced = logits(model, inputs)
        assert hook_count(model) > before
    assert reduced.shape[1] < vanilla.shape[1] or handle.kept_index is not None
    assert hook_count(model) == before
    core = model.model
    assert not {"generate", "get_image_features", "get_video_features", "get_rope_index"} & set(vars(core)) | \
        set(vars(model)) & {"generate"}
    torch.testing.assert_close(logits(model, inputs), vanilla, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["ficoco-v", "ficoco-l", "ficoco-vl", "evit", "visionzip", "pool", "divprune"])
def test_keeping_every_token_is_vanilla(models, generation, key):
    model = models[generation]
    inputs = image_batch(generation)
    vanilla = logits(model, inputs)
    overrides = {"retain": 1.0} if key != "ficoco-vl" else {"retain": 1.0}
    with ficoco.apply(model, build(key, **overrides)):
        torch.testing.assert_close(logits(model, inputs), vanilla, rtol=0, atol=0)


# -- batches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("key", list(METHODS))
def test_batched_equals_one_by_one(models, generation, key, side):
    """Three images of three sizes (48, 16, 60 tokens) in one batch: each sample keeps its own share
    of its own tokens and answers as alone."""
    model = models[generation]
    inputs = image_batch(generation, side=side)
    with ficoco.apply(model, build(key)) as handle:
        batched = logits(model, inputs)
        valid = output_valid(handle, inputs).clone()
        for row in range(3):
            single = logits(model, sample_of(inputs, row, generation))[0]
            torch.testing.assert_close(batched[row][valid[row]], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", list(METHODS))
def test_eager_equals_sdpa(models, eager_models, generation, key):
    inputs = image_batch(generation)
    with ficoco.apply(models[generation], build(key)) as handle:
        sdpa = logits(models[generation], inputs)
        valid = output_valid(handle, inputs).clone()
    with ficoco.apply(eager_models[generation], build(key)):
        eager = logits(eager_models[generation], inputs)
    torch.testing.assert_close(sdpa[valid], eager[valid], rtol=1e-4, atol=1e-4)


# -- budgets and positions -----------------------------------------------------------------------


@pytest.mark.parametrize("key", list(METHODS))
def test_exact_token_counts(models, generation, key):
    model = models[generation]
    inputs = image_batch(generation)
    counts = [tokens_of(grid) for grid in inputs["image_grid_thw"]]  # 48, 16, 60
    method = build(key)
    with ficoco.apply(model, method, record=True) as handle:
        logits(model, inputs)
        plans = [handle.plan_for(n) for n in counts]
        if method.vision is not None or method.input is not None:
            trace = handle.input_trace or handle.vision_trace
            assert [k.numel() for k in trace.kept] == [p.llm_input_visual for p in plans]
            prepared = handle.prepare_inputs(**image_batch(generation))
            assert (prepared["input_ids"] == 152).sum(dim=1).tolist() == [p.llm_input_visual for p in plans]
        if method.language is not None:
            final = (handle.kept_valid & (model.model.config.image_token_id ==
                                          handle.prepare_inputs(**image_batch(generation))["input_ids"].gather(
                                              1, handle.kept_index))).sum(dim=1).tolist()
            assert final == [p.llm_final_visual for p in plans]
    share = METHODS[key].get("retain", 0)  # zero keeps none
    expected = [min(n, share) if isinstance(share, int) else max(1, round(share * n)) for n in counts]
    if key == "sparsevlm":  # its retain names a budget of its per-stage table, not the final count
        expected = [method.language.stage_counts(n, max(1, round(share * n)), 3)[-1] for n in counts]
    assert [p.llm_final_visual for p in plans] == expected


class PositionSpy:
    """The M-RoPE position ids the language model receives at prefill."""

    seen: list = []

    def __init__(self, model):
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is None or not cache.get_seq_length():
            PositionSpy.seen.append(kwargs["position_ids"][-3:].clone())

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("key", ["ficoco-v", "tome", "evit", "random", "ficoco-vl", "visionzip", "pool", "divprune",
                                 "cdpruner"])
def test_kept_tokens_keep_their_m_rope_positions(models, generation, key):
    """Every token the LLM receives sits at the (temporal, height, width) position it had in the
    full prompt, the text after the image too (a pooled bin: its top-left token's); decoding
    continues where the full prompt would."""
    model = models[generation]
    inputs = image_batch(generation, side="right")
    PositionSpy.seen = []
    spy = PositionSpy(model)
    try:
        logits(model, inputs)
    finally:
        spy.remove()
    vanilla_deltas = model.model.rope_deltas.clone()
    with ficoco.apply(model, build(key), record=True) as handle:
        spy = PositionSpy(model)  # after the method's hooks: what the language model really gets
        try:
            logits(model, inputs)
        finally:
            spy.remove()
        trace = handle.input_trace or handle.vision_trace
        prepared = handle.prepare_inputs(**image_batch(generation, side="right"))
    reduced_deltas = model.model.rope_deltas.clone()
    full, cut = spy.seen
    image = model.model.config.image_token_id
    for row in range(3):
        full_ids, cut_ids = inputs["input_ids"][row], prepared["input_ids"][row]
        full_image = (full_ids == image).nonzero()[:, 0]
        kept_columns = full_image[trace.kept[row]]
        cut_image = (cut_ids == image).nonzero()[:, 0]
        torch.testing.assert_close(cut[:, row, cut_image], full[:, row, kept_columns], rtol=0, atol=0)
        full_text = (full_ids != image) & inputs["attention_mask"][row].bool()
        cut_text = (cut_ids != image) & prepared["attention_mask"][row].bool()
        torch.testing.assert_close(cut[:, row, cut_text], full[:, row, full_text], rtol=0, atol=0)
    # the next position is the same: deltas grow by exactly the tokens cut
    removed = inputs["attention_mask"].sum(1) - prepared["attention_mask"].sum(1)
    torch.testing.assert_close(reduced_deltas[:, 0], vanilla_deltas[:, 0] + removed, rtol=0, atol=0)


# -- generation -----------------------------------------------------------------------------------


def _manual_greedy(model, inputs, steps):
    """Prefill, then one token at a time with the cache, as generate() does (rows that emitted the
    end-of-sequence id 2 go on with padding id 0)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    finished = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    tokens, step_logits = [], []
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
        for _ in range(steps):
            last = out.logits[:, -1]
            step_logits.append(last)
            token = torch.where(finished, torch.zeros_like(last[:, :1].long()), last.argmax(-1, keepdim=True))
            tokens.append(token)
            finished |= token == 2
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
            # decoding continues at the prompt's last position + 1: text position + rope_deltas, as generate()
            position = (mask.long().cumsum(-1) - 1)[:, -1:] + model.model.rope_deltas
            out = model(input_ids=token, attention_mask=mask, use_cache=True, position_ids=position[None].expand(3, -1, -1),
                        **{cache_name: cache})
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


@pytest.mark.parametrize("key", ["vanilla", *METHODS])
def test_generate_equals_manual_prefill_and_decode(models, generation, key):
    model = models[generation]
    inputs = image_batch(generation, side="left")
    handle = ficoco.attach(model, build(key)) if key != "vanilla" else None
    try:
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        prepared = handle.prepare_inputs(**image_batch(generation, side="left")) if handle else inputs
        tokens, step_logits = _manual_greedy(model, prepared, 4)
    finally:
        if handle:
            handle.remove()
    assert torch.equal(gen.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, -4:], tokens)


def _text_only(inputs: dict) -> dict:
    """The prompt without its visual placeholders or pixels, re-padded on its own side."""
    from ficoco.adapters.inputs import cut_tokens

    ids = inputs["input_ids"]
    keep = (ids != QWEN_TOKENS["image"]) & (ids != QWEN_TOKENS["video"])
    new_ids, cut = cut_tokens(ids, {k: inputs[k] for k in ("attention_mask", "mm_token_type_ids")}, keep,
                              pad_token_id=QWEN_TOKENS["pad"])
    return {"input_ids": new_ids, **cut}


def test_zero_is_the_text_only_prompt(models, generation):
    """``zero`` gives what the model gives the prompt without its image: the text left is numbered
    as the model numbers a text-only prompt (0, 1, 2, ... over each row's real tokens, no gap where
    the image was; rope_deltas 0), in a forward pass (right padding: the stock text-only forward
    numbers padding too) and in generation (left padding)."""
    model = models[generation]
    inputs = image_batch(generation, side="right")
    text = _text_only(inputs)
    alone = logits(model, text)
    PositionSpy.seen = []
    with ficoco.apply(model, "zero") as handle:
        spy = PositionSpy(model)
        try:
            reduced = logits(model, inputs)
        finally:
            spy.remove()
        assert torch.equal(handle.prepare_inputs(**image_batch(generation, side="right"))["input_ids"],
                           text["input_ids"])
        assert not model.model.rope_deltas.any()
    mask = text["attention_mask"].bool()
    numbered = (text["attention_mask"].cumsum(1) - 1).masked_fill(~mask, 0)
    assert torch.equal(PositionSpy.seen[0], numbered.expand(3, -1, -1))
    torch.testing.assert_close(reduced[mask], alone[mask], rtol=1e-5, atol=1e-5)
    inputs, text = image_batch(generation, side="left"), _text_only(image_batch(generation, side="left"))
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(**text, **options)
        with ficoco.apply(model, "zero"):
            got = model.generate(**inputs, **options)
    torch.testing.assert_close(torch.stack(got.logits, 1), torch.stack(expected.logits, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequences[:, -4:], expected.sequences[:, -4:])


def test_encoder_then_input_reduction(models, generation):
    """A tower reduction (ToMe to 3/4) followed by an LLM-input one (DivPrune to half of what the
    tower hands on): each image gets both budgets, the input side picks among the tower's kept
    groups (their raster places and sizes), batched == one by one, positions kept."""
    from ficoco.methods import InputReduction
    from ficoco.stages import DropCompress, NoCorrelate, TokenReduction
    from ficoco.stages.diversity import MaxMinDiversityFilter

    model = models[generation]
    tower = ficoco.get_method("tome", retain=0.75).vision
    method = ficoco.Method("tome+divprune", vision=tower, input=InputReduction(
        TokenReduction(MaxMinDiversityFilter(), NoCorrelate(), DropCompress()), 0.5))
    inputs = image_batch(generation)
    counts = [tokens_of(grid) for grid in inputs["image_grid_thw"]]  # 48, 16, 60
    with ficoco.apply(model, method) as handle:
        batched = logits(model, inputs)
        valid = output_valid(handle, inputs).clone()
        encoder, reduced = handle.vision_trace, handle.input_trace
        assert [k.numel() for k in encoder.kept] == [round(0.75 * n) for n in counts]
        assert [k.numel() for k in reduced.kept] == [round(0.5 * round(0.75 * n)) for n in counts]
        for item in range(3):  # dropped, not merged: each kept token keeps its tower size
            size_at = dict(zip(encoder.kept[item].tolist(), encoder.sizes[item].tolist()))
            assert [size_at[r] for r in reduced.kept[item].tolist()] == reduced.sizes[item].tolist()
        for row in range(3):
            single = logits(model, sample_of(inputs, row, generation))[0]
            torch.testing.assert_close(batched[row][valid[row]], single, rtol=1e-4, atol=1e-4)


# -- videos and several images --------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ficoco-v", "ficoco-l", "ficoco-vl", "tome", "fastv", "visionzip", "pool", "cdpruner"])
def test_videos_and_several_images_per_prompt(models, generation, key):
    """A video (two temporal patches, reduced frame by frame) and an image in one sample, two
    images in the other: batched == one by one, and every frame keeps its share."""
    model = models[generation]
    inputs = video_and_images(generation)
    method = build(key)
    with ficoco.apply(model, method, record=True) as handle:
        batched = logits(model, inputs)
        valid = output_valid(handle, inputs).clone()
        if method.vision is not None or method.input is not None:
            video_tokens = (handle.input_trace or handle.vision_trace).kept  # the last tower call: the video
            assert video_tokens[0].numel() == 2 * handle.plan_for(24).llm_input_visual  # 2 frames of 4x6 tokens
        first = {k: v for k, v in inputs.items() if k not in ("image_grid_thw", "pixel_values")}
        first = {k: v[:1] if k in ("input_ids", "mm_token_type_ids", "attention_mask") else v for k, v in first.items()}
        grid = inputs["image_grid_thw"]
        patches = int(grid[0].prod())
        first.update(image_grid_thw=grid[:1], pixel_values=inputs["pixel_values"][:patches])
        keep = first["attention_mask"][0].bool()
        first = {**first, "input_ids": first["input_ids"][:, keep], "mm_token_type_ids": first["mm_token_type_ids"][:, keep],
                 "attention_mask": first["attention_mask"][:, keep]}
        single = logits(model, first)[0]
    torch.testing.assert_close(batched[0][valid[0]], single, rtol=1e-4, atol=1e-4)


# -- errors ---------------------------------------------------------------------------------------


def test_clear_errors(models, generation):
    model = models[generation]
    inputs = image_batch(generation)
    with ficoco.apply(model, build("ficoco-v")):
        with pytest.raises(ValueError, match="leave position_ids out"):
            logits(model, {**inputs, "position_ids": torch.zeros(3, *inputs["input_ids"].shape, dtype=torch.long)})
    with ficoco.apply(model, "ficoco-v", retain=20), pytest.raises(ValueError, match="retain=20 exceeds the 16"):
        logits(model, inputs)
    with pytest.raises(ValueError, match="lie within"):
        ficoco.attach(model, "ficoco-v", retain=0.5, start_layer=40)
    # CDPruner reads the instruction after each image: the tower called on its own has none
    with ficoco.apply(model, "cdpruner", retain=0.5), pytest.raises(ValueError, match="no instruction tokens"):
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    # a prompt cut right after its image's placeholders: nothing to weigh the image's tokens by
    one = sample_of(inputs, 0, generation)
    end = int((one["input_ids"][0] == QWEN_TOKENS["image"]).nonzero().max()) + 1
    cut = {**one, **{key: one[key][:, :end] for key in ("input_ids", "mm_token_type_ids", "attention_mask")}}
    with ficoco.apply(model, "cdpruner", retain=0.5), \
            pytest.raises(ValueError, match="the visual item in prompt 0 has no instruction text after it"):
        logits(model, cut)


# -- one attention call per tower block -------------------------------------------------------


@pytest.mark.parametrize("key", ["vanilla", "ficoco-v", "tome", "ficoco-vl", "visionzip"])
def test_one_call_vision_attention_equals_the_stock_path(models, generation, key):
    """The tower's attention in one call per block (all images, all windows) gives the stock
    per-segment loop's outputs, with or without a reduction attached, and switches back. With a
    reduction, every reducing block hands the statistics its attention's rotated queries and keys
    (the stock path rotates the projections' own)."""
    from ficoco.adapters.packed_vision import PackedVisionSide
    from ficoco.adapters.varlen import ATTENTION_NAME, fast_vision_attention

    model = models[generation]
    inputs = image_batch(generation)
    handle = ficoco.attach(model, build(key)) if key != "vanilla" else None
    handed = []
    keep = PackedVisionSide._keep_attention_inputs
    try:
        stock = logits(model, inputs)
        with fast_vision_attention(model), pytest.MonkeyPatch.context() as patch:
            patch.setattr(PackedVisionSide, "_keep_attention_inputs",
                          lambda self, q, k, lse: (handed.append(q.shape), keep(self, q, k, lse))[1])
            assert model.model.visual.config._attn_implementation == ATTENTION_NAME
            fast = logits(model, inputs)
    finally:
        if handle:
            handle.remove()
    assert model.model.visual.config._attn_implementation == "sdpa"
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    reducing = handle.vision.blocks if handle is not None and handle.vision is not None else ()
    assert len(handed) == len(reducing)


@pytest.mark.parametrize("key", ["ficoco-v", "evit"])
def test_one_call_attention_with_windows_emptied_by_a_reduction(models, key):
    """Everything removed in Qwen2.5-VL's first full-attention block (7) leaves whole windows empty
    in the window blocks after it: the one-call path gets them as empty segments computed on the
    device (no wait for the host), the stock path without them, and the two agree."""
    from ficoco.adapters.packed_vision import PackedVisionSide
    from ficoco.adapters.varlen import fast_vision_attention

    model, inputs = models["qwen2_5_vl"], image_batch("qwen2_5_vl")
    method = ficoco.get_method(key, retain=2, start_layer=7, end_layer=8)
    windows = []
    original = PackedVisionSide._current_inputs

    def spy(self, full):
        out = original(self, full)
        if not full and self._one_call_attention():
            windows.append((out[0][1:] - out[0][:-1]).tolist())
        return out

    with ficoco.apply(model, method), torch.inference_mode():
        stock = model(**inputs).logits
        with fast_vision_attention(model), pytest.MonkeyPatch.context() as patch:
            patch.setattr(PackedVisionSide, "_current_inputs", spy)
            fast = model(**inputs).logits
    assert windows and 0 in windows[0]
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)


def test_segment_layout():
    from ficoco.adapters.varlen import segment_layout

    segment, position, valid = segment_layout(torch.tensor([0, 3, 4, 8], dtype=torch.int32), 8, 4)
    assert segment.tolist() == [0, 0, 0, 1, 2, 2, 2, 2] and position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert valid.tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]


def test_padded_one_call_attention_trains_like_the_stock_path(models, generation):
    """``kernel="padded"`` (the training path) gives the stock path's loss and gradients."""
    from ficoco.adapters.varlen import PADDED_ATTENTION_NAME, fast_vision_attention

    model = models[generation]
    inputs = image_batch(generation)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("model.visual") and p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    stock_loss, stock = loss_and_grads()
    with fast_vision_attention(model, kernel="padded"):
        assert model.model.visual.config._attn_implementation == PADDED_ATTENTION_NAME
        loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == stock.keys() and grads
    for name in stock:
        torch.testing.assert_close(grads[name], stock[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="unknown kernel 'flash'.*auto, padded"):
        fast_vision_attention(model, kernel="flash")


@pytest.mark.parametrize("key", ["vanilla", "ficoco-v"])
def test_compiled_blocks_give_the_stock_outputs_and_come_off(models, key):
    """``compile_blocks=True`` (traced by dynamo; the "eager" backend keeps the test fast on CPU)
    gives the stock path's logits with and without a reduction attached, and ``remove`` puts the
    class's own forward back."""
    from ficoco.adapters.varlen import fast_vision_attention

    generation = "qwen2_5_vl"
    model = models[generation]
    inputs = image_batch(generation)
    handle = ficoco.attach(model, build(key)) if key != "vanilla" else None
    try:
        stock = logits(model, inputs)
        with fast_vision_attention(model, compile_blocks=True, compile_backend="eager"):
            assert all("forward" in vars(block) for block in model.model.visual.blocks)
            compiled = logits(model, inputs)
    finally:
        if handle:
            handle.remove()
    assert not any("forward" in vars(block) for block in model.model.visual.blocks)
    torch.testing.assert_close(compiled, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generation_name", QWEN_GENERATIONS)
def test_aligned_mlp_keeps_the_function_and_comes_off(generation_name):
    """A tower whose MLP width is not a multiple of 8 (54, or Qwen2-VL's 3 x 36 = 108), as
    Qwen2.5-VL-7B's 3420: the one-call path pads each MLP with zero units to the next multiple of
    64 (the same logits, with a reduction attached too) and ``remove`` puts the original layers
    back, untouched."""
    import transformers

    from ficoco.adapters.varlen import MLP_ALIGNMENT, fast_vision_attention
    from ficoco.testing import tiny_qwen_config

    torch.manual_seed(0)
    config = tiny_qwen_config(generation_name, vision_width=36)
    config.vision_config.num_heads = 3  # 12-wide heads: the 2-D rotary needs a multiple of 4
    if generation_name == "qwen2_vl":
        config.vision_config.mlp_ratio = 3
    else:
        config.vision_config.intermediate_size = 54
    name = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "qwen3_vl": "Qwen3VLForConditionalGeneration"}[generation_name]
    model = getattr(transformers, name)(config).eval()
    mlp = model.model.visual.blocks[0].mlp
    originals = {n: c for n, c in mlp.named_children() if isinstance(c, torch.nn.Linear)}
    inner = max(c.out_features for c in originals.values())
    assert inner % 8 != 0
    width = -(-inner // MLP_ALIGNMENT) * MLP_ALIGNMENT
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = image_batch(generation_name)
    for key in ("vanilla", "ficoco-v"):
        handle = ficoco.attach(model, build(key)) if key != "vanilla" else None
        try:
            stock = logits(model, inputs)
            with fast_vision_attention(model):
                for n, original in originals.items():
                    padded = getattr(mlp, n)
                    widened = original.out_features == inner
                    assert (padded.in_features, padded.out_features) == (
                        (original.in_features, width) if widened else (width, original.out_features)), n
                fast = logits(model, inputs)
            with fast_vision_attention(model, align_mlp=False):
                assert all(getattr(mlp, n) is originals[n] for n in originals)
        finally:
            if handle:
                handle.remove()
        torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    assert all(getattr(mlp, n) is originals[n] for n in originals)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_aligned_mlp_skips_already_aligned_and_unknown_shapes():
    from ficoco.adapters.varlen import aligned_mlp_layers

    class Gated(torch.nn.Module):
        def __init__(self, inner, act):
            super().__init__()
            self.up, self.down, self.act = torch.nn.Linear(8, inner), torch.nn.Linear(inner, 8), act

    assert aligned_mlp_layers(Gated(64, torch.nn.SiLU())) == {}  # already a multiple
    assert aligned_mlp_layers(Gated(54, torch.nn.Sigmoid())) == {}  # sigmoid(0) = 0.5: zero units would not stay zero
    padded = aligned_mlp_layers(Gated(54, torch.nn.GELU()))
    assert (padded["up"].out_features, padded["down"].in_features) == (64, 64)
    assert torch.equal(padded["up"].weight[54:], torch.zeros(10, 8)) and torch.equal(padded["down"].weight[:, 54:], torch.zeros(8, 10))


# PyramidDrop's first stage after Qwen3-VL's DeepStack layers (0-2), whose additions land after a layer's output
@pytest.mark.parametrize("name, options, scored_by", [("fastv", {}, 1), ("pdrop", {"layers": (4, 6)}, 4)])
def test_decoder_probe_sees_the_attention_the_model_computes(generation, name, options, scored_by):
    """The last token's head-averaged attention over the visual tokens, from the hooked queries
    and keys, equals the model's own eager attention row of the layer that scores: FastV's layer
    K - 1 = 1, and for PyramidDrop the layer it prunes for (4), whose queries and keys it computes
    from layer 3's output. Also for Qwen3-VL, whose decoder normalises queries and keys per head
    (q_norm, k_norm) before RoPE."""
    model = tiny_qwen_vl(generation, attn_implementation="eager")
    inputs = image_batch(generation)
    with torch.inference_mode():
        attention = model(**inputs, output_attentions=True).attentions[scored_by]  # [B, H, L, L]
    with ficoco.apply(model, name, retain=0.5, record=True, **options) as handle, torch.inference_mode():
        model(**inputs)
    checked = 0
    for group, result in handle.language.seq.results[0]:  # the first reduction, group by group
        rows = group.row_list or range(inputs["input_ids"].shape[0])
        for row, scores in zip(rows, result.filter_result.scores):
            ids = inputs["input_ids"][row]
            visual = ((ids == model.config.image_token_id) | (ids == model.config.video_token_id)).nonzero()[:, 0]
            last = inputs["attention_mask"][row].nonzero()[-1, 0]
            expected = attention[row, :, last, visual].mean(0)
            torch.testing.assert_close(-scores[:visual.shape[0]], expected, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked


@pytest.mark.parametrize("key", ["pool", "divprune", "cdpruner"])
def test_llm_input_oracle_keeps_each_frames_first_tokens(models, generation, key):
    """``oracle(like=<LLM-input method>)`` (the bench's floor for it) hands the LLM the same number
    of each image's merged tokens as the method, the first ones of each frame, with no scoring."""
    from ficoco.methods.baselines import oracle

    model, inputs = models[generation], image_batch(generation)
    method = ficoco.get_method(key, **METHODS[key])
    with ficoco.apply(model, method) as handle, torch.inference_mode():
        expected = model(**inputs).logits.shape
        counts = [k.numel() for k in handle.input_trace.kept]
    with ficoco.apply(model, oracle(like=method)) as handle, torch.inference_mode():
        out = model(**inputs).logits
        kept = handle.input_trace.kept
    assert out.shape == expected and torch.isfinite(out).all()
    assert [k.numel() for k in kept] == counts
    assert all(torch.equal(k.flatten().sort().values, torch.arange(k.numel())) for k in kept)
