"""``ficoco demo``: answer questions about one image with vanilla and reduced models, side by side,
and draw which patches were kept and where the discarded ones went."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .measure import budget
from .adapters import attach
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


#: the default budget of each family: LLaVA-1.5's 64 of 576 tokens; a quarter of a Qwen-VL image's
DEFAULT_RETAIN = {"llava": 64, "qwen": 0.25}


def default_retain(config) -> int | float:
    return DEFAULT_RETAIN["qwen" if budget.is_qwen(config) else "llava"]


def _method(name: str, retain: int | float, llm_layers: int):
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
             retain: int | float | None = None, picture: str | None = None, max_new_tokens: int = 4,
             expected: Sequence[str] | None = None) -> list[DemoRow]:
    """Answer ``questions`` about ``image`` with each method; optionally save to ``picture`` the
    figure of FiCoCo-V's reduction (kept patches, merge map) with every method's answers (and the
    ``expected`` ones, when known). ``retain``: a count or a share of the image's tokens [64 on
    LLaVA-1.5, 0.25 on Qwen-VL]."""
    retain = default_retain(model.config) if retain is None else retain
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(processor, q) for q in questions]
    batch = processor(images=[image] * len(questions), text=prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    shape = budget.shape_of(model.config, image.size, processor.image_processor)
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
        if budget.is_qwen(model.config):
            positions, destinations, grid = _qwen_reduction(model, trace)
        else:
            side = round(shape.num_patches ** 0.5)
            positions, grid = trace.positions[0].cpu(), (side, side)
            destinations = patch_destinations(trace.steps, shape.num_patches)[0]
        budget_text = f"{retain:g} of the image's tokens" if isinstance(retain, float) else f"{retain} tokens"
        render_reduction(image, positions, destinations, grid=grid, path=picture,
                         method=f"FiCoCo-V at {budget_text}", questions=questions,
                         answers={row.method: row.answers for row in rows}, expected=expected)
    return rows


def _qwen_reduction(model, trace) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``(positions, destinations, grid)`` of the first image of a Qwen-VL tower call, on its grid
    of LLM tokens (merge groups) in raster order. The stages saw the groups in the tower's own
    order (Qwen2.5-VL: window by window), so the shares are put back in raster order."""
    merge = model.config.vision_config.spatial_merge_size
    t, h, w = trace.grids[0]
    grid = (h // merge, w // merge)
    count = grid[0] * grid[1]
    steps = [(block, results[0]) for block, results in trace.steps]  # the first bucket holds frame 0, row 0
    shares = patch_destinations(steps, count)[0]  # [groups in tower order, N']
    vision = model.config.vision_config
    order = torch.arange(count)
    if getattr(vision, "window_size", None) and getattr(vision, "fullatt_block_indexes", None):
        from transformers.vision_utils import get_vision_window_index

        order = get_vision_window_index(torch.tensor([[1, h, w]]), merge, vision.window_size, vision.patch_size)[0]
    destinations = torch.zeros_like(shares)
    destinations[order.cpu()] = shares
    return trace.kept[0].cpu(), destinations, grid
