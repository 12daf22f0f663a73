"""GPU speed benchmark on LLaVA-1.5-7B / 13B, LLaVA-NeXT-7B and Video-LLaVA-7B shapes with random weights.

Timing does not depend on weight values, and no weights can be downloaded, so the models are
built from their configs (CLIP ViT-L/14 + Vicuna; :mod:`.bench_models`) with random bf16 weights
on the GPU. All variants run in one process on one model, so ratios are taken side by side:

- ``vanilla``: no reduction (576 visual tokens per image or crop, 256 patches per frame);
- ``oracle``: the LLM is simply fed ``retain`` visual tokens per view (truncation at the feature
  layer, no scoring work); for decoder-side and LLM-input methods also ``oracle[method]``: the
  method's own schedule with truncation instead of scoring, the floor for that schedule (for an
  LLM-input method the projected tokens are truncated, so the projector runs on every patch);
- every method at each retained count (per image, per crop of LLaVA-NeXT, per frame of
  Video-LLaVA, whose frames also hand on their [CLS]).

Each measurement: CUDA events, warm-up runs, median over repeats; the repeats are spread over
interleaved rounds (every variant once per round), so drifts in clocks or host load hit every
variant alike. Prefill is timed for the whole
model (vision tower + projector + LLM, ``logits_to_keep=1``) and for the vision side alone; the
LLM time is their difference.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..adapters import attach, graph_input_reduction, graph_language_steps, graph_vision_tower
from ..methods import Method, get_method
from ..methods.baselines import oracle
from . import bench_models, budget


def model_config(preset: str):
    """The configuration of a preset's model with its exact shapes (:func:`.bench_models.model_config`)."""
    return bench_models.model_config(preset)


