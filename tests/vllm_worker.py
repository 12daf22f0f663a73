"""The vLLM side of tests/test_vllm_plugin.py and tests/test_vllm_qwen.py, run by the vLLM environment's interpreter
(scripts/vllm-env.sh) as ``python tests/vllm_worker.py JOB.json RESULT.json``.

One process builds every engine of the job in turn (vLLM imported once; with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor each engine then starts in seconds),
answers the job's proxy test questions with each configuration, and writes what the test
compares: per configuration the prompt lengths vLLM reports and the generated token ids; per
refused configuration the error's last line; and checks of the plugin's registration and of the
reversible attachment.

Job (JSON): ``model`` (a checkpoint folder), ``questions`` (how many of the proxy test split),
``max_tokens``, ``proxy`` (``"llava"``, default, or ``"qwen"``: whose test questions),
``configs`` / ``refusals`` (``[{"label": ..., "overrides": {...}}]``; a config's ``questions``
answers only the first that many, its ``positions`` records the positions of the first question's
decoder calls, its ``detach`` detaches and counts), and
``engine`` (extra ``vllm.LLM`` keyword arguments, e.g. ``tensor_parallel_size``).
"""

from __future__ import annotations

import gc
import json
import sys
import time


def proxy_prompts(model: str, count: int, proxy: str = "llava") -> list[dict]:
    """The first ``count`` proxy test questions as vLLM prompts (chat template, one image each):
    the LLaVA proxy's at 336 px, or (``proxy="qwen"``) the Qwen proxy's, each at its own size."""
    from transformers import AutoProcessor

    from ficoco.prompts import chat_prompt
    from ficoco.proxy import qwen
    from ficoco.proxy.recipe import rendered
    from ficoco.proxy.scenes import make_split

    processor = AutoProcessor.from_pretrained(model)
    samples = qwen.validation_samples(count, "test") if proxy == "qwen" else \
        [rendered(example) for example in make_split("test", count)]
    return [{"prompt": chat_prompt(processor, s.question), "multi_modal_data": {"image": s.image}} for s in samples]


def capture_positions(model) -> None:
    """Record the positions the first decoder layer gets, call by call (a test probe, run in the
    worker through ``LLM.apply_model``; :func:`captured_positions` reads and removes it)."""
    layer = model.language_model.model.layers[0]
    calls: list = []

    def keep(module, args, kwargs):
        positions = args[0] if args else kwargs["positions"]
        calls.append(positions.tolist())

    model.ficoco_probe = (layer.register_forward_pre_hook(keep, with_kwargs=True), calls)


def captured_positions(model) -> list:
    handle, calls = model.ficoco_probe
    handle.remove()
    del model.ficoco_probe
    return calls


def detach_and_count(model) -> dict:
    """Detach the model's ficoco reduction; report what was attached and what is left (run in
    the worker through ``LLM.apply_model``)."""
    served = model.ficoco
    patched = getattr(served.vision, "patched", ()) if served.vision is not None else ()
    attached = {"hooks": len(served.hooks), "replaced_forwards": len(patched)}
    served.remove()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    replaced = sum("forward" in vars(m) for m in model.modules())
    return {"attached": attached, "hooks_left": hooks, "replaced_forwards_left": replaced}


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    started = time.perf_counter()
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.plugins import load_general_plugins

    from ficoco.serving import ARCHITECTURES, plugin

    result: dict = {"import_s": time.perf_counter() - started, "configs": {}, "refusals": {}}
    # vLLM loads the plugin through its entry point (as every engine does first); a second
    # registration changes nothing
    load_general_plugins()
    before = list(ModelRegistry.get_supported_archs())
    plugin.register()
    result["registered"] = all(name in before for name in ARCHITECTURES.values())
    result["register_idempotent"] = list(ModelRegistry.get_supported_archs()) == before

    prompts = proxy_prompts(job["model"], job["questions"], job.get("proxy", "llava"))
    sampling = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
    engine = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "limit_mm_per_prompt": {"image": 1},
              "kv_cache_memory_bytes": 64 << 20, **job.get("engine", {})}
    for config in job["configs"]:
        start = time.perf_counter()
        llm = LLM(model=job["model"], hf_overrides=config["overrides"], **engine)
        ready = time.perf_counter()
        outputs = llm.generate(prompts[:config.get("questions", len(prompts))], sampling, use_tqdm=False)
        entry = {
            "prompt_lengths": [len(o.prompt_token_ids) for o in outputs],
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "texts": [o.outputs[0].text for o in outputs],
            "init_s": ready - start,
            "generate_s": time.perf_counter() - ready,
        }
        if config.get("positions"):  # the first question again, its positions recorded call by call
            llm.apply_model(capture_positions)
            llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
            entry["positions"] = llm.apply_model(captured_positions)[0]
        if config.get("detach"):
            entry["detach"] = llm.apply_model(detach_and_count)[0]
        result["configs"][config["label"]] = entry
        del llm, outputs
        gc.collect()
    for config in job.get("refusals", []):
        try:
            LLM(model=job["model"], hf_overrides=config["overrides"], **engine)
            result["refusals"][config["label"]] = None
        except Exception as err:  # noqa: BLE001 - the test reads the message
            result["refusals"][config["label"]] = str(err).strip().splitlines()[-1]
        gc.collect()
    result["total_s"] = time.perf_counter() - started
    with open(result_path, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":  # vLLM spawns processes: the module must be importable without running
    main(*sys.argv[1:3])
