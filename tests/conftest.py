"""Shared fixtures: a tiny random LLaVA with LLaVA-1.5's geometry, written with ``save_pretrained``
and read back with ``from_pretrained`` exactly as a real checkpoint would be (for equivalence and
edge-case tests, where answers do not matter), and the embedded trained proxy model."""

from __future__ import annotations

import os

import pytest
import torch

from ficoco.testing import tiny_llava


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) each worker gets its share of the cores for torch's own
    threads: N workers that each spread matmuls over every core only slow each other down."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))

IMAGE_TOKEN = 95
PATCHES = 576


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoint_with_processor(tmp_path_factory):
    """The tiny LLaVA plus its word-level processor (chat template), as a full checkpoint folder."""
    from ficoco.testing import tiny_llava_processor

    path = tmp_path_factory.mktemp("tiny-llava-with-processor")
    tiny_llava(seed=0).save_pretrained(path)
    tiny_llava_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_checkpoint():
    """The embedded proxy LLaVA shipped in the package (trained, with its processor): the model for
    tests that need real answers (evaluation harness, lmms-eval plugin, accuracy regression)."""
    from ficoco.assets import embedded_model_dir

    return embedded_model_dir()


def _load(path, attn):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def model(checkpoint):
    return _load(checkpoint, "sdpa")


@pytest.fixture(scope="session")
def eager_model(checkpoint):
    return _load(checkpoint, "eager")


def make_prompt(text_before: list[int], text_after: list[int], images: int = 1) -> list[int]:
    """Token ids: text, ``images`` runs of 576 placeholders, text."""
    return [1, *text_before, *([IMAGE_TOKEN] * PATCHES * images), *text_after]


def batch_inputs(prompts: list[list[int]], pixel_values: torch.Tensor, side: str = "left") -> dict:
    """Pad ``prompts`` on ``side`` with id 0 into ``input_ids`` / ``attention_mask``."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(length - len(prompt), length) if side == "left" else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


@pytest.fixture(scope="session")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 336, 336)


@pytest.fixture(scope="session")
def prompts():
    gen = torch.Generator().manual_seed(2)

    def text(n):
        return torch.randint(3, 90, (n,), generator=gen).tolist()

    return [make_prompt(text(4), text(9)), make_prompt(text(2), text(5)), make_prompt(text(6), text(3))]
