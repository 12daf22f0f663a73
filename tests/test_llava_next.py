"""Every method inside a real (tiny) LLaVA-NeXT with LLaVA-NeXT-7B's anyres geometry (CLIP-336/14
crops, its five grid pinpoints, features from layer -2), saved and loaded as a checkpoint and fed
by a real ``LlavaNextProcessor``: the LLaVA-1.5 matrix (reduction off == vanilla, detach restores,
batched == one by one with mixed image sizes and padding on both sides, eager == SDPA, generate()
== manual prefill + cached decoding, exact token counts, clear refusals) plus what is LLaVA-NeXT's
own: the layout against the processor and the model's packing, the per-crop budget, the reduced
crops' packing, newline tokens kept inside the LLM, and several images per prompt."""

from __future__ import annotations

import json


import numpy as np
import pytest
import torch
from PIL import Image

import ficoco
from ficoco.adapters.anyres import anyres_layout
from ficoco.testing import LLAVA_NEXT_PINPOINTS, tiny_llava_next, tiny_llava_next_processor
from .test_models import _manual_greedy

pytestmark = pytest.mark.xdist_group("llava-next")

IMAGE_TOKEN = 95
CROP_PATCHES = 576
# per crop: an image of c crops keeps c x retain visual tokens
METHODS = {
    "ficoco-v": dict(retain=100),
    "ficoco-l": dict(retain=100, start_layer=2),
    "ficoco-vl": dict(retain=64, language_start_layer=2),
    "tome": dict(retain=100),
    "evit": dict(retain=100),
    "fastv": dict(retain=100),
    "random": dict(retain=100),
    "random-llm": dict(retain=100, side="language"),
    "topk": dict(retain=100),
    "visionzip": dict(retain=100),
    "prumerge": dict(retain=100),
    "prumerge+": dict(retain=100),
    "dart": dict(retain=100),
    "pdrop": dict(retain=100, layers=(2, 4, 6)),
    "sparsevlm": dict(retain=100),
    "pool": dict(retain=144),
    "divprune": dict(retain=100),
    "cdpruner": dict(retain=100),
    "zero": dict(),
    "ficoco-v-share": dict(retain=0.25),
}
#: refused in one line, with what the line says
REFUSED = {
    "downsample": dict(options=dict(retain=192), match="lowers each crop's resolution"),
    "prumerge-adaptive": dict(options=dict(retain=None), match="decides each crop's count in the tower"),
}
BEFORE_LLM = ("ficoco-v", "tome", "evit", "random", "topk", "visionzip", "prumerge", "prumerge+", "pool", "divprune",
              "cdpruner", "zero", "ficoco-v-share", "ficoco-vl")
CAN_KEEP_ALL = [key for key in METHODS if key != "zero"]
# (height, width): 1x2 tiles (rows unpadded), 2x1 tiles (columns unpadded), 1x3 tiles, 2x2 tiles; thin
# images keep the unpadded tile grids (and so the tests) small: 968, 1,008, 1,160 and 2,928 tokens
SIZES = [(100, 640), (640, 100), (100, 1000), (400, 400)]


