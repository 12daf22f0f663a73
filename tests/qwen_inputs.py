"""Inputs for the tiny Qwen-VL checkpoints: images of several sizes through the family's image
processor, a video as random temporal patches, and prompts with their placeholder runs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ficoco.testing import QWEN_TOKENS, qwen_image_processor, qwen_patch_size, qwen_prompt

#: image sizes in merge units (2 patches): wider, square and taller, so grids and token counts differ
SHAPES = ((8, 6), (4, 4), (6, 10))


def images_for(generation: str, shapes=SHAPES, seed: int = 0) -> list[Image.Image]:
    unit = 2 * qwen_patch_size(generation)
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h * unit, w * unit, 3)) * 255).astype("uint8")) for w, h in shapes]


def pixels(generation: str, images) -> dict:
    out = qwen_image_processor(generation)(images=list(images), return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def tokens_of(grid) -> int:
    t, h, w = (int(x) for x in grid)
    return t * h * w // 4


def batch(prompts: list[tuple[list[int], list[int]]], side: str = "left") -> dict:
    """``input_ids`` / ``mm_token_type_ids`` / ``attention_mask`` padded on ``side`` with id 0."""
    length = max(len(ids) for ids, _ in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (p, t) in enumerate(prompts):
        span = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        ids[row, span], types[row, span], mask[row, span] = torch.tensor(p), torch.tensor(t), 1
    return {"input_ids": ids, "mm_token_type_ids": types, "attention_mask": mask}


def image_batch(generation: str, shapes=SHAPES, side: str = "left", seed: int = 0) -> dict:
    """One image per sample, each sample its own size and its own text."""
    visual = pixels(generation, images_for(generation, shapes, seed))
    prompts = [qwen_prompt([5 + row, 6, 7][: 1 + row % 3], [("image", tokens_of(grid))], [8, 9 + row, 10, 11][: 2 + row % 3])
               for row, grid in enumerate(visual["image_grid_thw"])]
    return {**batch(prompts, side), **visual}


def sample_of(inputs: dict, row: int, generation: str, shapes=SHAPES, seed: int = 0) -> dict:
    """Sample ``row`` of :func:`image_batch` alone (no padding)."""
    visual = pixels(generation, [images_for(generation, shapes, seed)[row]])
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    types = inputs["mm_token_type_ids"][row][inputs["attention_mask"][row].bool()]
    return {"input_ids": ids[None], "mm_token_type_ids": types[None], "attention_mask": torch.ones_like(ids)[None],
            **visual}


def video_and_images(generation: str, side: str = "left", seed: int = 0) -> dict:
    """Sample 0: a 4-frame video (2 temporal patches) then an image; sample 1: two images."""
    patch = qwen_patch_size(generation)
    generator = torch.Generator().manual_seed(seed)
    grid_video = torch.tensor([[2, 8, 12]])
    videos = torch.randn(int(grid_video.prod()), 3 * 2 * patch * patch, generator=generator)
    visual = pixels(generation, images_for(generation, ((4, 4), (6, 4), (4, 6)), seed))
    grids = visual["image_grid_thw"]
    if generation == "qwen3_vl":  # one run per frame, each after its timestamp
        frame = tokens_of(grid_video[0]) // 2
        video = [("text", 40), ("video", frame), ("text", 41), ("video", frame)]
    else:  # every frame in one run
        video = [("video", tokens_of(grid_video[0]))]
    prompts = [qwen_prompt([5], [*video, ("image", tokens_of(grids[0]))], [8, 9]),
               qwen_prompt([6, 7], [("image", tokens_of(grids[1])), ("image", tokens_of(grids[2]))], [10])]
    return {**batch(prompts, side), **visual, "pixel_values_videos": videos, "video_grid_thw": grid_video}


__all__ = ["QWEN_TOKENS", "SHAPES", "batch", "image_batch", "images_for", "pixels", "sample_of", "tokens_of",
           "video_and_images"]
