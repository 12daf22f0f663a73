"""GPU speed benchmark on Qwen-VL shapes (Qwen2-VL-7B, Qwen2.5-VL-7B, Qwen3-VL-8B) with random weights.

As :mod:`ficoco.measure.bench` does for LLaVA: the model is built from its configuration with
random bf16 weights on the GPU (timing does not depend on weight values), every variant runs on
the same model in interleaved rounds, and prefill is timed for the whole model (vision tower +
mergers + LLM, ``logits_to_keep=1``) and for the vision side alone (``get_image_features``).
Each image is one ``image_size`` picture (1280x720 by default: 92x52 patches, 1196 LLM tokens for
the 14-pixel patches of Qwen2-VL and Qwen2.5-VL) with ``text_tokens`` of text around it.

Variants: ``vanilla``; ``oracle`` (the LLM fed the kept share, truncated at the last block, no
scoring); ``oracle[method]`` (the method's own per-block and per-layer schedule, truncation
instead of scoring: the floor of that schedule); every method at every share. Each runs with the
tower's stock attention (``sdpa``: one SDPA call per image or window, as transformers runs it
without flash-attn), with :func:`ficoco.fast_vision_attention` (``varlen``) and with that and
every block's forward compiled (``compiled``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..adapters import attach, fast_vision_attention
from ..methods import Method
from . import budget
from .bench import cuda_times, environment, split_repeats
from .bench import variants as bench_variants
from .flops import preset as flops_preset
from .qwen import QwenVLShape

#: the tower's attention paths: transformers' stock loop, ficoco's one call per block, and the
#: same with every block's forward compiled (``torch.compile``)
ATTENTION_PATHS = ("sdpa", "varlen", "compiled")

#: preset -> (model type, text-config rope) of the Hugging Face classes
GENERATIONS = {
    "qwen2-vl-7b": ("qwen2_vl", {"mrope_section": [16, 24, 24]}),
    "qwen2.5-vl-7b": ("qwen2_5_vl", {"mrope_section": [16, 24, 24]}),
    "qwen3-vl-8b": ("qwen3_vl", {"mrope_section": [24, 20, 20], "mrope_interleaved": True}),
}
TOKENS = {"image": 151655, "video": 151656, "vision_start": 151652, "vision_end": 151653}


def qwen_config(preset: str):
    """The Hugging Face configuration with the shapes of a Qwen-VL FLOPs preset."""
    import transformers

    if preset not in GENERATIONS:
        raise ValueError(f"unknown Qwen-VL preset {preset!r}; available: {', '.join(GENERATIONS)}")
    generation, rope = GENERATIONS[preset]
    shape: QwenVLShape = flops_preset(preset)
    v, t = shape.vision, shape.language
    text = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
                max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6, **rope})
    ids = dict(image_token_id=TOKENS["image"], video_token_id=TOKENS["video"],
               vision_start_token_id=TOKENS["vision_start"], vision_end_token_id=TOKENS["vision_end"])
    if generation == "qwen2_vl":
        vision = dict(depth=v.num_layers, embed_dim=v.hidden_size, hidden_size=v.out_hidden_size, num_heads=v.num_heads,
                      mlp_ratio=v.intermediate_size // v.hidden_size, patch_size=v.patch_size,
                      spatial_merge_size=v.merge_size, temporal_patch_size=v.temporal_patch_size)
        return transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
    if generation == "qwen2_5_vl":
        vision = dict(depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                      spatial_merge_size=v.merge_size, temporal_patch_size=v.temporal_patch_size,
                      window_size=v.window_size, fullatt_block_indexes=list(v.full_attention_blocks), hidden_act="silu")
        return transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    vision = dict(depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                  spatial_merge_size=v.merge_size, temporal_patch_size=v.temporal_patch_size,
                  num_position_embeddings=2304, deepstack_visual_indexes=list(v.deepstack_blocks))
    return transformers.Qwen3VLConfig(vision_config=vision, text_config={**text, "head_dim": t.head_dim}, **ids)


def random_qwen_model(preset: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """The model of a preset with random weights, built on ``device`` in ``dtype``, SDPA attention."""
    from transformers import AutoModelForImageTextToText

    config = qwen_config(preset)
    config._attn_implementation = "sdpa"
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(shape: QwenVLShape, batch: int, text_tokens: int, device: str, dtype: torch.dtype,
                seed: int = 0) -> dict:
    """``batch`` prompts of one image each (its placeholders between ``text_tokens`` of text)."""
    gen = torch.Generator().manual_seed(seed)
    v = shape.vision
    rows, columns = shape.grid
    patches = rows * columns
    tokens = shape.num_patches
    before = max(1, text_tokens // 2 - 1)
    after = max(1, text_tokens - before - 2)
    ids = torch.randint(10, 150000, (batch, before + 1 + tokens + 1 + after), generator=gen)
    ids[:, before] = TOKENS["vision_start"]
    ids[:, before + 1:before + 1 + tokens] = TOKENS["image"]
    ids[:, before + 1 + tokens] = TOKENS["vision_end"]
    types = torch.zeros_like(ids)
    types[:, before + 1:before + 1 + tokens] = 1
    pixels = torch.randn(batch * patches, v.num_channels * v.temporal_patch_size * v.patch_size ** 2, generator=gen)
    grid = torch.tensor([[1, rows, columns]] * batch)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": types.to(device), "pixel_values": pixels.to(device, dtype),
            "image_grid_thw": grid.to(device)}


@dataclass
class QwenMeasurement:
    variant: str
    method: str
    retain: float
    batch: int
    attention: str
    prefill_ms: float
    vision_ms: float
    llm_ms: float
    peak_memory_gb: float
    llm_input_visual: int
    calculator_llm_tflops: float
    calculator_vision_tflops: float


def variants(shares: Sequence[float], methods: Sequence[str], geometry, log: Callable[[str], None]
             ) -> list[tuple[str, float, Method | None]]:
    """``(label, share, method)`` for vanilla, the oracles and every method (:func:`.bench.variants`).
    A method reducing in the tower, at the LLM's input or in the LLM gets ``oracle[name]`` (at the
    input: the merger's tokens truncated, the whole tower still run); a method that reduces the
    image's resolution compares with the plain oracle, the LLM fed the same count of tokens."""
    return bench_variants(shares, methods, geometry, log, vanilla_retain=1.0,
                          own_oracle=lambda method: any(x is not None for x in (method.vision, method.input,
                                                                                  method.language)))