def build(key: str, **overrides) -> ficoco.Method:
    name = key.removesuffix("-llm").removesuffix("-share").removesuffix("-adaptive")
    options = {**(METHODS[key] if key in METHODS else REFUSED[key]["options"]), **overrides}
    return ficoco.get_method(name, **options)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny LLaVA-NeXT and its processor, written as a checkpoint folder."""
    path = tmp_path_factory.mktemp("tiny-llava-next")
    tiny_llava_next(seed=0).save_pretrained(path)
    tiny_llava_next_processor().save_pretrained(path)
    return path


def _load(path, attn):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation=attn,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(checkpoint):
    return _load(checkpoint, "sdpa")


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return _load(checkpoint, "eager")


@pytest.fixture(scope="module")
def processor(checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint, local_files_only=True)


def image(size: tuple[int, int], seed: int) -> Image.Image:
    height, width = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def encode(processor, sizes: list[tuple[int, int]], question: str, seed: int = 0) -> dict:
    """One sample: ``len(sizes)`` images, then the question, in the chat template. The crops get
    a little pixel noise: a thin image's tiles are mostly the processor's constant padding, whose
    identical patches would leave argmax rules (ToMe's matching) ties that kernel rounding breaks."""
    parts = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    images = [image(size, seed + i) for i, size in enumerate(sizes)]
    out = dict(processor(images=images, text=[text], return_tensors="pt"))
    noise = torch.randn(out["pixel_values"].shape, generator=torch.Generator().manual_seed(seed))
    out["pixel_values"] = out["pixel_values"] + 0.05 * noise
    return out


def batch(samples: list[dict], side: str = "left") -> dict:
    """Samples padded on ``side`` (id 0), their images' crops padded to the most crops."""
    length = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        span = slice(length - n, length) if side == "left" else slice(0, n)
        ids[row, span], mask[row, span] = sample["input_ids"][0], 1
    crops = max(s["pixel_values"].shape[1] for s in samples)
    pixels = torch.cat([torch.nn.functional.pad(s["pixel_values"], (0, 0, 0, 0, 0, 0, 0, crops - s["pixel_values"].shape[1]))
                        for s in samples])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_sizes": torch.cat([s["image_sizes"] for s in samples])}


@pytest.fixture(scope="module")
def samples(processor):
    """Two samples of different image sizes and question lengths (968 and 1,008 image tokens)."""
    return [encode(processor, [SIZES[0]], "what is the color of the shape ?", seed=1),
            encode(processor, [SIZES[1]], "how many ?", seed=2)]


def logits(model, inputs, **kwargs):
    with torch.inference_mode():
        return model(**inputs, **kwargs).logits


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def vanilla_logits(model, samples):
    return logits(model, batch(samples))


# -- the layout ----------------------------------------------------------------------------------


def test_every_registered_method_runs_or_is_refused():
    names = {key.removesuffix("-llm").removesuffix("-share").removesuffix("-adaptive") for key in [*METHODS, *REFUSED]}
    assert names == set(ficoco.methods.available_methods())


@pytest.mark.parametrize("size", SIZES)
def test_layout_matches_processor_and_model_packing(model, processor, size):
    """Crops, token count and newline places of each size: as the processor counts placeholders
    and as the model packs its features (newline rows hold ``image_newline`` itself)."""
    layout = anyres_layout(size, LLAVA_NEXT_PINPOINTS, 336, 14)
    inputs = encode(processor, [size], "what ?")
    assert inputs["pixel_values"].shape[1] == layout.crops
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == layout.full_tokens
    with torch.inference_mode():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    assert packed.shape[0] == layout.full_tokens
    newline = model.model.image_newline
    is_newline = (packed == newline).all(dim=-1)
    assert torch.equal(is_newline, layout.newlines())
    assert layout.patch_positions().unique().numel() == layout.patch_tokens
    assert {SIZES[0]: (1, 2), SIZES[1]: (2, 1), SIZES[2]: (1, 3), SIZES[3]: (2, 2)}[size] == \
        (layout.tile_rows, layout.tile_cols)


# -- the matrix ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CAN_KEEP_ALL)
def test_reduction_disabled_is_vanilla(model, samples, vanilla_logits, key):
    retain = 1.0 if key.endswith("-share") else CROP_PATCHES
    with ficoco.apply(model, build(key, retain=retain)):
        out = logits(model, batch(samples))
    torch.testing.assert_close(out, vanilla_logits, rtol=0, atol=0)


@pytest.mark.parametrize("key", list(METHODS))
def test_detach_restores_model(model, samples, vanilla_logits, key):
    before = hook_count(model)
    with ficoco.apply(model, build(key)):
        reduced = logits(model, batch(samples))
        assert hook_count(model) > before
    assert reduced.shape[1] < vanilla_logits.shape[1]
    assert hook_count(model) == before and "generate" not in model.__dict__
    assert not {"get_image_features", "pack_image_features"} & set(model.model.__dict__)
    torch.testing.assert_close(logits(model, batch(samples)), vanilla_logits, rtol=0, atol=0)


def _valid_rows(out, length, side):
    return out[-length:] if side == "left" else out[:length]


@pytest.mark.parametrize("key", list(METHODS))
def test_batched_equals_one_by_one(model, samples, key):
    """Mixed image sizes, padded on the left and on the right: each sample's logits in the batch
    as when run alone."""
    with ficoco.apply(model, build(key)):
        singles = [logits(model, batch([sample]))[0] for sample in samples]
        for side in ("left", "right"):
            batched = logits(model, batch(samples, side))
            for row, single in enumerate(singles):
                torch.testing.assert_close(_valid_rows(batched[row], single.shape[0], side), single, rtol=1e-4,
                                           atol=1e-4)


def output_mask(handle, inputs):
    """``[B, L']`` which output positions are real tokens."""
    if handle.kept_index is not None:
        return inputs["attention_mask"].gather(1, handle.kept_index).bool() & handle.kept_valid
    return handle.prepare_inputs(**inputs)["attention_mask"].bool()


@pytest.mark.parametrize("key", list(METHODS))
def test_eager_equals_sdpa(model, eager_model, samples, key):
    inputs = batch(samples)
    with ficoco.apply(model, build(key)) as handle:
        sdpa = logits(model, inputs)
        real = output_mask(handle, inputs)
    with ficoco.apply(eager_model, build(key)):
        eager = logits(eager_model, inputs)
    torch.testing.assert_close(sdpa[real], eager[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["vanilla", *METHODS])
def test_generate_equals_manual_prefill_and_decode(model, samples, key):
    inputs = batch(samples, "left")
    steps = 3
    handle = ficoco.attach(model, build(key)) if key != "vanilla" else None
    try:
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            prepared = handle.prepare_inputs(**inputs) if handle else inputs
            tokens, step_logits = _manual_greedy(model, prepared, steps)
    finally:
        if handle:
            handle.remove()
    assert torch.equal(gen.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, -steps:], tokens)


@pytest.mark.parametrize("key", ["ficoco-v", "cdpruner", "fastv"])
def test_static_cache_generates_the_same_tokens_or_refuses_clearly(model, samples, key):
    """Before the LLM only the prompt is shorter, so a static KV cache gives the dynamic cache's
    tokens; inside it each layer keeps its own length, and a static cache is refused."""
    inputs = batch(samples, "left")
    options = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        dynamic = model.generate(**inputs, **options)
        if handle.method.language is not None:
            with pytest.raises(ValueError, match="needs a dynamic KV cache.*StaticCache"):
                model.generate(**inputs, **options, cache_implementation="static")
            return
        static = model.generate(**inputs, **options, cache_implementation="static")
    assert torch.equal(static, dynamic)


# -- budgets and layout of the reduced tokens -----------------------------------------------------


def _layouts(inputs):
    return [anyres_layout(tuple(s), LLAVA_NEXT_PINPOINTS, 336, 14) for s in inputs["image_sizes"].tolist()]


@pytest.mark.parametrize("key", list(METHODS))
def test_exact_token_counts(model, samples, key):
    """Before the LLM: each image's placeholders are cut to crops x k and the LLM gets exactly
    those; inside it: each image keeps min(crops x k, its patches) of its patch tokens, and every
    newline token."""
    inputs = batch(samples, "right")
    layouts = _layouts(inputs)
    method = build(key)
    with ficoco.apply(model, method) as handle, torch.inference_mode():
        out = model(**inputs)
        prepared = handle.prepare_inputs(**inputs)
        kept_index, kept_valid = handle.kept_index, handle.kept_valid
    per_crop = handle.plan.llm_input_visual
    text = (inputs["attention_mask"].sum(1) - torch.tensor([x.full_tokens for x in layouts])).tolist()
    if key in BEFORE_LLM:
        if key != "ficoco-vl":  # (its encoder keeps its share of the removals down to 64)
            assert per_crop == {"zero": 0, "pool": 144, "ficoco-v-share": round(0.25 * CROP_PATCHES)}.get(key, 100)
        placeholders = (prepared["input_ids"] == IMAGE_TOKEN) & prepared["attention_mask"].bool()
        assert placeholders.sum(1).tolist() == [x.crops * per_crop for x in layouts]
        assert prepared["attention_mask"].sum(1).tolist() == [t + x.crops * per_crop for t, x in zip(text, layouts)]
        if method.language is None:
            assert out.logits.shape[1] == prepared["input_ids"].shape[1]
        assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == sum(x.full_tokens for x in layouts)  # untouched
    if method.language is None:
        assert kept_index is None
        return
    ids = (prepared if key in BEFORE_LLM else inputs)["input_ids"]
    final = ids.gather(1, kept_index) == IMAGE_TOKEN
    final &= kept_valid
    expected = [handle.kept_tokens(tuple(s)) for s in inputs["image_sizes"].tolist()]
    if key in BEFORE_LLM:  # ficoco-vl: crops x its final per-crop count
        assert expected == [x.crops * handle.plan.llm_final_visual for x in layouts]
    else:  # (SparseVLM's own stage counts leave fewer than its budget: docs/methods.md)
        assert key == "sparsevlm" or expected == [min(x.patch_tokens, x.crops * 100) for x in layouts]
        expected = [e + x.rows for e, x in zip(expected, layouts)]  # every newline token stays
    assert final.sum(1).tolist() == expected


@pytest.mark.parametrize("key", ["fastv", "ficoco-l", "sparsevlm"])
def test_decoder_side_keeps_every_newline_token(model, samples, key):
    inputs = batch(samples, "left")
    layouts = _layouts(inputs)
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        model(**inputs)
        kept = handle.kept_index
    for row, layout in enumerate(layouts):
        columns = (inputs["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        newline_columns = set(columns[layout.newlines()].tolist())
        assert newline_columns <= set(kept[row].tolist())
        assert len(newline_columns) == layout.rows


@pytest.mark.parametrize("key", ["ficoco-v", "evit", "tome", "visionzip"])
def test_reduced_crops_packing(model, samples, key):
    """Base crop first as handed on, then the tiles' tokens in the raster order of their full grid
    (rows running across tiles), fused tokens last; the LLM reads exactly those rows of the
    projected crops."""
    inputs = batch(samples, "right")
    layouts = _layouts(inputs)
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        trace = handle.vision_trace
        packed_state = handle._packed
    start = 0
    for layout, features, (index, sizes) in zip(layouts, encoded.pooler_output, packed_state):
        rows = slice(start, start + layout.crops)
        start += layout.crops
        positions = trace.positions[rows]
        k = positions.shape[1]
        assert features.shape[0] == layout.crops * k == index.numel()
        assert torch.equal(index[:k], positions[0])
        tiles = index[k:]
        on_grid = tiles[tiles >= 0]
        assert torch.equal(on_grid, on_grid.sort().values) and on_grid.unique().numel() == on_grid.numel()
        assert bool((tiles[on_grid.numel():] == -1).all()) and (key == "evit") == bool((tiles == -1).any())
        if key != "visionzip":  # merging methods conserve the patches of each crop
            assert float(sizes.sum()) == pytest.approx(layout.crops * CROP_PATCHES)
        # a tile token at grid row r, column c came from tile (r // 24, c // 24)
        tile_of = (on_grid - CROP_PATCHES) // layout.grid_width // 24 * layout.tile_cols \
            + (on_grid - CROP_PATCHES) % layout.grid_width // 24
        assert sorted(set(tile_of.tolist())) == list(range(layout.crops - 1))


@pytest.mark.parametrize("key", ["fastv", "ficoco-l", "ficoco-v", "cdpruner"])
def test_samples_with_several_images_batch_like_one_by_one(model, processor, samples, key):
    """One sample with one image, one with two of other sizes (3 + 4 crops): different counts per
    sample (dead rows inside the LLM), each sample's logits as alone, padded on either side."""
    two = encode(processor, [SIZES[1], SIZES[2]], "is there a red circle ?", seed=5)
    with ficoco.apply(model, build(key)) as handle:
        singles = [logits(model, batch([sample]))[0] for sample in (samples[0], two)]
        for side in ("left", "right"):
            batched = logits(model, batch([samples[0], two], side))
            valid = handle.kept_valid
            for row, single in enumerate(singles):
                got = batched[row][valid[row]] if valid is not None else \
                    _valid_rows(batched[row], single.shape[0], side)
                torch.testing.assert_close(got, single, rtol=1e-4, atol=1e-4)
            if valid is not None:
                assert handle.kept_dead is not None and bool(handle.kept_dead.any())


def test_budget_is_per_crop(model, samples):
    """``retain`` is per crop: images of 3 and 5 crops hand on 3 k and 5 k tokens."""
    with ficoco.apply(model, "ficoco-v", retain=64) as handle:
        assert handle.visual_tokens_per_crop == 64
        assert [handle.prompt_tokens(size) for size in SIZES] == [192, 192, 256, 320]
    with ficoco.apply(model, "fastv", retain=64) as handle:
        layouts = [anyres_layout(size, LLAVA_NEXT_PINPOINTS, 336, 14) for size in SIZES]
        assert [handle.prompt_tokens(size) for size in SIZES] == [x.full_tokens for x in layouts]
        assert [handle.kept_tokens(size) for size in SIZES] == [192, 192, 256, 320]


# -- refusals and the family ----------------------------------------------------------------------


@pytest.mark.parametrize("key", list(REFUSED))
def test_refused_methods_say_why_in_one_line(model, key):
    before = hook_count(model)
    with pytest.raises(ValueError, match=REFUSED[key]["match"]) as err:
        ficoco.attach(model, build(key))
    assert "\n" not in str(err.value)
    assert hook_count(model) == before and not hasattr(model, "_ficoco_handle")


def test_wrong_placeholder_count_and_missing_sizes(model, samples):
    inputs = batch(samples[:1])
    with ficoco.apply(model, "ficoco-v", retain=64):
        short = {**inputs, "input_ids": inputs["input_ids"][:, 10:], "attention_mask": inputs["attention_mask"][:, 10:]}
        with pytest.raises(ValueError, match=r"image placeholders for 1 image\(s\) of sizes \[\(100, 640\)\]; LLaVA-NeXT expects 968"):
            logits(model, short)
        with pytest.raises(ValueError, match="needs image_sizes"):
            logits(model, {k: v for k, v in inputs.items() if k != "image_sizes"})


def test_full_strategy_with_cls_is_refused(checkpoint):
    model = _load(checkpoint, "sdpa")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="hands the LLM each crop's \\[CLS\\]"):
        ficoco.attach(model, "ficoco-v")


def test_family_from_model_and_checkpoint(model, checkpoint):
    from ficoco.adapters.families import family_of
    from ficoco.checkpoint import check_supported, checkpoint_config, load_model

    assert family_of(model).name == "LLaVA-NeXT" == check_supported(checkpoint_config(checkpoint), checkpoint).name
    loaded = load_model(checkpoint)
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    with ficoco.apply(loaded.model, "ficoco-v", retain=64) as handle:  # the bare LlavaNextModel too
        assert handle.family == "llava-next"


def test_command_line_picks_the_family_from_the_checkpoint(checkpoint, tmp_path):
    """``ficoco run`` answers on a LLaVA-NeXT checkpoint (no TFLOPs line: not costed per image), and
    ``ficoco flops`` costs it at the paper's 672x672 image or another size."""
    from click.testing import CliRunner

    from ficoco.cli import main

    path = tmp_path / "thin.png"
    image(SIZES[0], seed=3).save(path)
    runner = CliRunner()
    out = runner.invoke(main, ["run", str(checkpoint), "--image", str(path), "--question", "what is the color ?",
                               "--method", "ficoco-v", "--retain", "64", "--max-new-tokens", "2"])
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("answer: ") and "method: ficoco-v  time: " in out.stdout and "TFLOPs" not in out.stdout
    # the calculator reads the checkpoint's own tower, decoder and pinpoints: a 672x672 image is
    # the base crop + 2x2 tiles, a 1008x336 one the base + 3x1
    from ficoco.measure.multiview import shape_from_config

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    for size, views in ((None, 5), ("1008x336", 4)):
        out = runner.invoke(main, ["flops", "--model", str(checkpoint), "--json", "--retain", "16",
                                   *(["--image-size", size] if size else [])])
        assert out.exit_code == 0, out.output
        rows = {row["method"]: row for row in json.loads(out.stdout)["rows"]}
        assert rows["vanilla"]["llm_input_visual"] == views * patches
        assert rows["ficoco-v"]["llm_input_visual"] == views * 16
    assert shape_from_config(config).grid_pinpoints == tuple(tuple(p) for p in config.image_grid_pinpoints)
