"""Serving throughput with ficoco's vLLM plugin: vanilla against a method at several budgets, each
served by vLLM's OpenAI-compatible server under the same fixed KV-cache budget.

For every variant the script starts the server (plugin architecture; ``vanilla`` runs it without a
reduction), waits for ``/health``, sends a few warm-up requests, then ``--requests`` streamed chat
requests with ``--concurrency`` in flight, each with its own image (so that neither the
processor's nor the encoder's cache answers for it) and the same number of output tokens
(``ignore_eos``). It reports requests/s, output tokens/s and time to first token (client side),
and the KV-cache capacity the server logged; then stops the server.

CPU, with the shipped proxy (run by the vLLM environment's interpreter; docs/serving.md)::

    ficoco vllm-checkpoint --out /tmp/proxy-llava-hd64
    $(bash scripts/vllm-env.sh) benchmarks/vllm_serving.py --model /tmp/proxy-llava-hd64 \\
        --requests 48 --concurrency 16 --out docs/benchmarks/vllm-serving-cpu.json

GPU (LLaVA-1.5-7B on one GPU; ``pip install vllm`` and ``pip install -e .`` in one environment;
the server also gets CUDA graphs for the LLM, which leave the vision tower and its hooks eager)::

    python benchmarks/vllm_serving.py --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 --no-enforce-eager \\
        --kv-cache-gib 8 --requests 1024 --concurrency 256 --max-tokens 64 --max-model-len 2048 \\
        --out vllm-serving-7b-h200.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHITECTURE = "FicocoLlavaForConditionalGeneration"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(method: str, retain: int | None) -> dict:
    settings = {"method": method} if retain is None else {"method": method, "retain": retain}
    return {"architectures": [ARCHITECTURE], "ficoco": settings}


def start_server(args, method: str, retain: int | None, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
               "--max-model-len", str(args.max_model_len), "--limit-mm-per-prompt", '{"image": 1}',
               "--served-model-name", "bench", "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)),
               "--max-num-seqs", str(args.concurrency), "--hf-overrides", json.dumps(_overrides(method, retain)),
               *(["--enforce-eager"] if args.enforce_eager else []), *args.server_arg]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO"}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


async def wait_ready(session, process: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError("the server exited:\n" + "\n".join(log.read_text().splitlines()[-20:]))
        try:
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        await asyncio.sleep(1)
    raise RuntimeError(f"the server did not answer /health within {timeout} s")


async def one_request(session, url: str, image_b64: str, question: str, max_tokens: int) -> dict:
    """One streamed chat request: ``{"ttft", "latency", "output_tokens", "prompt_tokens"}``."""
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}},
                {"type": "text", "text": question}]}]}
    start = time.perf_counter()
    first = None
    usage = {}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    return {"ttft": first, "latency": time.perf_counter() - start, "output_tokens": usage.get("completion_tokens"),
            "prompt_tokens": usage.get("prompt_tokens")}


async def run_load(url: str, items: list[tuple[str, str]], concurrency: int, max_tokens: int, session) -> tuple:
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    results: list[dict] = []

    async def client() -> None:
        while not queue.empty():
            image, question = queue.get_nowait()
            results.append(await one_request(session, url, image, question, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def kv_capacity(log: Path) -> dict:
    """The KV-cache size (tokens) and the concurrency it allows, as the server logged them."""
    match = re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
                      r"([\d.]+)x", log.read_text())
    if match is None:
        return {}
    return {"kv_cache_tokens": int(match.group(1).replace(",", "")), "max_concurrency_at_max_len": float(match.group(3))}


def images(count: int) -> list[tuple[str, str]]:
    """``count`` distinct proxy test scenes (base64 PNG) with their questions."""
    from ficoco.proxy.recipe import rendered
    from ficoco.proxy.scenes import make_split

    out = []
    for example in make_split("test", count):
        sample = rendered(example)
        png = io.BytesIO()
        sample.image.save(png, format="PNG")
        out.append((base64.b64encode(png.getvalue()).decode(), sample.question))
    return out


def summarize(results: list[dict], wall: float) -> dict:
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    return {
        "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
        "output_tokens_per_s": sum(r["output_tokens"] or 0 for r in results) / wall,
        "ttft_mean_s": statistics.fmean(ttft), "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "latency_mean_s": statistics.fmean(r["latency"] for r in results),
        "prompt_tokens": statistics.median(r["prompt_tokens"] for r in results if r["prompt_tokens"]),
    }


async def bench_variant(args, method: str, retain: int | None, items, warmup, folder: Path) -> dict:
    import aiohttp

    log = folder / f"server-{method}-{retain}.log"
    process, url = start_server(args, method, retain, log)
    try:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            startup = await wait_ready(session, process, url, log, args.startup_timeout)
            await run_load(url, warmup, min(len(warmup), args.concurrency), args.max_tokens, session)
            results, wall = await run_load(url, items, args.concurrency, args.max_tokens, session)
    finally:
        stop_server(process)
    row = {"method": method, "retain": retain, "startup_s": startup, **kv_capacity(log), **summarize(results, wall)}
    print(json.dumps(row), flush=True)
    return row


def environment() -> dict:
    import torch
    import transformers
    import vllm

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "vllm": vllm.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "vanilla"), rows[0])
    lines = ["| variant | prompt tokens | KV cache (tokens) | max concurrency (at max len) | requests/s | vs vanilla "
             "| output tok/s | TTFT median (s) | TTFT p90 (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] if r["retain"] is None else f'{r["method"]} @ {r["retain"]}'
        lines.append(f'| {name} | {r["prompt_tokens"]:.0f} | {r.get("kv_cache_tokens", "?")} | '
                     f'{r.get("max_concurrency_at_max_len", float("nan")):.2f} | {r["requests_per_s"]:.2f} | '
                     f'{r["requests_per_s"] / base["requests_per_s"]:.2f}x | {r["output_tokens_per_s"]:.1f} | '
                     f'{r["ttft_median_s"]:.2f} | {r["ttft_p90_s"]:.2f} |')
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or hub name (LLaVA-1.5)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--method", default="ficoco-v")
    parser.add_argument("--retains", default="192,128,64")
    parser.add_argument("--kv-cache-gib", type=float, default=24 / 1024, help="the fixed KV-cache budget [24 MiB]")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the variants in interleaved rounds")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--server-arg", action="append", default=[], help="one more server argument (repeatable)")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--out", default="vllm-serving.json")
    args = parser.parse_args()

    pool = images(args.requests + args.warmup)
    warmup, items = pool[:args.warmup], pool[args.warmup:]
    variants = [("vanilla", None)] + [(args.method, int(r)) for r in args.retains.split(",") if r]
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for method, retain in variants:
                rows.append(asyncio.run(bench_variant(args, method, retain, items, warmup, Path(tmp))))
    result = {"environment": {**environment(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "settings": vars(args), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":  # vLLM spawns processes
    main()
