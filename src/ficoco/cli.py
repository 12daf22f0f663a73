"""The ``ficoco`` command line.

Only ``click`` is imported here at start-up: every command imports what it needs (torch,
transformers) when it runs, so that ``ficoco --help`` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

#: ``--question`` (the name every command documents) and ``--prompt`` (its alias) on run and demo
QUESTION_NAMES = ("--question", "--prompt")


class _OneLineErrors(click.Group):
    """Turn library errors into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
            sys.stdout = open(os.devnull, "w")
            ctx.exit(0)
        except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError, ImportError) as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="ficoco")
def main() -> None:
    """Training-free visual token reduction (filter, correlate, compress) for LLaVA models."""


@main.command()
def methods() -> None:
    """List the registered methods, and the options that reproduce their official code."""
    from .methods import OFFICIAL_OPTIONS, available_methods

    for name, summary in available_methods().items():
        click.echo(f"{name:<10} {summary}")
    click.echo("\nNAME[KEY=VALUE,...] builds a method with keyword options (e.g. 'ficoco-v[lam=0.5]'); "
               "NAME[official] with those that reproduce its official code (docs/methods.md):")
    for name, options in OFFICIAL_OPTIONS.items():
        click.echo(f"  {name + '[official]':<20} " + ", ".join(f"{key}={value!r}" for key, value in options.items()))
    click.echo(f"  {'fastv':<20} needs none: it prunes once at prefill, as FastV's official KV-cache mode")


def _shape(model: str, image_size: str | None = None):
    """The FLOPs shape of a preset or a checkpoint folder (Qwen-VL, LLaVA-NeXT: at ``image_size``, "WxH")."""
    from .measure import budget, multiview
    from .measure.flops import LlavaShape, preset, preset_names
    from .measure.qwen import QwenVLShape

    if model in preset_names():
        shape = preset(model)
    else:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ValueError(f"{model!r} is neither a preset ({', '.join(preset_names())}) nor a folder with "
                             f"config.json")
        from transformers import AutoConfig

        from .checkpoint import check_supported, checkpoint_config

        family = check_supported(checkpoint_config(path), path)
        model_type = checkpoint_config(path).get("model_type")
        if not budget.is_costed(checkpoint_config(path)) and model_type not in multiview.CHECKPOINT_MODEL_TYPES:
            raise click.BadParameter(f"{path} is a {family.name} checkpoint; the FLOPs calculator reads LLaVA-1.5, "
                                     f"LLaVA-NeXT, Video-LLaVA and Qwen-VL checkpoints (presets: "
                                     f"{', '.join(preset_names())})", param_hint="--model")
        config = AutoConfig.from_pretrained(path)
        if model_type in multiview.CHECKPOINT_MODEL_TYPES:
            shape = multiview.shape_from_config(config)
        else:
            shape = LlavaShape.from_config(config) if family.model_types == ("llava",) else \
                QwenVLShape.from_config(config)
    if image_size is not None:
        if not isinstance(shape, QwenVLShape) and not shape.grid_pinpoints:
            raise click.BadParameter(f"{model} sees every {shape.view} at {shape.vision.image_size} px; "
                                     f"--image-size is for Qwen-VL and LLaVA-NeXT", param_hint="--image-size")
        try:
            width, height = (int(x) for x in image_size.lower().split("x"))
            if width <= 0 or height <= 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"expected WIDTHxHEIGHT in pixels, got {image_size!r}",
                                     param_hint="--image-size") from None
        shape = shape.with_image(width, height) if isinstance(shape, QwenVLShape) else \
            multiview.with_image(shape, width, height)
    return shape


def _budgets(text: str) -> list[int | float]:
    """``"600,500,0.25"`` → ``[600, 500, 0.25]``: token counts, or shares of each image's tokens."""
    values: list[int | float] = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            values.append(float(item) if "." in item else int(item))
        except ValueError:
            raise click.BadParameter(f"expected comma-separated token counts or shares (0.25), got {text!r}",
                                     param_hint="--retain") from None
    return values


def _int_list(text: str) -> list[int]:
    """``"1,4,9"`` → ``[1, 4, 9]``; an item ``"12-15"`` is the inclusive range ``12, 13, 14, 15``."""
    values = []
    try:
        for item in filter(None, (x.strip() for x in text.split(","))):
            first, dash, last = item.partition("-")
            values.extend(range(int(first), int(last) + 1) if dash and first else [int(item)])
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers or ranges (12-22), got {text!r}") from None
    return values


@main.command()
@click.option("--model", "model", default="llava-1.5-7b", show_default=True,
              help="Preset name (llava-1.5-7b, llava-1.5-13b, llava-next-7b, video-llava-7b, qwen2-vl-7b, "
                   "qwen2.5-vl-7b, qwen3-vl-8b) or a checkpoint folder with config.json.")
@click.option("--image-size", default=None, help="Qwen-VL: the image's WIDTHxHEIGHT in pixels [1280x720]; "
              "LLaVA-NeXT: picks its tile grid [the paper's 2x2 tiles + base, as for 672x672].")
@click.option("--text-tokens", type=int, default=None,
              help="Text tokens in the prompt [LLaVA-1.5: 60 for 7B, 512 for 13B; LLaVA-NeXT, Video-LLaVA, "
                   "Qwen-VL: 64].")
