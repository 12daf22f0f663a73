"""The FLOPs calculator on Qwen-VL shapes: the processor's resizing, agreement with torch's
FlopCounterMode on the tiny models (tower block by block, mergers, LLM decoder), presets and the
``ficoco flops`` table with the paper's Table 3 budgets."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import ficoco
from ficoco.cli import main
from ficoco.measure import budget
from ficoco.measure.qwen import QwenVLShape, qwen2_5_vl_7b, qwen_vision_flops, smart_resize
from ficoco.testing import QWEN_GENERATIONS, qwen_image_processor, qwen_patch_size, tiny_qwen_vl

from .qwen_inputs import batch, images_for, pixels, tokens_of
from ficoco.testing import qwen_prompt


@pytest.mark.parametrize("size", [(1280, 720), (300, 1000), (100, 60), (4000, 3000)])
def test_smart_resize_is_the_processors(size):
    from PIL import Image

    processor = qwen_image_processor("qwen2_5_vl")
    grid = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0].tolist()
    h, w = smart_resize(size[1], size[0], 28, processor.size.shortest_edge, processor.size.longest_edge)
    assert grid == [1, h // 14, w // 14]


def test_presets_match_the_papers_token_counts():
    shape = qwen2_5_vl_7b()
    assert shape.grid == (52, 92) and shape.num_patches == 1196  # a 1280x720 image: 1288x728 px, 4784 patches
    assert len(shape.windows()) == 7 * 12 and sum(shape.windows()) == 4784
    out = json.loads(CliRunner().invoke(main, ["flops", "--model", "qwen2.5-vl-7b", "--json"]).output)
    budgets = {row["budget"] for row in out["rows"]}
    assert {"600", "500", "400"} <= budgets  # the paper's Table 3 budgets
    rows = {(r["budget"], r["method"]): r for r in out["rows"]}
    assert rows[("600", "ficoco-v")]["llm_input_visual"] == 600
    assert rows[("400", "ficoco-v")]["llm_tflops"] < rows[("600", "ficoco-v")]["llm_tflops"] < rows[("-", "vanilla")]["llm_tflops"]
    assert rows[("600", "ficoco-v")]["schedule"] == "encoder L15-31"  # full-attention blocks only
    assert rows[("600", "pool")]["llm_input_visual"] == 600 and rows[("600", "pool")]["schedule"] == "LLM input"
    shares = CliRunner().invoke(main, ["flops", "--model", "qwen3-vl-8b", "--image-size", "640x480", "--retain",
                                       "0.5,0.25"])
    assert shares.exit_code == 0 and "640x480 px image" in shares.output
    bad = CliRunner().invoke(main, ["flops", "--image-size", "640x480"])
    assert bad.exit_code != 0 and "--image-size is for Qwen-VL" in bad.output


@pytest.mark.parametrize("generation", QWEN_GENERATIONS)
@pytest.mark.parametrize("method", [None, "ficoco-v", "fastv", "divprune"])
def test_calculator_matches_flops_measured_on_the_model(generation, method):
    """FlopCounterMode (math attention, so that attention matmuls count) on one image: each tower
    block, the mergers and the LLM decoder equal the calculator, up to the scoring work of a
    reducing layer (decoder-side) and, after an encoder reduction, Qwen2.5-VL's uneven windows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_qwen_vl(generation)
    visual = pixels(generation, images_for(generation, ((8, 6),)))
    grid = visual["image_grid_thw"][0].tolist()
    text = [7, 8, 9, 10]
    ids, types = qwen_prompt(text, [("image", tokens_of(grid))], text)
    inputs = {**batch([(ids, types)]), **visual}
    unit = 2 * qwen_patch_size(generation)
    shape = QwenVLShape.from_config(model.config, (grid[2] * qwen_patch_size(generation), grid[1] * qwen_patch_size(generation)))
    shape = QwenVLShape(shape.vision, shape.language, shape.image_size, min_pixels=unit * unit, max_pixels=10 ** 8)
    assert shape.num_patches == tokens_of(grid)
    spec = None if method is None else ficoco.get_method(method, retain=0.5, **({"start_layer": 12} if method == "ficoco-v" else {}))
    counter = FlopCounterMode(display=False)
    handle = ficoco.attach(model, spec) if spec else None
    try:
        with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
            model(**(handle.prepare_inputs(**inputs) if handle else inputs))
    finally:
        if handle:
            handle.remove()
    counts = counter.get_flop_counts()
    cost = budget.method_cost(shape, spec, len(ids) - tokens_of(grid)) if spec else \
        budget.vanilla_cost(shape, len(ids) - tokens_of(grid))
    llm = budget.counted_decoder_flops(counts)
    overhead = 0.15 if method == "fastv" else 0.0
    assert cost.llm_tflops * 1e12 <= llm <= cost.llm_tflops * 1e12 * (1 + overhead) + 1
    plan = spec.plan(budget.geometry(shape)) if spec else None
    groups = plan.vision_tokens_per_layer(with_cls=False) if plan else None
    # the merger runs on every token the tower hands on, before an LLM-input reduction
    expected = qwen_vision_flops(shape, groups, plan.llm_input_visual + plan.input_removed if plan else None)
    blocks = [sum(ops.values()) for key, ops in counts.items()
              if key.count(".") >= 2 and key.split(".")[-2] == "blocks"]
    assert len(blocks) == shape.vision.num_layers
    windowed_after_reduction = generation == "qwen2_5_vl" and method == "ficoco-v"
    for index, (got, want) in enumerate(zip(blocks, expected.encoder_per_layer)):
        if windowed_after_reduction and not shape.vision.full_attention(index) and index > 15:
            assert abs(got - want) <= 0.1 * want, index  # windows keep uneven shares
        elif plan and index in plan.vision and method == "ficoco-v":
            assert want <= got <= want * 1.5, index  # the reducing block also scores its tokens
        else:
            assert got == pytest.approx(want, rel=1e-9), index