def run(
    preset: str = "qwen2.5-vl-7b",
    *,
    image_size: tuple[int, int] = (1280, 720),
    batches: Sequence[int] = (1, 8),
    shares: Sequence[float] = (0.5, 0.25, 0.125),
    methods: Sequence[str] = ("ficoco-v", "ficoco-l", "ficoco-vl", "tome", "evit", "fastv", "random"),
    attention: Sequence[str] = ("sdpa", "varlen"),
    text_tokens: int = 64,
    warmup: int = 2,
    repeats: int = 6,
    rounds: int = 3,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark; returns a JSON-ready dict (environment, settings, prefill rows)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the speed benchmark needs a CUDA GPU")
    unknown = set(attention) - set(ATTENTION_PATHS)
    if unknown:
        raise ValueError(f"attention must be among {', '.join(ATTENTION_PATHS)}, got {sorted(unknown)}")
    device, dtype = "cuda", torch.bfloat16
    started = time.time()
    model = random_qwen_model(preset, device, dtype)
    shape = flops_preset(preset).with_image(*image_size)
    geometry = budget.geometry(shape)
    log(f"built {preset} in {time.time() - started:.1f}s: {image_size[0]}x{image_size[1]} px, "
        f"{shape.grid[1]}x{shape.grid[0]} patches, {shape.num_patches} LLM tokens per image")
    variant_list = variants(shares, methods, geometry, log)
    per_round = split_repeats(repeats, rounds)
    prefill_times: dict[tuple, list[float]] = {}
    vision_times: dict[tuple, list[float]] = {}
    memory: dict[tuple, float] = {}
    for round_index, round_repeats in enumerate(per_round):
        for path in attention:
            fast = (fast_vision_attention(model, compile_blocks=path == "compiled")
                    if path in ("varlen", "compiled") else None)
            try:
                for label, share, method in variant_list:
                    handle = attach(model, method) if method is not None else None
                    try:
                        for batch in batches:
                            key = (path, label, share, batch)
                            inputs = make_inputs(shape, batch, text_tokens, device, dtype)
                            # what the tower is given (downsample: the smaller image)
                            encoded = handle.prepare_inputs(**inputs) if handle is not None else inputs
                            with torch.inference_mode():
                                def prefill():
                                    return model(**inputs, use_cache=True, logits_to_keep=1)

                                def vision():
                                    # the class's method, past the handle's instance wrapper: the
                                    # tower with any reduction inside it; an LLM-input reduction
                                    # (it may read the prompt's text) counts in the LLM part
                                    core = model.model
                                    return type(core).get_image_features(core, encoded["pixel_values"],
                                                                         encoded["image_grid_thw"])

                                if key not in memory:
                                    torch.cuda.synchronize()
                                    torch.cuda.reset_peak_memory_stats()
                                    prefill()
                                    memory[key] = torch.cuda.max_memory_allocated() / 1e9
                                prefill_times.setdefault(key, []).extend(cuda_times(prefill, warmup, round_repeats))
                                vision_times.setdefault(key, []).extend(cuda_times(vision, warmup, round_repeats))
                    finally:
                        if handle is not None:
                            handle.remove()
            finally:
                if fast is not None:
                    fast.remove()
        log(f"round {round_index + 1}/{len(per_round)} done ({round_repeats} timed runs per variant and batch)")
    rows = []
    for path in attention:
        for label, share, method in variant_list:
            cost = budget.method_cost(shape, method, text_tokens) if method else budget.vanilla_cost(shape, text_tokens)
            for batch in batches:
                key = (path, label, share, batch)
                total, vision = statistics.median(prefill_times[key]), statistics.median(vision_times[key])
                rows.append(asdict(QwenMeasurement(label, method.name if method else "vanilla", share, batch, path, total,
                                                   vision, total - vision, memory[key], cost.llm_input_visual,
                                                   cost.llm_tflops, cost.vision_tflops)))
                log(f"{path:>6} {label:>18} share={share:<5g} batch={batch:<2} prefill {total:8.2f} ms "
                    f"(vision {vision:7.2f}, llm {total - vision:8.2f})  peak {memory[key]:5.1f} GB")
    return {
        "preset": preset,
        "environment": environment(),
        "settings": dict(image_size=list(image_size), grid=list(shape.grid), tokens_per_image=shape.num_patches,
                         batches=list(batches), shares=list(shares), methods=list(methods), attention=list(attention),
                         text_tokens=text_tokens, warmup=warmup, repeats=repeats, rounds=len(per_round),
                         dtype="bfloat16", vision_part="the tower, with any reduction inside it; an LLM-input "
                         "reduction (pool, divprune, cdpruner) is timed in the LLM part"),
        "prefill": rows,
    }
