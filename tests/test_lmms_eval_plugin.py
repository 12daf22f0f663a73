"""ficoco's lmms-eval plugin: found through its entry point, run end to end on a local POPE task
(lmms-eval's own POPE config and scoring over a small parquet file this test writes), and equal to
``ficoco eval``'s answering when no method is attached.

Needs lmms-eval installed without its dependencies (they pull torchvision and more):
``pip install --no-deps lmms-eval==0.7.3 && pip install -e '.[lmms]'``; skipped without it."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402  (a half-installed lmms-eval fails loudly here)
from lmms_eval.tasks import TaskManager  # noqa: E402

from ficoco.evaluation import lmms_eval_plugin as plugin  # noqa: E402
from ficoco.evaluation.prompt_format import bare_question  # noqa: E402
from ficoco.evaluation.runner import answer_batch  # noqa: E402
from ficoco.proxy.scenes import make_split  # noqa: E402

# under pytest-xdist (--dist loadgroup) one worker runs this module: its module fixtures are costly
pytestmark = pytest.mark.xdist_group("lmms-eval-plugin")
TASK = "pope_local"
NEW_TOKENS = 6
EXISTENCE = [e for e in make_split("test", 60) if e.family == "existence"][:6]  # procedural yes/no questions
QUESTIONS = [e.question for e in EXISTENCE]


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    """A POPE-like task folder: six yes/no questions about procedural scenes (the embedded model's
    own kind of question) in a parquet file, and a task YAML that includes lmms-eval's own
    ``pope.yaml`` (prompt, generation settings, metrics)."""
    import datasets
    import lmms_eval

    folder = tmp_path_factory.mktemp("pope-local")
    rows = {"question_id": [str(i) for i in range(len(QUESTIONS))], "question": QUESTIONS,
            "answer": [e.answer for e in EXISTENCE], "image": [e.image() for e in EXISTENCE]}
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "pope_local.parquet")
    pope_yaml = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    (folder / "pope_local.yaml").write_text(
        f"include: {pope_yaml}\n"
        f"task: {TASK}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    test: pope_local.parquet\n"  # relative to this file
        f"  cache_dir: {folder / 'hf-datasets-cache'}\n"
    )
    return folder


def _evaluate(pope_dir, model_args: str, batch_size: int = 4) -> dict:
    return simple_evaluate(model="ficoco", model_args=model_args, tasks=[TASK], batch_size=batch_size, device="cpu",
                           task_manager=TaskManager("WARNING", include_path=str(pope_dir), include_defaults=False),
                           gen_kwargs=f"max_new_tokens={NEW_TOKENS}", bootstrap_iters=0, log_samples=True,
                           verbosity="WARNING")


def _answers(results: dict) -> dict[int, str]:
    return {s["doc_id"]: s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            for s in results["samples"][TASK]}


@pytest.fixture(scope="module")
def vanilla_results(pope_dir, embedded_checkpoint):
    return _evaluate(pope_dir, f"pretrained={embedded_checkpoint},method=vanilla", batch_size=len(QUESTIONS))


def test_entry_point_resolves_to_the_plugin():
    found = {ep.name: ep for ep in entry_points(group="lmms_eval.models")}
    assert "ficoco" in found, "reinstall ficoco (pip install -e .) to register its entry points"
    manifest = found["ficoco"].load()()
    assert manifest.model_id == "ficoco"
    assert manifest.simple_class_path == "ficoco.evaluation.lmms_eval_plugin.FicocoLlava"
    from lmms_eval.models import get_model

    assert get_model("ficoco") is plugin.FicocoLlava
    assert get_model("ficoco_llava") is plugin.FicocoLlava


def test_import_order_and_missing_lmms_eval(monkeypatch):
    # ficoco never imports lmms-eval; importing the plugin first still registers it (lmms-eval's
    # registry then loads the entry point while the plugin module is half imported)
    script = ("import sys, ficoco, ficoco.evaluation.runner; assert 'lmms_eval' not in sys.modules; "
              "import ficoco.evaluation.lmms_eval_plugin; from lmms_eval.models import get_model; "
              "print(get_model('ficoco').__name__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "FicocoLlava", done.stderr[-2000:]
    # without lmms-eval: an ImportError that says how to install it
    monkeypatch.delitem(sys.modules, plugin.__name__)
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", None)
    with pytest.raises(ImportError, match="--no-deps lmms-eval==0.7.3"):
        importlib.import_module(plugin.__name__)


def test_pope_with_ficoco_v_attaches_the_method(pope_dir, embedded_checkpoint, vanilla_results, monkeypatch):
    handles, attach = [], plugin.attach

    def spy(model, method, **kw):
        handles.append(attach(model, method, **kw))
        return handles[-1]

    monkeypatch.setattr(plugin, "attach", spy)
    results = _evaluate(pope_dir, f"pretrained={embedded_checkpoint},method=ficoco-v,retain=64,start_layer=10")

    metrics = results["results"][TASK]
    for name in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"):
        assert 0.0 <= metrics[f"{name},none"] <= 1.0
    assert len(results["samples"][TASK]) == len(QUESTIONS)
    assert results["config"]["model"] == "ficoco"

    (handle,) = handles  # attached once for the whole run ...
    assert handle.method.name == "ficoco-v" and handle.plan.vision  # ... with the options given
    assert min(handle.plan.vision) == 10
    trace = handle.vision_trace  # the encoder really handed on 64 tokens per image
    assert trace is not None and trace.positions.shape[-1] == 64
    assert len(handle.hooks) == 0 and not hasattr(handle.model, "_ficoco_handle")  # ... and detached at the end
    assert _answers(results) != _answers(vanilla_results)


def test_vanilla_plugin_answers_as_ficoco_eval(pope_dir, embedded_checkpoint, vanilla_results):
    """The plugin's vanilla answers equal ``answer_batch`` (what ``ficoco eval`` runs) on the same
    prompts and images, batched together as the plugin batched them. The embedded model is asked
    in its own prompt format (``prompt_format=auto``): POPE's answer instruction is dropped."""
    from lmms_eval.tasks.pope.utils import pope_doc_to_text
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import datasets

    docs = datasets.load_dataset("parquet", data_files=str(pope_dir / "pope_local.parquet"), split="train",
                                 cache_dir=str(pope_dir / "hf-datasets-cache"))
    prompt_options = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    records = [SimpleNamespace(question=bare_question(pope_doc_to_text(doc, prompt_options)),
                               image=lambda doc=doc: doc["image"].convert("RGB")) for doc in docs]
    assert [r.question for r in records] == QUESTIONS
    model = LlavaForConditionalGeneration.from_pretrained(embedded_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(embedded_checkpoint)
    expected = answer_batch(model, processor, records, NEW_TOKENS)
    got = _answers(vanilla_results)
    assert [got[i] for i in range(len(records))] == expected
    assert set(expected) <= {"yes", "no"} and any(expected)


def test_unparsed_answers_are_counted_and_flagged(pope_dir, embedded_checkpoint):
    """Asked with POPE's instruction (``prompt_format=benchmark``), which it was never trained on,
    the embedded model answers noise: the plugin warns that its unknown words may give noise,
    and that more than 10% of the answers are neither yes nor no. In its own format it answers
    yes/no and the log says 0%."""
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="INFO")
    try:
        benchmark = _evaluate(pope_dir, f"pretrained={embedded_checkpoint},method=vanilla,prompt_format=benchmark",
                              batch_size=len(QUESTIONS))
        own = _evaluate(pope_dir, f"pretrained={embedded_checkpoint},method=vanilla,prompt_format=model",
                        batch_size=len(QUESTIONS))
    finally:
        logger.remove(sink)
    assert not set(_answers(benchmark).values()) <= {"yes", "no"}
    warned = [m for m in messages if "pope_local" in m and "cannot be parsed" in m]
    assert len(warned) == 2, messages
    assert "WARNING" in warned[0] and "say neither yes nor no" in warned[0] and "more than 10%" in warned[0]
    assert "0 of 6 answers (0.0%)" in warned[1] and "WARNING" not in warned[1]
    assert any("unknown to the model's tokenizer" in m and "'phrase'" in m for m in messages)
    assert set(_answers(own).values()) <= {"yes", "no"}