@click.option("--retain", "retains", default=None,
              help="Visual-token budgets: counts, or shares such as 0.25 [LLaVA-1.5: 192,128,64; Qwen-VL: "
                   "600,500,400, the paper's Table 3]; per crop for LLaVA-NeXT [128,64,32] and per frame for "
                   "Video-LLaVA [64,32,17].")
@click.option("--tflops", "targets", default=None, help="Comma-separated TFLOPs budgets to solve schedules for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def flops(model: str, image_size: str | None, text_tokens: int | None, retains: str | None, targets: str | None,
          as_json: bool) -> None:
    """Budget table: LLM prefill TFLOPs, vision TFLOPs and KV cache per method and budget.

    With --tflops each decoder-side method keeps one schedule shape for all the budgets asked: its
    own layers when they reach every budget, else all removals at its first reducing layer. So its
    kept tokens never grow as the budget shrinks; the schedule column and the notes say which."""
    from .measure import budget
    from .measure.multiview import preset_defaults
    from .methods import DECODER_METHODS, ENCODER_METHODS, LATER_DECODER_METHODS, get_method

    from .measure.qwen import QwenVLShape

    # the LLM-input methods (pool, divprune, cdpruner; topk at the feature layer) all run the whole
    # tower and feed the LLM `retain` tokens: one row stands for them; prumerge's for those that reduce
    # the feature layer's output (visionzip, prumerge+; LLaVA-1.5), whose last layer runs on the kept tokens
    input_rows = ("pool", "prumerge")

    shape = _shape(model, image_size)
    qwen = isinstance(shape, QwenVLShape)
    views = 1 if qwen else shape.num_views
    text_default, retains_default = preset_defaults(model) or (
        64 if qwen else 512 if shape.language.num_layers >= 40 else 60, "600,500,400" if qwen else "192,128,64")
    if text_tokens is None:
        text_tokens = text_default
    if retains is None:
        retains = retains_default
    geometry = budget.geometry(shape)
    vanilla = budget.vanilla_cost(shape, text_tokens)
    rows, notes = [("-", vanilla, "-")], []
    if targets:
        try:
            values = [float(x) for x in targets.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {targets!r}", param_hint="--tflops") from None
        solved: dict[str, dict[float, tuple]] = {}
        for name in ENCODER_METHODS[:1] + DECODER_METHODS:
            solved[name], note = _solve_every_target(budget, shape, name, values, text_tokens)
            notes += note
        for target in values:
            for name in solved:
                if target in solved[name]:
                    method, cost = solved[name][target]
                    rows.append((f"{target:g} TF", cost, budget.describe_schedule(method, geometry)))
    else:
        for retain in _budgets(retains):
            for name in ENCODER_METHODS[:1] + input_rows[:1 if qwen else None] + ("downsample",) + DECODER_METHODS \
                    + LATER_DECODER_METHODS:
                method = get_method(name, retain=retain)
                try:
                    rows.append((str(retain), budget.method_cost(shape, method, text_tokens),
                                 budget.describe_schedule(method, geometry)))
                except ValueError as err:  # downsample: a budget no smaller image gives exactly
                    notes.append(f"{name} at {retain}: {err}")
    if as_json:
        click.echo(json.dumps({"model": model, "text_tokens": text_tokens, "views": views, "notes": notes,
                               "rows": [dict(budget=b, schedule=s, **c.as_dict()) for b, c, s in rows]}, indent=1))
        return
    if qwen:
        visual = (f"{shape.num_patches} visual tokens per image ({shape.image_size[0]}x{shape.image_size[1]} px "
                  f"image, {shape.grid[1]}x{shape.grid[0]} patches)")
    elif views > 1:
        image = f" of a {shape.image_size[0]}x{shape.image_size[1]} px image" if shape.image_size else ""
        visual = (f"{views} {shape.view}s{image} x {shape.num_patches} = {shape.visual_tokens} visual tokens "
                  f"(budgets are per {shape.view})")
    else:
        visual = f"{shape.num_patches} visual tokens per image"
    click.echo(f"{model}: {shape.language.num_layers}-layer LLM, {visual}, "
               f"{text_tokens} text tokens; LLM prefill counted as in docs/spec.md §8")
    click.echo("encoder-side methods (ficoco-v, tome, evit, random) share ficoco-v's row at the same budget; "
               "downsample's tower runs on the smaller image (its vision TFLOPs)"
               + ("" if targets else "; pool's row is every method that prunes at the LLM input (topk, pool, "
                                     "divprune, cdpruner: the whole tower runs)")
               + ("" if qwen or targets else ", prumerge's every one that reduces the feature layer's output "
                                              "(visionzip, prumerge+; prumerge without a budget keeps an "
                                              "adaptive count per image)"))
    header = f"{'budget':>8} {'method':<10} {'LLM in':>6} {'LLM out':>7} {'LLM TFLOPs':>10} {'% vanilla':>9} " \
             f"{'vision TFLOPs':>13} {'KV MB':>8}  schedule"
    click.echo(header)
    click.echo("-" * len(header))
    for label, cost, schedule in rows:
        click.echo(f"{label:>8} {cost.method:<10} {cost.llm_input_visual:>6} {cost.llm_final_visual:>7} "
                   f"{cost.llm_tflops:>10.2f} {100 * cost.llm_tflops / vanilla.llm_tflops:>8.1f}% "
                   f"{cost.vision_tflops:>13.3f} {cost.kv_cache_mb:>8.1f}  {schedule}")
    for note in notes:
        click.echo(f"note: {note}")


def _solve_every_target(budget, shape, name: str, targets: list[float], text_tokens: int):
    """``({target: (method, cost)}, notes)`` for ``name`` under one schedule shape for all
    ``targets``: the first of ``budget.SPREADS`` that reaches the most of them."""
    from .methods import get_method

    own = get_method(name, retain=1)
    spreads = budget.SPREADS if own.language is not None else budget.SPREADS[:1]
    best = None
    for spread in spreads:
        reached, failed = {}, {}
        for target in targets:
            try:
                reached[target] = budget.solve_for_tflops(shape, name, target, text_tokens, spread=spread)
            except ValueError as err:
                failed[target] = str(err)
        if best is None or len(reached) > len(best[0]):
            best = (reached, failed, spread)
    reached, failed, spread = best
    notes = [failed[t] for t in targets if t in failed]
    if spread != budget.SPREADS[0] and reached:
        geometry = budget.geometry(shape)
        chosen = budget.describe_schedule(next(iter(reached.values()))[0], geometry)
        floor = budget.method_cost(shape, own, text_tokens).llm_tflops
        notes.insert(0, f"{name}: every LLM-side removal at its first reducing layer ({chosen}) for every budget here, because "
                        f"spread over its own layers ({budget.describe_schedule(own, geometry)}) it costs at least "
                        f"{floor:.3g} TFLOPs; compare its rows with each other")
    return reached, notes


@main.command()
@click.argument("model_path", type=click.Path(file_okay=False))
@click.option("--image", "image_path", required=True, type=click.Path(dir_okay=False), help="Image file.")
@click.option(*QUESTION_NAMES, "question", required=True, help="Question about the image (--prompt is an alias).")
@click.option("--method", "method_name", default="ficoco-v", show_default=True,
              help="Method name, or 'vanilla' for no reduction.")
@click.option("--retain", default=None, help="Visual tokens kept per image: a count, or a share of the image's "
              "tokens (0.25) [LLaVA-1.5: 192; Qwen-VL: 0.5].")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
def run(model_path: str, image_path: str, question: str, method_name: str, retain: str | None, max_new_tokens: int,
        device: str, dtype: str) -> None:
    """Answer a question about an image with the checkpoint at MODEL_PATH (LLaVA-1.5 or Qwen-VL), with token reduction.

    The question is put into the processor's chat template with the image token, so give the
    plain question."""
    import time

    import torch

    from .measure import budget
    from .adapters import attach
    from .checkpoint import checkpoint_config, load_model, load_processor, resolve_device
    from .methods import get_method
    from .prompts import chat_prompt, vocabulary_check

    qwen = checkpoint_config(model_path).get("model_type") in budget.QWEN_MODEL_TYPES
    budgets = _budgets(retain) if retain is not None else [0.5 if qwen else 192]
    if len(budgets) != 1:
        raise click.BadParameter(f"expected one count or share, got {retain!r}", param_hint="--retain")
    method = None if method_name == "vanilla" else get_method(method_name, retain=budgets[0])
    target = resolve_device(device)
    image = _open_image(image_path)
    processor = load_processor(model_path)
    check = vocabulary_check(processor.tokenizer, [question])
    if check.unknown:
        click.echo(f"warning: {check.describe()}; the answer may be noise", err=True)
    model = load_model(model_path, dtype=dtype, device=target)
    text = chat_prompt(processor, question)
    inputs = processor(images=image, text=text, return_tensors="pt").to(target)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    costed = budget.is_costed(model.config)
    shape = budget.shape_of(model.config, image.size, processor.image_processor) if costed else None
    image_token = model.config.image_token_id
    text_tokens = int((inputs["input_ids"][0] != image_token).sum())
    handle = attach(model, method) if method is not None else None
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        if target.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        if handle is not None:
            handle.remove()
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    click.echo(f"answer: {answer}")
    timing = f"time: {seconds:.2f} s for {out.shape[1] - inputs['input_ids'].shape[1]} new tokens"
    if shape is None:  # LLaVA-NeXT: its anyres images are not costed
        click.echo(f"method: {method_name}  {timing}")
        return
    cost = budget.method_cost(shape, method, text_tokens) if method else budget.vanilla_cost(shape, text_tokens)
    click.echo(f"method: {method_name}  visual tokens: {cost.llm_input_visual} into the LLM, "
               f"{cost.llm_final_visual} after its last reduction (of {shape.num_patches})")
    click.echo(f"LLM prefill: {cost.llm_tflops:.4g} TFLOPs  vision: {cost.vision_tflops:.4g} TFLOPs  {timing}")


@main.command()
@click.option("--preset", default="llava-1.5-7b", show_default=True,
              help="llava-1.5-7b, llava-1.5-13b, llava-next-7b (a 672x672 image: 5 crops), video-llava-7b "
                   "(8 frames), qwen2-vl-7b, qwen2.5-vl-7b or qwen3-vl-8b shapes.")
@click.option("--batches", default=None, help="[LLaVA-1.5: 1,8,32; LLaVA-NeXT, Video-LLaVA, Qwen-VL: 1,8]")
@click.option("--retain", "retains", default=None,
              help="Budgets [LLaVA-1.5: 192,128,64 tokens; LLaVA-NeXT: 128,64,32 per crop; Video-LLaVA: "
                   "64,32,17 per frame; Qwen-VL: shares 0.5,0.25,0.125 of each image's tokens].")
@click.option("--image-size", default="1280x720", show_default=True, help="Qwen-VL: the image's WIDTHxHEIGHT.")
@click.option("--attention", default="sdpa,varlen", show_default=True,
              help="Qwen-VL: the tower's attention paths to time (sdpa: transformers' own; varlen: one call per "
                   "block, ficoco.fast_vision_attention; compiled: that with each block's forward compiled).")
@click.option("--methods", "method_names", default="ficoco-v,ficoco-l,ficoco-vl,tome,evit,fastv,random",
              show_default=True)
@click.option("--generate-tokens", default="1,32", show_default=True, help="New tokens per generation run.")
@click.option("--generate-batch", type=int, default=8, show_default=True)
@click.option("--text-tokens", type=int, default=64, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--repeats", type=int, default=10, show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True,
              help="Spread the repeats over this many interleaved rounds of all variants.")
@click.option("--flops/--no-flops", "with_flops", default=True, help="Also count FLOPs with FlopCounterMode.")
@click.option("--graph-vision", is_flag=True,
              help="Replay the vision tower, and a reduction of the projected tokens, as CUDA graphs (every variant).")
@click.option("--graph-steps", is_flag=True,
              help="Replay each decoder-side reduction step as a CUDA graph (FiCoCo-L, FastV, FiCoCo-VL).")
@click.option("--static-cache", is_flag=True,
              help="Also time generation with a static KV cache (vanilla, oracle, encoder-side methods).")
@click.option("--out", "out_path", default="benchmark.json", show_default=True, help="Where the JSON goes.")
def bench(preset, batches, retains, image_size, attention, method_names, generate_tokens, generate_batch, text_tokens,
          warmup, repeats, rounds, with_flops, graph_vision, graph_steps, static_cache, out_path) -> None:
    """GPU speed benchmark on random-weight model shapes (vanilla, oracle, every method)."""
    from .measure import bench as benchmark
    from .measure.bench_models import layout
    from .measure.bench_qwen import GENERATIONS
    from .methods import get_method, split_methods

    methods_list = split_methods(method_names)
    for name in methods_list:
        get_method(name)  # fail fast on a typo
    if preset in GENERATIONS:
        from .measure import bench_qwen

        if graph_vision or graph_steps or static_cache:
            raise click.UsageError("--graph-vision, --graph-steps and --static-cache are LLaVA-1.5 options")
        width, height = (int(x) for x in _shape(preset, image_size).image_size)
        result = bench_qwen.run(preset, image_size=(width, height), batches=_int_list(batches or "1,8"),
                                shares=_budgets(retains or "0.5,0.25,0.125"), methods=methods_list,
                                attention=[a for a in attention.split(",") if a], text_tokens=text_tokens,
                                warmup=warmup, repeats=repeats, rounds=rounds, log=click.echo)
        benchmark.save(result, out_path)
        click.echo(f"wrote {out_path}")
        return
    target = layout(preset)
    batches = _int_list(batches) if batches else list(target.batches)
    retains = _int_list(retains) if retains else list(target.retains)
    result = benchmark.run(preset, batches=batches, retains=retains, methods=methods_list,
                           generate_tokens=_int_list(generate_tokens), generate_batch=generate_batch,
                           text_tokens=text_tokens, warmup=warmup, repeats=repeats, rounds=rounds,
                           graph_vision=graph_vision, graph_steps=graph_steps, static_cache=static_cache,
                           log=click.echo, on_round=lambda partial: benchmark.save(partial, out_path))
    if "error" in result:
        benchmark.save(result, out_path)
        raise click.ClickException(f"{result['error']} (the rows measured before it are in {out_path})")
    if with_flops:
        result["flops"] = benchmark.measured_flops(preset, retain=retains[0], text_tokens=text_tokens,
                                                   methods=methods_list)
        for row in result["flops"]:
            click.echo(f"flops {row['method']:>10}: measured {row['measured_tflops']:.3f} TFLOPs, "
                       f"calculator {row['calculator_tflops']:.3f} (x{row['ratio']:.4f})")
    benchmark.save(result, out_path)
    click.echo(f"wrote {out_path}")


@main.command("bench-report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--plot", "plot_path", default=None, help="Write a latency-vs-tokens PNG here.")
@click.option("--plot-batch", type=int, default=8, show_default=True)
def bench_report(results, plot_path, plot_batch) -> None:
    """Markdown tables (and a plot) from one or more JSON files of 'ficoco bench'."""
    from .measure import bench_report as report

    data = report.load(list(results))
    click.echo(report.markdown(data))
    if plot_path:
        report.plot(data, plot_path, plot_batch)


@main.command()
@click.option("--model", "model_path", default=None, type=click.Path(file_okay=False),
              help="A checkpoint folder (with its processor), or an embedded proxy model: llava (LLaVA-1.5-shaped) "
                   "or qwen (Qwen2.5-VL-shaped) [llava].")
@click.option("--image", "image_path", default=None, type=click.Path(dir_okay=False),
              help="Image file [the bundled demo scene, with its own questions].")
@click.option(*QUESTION_NAMES, "questions", multiple=True,
              help="Repeat for several questions (--prompt is an alias) [the bundled scene's].")
@click.option("--retain", default=None, help="Visual tokens kept: a count, or a share of the image's tokens (0.25) "
              "[64 on LLaVA-1.5, 0.25 on Qwen-VL].")
@click.option("--picture", default="ficoco-demo.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where the PNG goes: the image, FiCoCo-V's kept patches, where the discarded ones went, "
                   "and every method's answers.")
@click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:N.")
def demo(model_path, image_path, questions, retain, picture, device) -> None:
    """Answer questions about an image with vanilla and FiCoCo-V / -L / -VL, side by side."""
    from .assets import EMBEDDED_MODELS, embedded_model_dir
    from .checkpoint import load_model, load_processor, resolve_device
    from .demo import bundled_example, run_demo
    from .prompts import vocabulary_check
    from .proxy.evaluate import normalize_answer

    expected = None  # the right answers, known only for the bundled scene's own questions
    if image_path is None:
        image, bundled_questions, bundled_answers = bundled_example()
        if not questions:
            questions, expected = bundled_questions, bundled_answers
    else:
        image = _open_image(image_path)
        if not questions:
            raise click.UsageError("--question is required with --image")
    target = resolve_device(device)
    picture_path = Path(picture).expanduser().resolve()
    if not picture_path.parent.is_dir():
        raise FileNotFoundError(f"--picture: folder {picture_path.parent} does not exist")
    model_path = str(embedded_model_dir(model_path or "llava")) if model_path in (None, *EMBEDDED_MODELS) else model_path
    retain = None if retain is None else _budgets(retain)
    if retain is not None and len(retain) != 1:
        raise click.BadParameter(f"expected one count or share, got {len(retain)}", param_hint="--retain")
    processor = load_processor(model_path)
    check = vocabulary_check(processor.tokenizer, questions)
    if check.unknown:
        click.echo(f"warning: {check.describe()}; answers to those questions may be noise", err=True)
    model = load_model(model_path, device=target)
    click.echo(f"model {model_path}")
    for i, question in enumerate(questions):
        click.echo(f"Q{i + 1}: {question}" + (f"   (expected: {expected[i]})" if expected else ""))
    rows = run_demo(model, processor, image, list(questions), retain=retain and retain[0], picture=str(picture_path),
                    expected=expected)
    for row in rows:
        score = ""
        if expected:
            right = sum(normalize_answer(a) == normalize_answer(e) for a, e in zip(row.answers, expected))
            score = f"  correct {right}/{len(expected)}"
        click.echo(f"{row.method:<10} visual tokens {row.llm_input_visual:>3} -> {row.llm_final_visual:>3}  "
                   f"LLM {row.llm_tflops * 1e3:8.3f} GFLOPs  {row.seconds:6.2f} s{score}  answers: {row.answers}")
    click.echo(f"wrote the picture to {picture_path} (input image, FiCoCo-V's kept patches, where the discarded "
               f"patches went, every method's answers)")


@main.command("eval")
@click.argument("model_path", required=False, type=click.Path(file_okay=False))
@click.option("--data", "data", multiple=True, required=True,
              help="TASK=PATH, an lmms-eval task name and its files on disk (repeat per benchmark).")
@click.option("--methods", "method_names", default="ficoco-v,ficoco-l,fastv", show_default=True,
              help="Comma-separated; a method with options is NAME[KEY=VALUE,...], with its official code's "
                   "choices NAME[official] (quote it).")
@click.option("--retain", "retains", default="192,128,64", show_default=True,
              help="Budgets: counts, or shares of each image's tokens (0.5,0.25,0.125; Qwen-VL's varied sizes).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--limit", type=int, default=None, help="First N samples of each benchmark.")
@click.option("--out", "out_dir", default="eval-results", show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto: this process's accelerate device when launched with several, else cuda if present, else cpu.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--prompt-format", type=click.Choice(["auto", "benchmark", "model"]), default="auto", show_default=True,
              help="benchmark: each benchmark's own prompt (with its answer instruction); model: the bare question, "
                   "as a model trained by 'ficoco train-proxy' expects; auto: model for such a checkpoint, else "
                   "benchmark.")
@click.option("--plot/--no-plot", default=True, help="Write accuracy-vs-tflops.png beside the tables.")
@click.option("--textvqa-ocr/--no-textvqa-ocr", "textvqa_ocr", default=None,
              help="TextVQA prompts with the reference OCR tokens, as LLaVA-1.5's published results [with them where "
                   "the files have them].")
@click.option("--videos", "video_dirs", multiple=True, metavar="TASK=FOLDER",
              help="Where a video benchmark's extracted videos are [its folders beside the data: all_test/, "
                   "videos/, mp4/, ...] (repeat per benchmark).")
@click.option("--frames", "max_frames", type=click.IntRange(min=1), default=None,
              help="Most frames shown of a video [Qwen-VL: 2 per second, at most 32; Video-LLaVA: 8; "
                   "LLaVA-OneVision: 32; LLaVA-NeXT-Video: 1 per second, at most 32].")
@click.option("--judge", "judge_spec", default="none", show_default=True,
              help="Judge of the video QA benchmarks (Video-LLaVA's GPT protocol): none (predictions kept, not "
                   "scored), openai (an OpenAI-compatible endpoint: OPENAI_API_KEY, OPENAI_BASE_URL), or "
                   "MODULE:NAME, a callable judge(question, answer, prediction) -> (yes, score 0-5).")
@click.option("--judge-model", default=None, help="openai judge: the model [FICOCO_JUDGE_MODEL, else gpt-3.5-turbo, "
              "Video-LLaVA's].")
@click.option("--judge-url", default=None, help="openai judge: the API base URL [OPENAI_BASE_URL, else OpenAI's].")
def eval_command(model_path, data, method_names, retains, batch_size, limit, out_dir, device, dtype, prompt_format,
                 plot, textvqa_ocr, video_dirs, max_frames, judge_spec, judge_model, judge_url) -> None:
    """Evaluate vanilla and every method/budget on benchmarks; resumable; writes tables and a plot.

    MODEL_PATH is a local checkpoint folder with its processor [the embedded proxy model]. Under
    'accelerate launch --num_processes N -m ficoco.cli eval ...' the samples are sharded across the
    processes and the main process merges and scores them. Video benchmarks (tgif_qa, msvd_qa,
    msrvtt_qa, activitynetqa) need a model that takes videos (Qwen2-VL / Qwen2.5-VL / Qwen3-VL,
    Video-LLaVA, LLaVA-OneVision, LLaVA-NeXT-Video)."""
    from .assets import embedded_model_dir
    from .checkpoint import checkpoint_config, check_supported, load_model, load_processor, resolve_device
    from .evaluation.prompt_format import in_prompt_format, resolve_prompt_format
    from .evaluation.read import read_benchmark
    from .evaluation.report import plot_results
    from .evaluation.runner import Shard, evaluate, variants_for
    from .evaluation.tasks import task_spec
    from .evaluation.video_frames import check_takes_video
    from .methods import split_methods

    model_path = model_path or str(embedded_model_dir())
    config = checkpoint_config(model_path)
    check_supported(config, model_path)
    prompt_format = resolve_prompt_format(prompt_format, model_path)
    folders = _pairs(video_dirs, "--videos", "TASK=FOLDER")
    video_judge = _video_judge(judge_spec, judge_model, judge_url)
    tasks = {}
    for task, path in _pairs(data, "--data", "TASK=PATH").items():
        if task_spec(task).modality == "video":
            check_takes_video(config.get("model_type"), task)  # before reading anything
        options = {"ocr_tokens": textvqa_ocr} if task == "textvqa_val" else {}
        if task in folders:
            options["video_folder"] = folders.pop(task)
        tasks[task] = in_prompt_format(read_benchmark(task, path, limit=limit, **options), prompt_format)
    if folders:
        raise click.BadParameter(f"no --data for {', '.join(folders)}", param_hint="--videos")
    variants = variants_for(split_methods(method_names), _budgets(retains))
    for variant in variants:
        variant.build()  # fail fast on a bad method or budget
    shard = Shard.current()
    if device == "auto" and shard.world > 1:
        from accelerate import PartialState

        device = PartialState().device
    target = resolve_device(device)
    if shard.rank == 0:
        click.echo(f"prompt format: {prompt_format}" + (
            " (bare questions: the benchmarks' answer instructions are dropped)" if prompt_format == "model" else ""))
    processor = load_processor(model_path)
    model = load_model(model_path, dtype=dtype, device=target)
    summary = evaluate(model, processor, tasks, variants, out_dir, batch_size=batch_size, shard=shard,
                       log=lambda line: click.echo(f"warning: {line}", err=True), video_judge=video_judge,
                       max_frames=max_frames)
    if summary is None:  # not the main process under accelerate launch
        return
    if plot:
        plot_results(summary["results"], str(Path(out_dir) / "accuracy-vs-tflops.png"))
    click.echo(Path(out_dir, "results.md").read_text())


def _pairs(items, option: str, form: str) -> dict[str, str]:
    """``("a=x", "b=y")`` -> ``{"a": "x", "b": "y"}``; one clear line for an item without ``=``."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected {form}, got {item!r}", param_hint=option)
        pairs[key] = value
    return pairs


def _video_judge(spec: str, model: str | None, url: str | None):
    """The video QA judge ``--judge`` names: ``None`` for none, the OpenAI-compatible one, or an
    importable callable ``MODULE:NAME``."""
    if spec == "none":
        if model or url:
            raise click.BadParameter("--judge-model / --judge-url need --judge openai", param_hint="--judge")
        return None
    if spec == "openai":
        from .evaluation.video_qa import OpenAIJudge

        return OpenAIJudge.from_env(model=model, base_url=url)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise click.BadParameter(f"expected none, openai or MODULE:NAME, got {spec!r}", param_hint="--judge")
    import importlib

    judge = getattr(importlib.import_module(module), name, None)
    if not callable(judge):
        raise click.BadParameter(f"{spec} is not a callable judge", param_hint="--judge")
    return judge


@main.command("train-proxy")
@click.option("--out", "out_dir", required=True, help="Where the trained checkpoint goes.")
@click.option("--family", type=click.Choice(["llava", "qwen"]), default="llava", show_default=True,
              help="llava: the LLaVA-1.5-shaped proxy; qwen: the Qwen2.5-VL-shaped one at varied resolutions, its "
              "decoder started from a LLaVA proxy's (--language-from).")
@click.option("--language-from", default=None, help="qwen: the LLaVA proxy checkpoint whose decoder and word "
              "embeddings the Qwen proxy starts from [the embedded LLaVA proxy].")
@click.option("--steps", type=int, default=None, help="Optimizer steps [TrainConfig: 1800].")
@click.option("--batch-size", type=int, default=None, help="[TrainConfig: 128].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [TrainConfig: 1e-3].")
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps [TrainConfig: 200].")
@click.option("--aux-weight", type=float, default=None, help="Weight of the [CLS] scene loss [0.5].")
@click.option("--patch-weight", type=float, default=None, help="Weight of the patch-word alignment loss [0.5].")
@click.option("--cls-layers", default="", help="Encoder layers (0-based, comma-separated) whose [CLS] also "
              "predicts the scene, e.g. 12,16,20 [none].")
@click.option("--cls-attention-layers", default="", help="Encoder layers whose [CLS] attention must reach every "
              "object and word patch, e.g. 12-22 [none].")
@click.option("--cls-attention-weight", type=float, default=None, help="Weight of that saliency loss [0.1].")
@click.option("--token-drop-prob", type=click.FloatRange(0.0, 1.0), default=None,
              help="Share of steps whose LLM sees a random subset of the visual tokens, renumbered as after "
              "an encoder-side reduction [0].")
@click.option("--token-drop-min", type=int, default=None, help="Fewest visual tokens such a step keeps [32].")
@click.option("--distill-weight", type=float, default=None, help="qwen: weight of the distillation of its visual "
              "tokens towards the LLaVA proxy's image tokens over the same scene region [0: off].")
@click.option("--teacher-from", default=None, help="qwen: the LLaVA proxy to distil from [--language-from, else the "
              "embedded LLaVA proxy].")
@click.option("--token-drop-min-share", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="qwen: smallest share of each image's tokens such a step keeps [0.1].")
@click.option("--max-minutes", type=float, default=None, help="Stop training early after this long (recorded).")
@click.option("--device", default="cuda", show_default=True)
@click.option("--workers", type=int, default=None, help="Data-loading processes [CPU count - 2, at most 14].")
@click.option("--eval-size", type=int, default=500, show_default=True)
@click.option("--easy-vqa-every", type=int, default=8, show_default=True,
              help="One training sample in N is an easy-VQA question (0: procedural scenes only).")
@click.option("--turns", type=int, default=12, show_default=True,
              help="Questions per training image, asked as the turns of one conversation.")
@click.option("--init-from", default=None, help="Continue from this saved proxy checkpoint (a later stage).")
@click.option("--textured-backgrounds", is_flag=True, help="Draw the scenes on textured instead of plain backgrounds.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_proxy_command(out_dir, family, language_from, steps, batch_size, lr, warmup_steps, aux_weight, patch_weight, cls_layers,
                        cls_attention_layers, cls_attention_weight, token_drop_prob, token_drop_min,
                        distill_weight, teacher_from, token_drop_min_share, max_minutes, device, workers, eval_size, easy_vqa_every, turns,
                        init_from, textured_backgrounds, seed) -> None:
    """Train a proxy model (LLaVA-1.5- or Qwen2.5-VL-shaped) on the procedural dataset and save it in HF format."""
    from .checkpoint import resolve_device
    from .proxy.train import TrainConfig

    device = str(resolve_device(device))
    given = dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, aux_weight=aux_weight,
                 patch_weight=patch_weight,
                 cls_attention_weight=cls_attention_weight, token_drop_prob=token_drop_prob,
                 token_drop_min=token_drop_min, token_drop_min_share=token_drop_min_share,
                 distill_weight=distill_weight, num_workers=workers)
    if family == "llava" and (distill_weight is not None or teacher_from is not None or token_drop_min_share is not None):
        raise click.UsageError("--distill-weight, --teacher-from and --token-drop-min-share are Qwen proxy options")
    if family == "qwen":
        llava_only = {"--aux-weight": aux_weight, "--cls-layers": cls_layers or None,
                      "--cls-attention-layers": cls_attention_layers or None,
                      "--cls-attention-weight": cls_attention_weight, "--token-drop-min": token_drop_min,
                      "--textured-backgrounds": textured_backgrounds or None}
        given_there = [name for name, value in llava_only.items() if value is not None]
        if given_there:
            raise click.UsageError(f"{', '.join(given_there)}: LLaVA proxy options (the Qwen proxy has no [CLS] "
                                   f"and plain backgrounds)")
        from .assets import embedded_model_dir
        from .proxy.qwen import train_qwen_proxy

        config = TrainConfig(max_seconds=None if max_minutes is None else max_minutes * 60, device=device, seed=seed,
                             **{key: value for key, value in given.items() if value is not None})
        train_qwen_proxy(out_dir, config, language_from or (None if init_from else str(embedded_model_dir())),
                         eval_size=eval_size, turns=turns, init_from=init_from,
                         teacher_from=teacher_from or language_from or str(embedded_model_dir()), log=click.echo)
        return
    from .proxy.recipe import train_proxy

    config = TrainConfig(max_seconds=None if max_minutes is None else max_minutes * 60, device=device, seed=seed,
                         cls_layers=tuple(_int_list(cls_layers)),
                         cls_attention_layers=tuple(_int_list(cls_attention_layers)),
                         **{key: value for key, value in given.items() if value is not None})
    train_proxy(out_dir, config, eval_size=eval_size, easy_vqa_every=easy_vqa_every, turns=turns,
                init_from=init_from, textured=textured_backgrounds, log=click.echo)


@main.command("proxy-accuracy")
@click.option("--model", "model_path", required=True, help="Trained proxy checkpoint folder (with its processor).")
@click.option("--out", "out_dir", required=True, help="Where proxy_accuracy.json / .md / .png go.")
@click.option("--split", type=click.Choice(["validation", "test"]), default="test", show_default=True)
@click.option("--size", type=click.IntRange(min=1), default=None, help="First N samples of the split [all 2000].")
@click.option("--retain", "retains", default=None, help="Visual-token budgets: counts, or shares of each image's "
              "tokens (0.25) [LLaVA: 192,128,64; Qwen-VL: 0.5,0.25,0.125].")
@click.option("--methods", "method_names", default=None, help="Comma-separated [every method]; a method with "
              "options is NAME[KEY=VALUE,...], with its official code's choices NAME[official] (quote it).")
@click.option("--device", default=None, help="cuda or cpu [cuda if present] (fp16 on cuda, fp32 on cpu).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--easy-vqa/--no-easy-vqa", "easy_vqa", default=True, show_default=True,
              help="Also score easy-VQA's test questions (a column of their own, not in overall).")
@click.option("--method-option", "method_options", multiple=True, metavar="METHOD:KEY=VALUE",
              help="A keyword option of one method, e.g. ficoco-l:start_layer=1 (repeatable).")
def proxy_accuracy(model_path, out_dir, split, size, retains, method_names, device, batch_size, easy_vqa,
                   method_options) -> None:
    """Accuracy table of the proxy model: vanilla, every method/budget, decoder methods at ficoco-v's TFLOPs."""
    from .checkpoint import resolve_device
    from .methods import DECODER_METHODS, ENCODER_METHODS, split_methods
    from .proxy.table import run as accuracy_table

    names = split_methods(method_names) if method_names else list(ENCODER_METHODS + DECODER_METHODS)
    accuracy_table(model_path, out_dir, split=split, size=size, retains=None if retains is None else _budgets(retains),
                   methods=names,
                   device=None if device is None else str(resolve_device(device)), batch_size=batch_size,
                   easy_vqa=easy_vqa, options=_method_options(method_options), log=click.echo)
    click.echo(Path(out_dir, "proxy_accuracy.md").read_text())


@main.command("vllm-overrides")
@click.argument("method_name", metavar="METHOD")
@click.option("--retain", default=None, help="Visual tokens kept per image: a count, or a share (0.25) [the "
              "method's default].")
@click.option("--option", "options", multiple=True, help="A method option KEY=VALUE (repeatable).")
@click.option("--model-type", type=click.Choice(["llava", "qwen2_5_vl"]), default="llava", show_default=True,
              help="The checkpoint's model_type: LLaVA-1.5 or Qwen2.5-VL.")
def vllm_overrides(method_name, retain, options, model_type) -> None:
    """Print the --hf-overrides JSON that serves METHOD with vLLM (docs/serving.md); 'vanilla' for none."""
    from .methods import parse_option_value
    from .serving import hf_overrides

    budgets = None if retain is None else _budgets(retain)
    if budgets is not None and len(budgets) != 1:
        raise click.BadParameter(f"expected one count or share, got {retain!r}", param_hint="--retain")
    extra = {}
    for item in options:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        extra[key.strip()] = parse_option_value(text)
    click.echo(json.dumps(hf_overrides(method_name, budgets and budgets[0], model_type=model_type, **extra)))


@main.command("vllm-checkpoint")
@click.argument("model_path", required=False, type=click.Path(file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(file_okay=False),
              help="The folder to write (replaced if it exists).")
@click.option("--head-dim", type=int, default=None,
              help="The LLM's new head size [the smallest vLLM's CPU attention supports].")
@click.option("--proxy", type=click.Choice(["llava", "qwen"]), default="llava", show_default=True,
              help="Which embedded proxy to convert when MODEL_PATH is not given.")
def vllm_checkpoint(model_path, out_path, head_dim, proxy) -> None:
    """Pad a LLaVA checkpoint's LLM heads (widen a Qwen2.5-VL checkpoint's LLM) for vLLM's CPU
    attention, exactly [the embedded proxy]."""
    from .assets import embedded_model_dir
    from .serving.checkpoint import pad_attention_heads

    source = embedded_model_dir(proxy) if model_path is None else Path(model_path)
    target = pad_attention_heads(source, out_path, head_dim)
    click.echo(f"wrote {target}")


def _method_options(items) -> dict[str, dict]:
    """``("ficoco-l:start_layer=1", ...)`` -> ``{"ficoco-l": {"start_layer": 1}}`` (values read as
    int, float, true/false, none, else text)."""
    from .methods import parse_option_value

    options: dict[str, dict] = {}
    for item in items:
        name, sep, assignment = item.partition(":")
        key, eq, text = assignment.partition("=")
        if not sep or not eq or not name or not key:
            raise click.BadParameter(f"expected METHOD:KEY=VALUE, got {item!r}", param_hint="--method-option")
        options.setdefault(name, {})[key] = parse_option_value(text)
    return options


def _open_image(image_path: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image not found: {image_path}")
    try:
        image = Image.open(image_path)
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"corrupt or unreadable image {image_path}: {err}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
