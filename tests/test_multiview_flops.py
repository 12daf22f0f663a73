"""The multi-view FLOPs presets (LLaVA-NeXT-7B, Video-LLaVA-7B) against the FiCoCo paper's figures."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from ficoco.cli import main
from ficoco.measure import budget
from ficoco.measure.flops import LlavaShape, llava_1_5_7b, preset, vision_flops
from ficoco.measure.multiview import (
    LLAVA_NEXT_PINPOINTS,
    llava_next_7b,
    select_best_resolution,
    video_llava_7b,
    with_image,
)
from ficoco.methods import get_method

# Vicuna-7B: 32 layers, D = 4096, H = 11008 (docs/spec.md §8)
LAYERS, D, H = 32, 4096, 11008


def _paper_tflops(tokens: int) -> float:
    """docs/spec.md §8's per-layer count, written out independently of the calculator."""
    return LAYERS * (8 * tokens * D * D + 6 * tokens * D * H + 4 * tokens * tokens * D) / 1e12


def _rows(*args):
    out = CliRunner().invoke(main, ["flops", *args, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    return data, {(r["budget"], r["method"]): r for r in data["rows"]}


@pytest.mark.parametrize("name, views, per_view, paper", [
    ("llava-next-7b", 5, 576, 42.7),
    ("video-llava-7b", 8, 256, 29.7),
])
def test_vanilla_is_the_papers_baseline(name, views, per_view, paper):
    shape = preset(name)
    assert (shape.num_views, shape.num_patches, shape.visual_tokens) == (views, per_view, views * per_view)
    language = shape.language
    assert (language.num_layers, language.hidden_size, language.intermediate_size, language.kv_dim) == (
        LAYERS, D, H, D)
    cost = budget.vanilla_cost(shape, 64)
    assert cost.llm_tflops == pytest.approx(_paper_tflops(views * per_view + 64), rel=1e-12)
    assert round(cost.llm_tflops, 1) == paper
    # 60 text tokens, LLaVA-1.5's, would miss the paper's figure by one in the last digit
    assert round(budget.vanilla_cost(shape, 60).llm_tflops, 1) == pytest.approx(paper - 0.1)
    assert cost.llm_input_visual == cost.llm_final_visual == views * per_view
    assert cost.kv_cache_mb == pytest.approx((views * per_view + 64) * LAYERS * 2 * D * 2 / 1e6)


def test_llava_next_ficoco_rows_and_the_abstracts_reduction():
    shape = llava_next_7b()
    vanilla = budget.vanilla_cost(shape, 64)
    ficoco = budget.method_cost(shape, get_method("ficoco-v", retain=32), 64)  # 32 per crop: 160 tokens
    assert ficoco.llm_input_visual == ficoco.llm_final_visual == 160
    assert ficoco.llm_tflops == pytest.approx(_paper_tflops(160 + 64), rel=1e-12)
    assert round(ficoco.llm_tflops, 1) == 2.9
    # the abstract's "up to 14.7x FLOPs reduction" is 42.7 / 2.9
    assert round(round(vanilla.llm_tflops, 1) / round(ficoco.llm_tflops, 1), 1) == 14.7


def test_video_llava_cut_to_136_tokens():
    cost = budget.method_cost(video_llava_7b(), get_method("ficoco-v", retain=17), 64)
    assert cost.llm_input_visual == 136
    assert cost.llm_tflops == pytest.approx(_paper_tflops(136 + 64), rel=1e-12)


def test_decoder_side_methods_keep_every_view_until_their_layer():
    shape = llava_next_7b()
    cost = budget.method_cost(shape, get_method("fastv", retain=32), 64)
    assert cost.llm_tokens_per_layer[:2] == (2944, 2944)
    assert set(cost.llm_tokens_per_layer[2:]) == {160 + 64}
    assert (cost.llm_input_visual, cost.llm_final_visual) == (2880, 160)


@pytest.mark.parametrize("shape, views", [(llava_next_7b(), 5), (video_llava_7b(), 8)])
def test_the_tower_runs_once_per_view(shape, views):
    one = vision_flops(shape)
    assert budget.vanilla_cost(shape, 64).vision_tflops == pytest.approx(views * one.total / 1e12, rel=1e-12)


def test_video_llava_tower_is_clip_l14_at_224():
    v = video_llava_7b().vision
    one = vision_flops(v)
    p, d, h = 257, 1024, 4096
    assert one.encoder == 24 * (8 * p * d * d + 4 * p * d * h + 4 * p * p * d)
    assert one.projector == 2 * 256 * (1024 * 4096 + 4096 * 4096)
    assert one.patch_embedding == 2 * 256 * 3 * 14 * 14 * 1024
    assert llava_next_7b().vision == llava_1_5_7b().vision


@pytest.mark.parametrize("size", [(672, 672), (1008, 336), (336, 1008), (336, 336), (800, 600), (500, 1000),
                                  (1920, 1080), (100, 40), (337, 1)])
def test_tile_choice_is_the_processors(size):
    from transformers.image_processing_utils import select_best_resolution as reference

    width, height = size
    expected = tuple(reference((height, width), [list(p) for p in LLAVA_NEXT_PINPOINTS]))
    assert select_best_resolution(width, height, LLAVA_NEXT_PINPOINTS) == expected


@pytest.mark.parametrize("size, views", [((672, 672), 5), ((1008, 336), 4), ((336, 336), 3), ((1920, 1080), 5)])
def test_image_size_picks_the_tile_grid(size, views):
    shape = with_image(llava_next_7b(), *size)
    assert (shape.num_views, shape.image_size) == (views, size)
    assert dataclasses.replace(shape, image_size=None) == dataclasses.replace(llava_next_7b(), num_views=views)


def test_cli_prints_the_papers_figures():
    data, rows = _rows("--model", "llava-next-7b")
    assert (data["text_tokens"], data["views"]) == (64, 5)
    assert round(rows[("-", "vanilla")]["llm_tflops"], 1) == 42.7
    assert rows[("32", "ficoco-v")]["llm_input_visual"] == 160
    assert round(rows[("32", "ficoco-v")]["llm_tflops"], 1) == 2.9
    assert {b for b, _ in rows} == {"-", "128", "64", "32"}
    data, rows = _rows("--model", "video-llava-7b")
    assert (data["text_tokens"], data["views"]) == (64, 8)
    assert round(rows[("-", "vanilla")]["llm_tflops"], 1) == 29.7
    assert rows[("17", "ficoco-v")]["llm_input_visual"] == 136
    table = CliRunner().invoke(main, ["flops", "--model", "llava-next-7b", "--retain", "32"]).output
    assert "5 crops x 576 = 2880 visual tokens (budgets are per crop)" in table and "42.67" in table


def test_cli_image_size_for_llava_next():
    _, default = _rows("--model", "llava-next-7b", "--retain", "32")
    _, square = _rows("--model", "llava-next-7b", "--retain", "32", "--image-size", "672x672")
    assert square == default
    data, wide = _rows("--model", "llava-next-7b", "--retain", "32", "--image-size", "1008x336")
    assert data["views"] == 4 and wide[("-", "vanilla")]["llm_input_visual"] == 2304
    assert wide[("-", "vanilla")]["llm_tflops"] == pytest.approx(_paper_tflops(2304 + 64), rel=1e-12)


@pytest.mark.parametrize("args, message", [
    (["--model", "video-llava-7b", "--image-size", "672x672"],
     "video-llava-7b sees every frame at 224 px; --image-size is for Qwen-VL and LLaVA-NeXT"),
    (["--model", "llava-next-7b", "--image-size", "0x672"], "expected WIDTHxHEIGHT in pixels"),
])
def test_cli_refusals_are_one_line(args, message):
    out = CliRunner().invoke(main, ["flops", *args])
    assert out.exit_code != 0 and message in out.output
    assert "Traceback" not in out.output


def test_bad_shapes_and_calls_are_refused():
    base = llava_1_5_7b()
    with pytest.raises(ValueError, match="num_views must be a positive integer"):
        dataclasses.replace(base, num_views=0)
    with pytest.raises(ValueError, match="multiples of the tower's 336 px"):
        dataclasses.replace(base, grid_pinpoints=((336, 500),))
    with pytest.raises(ValueError, match="sees every image at 336 px"):
        with_image(base, 672, 672)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        with_image(llava_next_7b(), 672, 0)
    assert isinstance(llava_next_7b(), LlavaShape) and llava_next_7b() is not llava_next_7b()