def test_prompts_the_model_cannot_read_are_refused(embedded_checkpoint):
    from PIL import Image

    lm = plugin.FicocoLlava(pretrained=str(embedded_checkpoint), device="cpu")
    lm.task_dict = {"t": {"test": [{}]}}
    request = SimpleNamespace(args=("Quelle est la couleur du carré dessiné ici ?", {"max_new_tokens": 2},
                                    lambda doc: [Image.new("RGB", (40, 30))], 0, "t", "test"))
    with pytest.raises(ValueError, match="t: the model cannot read these prompts.*unknown"):
        lm.generate_until([request])
    assert lm.unparsed == {}  # refused before answering anything
    lm.close()


def test_loglikelihood_and_life_cycle(embedded_checkpoint):
    from PIL import Image

    lm = plugin.FicocoLlava(pretrained=str(embedded_checkpoint), method="fastv", retain=32, device="cpu",
                            dtype="float32")
    assert lm.handle is not None and getattr(lm.model, "_ficoco_handle") is lm.handle
    lm.task_dict = {"t": {"test": [{"image": Image.new("RGB", (50, 40), (200, 10, 10))}]}}
    request = SimpleNamespace(args=("is there a red circle?", " yes", lambda doc: [doc["image"]], 0, "t", "test"))
    (reduced,) = lm.loglikelihood([request])
    lm.close()
    assert getattr(lm.model, "_ficoco_handle", None) is None and lm.handle is None
    ((full, greedy),) = lm.loglikelihood([request])
    assert full < 0 and isinstance(greedy, bool)
    assert torch.isfinite(torch.tensor(reduced[0])) and reduced[0] != full  # FastV changed what the LLM saw

    # by hand: log P(" yes") after the prompt, from the unreduced model
    prompt = plugin.chat_prompt(lm.processor, "is there a red circle?")
    image = lm.task_dict["t"]["test"][0]["image"]
    context = lm.processor(images=[image], text=[prompt], return_tensors="pt")
    whole = lm.processor(images=[image], text=[prompt + " yes"], return_tensors="pt")
    n = whole["input_ids"].shape[1] - context["input_ids"].shape[1]
    with torch.no_grad():
        logits = lm.model(**whole).logits[0, -n - 1:-1].log_softmax(-1)
    expected = logits.gather(-1, whole["input_ids"][0, -n:, None]).sum()
    assert full == pytest.approx(float(expected), abs=1e-4)

    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([request])
    assert plugin._cut("yes. no\n\nmore", ["\n\n", "."]) == "yes"


