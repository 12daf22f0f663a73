"""ficoco's vLLM plugin for Qwen2.5-VL (issue 16; docs/serving.md), on the CPU.

Without vLLM (this environment): the widening that gives the shipped Qwen proxy a head size
vLLM's CPU attention takes computes the same logits in transformers; the plugin's configuration
gives every image the kept count ficoco's Qwen-VL adapter gives it, and refuses in one line what
cannot be served.

With vLLM (the interpreter scripts/vllm-env.sh builds, run as subprocesses, as in
tests/test_vllm_plugin.py): the widened proxy served offline (``vllm.LLM``,
tests/vllm_worker.py) answers the proxy's test questions (each image at its own size) with the
greedy tokens of ficoco on transformers for vanilla, FiCoCo-V and ToMe at 50% and 25% of each
image's tokens and the other pre-LLM methods; prompt lengths are text tokens + each image's kept
count; the first decoder layer gets, in prefill and in decoding, the M-RoPE positions transformers
gives the kept tokens; decoder-side methods, text-conditioned ones and impossible budgets are
refused at start-up in one line; vLLM's OpenAI-compatible server, started here with the plugin,
answers a chat request with an image as the offline engine does.

The vLLM parts skip when that interpreter is absent, unless ``FICOCO_REQUIRE_VLLM`` is set.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from pathlib import Path

import pytest
import torch

from ficoco.serving import ARCHITECTURES, hf_overrides, served_reduction
from ficoco.serving.checkpoint import pad_attention_heads, widen_qwen_llm

from .test_vllm_plugin import (
    _finish_worker,
    _start_server,
    _start_worker,
    _stop,
    _vllm_env,
    _wait_ready,
    find_vllm_python,
)

pytestmark = pytest.mark.xdist_group("vllm-qwen")

QUESTIONS = 6  # the first 6 Qwen proxy test questions: one per family, images of 99 to 210 tokens
CONFIGS = [("vanilla", None), ("ficoco-v", 0.5), ("ficoco-v", 0.25), ("tome", 0.5), ("tome[start_layer=0]", 0.25)]
#: every other pre-LLM method, on the first three questions (each engine costs a start)
MORE_CONFIGS = [("evit", 0.25), ("random", 0.25), ("topk", 0.25), ("visionzip", 0.25), ("pool", 0.25),
                ("divprune", 0.25)]
MORE_QUESTIONS = 3
POSITIONS = ("ficoco-v", 0.25)  # whose first question's positions are compared, call by call
MAX_TOKENS = 4
EOS = 2
IMAGE_TOKEN = 118
REFUSED = {  # label: (override, what the one line says)
    "impossible retain": ({"method": "ficoco-v", "retain": 300}, "retain=300 exceeds the 256 visual tokens"),
    "decoder-side fastv": ({"method": "fastv", "retain": 0.25}, "fastv reduces inside the LLM"),
    "decoder-side ficoco-l": ({"method": "ficoco-l", "retain": 0.25}, "ficoco-l reduces inside the LLM"),
    "text-conditioned cdpruner": ({"method": "cdpruner", "retain": 0.25}, "weighs the visual tokens by the prompt"),
    "tome above half a block": ({"method": "tome", "retain": 0.25}, "ToMe merges at most half the tokens"),
}


def _label(method: str, retain) -> str:
    return method if retain is None else f"{method}@{retain}"


def _overrides(method: str, retain) -> dict:
    return hf_overrides(method, retain, model_type="qwen2_5_vl")


def _answer(tokens: list[int]) -> list[int]:
    return tokens[:tokens.index(EOS)] if EOS in tokens else list(tokens)


# -- without vLLM -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def widened_proxy(tmp_path_factory) -> Path:
    """The shipped Qwen proxy with its LLM widened 224 -> 256 (heads 56 -> 64)."""
    from ficoco.assets import embedded_model_dir

    return pad_attention_heads(embedded_model_dir("qwen"), tmp_path_factory.mktemp("proxy") / "proxy-qwen-hd64")


@pytest.fixture(scope="module")
def proxy():
    """The shipped Qwen proxy in transformers, float32, and its processor."""
    from ficoco.assets import embedded_model_dir
    from ficoco.checkpoint import load_model, load_processor

    path = embedded_model_dir("qwen")
    return load_model(path, dtype=torch.float32).eval(), load_processor(path)


def test_widened_checkpoint_computes_the_same_logits(widened_proxy, proxy):
    from ficoco.checkpoint import load_model
    from ficoco.proxy import qwen
    from ficoco.proxy.train import collate

    model, processor = proxy
    widened = load_model(widened_proxy, dtype=torch.float32).eval()
    config = json.loads((widened_proxy / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 256 and config["vision_config"]["out_hidden_size"] == 256
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [8, 10, 14]
    batch = collate(qwen.validation_samples(3, "test"), processor, with_answers=False)  # 3 sizes, left-padded
    with torch.no_grad():
        expected, got = model(**batch).logits, widened(**batch).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_widening_refuses_what_it_cannot_convert(tmp_path):
    from ficoco.assets import embedded_model_dir

    source = tmp_path / "source"
    source.mkdir()
    config = json.loads((embedded_model_dir("qwen") / "config.json").read_text())
    config["text_config"]["rope_parameters"]["mrope_section"] = [8, 10, 8]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only M-RoPE in contiguous sections over the head's 28 frequencies"):
        widen_qwen_llm(source, tmp_path / "out")
    with pytest.raises(ValueError, match="must be even and larger"):
        widen_qwen_llm(embedded_model_dir("qwen"), tmp_path / "small", head_dim=32)


def _proxy_config() -> dict:
    from ficoco.assets import embedded_model_dir

    return json.loads((embedded_model_dir("qwen") / "config.json").read_text())


@pytest.mark.parametrize(("method", "retain"), CONFIGS[1:] + MORE_CONFIGS + [("ficoco-v", 64)])
def test_each_image_gets_the_qwen_adapters_kept_count(proxy, method, retain):
    """The processor's count per image (from the config alone) is the count ficoco's Qwen-VL
    adapter keeps of that image in transformers, at every size the proxy's processor makes."""
    import ficoco

    served = served_reduction({**_proxy_config(), **_overrides(method, retain)})
    grids = [(1, 2 * h, 2 * w) for h, w in [(8, 8), (9, 11), (12, 12), (11, 16), (16, 16)]]
    with ficoco.apply(proxy[0], method, retain=retain) as handle:
        expected = [handle.kept_tokens(grid) for grid in grids]
        plans = [handle.plan_for(h * w // 4) for _, h, w in grids]
    assert [served.kept_tokens(h * w // 4) for _, h, w in grids] == expected
    assert [served.plan_for(h * w // 4) for _, h, w in grids] == plans


def test_overrides_name_the_qwen_architecture():
    assert ARCHITECTURES["qwen2_5_vl"] == "FicocoQwen2_5_VLForConditionalGeneration"
    assert _overrides("ficoco-v", 0.25) == {"architectures": ["FicocoQwen2_5_VLForConditionalGeneration"],
                                            "ficoco": {"method": "ficoco-v", "retain": 0.25}}
    assert served_reduction({**_proxy_config(), **_overrides("vanilla", None)}) is None


def test_command_line_writes_the_qwen_overrides_and_checkpoint(tmp_path):
    from click.testing import CliRunner

    from ficoco.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["vllm-overrides", "ficoco-v", "--retain", "0.25", "--model-type", "qwen2_5_vl"])
    assert out.exit_code == 0 and json.loads(out.output) == _overrides("ficoco-v", 0.25)
    out = runner.invoke(main, ["vllm-checkpoint", "--proxy", "qwen", "--out", str(tmp_path / "hd64")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "hd64" / "config.json").read_text())["text_config"]["hidden_size"] == 256


@pytest.mark.parametrize("label", sorted(set(REFUSED) - {"impossible retain"}))
def test_refusals_are_one_line(label):
    override, says = REFUSED[label]
    with pytest.raises(ValueError, match="^ficoco: ") as caught:
        served_reduction({**_proxy_config(), "ficoco": override})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_count_above_an_images_tokens_is_refused_for_that_image():
    served = served_reduction({**_proxy_config(), "ficoco": {"method": "ficoco-v", "retain": 100}})
    assert served.kept_tokens(144) == 100
    with pytest.raises(ValueError, match="^ficoco: ficoco-v: retain=100 exceeds the 81 visual tokens"):
        served.kept_tokens(81)
    with pytest.raises(ValueError, match="Qwen2-VL and Qwen3-VL need their own towers"):
        served_reduction({**_proxy_config(), "model_type": "qwen3_vl", "ficoco": {"method": "tome"}})


# -- with vLLM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return find_vllm_python()


def _reference() -> dict:
    """ficoco on transformers (the original proxy, width 224): per configuration the greedy tokens;
    the prompt lengths before cutting and each image's full token count; the positions the first
    decoder layer gets for the first question under :data:`POSITIONS` (prefill, then one step)."""
    import ficoco
    from ficoco.assets import embedded_model_dir
    from ficoco.checkpoint import load_model, load_processor
    from ficoco.proxy import qwen
    from ficoco.proxy.train import collate

    path = embedded_model_dir("qwen")
    model, processor = load_model(path, dtype=torch.float32).eval(), load_processor(path)
    samples = qwen.validation_samples(QUESTIONS, "test")
    batch = collate(samples, processor, with_answers=False)  # left-padded
    result = {"lengths": batch["attention_mask"].sum(1).tolist(),
              "image_tokens": (batch["image_grid_thw"].prod(-1) // 4).tolist(),
              "kept": {}, "answers": [s.answer for s in samples]}

    def generate(inputs, method, retain):
        with torch.inference_mode():
            if method == "vanilla":
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
                kept = [int(n) for n in (inputs["image_grid_thw"].prod(-1) // 4).tolist()]
            else:
                with ficoco.apply(model, method, retain=retain) as handle:
                    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
                    kept = [handle.kept_tokens(tuple(g)) for g in inputs["image_grid_thw"].tolist()]
        return [_answer(row) for row in out[:, inputs["input_ids"].shape[1]:].tolist()], kept

    for method, retain in CONFIGS:
        result[_label(method, retain)], result["kept"][_label(method, retain)] = generate(batch, method, retain)
    batch = collate(samples[:MORE_QUESTIONS], processor, with_answers=False)
    for method, retain in MORE_CONFIGS:
        result[_label(method, retain)], result["kept"][_label(method, retain)] = generate(batch, method, retain)

    one = collate(samples[:1], processor, with_answers=False)
    calls = []

    def keep(module, args, kwargs):
        calls.append(kwargs["position_ids"][-3:, 0].tolist())  # [3, L]: (t, h, w) of each token

    with torch.inference_mode(), ficoco.apply(model, POSITIONS[0], retain=POSITIONS[1]):
        handle = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)  # after ficoco's
        try:
            model.generate(**one, max_new_tokens=2, do_sample=False, pad_token_id=0)
        finally:
            handle.remove()
    result["positions"] = calls
    return result


SERVED = ("ficoco-v", 0.25)  # what the server runs


@pytest.fixture(scope="module")
def server(vllm_python, widened_proxy, tmp_path_factory):
    """vLLM's OpenAI-compatible server with the plugin running FiCoCo-V at 25% (started first, so
    that it boots while the offline engines run)."""
    log = tmp_path_factory.mktemp("server-qwen") / "server.log"
    process, url = _start_server(vllm_python, widened_proxy, _overrides(*SERVED), log)
    yield process, url, log
    _stop(process)


@pytest.fixture(scope="module")
def runs(vllm_python, widened_proxy, server, tmp_path_factory) -> tuple[dict, dict]:
    """``(offline, reference)``: every configuration answered by ``vllm.LLM`` in one process with
    every refusal, and by ficoco on transformers here, meanwhile."""
    architecture = ARCHITECTURES["qwen2_5_vl"]
    job = {
        "model": str(widened_proxy), "questions": QUESTIONS, "max_tokens": MAX_TOKENS, "proxy": "qwen",
        "engine": {"distributed_executor_backend": "uni"},
        "configs": [{"label": _label(m, r), "overrides": _overrides(m, r), "positions": (m, r) == POSITIONS,
                     "detach": m == "tome"} for m, r in CONFIGS]
                   + [{"label": _label(m, r), "overrides": _overrides(m, r), "questions": MORE_QUESTIONS}
                      for m, r in MORE_CONFIGS],
        "refusals": [{"label": label, "overrides": {"architectures": [architecture], "ficoco": override}}
                     for label, (override, _) in REFUSED.items()],
    }
    folder = tmp_path_factory.mktemp("offline-qwen")
    worker = _start_worker(vllm_python, job, folder, _vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    try:
        reference = _reference()
        (folder / "reference.json").write_text(json.dumps(reference))
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


def test_vllm_registers_the_qwen_architecture(offline):
    assert offline["registered"] and offline["register_idempotent"]


@pytest.mark.parametrize(("method", "retain"), CONFIGS + MORE_CONFIGS)
def test_prompt_length_is_text_tokens_plus_each_images_kept_count(offline, reference, method, retain):
    label = _label(method, retain)
    run = offline["configs"][label]
    count = len(run["prompt_lengths"])
    text = [length - n for length, n in zip(reference["lengths"], reference["image_tokens"])][:count]
    kept = reference["kept"][label]
    assert run["prompt_lengths"] == [t + k for t, k in zip(text, kept)], label
    if method != "vanilla":
        assert all(k < n for k, n in zip(kept, reference["image_tokens"]))


@pytest.mark.parametrize(("method", "retain"), CONFIGS + MORE_CONFIGS)
def test_greedy_tokens_equal_ficoco_on_transformers(offline, reference, method, retain):
    """The same tokens on every question (the widening and vLLM's kernels change the logits by
    ~1e-5; the hooks keep the same tokens as transformers', each at its own position)."""
    label = _label(method, retain)
    got = [_answer(tokens) for tokens in offline["configs"][label]["tokens"]]
    assert got == reference[label], f"{label}: agreement {_agreement(got, reference[label]):.0%}"


def test_kept_tokens_keep_their_original_positions(offline, reference):
    """Prefill: each kept token at the (t, h, w) it had in the full image, the text after the image
    where it is after the full image; decoding continues there too: the positions transformers
    gives (ficoco's Qwen-VL adapter), call by call."""
    calls = offline["configs"][_label(*POSITIONS)]["positions"]
    expected = reference["positions"]
    assert calls[0] == expected[0]  # prefill [3, L]
    assert [c[0] for c in zip(*calls[1])] == [c[0] for c in zip(*expected[1])]  # the first decoded token
    image = [column for column in zip(*expected[0]) if len(set(column)) > 1]
    assert len(image) > 0  # the image's tokens, whose (t, h, w) differ


def test_vanilla_answers_are_right(offline, reference):
    from ficoco.proxy.evaluate import normalize_answer

    texts = [normalize_answer(t) for t in offline["configs"]["vanilla"]["texts"]]
    right = sum(t == normalize_answer(a) for t, a in zip(texts, reference["answers"]))
    assert right >= 0.8 * len(texts), f"{right} of {len(texts)}"


def test_detaching_restores_vllms_modules(offline):
    detach = offline["configs"]["tome@0.5"]["detach"]
    assert detach["attached"]["hooks"] > 0
    assert detach["hooks_left"] == 0 and detach["replaced_forwards_left"] == 0


@pytest.mark.parametrize("label", sorted(REFUSED))
def test_engine_refuses_at_start_up_in_one_line(offline, label):
    line = offline["refusals"][label]
    assert line is not None, f"{label} was not refused"
    assert line.startswith("ficoco: ") and REFUSED[label][1] in line, line


def test_server_answers_a_chat_request_with_an_image(server, offline, reference):
    from ficoco.proxy import qwen
    from ficoco.proxy.evaluate import normalize_answer

    process, url, log = server
    _wait_ready(process, url, log)
    sample = qwen.validation_samples(1, "test")[0]
    png = io.BytesIO()
    sample.image.save(png, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = {"model": "proxy", "max_tokens": MAX_TOKENS, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": sample.question}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.loads(response.read())
    offline_run = offline["configs"][_label(*SERVED)]
    kept = reference["kept"][_label(*SERVED)][0]
    assert reply["usage"]["prompt_tokens"] == offline_run["prompt_lengths"][0] == \
        reference["lengths"][0] - reference["image_tokens"][0] + kept
    answer = reply["choices"][0]["message"]["content"]
    assert answer == offline_run["texts"][0] and normalize_answer(answer) == normalize_answer(sample.answer)


_POSITION_CHECKS = """
import torch
from ficoco.serving.config import served_reduction
from ficoco.serving.vllm_qwen import ServedQwen, media_positions

positions = media_positions((1, 30, 20), 2)  # 15 rows x 10 columns of LLM tokens
assert positions.shape == (150, 4), positions.shape
assert positions[:, 0].eq(0).all() and positions[:, 3].eq(15).all()  # text after: base + 15 (rows), not 10
assert positions[11, 1:3].tolist() == [1, 1] and positions[-1, 1:3].tolist() == [14, 9]
served = served_reduction({"model_type": "qwen2_5_vl", "ficoco": {"method": "random", "retain": 1.0},
                           "vision_config": {"depth": 4, "fullatt_block_indexes": [3], "spatial_merge_size": 2},
                           "text_config": {"num_hidden_layers": 2}})
side = ServedQwen.__new__(ServedQwen)
side.served, side.vision, side.input = served, None, None
wide = (1, 2, 2 * 300)  # 1 x 300 tokens: positions up to 299
out = side.kept([torch.zeros(300, 8)], [list(wide)])
assert out[0].shape == (300, 12) and out[0][-1, -4:].tolist() == [0, 0, 299, 300]
try:
    side.kept([torch.zeros(300, 8, dtype=torch.bfloat16)], [list(wide)])
except ValueError as err:
    print(err)
else:
    raise AssertionError("bfloat16 positions above 256 were not refused")
"""


def test_positions_ride_exactly_or_are_refused(vllm_python):
    """Channel 3 is where the text after the whole image starts (its rows here, where EVS would
    write its width); positions a bfloat16 embedding cannot hold exactly are refused in one line."""
    import subprocess

    done = subprocess.run([str(vllm_python), "-c", _POSITION_CHECKS], capture_output=True, text=True, timeout=300,
                          env=_vllm_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ficoco: an image of 1 x 300 tokens has positions above 256")
