"""Accuracy of a LLaVA model on question/answer samples, per question family, with or without a
token-reduction method attached."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ..adapters import attach
from ..methods import Method
from .train import QASample, collate


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def _prompt_batch(model, processor, samples: Sequence[QASample]) -> dict:
    """The first prompts of ``samples`` with their images, left-padded, on the model's device and
    with pixels in its dtype."""
    parameter = next(model.parameters())
    batch = {k: v.to(parameter.device) for k, v in collate(samples, processor, with_answers=False).items()}
    batch["pixel_values"] = batch["pixel_values"].to(parameter.dtype)
    return batch


@torch.inference_mode()
def answer(model, processor, samples: Sequence[QASample], max_new_tokens: int = 4, *,
           batch: dict | None = None) -> list[str]:
    """Greedy answers for ``samples`` (one batch, left-padded; ``batch``: their prompt batch, when
    already built by :func:`prompt_batches`)."""
    batch = _prompt_batch(model, processor, samples) if batch is None else batch
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def prompt_batches(model, processor, samples: Sequence[QASample], batch_size: int) -> list[dict]:
    """The prompt batches of ``samples`` (``batch_size`` each, on the model's device), built once
    to be answered under several methods: rendering and processing the images is most of a small
    model's evaluation time."""
    return [_prompt_batch(model, processor, samples[start:start + batch_size])
            for start in range(0, len(samples), batch_size)]


def accuracy(
    model,
    processor,
    samples: Sequence[QASample],
    method: Method | None = None,
    batch_size: int = 16,
    *,
    batches: Sequence[dict] | None = None,
) -> dict[str, float]:
    """``{family: accuracy, ..., "overall": accuracy}`` (exact match after normalisation).
    ``batches``: the samples' :func:`prompt_batches` of ``batch_size``, if already built."""
    if batches is not None and len(batches) != -(-len(samples) // batch_size):
        raise ValueError(f"{len(batches)} prompt batches do not hold {len(samples)} samples in batches of {batch_size}")
    handle = attach(model, method) if method is not None else None
    correct: dict[str, list[bool]] = defaultdict(list)
    try:
        for index, start in enumerate(range(0, len(samples), batch_size)):
            chunk = samples[start:start + batch_size]
            predictions = answer(model, processor, chunk, batch=None if batches is None else batches[index])
            for sample, predicted in zip(chunk, predictions):
                correct[sample.family].append(normalize_answer(predicted) == normalize_answer(sample.answer))
    finally:
        if handle is not None:
            handle.remove()
    result = {family: sum(hits) / len(hits) for family, hits in sorted(correct.items())}
    everything = [hit for hits in correct.values() for hit in hits]
    result["overall"] = sum(everything) / max(1, len(everything))
    return result


@torch.inference_mode()
def surviving_patch_share(model, processor, samples: Sequence[QASample], salient: torch.Tensor,
                          method: Method) -> float:
    """Share of the ``salient`` patches (``[B, P]`` bool over each sample's patch grid in raster
    order) whose own token reaches the LLM when the encoder-side ``method`` runs on ``samples``'
    images. A patch merged into another token or fused away does not count as reaching it."""
    if method.vision is None:
        raise ValueError(f"{method.name} does not reduce in the vision encoder; no patch is dropped there")
    with attach(model, method) as handle:
        model(**_prompt_batch(model, processor, samples))
        positions = handle.vision_trace.positions.cpu()  # [B, N'], -1 for fused tokens
    kept = torch.zeros_like(salient)
    rows = torch.arange(len(samples))[:, None].expand_as(positions)
    real = positions >= 0
    kept[rows[real], positions[real]] = True
    return float((kept & salient).sum() / salient.sum().clamp(min=1))
