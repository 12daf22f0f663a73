"""``ficoco demo``: answer questions about one image with vanilla and reduced models, side by side,
and draw which patches were kept and where the discarded ones went."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .measure import budget
from .adapters import attach
from .measure.flops import LlavaShape
from .methods import get_method
from .prompts import chat_prompt
from .visualize import patch_destinations, render_reduction

DEMO_METHODS = ("vanilla", "ficoco-v", "ficoco-l", "ficoco-vl")
#: the bundled demo picture: sample 39 of the proxy dataset's fixed test split (five shapes and a word)
DEMO_SAMPLE = ("test", 39)


def bundled_example(follow_ups: int = 5):
    """``(image, questions, expected answers)`` of the bundled demo scene: its test-split question
    and ``follow_ups`` more about the same scene (deterministic)."""
    from .proxy.scenes import SPLITS, example_at, follow_up_questions

    split, index = DEMO_SAMPLE
    example = example_at(SPLITS[split].seed, index)
    samples = [example.sample, *follow_up_questions(example, follow_ups)]
    return example.image(), [s.question for s in samples], [s.answer for s in samples]


@dataclass
class DemoRow:
    method: str
    answers: list[str]
    llm_input_visual: int
    llm_final_visual: int
    llm_tflops: float
    seconds: float


def _method(name: str, retain: int, llm_layers: int):
    if name == "vanilla":
        return None
    options = {"retain": retain}
    start = min(5, max(1, llm_layers // 3))  # FiCoCo-L's layer 5 of 32, scaled to shallower LLMs
    if name == "ficoco-l":
        options["start_layer"] = start
    if name == "ficoco-vl":
        options["language_start_layer"] = start
    return get_method(name, **options)


@torch.inference_mode()
def run_demo(model, processor, image, questions: Sequence[str], *, methods: Sequence[str] = DEMO_METHODS,
             retain: int = 64, picture: str | None = None, max_new_tokens: int = 4,
             expected: Sequence[str] | None = None) -> list[DemoRow]:
    """Answer ``questions`` about ``image`` with each method; optionally save to ``picture`` the
    figure of FiCoCo-V's reduction (kept patches, merge map) with every method's answers (and the
    ``expected`` ones, when known)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(processor, q) for q in questions]
    batch = processor(images=[image] * len(questions), text=prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    shape = LlavaShape.from_config(model.config)
    text_tokens = int((batch["input_ids"][0] != model.config.image_token_id).sum() - (batch["attention_mask"][0] == 0).sum())
    llm_layers = model.config.text_config.num_hidden_layers
    rows, trace = [], None
    for name in methods:
        method = _method(name, retain, llm_layers)
        handle = attach(model, method, record=True) if method is not None else None
        try:
            start = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            seconds = time.perf_counter() - start
            if name == "ficoco-v" and handle is not None:
                trace = handle.vision_trace
        finally:
            if handle is not None:
                handle.remove()
        answers = [a.strip() for a in processor.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]
        cost = budget.method_cost(shape, method, text_tokens) if method else budget.vanilla_cost(shape, text_tokens)
        rows.append(DemoRow(name, answers, cost.llm_input_visual, cost.llm_final_visual, cost.llm_tflops, seconds))
    if picture and trace is not None:
        render_reduction(image, trace.positions[0].cpu(), patch_destinations(trace.steps, shape.num_patches)[0],
                         grid=_grid(shape), path=picture, method=f"FiCoCo-V at {retain} tokens", questions=questions,
                         answers={row.method: row.answers for row in rows}, expected=expected)
    return rows


def _grid(shape: LlavaShape) -> tuple[int, int]:
    side = round(shape.num_patches ** 0.5)
    return side, side