def test_generate_until_mixes_image_counts_and_honours_until(embedded_checkpoint):
    """Rows with 0, 1 and 2 images in one call (batched by image count), answers in request order
    and equal to answering one at a time; ``until`` cuts the text; prompts are ``chat_prompt``'s."""
    from PIL import Image

    lm = plugin.FicocoLlava(pretrained=str(embedded_checkpoint), method="ficoco-v", retain=64, device="cpu",
                            batch_size=5)
    counts = [1, 0, 2, 1, 2]
    lm.task_dict = {"t": {"test": [{"n": n} for n in counts]}}

    def visuals(doc):
        return [Image.new("RGB", (40 + 9 * i, 30), (70 * i, 20, 90)) for i in range(doc["n"])]

    def requests(until):
        return [SimpleNamespace(args=(f"is there a red circle? {'a ' * i}", {"max_new_tokens": 4, "until": until},
                                      visuals, i, "t", "test")) for i in range(len(counts))]

    batched = lm.generate_until(requests([]))
    lm.batch_size_per_gpu = 1
    assert lm.generate_until(requests([])) == batched
    assert all(batched)
    stop = batched[0][1:]  # the embedded model answers in one word: cut inside it
    cut = lm.generate_until(requests([stop]))
    assert len(stop) >= 1 and cut == [plugin._cut(text, [stop]).strip() for text in batched]
    assert cut[0] == batched[0][:1]

    image = lm.processor.image_token
    assert lm._prompt("what is it?", 1) == plugin.chat_prompt(lm.processor, "what is it?")
    assert [lm._prompt("what is it?", n).count(image) for n in (0, 1, 2)] == [0, 1, 2]
    assert lm._prompt(f"{image} {image} compare them", 2).count(image) == 2  # images already placed by the task
    with pytest.raises(ValueError, match="names 1 images"):
        lm._prompt(f"{image} compare them", 2)
    lm.close()