def random_model(preset: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """The preset's model (LLaVA, LLaVA-NeXT or Video-LLaVA) with random weights, built directly on
    ``device`` in ``dtype``, SDPA attention."""
    config = model_config(preset)
    config._attn_implementation = "sdpa"
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = bench_models.model_class(config)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(batch: int, text_tokens: int, device: str, dtype: torch.dtype, seed: int = 0,
                preset: str = "llava-1.5-7b") -> dict:
    """``batch`` prompts of one sample each for ``preset`` (:func:`.bench_models.make_inputs`):
    35 system tokens, the visual placeholders (576 for LLaVA-1.5), the rest of ``text_tokens`` after."""
    return bench_models.make_inputs(preset, batch, text_tokens, device, dtype, seed)


def cuda_times(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` runs of ``fn`` after ``warmup`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs (CUDA events)."""
    return statistics.median(cuda_times(fn, warmup, repeats))


def split_repeats(repeats: int, rounds: int) -> list[int]:
    """``repeats`` timed runs spread over ``rounds`` interleaved rounds (each round at least one)."""
    rounds = max(1, min(rounds, repeats))
    return [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]


@dataclass
class Measurement:
    variant: str
    method: str
    retain: int
    batch: int
    prefill_ms: float
    vision_ms: float
    llm_ms: float
    peak_memory_gb: float
    kv_cache_mb: float
    calculator_llm_tflops: float


def _kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def variants(retains: Sequence[int | float], methods: Sequence[str], geometry, log: Callable[[str], None] = print,
             *, vanilla_retain: int | float | None = None,
             own_oracle: Callable[[Method], bool] = lambda method: method.language is not None
             or method.input is not None,
             ) -> list[tuple[str, int | float, Method | None]]:
    """``(label, retain, method)`` for vanilla (``retain``: ``vanilla_retain``, default
    ``geometry``'s patches per view), the oracles and every method; a method for which
    ``own_oracle`` holds (default: it reduces inside the LLM or on the projected tokens) gets
    ``oracle[name]``, its own schedule with truncation (for an LLM-input method: the projected
    tokens truncated, so the projector still runs on every patch). A method that cannot run at a
    budget on this geometry (ToMe past half the tokens of a layer, say) is skipped and said, so one
    refusal does not lose the whole run."""
    out: list[tuple[str, int | float, Method | None]] = [
        ("vanilla", geometry.num_patches if vanilla_retain is None else vanilla_retain, None)]
    for retain in retains:
        out.append(("oracle", retain, oracle(retain)))
        for name in methods:
            method = get_method(name, retain=retain)
            try:
                method.plan(geometry)
            except ValueError as err:
                log(f"skipped {name} at {retain:g}: {err}")
                continue
            if own_oracle(method):
                out.append((f"oracle[{name}]", retain, oracle(like=method)))
            out.append((name, retain, method))
    return out


def _time_generation(model, preset: str, label: str, retain: int, generate_tokens: Sequence[int], batch: int,
                     text_tokens: int, repeats: int, device: str, dtype: torch.dtype, log: Callable[[str], None],
                     cache_implementation: str | None = None) -> list[dict]:
    """Samples per second of ``generate()`` for each length in ``generate_tokens`` (greedy, forced length)."""
    inputs = make_inputs(batch, text_tokens, device, dtype, preset=preset)
    options = {"cache_implementation": cache_implementation} if cache_implementation else {}
    rows = []
    for new in generate_tokens:
        with torch.inference_mode():
            def generate():
                return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      pad_token_id=0, **options)

            ms = cuda_time(generate, 1, max(2, repeats // 3))
        rows.append(dict(variant=label, retain=retain, batch=batch, new_tokens=new, ms=ms,
                         images_per_s=1000 * batch / ms, cache=cache_implementation or "dynamic"))
        log(f"{label:>18} retain={retain:<3} generate {new:>2} tokens x {batch}: {ms:8.1f} ms "
            f"= {1000 * batch / ms:6.1f} img/s")
    return rows


def run(
    preset: str = "llava-1.5-7b",
    *,
    batches: Sequence[int] | None = None,
    retains: Sequence[int] | None = None,
    methods: Sequence[str] = ("ficoco-v", "ficoco-l", "ficoco-vl", "tome", "evit", "fastv", "random"),
    generate_tokens: Sequence[int] = (1, 32),
    generate_batch: int = 8,
    text_tokens: int = 64,
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 5,
    graph_vision: bool = False,
    graph_steps: bool = False,
    static_cache: bool = False,
    log: Callable[[str], None] = print,
    on_round: Callable[[dict], None] | None = None,
) -> dict:
    """Run the benchmark; returns a JSON-ready dict (environment, prefill rows, generation rows).
    ``batches`` and ``retains`` (per view) default to the preset's (:func:`.bench_models.layout`).
    ``on_round`` receives the result so far after every round (to save it); if the GPU runs out of
    memory the run stops there and returns the rows measured so far, with an ``"error"`` entry."""
    target = bench_models.layout(preset)
    batches = tuple(batches) if batches is not None else target.batches
    retains = tuple(retains) if retains is not None else target.retains
    if graph_vision and target.family == "video-llava":
        raise ValueError("--graph-vision replays a vision_tower; Video-LLaVA encodes frames in its video_tower")
    if not torch.cuda.is_available():
        raise RuntimeError("the speed benchmark needs a CUDA GPU")
    device, dtype = "cuda", torch.bfloat16
    started = time.time()
    model = random_model(preset, device, dtype)
    # the preset's shape: its views per sample (crops, frames) for the calculator's figures
    shape = target.shape
    geometry = budget.geometry(shape)
    log(f"built {preset} ({type(model).__name__}, {shape.num_views} {shape.view}(s) of {shape.num_patches} "
        f"patches per sample) in {time.time() - started:.1f}s")
    generate_rows: list[dict] = []
    # every variant is timed in each round, so slow drifts of the GPU (clocks, temperature) and of
    # the host hit all variants alike and the ratios stay side by side
    variant_list = variants(retains, methods, geometry, log)
    per_round = split_repeats(repeats, rounds)
    prefill_times: dict[tuple, list[float]] = {}
    vision_times: dict[tuple, list[float]] = {}
    memory: dict[tuple, tuple[float, float]] = {}
    settings = dict(batches=list(batches), retains=list(retains), methods=list(methods),
                    generate_tokens=list(generate_tokens), generate_batch=generate_batch, text_tokens=text_tokens,
                    warmup=warmup, repeats=repeats, rounds=len(per_round), static_cache=static_cache,
                    dtype="bfloat16", attention="sdpa", graph_vision=graph_vision, graph_steps=graph_steps)

    def prefill_rows_of(say: Callable[[str], None] | None = None) -> list[dict]:
        """Median rows of every (variant, batch) timed so far."""
        rows = []
        for label, retain, method in variant_list:
            cost = budget.method_cost(shape, method, text_tokens) if method else budget.vanilla_cost(shape, text_tokens)
            for batch in batches:
                key = (label, retain, batch)
                if key not in prefill_times or key not in vision_times:
                    continue
                total_ms, vision_ms = statistics.median(prefill_times[key]), statistics.median(vision_times[key])
                peak, kv = memory[key]
                rows.append(asdict(Measurement(label, method.name if method else "vanilla", retain, batch, total_ms,
                                               vision_ms, total_ms - vision_ms, peak, kv, cost.llm_tflops)))
                if say is not None:
                    say(f"{label:>18} retain={retain:<3} batch={batch:<2} prefill {total_ms:8.2f} ms (vision "
                        f"{vision_ms:7.2f}, llm {total_ms - vision_ms:8.2f})  peak {peak:5.1f} GB  kv {kv:6.1f} MB/img")
        return rows

    error = None
    try:
        for round_index, round_repeats in enumerate(per_round):
            last_round = round_index == len(per_round) - 1
            for label, retain, method in variant_list:
                handle = attach(model, method) if method is not None else None
                graphed = graph_vision_tower(model) if graph_vision else None  # after attaching: captures the hooks
                # the vision side's other part: a reduction of the projected tokens, replayed as graphs too
                input_graphs = (graph_input_reduction(handle) if graph_vision and handle is not None
                                and handle.input is not None else None)
                step_graphs = (graph_language_steps(handle)
                               if graph_steps and handle is not None and handle.language is not None else None)
                try:
                    for batch in batches:
                        key = (label, retain, batch)
                        inputs = make_inputs(batch, text_tokens, device, dtype, preset=preset)
                        with torch.inference_mode():
                            def prefill():
                                return model(**inputs, use_cache=True, logits_to_keep=1)

                            # an LLM-input reduction conditioned on the instruction reads the prompt, which a
                            # bare call of the vision path does not carry: hand it the cut prompt (untimed)
                            prompt = handle.prepare_inputs(**inputs) if handle is not None and _reads_prompt(handle) else None

                            def vision():
                                return bench_models.encode_visual(model, inputs, handle, prompt)

                            if key not in memory:
                                torch.cuda.synchronize()
                                torch.cuda.reset_peak_memory_stats()
                                out = prefill()
                                peak = torch.cuda.max_memory_allocated() / 1e9
                                cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
                                memory[key] = (peak, _kv_bytes(cache) / batch / 1e6)
                                del out
                            prefill_times.setdefault(key, []).extend(cuda_times(prefill, warmup, round_repeats))
                            vision_times.setdefault(key, []).extend(cuda_times(vision, warmup, round_repeats))
                    if last_round:
                        generate_rows += _time_generation(model, preset, label, retain, generate_tokens, generate_batch,
                                                          text_tokens, repeats, device, dtype, log)
                        if static_cache and (method is None or method.language is None):
                            # decoder-side reductions keep a different length per layer: dynamic cache only
                            generate_rows += _time_generation(model, preset, label, retain, generate_tokens, generate_batch,
                                                              text_tokens, repeats, device, dtype, log, "static")
                finally:
                    if step_graphs is not None:
                        step_graphs.remove()
                    if input_graphs is not None:
                        input_graphs.remove()
                    if graphed is not None:
                        graphed.remove()
                    if handle is not None:
                        handle.remove()
                    # a graphed variant's private pools go back now, not at the end of the run
                    gc.collect()
                    torch.cuda.empty_cache()
            log(f"round {round_index + 1}/{len(per_round)} done ({round_repeats} timed runs per variant and batch; "
                f"{torch.cuda.memory_allocated() / 1e9:.1f} GB allocated, {torch.cuda.memory_reserved() / 1e9:.1f} GB reserved)")
            if on_round is not None:
                on_round(_result(preset, model, shape, prefill_rows_of(), generate_rows,
                                 dict(settings, rounds_done=round_index + 1)))
    except torch.OutOfMemoryError as err:
        # keep what was measured: the rows of every (variant, batch) timed so far are still reported
        error = f"stopped early: {type(err).__name__}: {str(err).splitlines()[0]}"
        log(error)
    done = len(per_round) if error is None else round_index
    result = _result(preset, model, shape, prefill_rows_of(log), generate_rows, dict(settings, rounds_done=done))
    if error is not None:
        result["error"] = error
    return result


def _result(preset: str, model, shape, prefill_rows: list[dict], generate_rows: list[dict], settings: dict) -> dict:
    return {"preset": preset, "environment": environment(),
            "settings": dict(model=type(model).__name__, views=shape.num_views, view=shape.view,
                             visual_placeholders=bench_models.visual_placeholders(preset), **settings),
            "prefill": prefill_rows, "generate": list(generate_rows)}


def _reads_prompt(handle) -> bool:
    """Whether an attachment reduces the LLM's input (images', or Video-LLaVA's frames')."""
    return handle.input is not None or getattr(handle, "video_input", None) is not None


def measured_flops(preset: str = "llava-1.5-7b", retain: int = 192, text_tokens: int = 64,
                   methods: Sequence[str] = ("ficoco-v", "ficoco-l", "ficoco-vl", "tome", "evit", "fastv", "random"),
                   model=None) -> list[dict]:
    """LLM-decoder FLOPs counted by ``FlopCounterMode`` on the GPU model vs the calculator."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model if model is not None else random_model(preset)
    shape = bench_models.layout(preset).shape
    inputs = make_inputs(1, text_tokens, "cuda", torch.bfloat16, preset=preset)
    rows = []
    for name in ("vanilla", *methods):
        method = None if name == "vanilla" else get_method(name, retain=retain)
        handle = attach(model, method) if method else None
        counter = FlopCounterMode(display=False)
        try:
            with torch.inference_mode(), counter:
                model(**inputs, logits_to_keep=1)
        finally:
            if handle:
                handle.remove()
        counted = budget.counted_decoder_flops(counter.get_flop_counts())
        cost = budget.method_cost(shape, method, text_tokens) if method else budget.vanilla_cost(shape, text_tokens)
        rows.append(dict(method=name, retain=retain if method else shape.num_patches, measured_tflops=counted / 1e12,
                         calculator_tflops=cost.llm_tflops, ratio=counted / 1e12 / cost.llm_tflops))
    return rows


def environment() -> dict:
    import transformers

    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        import subprocess

        # one line per GPU of the host (whatever CUDA_VISIBLE_DEVICES says); the driver is the host's
        lines = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20).stdout.split()
        driver = lines[0] if lines else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": props.name, "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def save(result: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