def test_bad_arguments_fail_before_loading():
    with pytest.raises(ValueError, match="unknown method"):
        plugin.FicocoLlava(pretrained="/nonexistent", method="nope")
    with pytest.raises(ValueError, match="vanilla takes no retain"):
        plugin.FicocoLlava(pretrained="/nonexistent", retain=64)
    with pytest.raises(ValueError, match="bad option"):
        plugin.FicocoLlava(pretrained="/nonexistent", method="ficoco-v", retain=64, not_an_option=1)
    with pytest.raises(ValueError, match="dtype must be"):
        plugin.FicocoLlava(pretrained="/nonexistent", dtype="fp16")


def test_command_line(pope_dir, embedded_checkpoint, tmp_path):
    """The documented command, in a fresh process: ``lmms-eval --model ficoco --model_args ...``."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lmms_eval", "--model", "ficoco",
               "--model_args", f"pretrained={embedded_checkpoint},method=ficoco-v,retain=64,batch_size=3",
               "--include_path", str(pope_dir), "--tasks", TASK, "--device", "cpu",
               "--gen_kwargs", f"max_new_tokens={NEW_TOKENS}", "--output_path", str(out), "--verbosity", "DEBUG"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.rglob("*_results.json")
    results = json.loads(path.read_text())
    assert 0.0 <= results["results"][TASK]["pope_accuracy,none"] <= 1.0
    assert "pope_accuracy" in done.stdout  # the table lmms-eval prints
    assert f"ficoco: {TASK}: 0 of 6 answers (0.0%) cannot be parsed" in done.stdout + done.stderr


def test_video_files_reach_a_qwen_model_as_ficoco_eval_shows_them(embedded_checkpoint, tmp_path):
    """A task whose ``doc_to_visual`` gives video paths (lmms-eval's ``activitynetqa``) runs on the
    Qwen proxy: the frames its processor convention picks, the same answers as ``ficoco eval``'s
    ``answer_batch``, FiCoCo-V attached with a share of each frame's tokens; LLaVA-1.5 refuses it
    in one line naming the families that take video."""
    from ficoco.assets import embedded_model_dir
    from ficoco.evaluation.formats.videos import VideoFile
    from ficoco.evaluation.records import Record
    from ficoco.proxy.scenes import make_split

    from .video_files import scene_video

    scenes = [e for e in make_split("test", 60) if e.family == "existence"][:2]
    paths = [scene_video(tmp_path / f"v_{i}.mp4", scene.image()) for i, scene in enumerate(scenes)]
    lm = plugin.FicocoLlava(pretrained=str(embedded_model_dir("qwen")), method="ficoco-v", retain=0.25, device="cpu",
                            batch_size=2)
    lm.task_dict = {"activitynetqa": {"test": [{"path": str(p)} for p in paths]}}
    requests = [SimpleNamespace(args=(scene.question, {"max_new_tokens": 4}, lambda doc: [doc["path"]], i,
                                      "activitynetqa", "test")) for i, scene in enumerate(scenes)]
    answers = lm.generate_until(requests)
    assert lm.handle is not None and lm.handle.method.name == "ficoco-v"  # attached for the whole run
    records = [Record("activitynetqa", str(i), scene.question, _videos=(VideoFile(p.name, [p.parent]),))
               for i, (scene, p) in enumerate(zip(scenes, paths))]
    assert answers == answer_batch(lm.model, lm.processor, records, 4)  # the method is still attached: same run
    assert all(answers) and lm.unparsed["activitynetqa"] == (0, 2)
    lm.close()

    llava = plugin.FicocoLlava(pretrained=str(embedded_checkpoint), device="cpu")
    llava.task_dict = lm.task_dict
    with pytest.raises(ValueError, match="activitynetqa is a video benchmark and LLaVA-1.5 models take no video"):
        llava.generate_until(requests[:1])
    llava.close()
