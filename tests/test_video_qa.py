"""The video QA benchmarks (TGIF-QA, MSVD-QA, MSRVTT-QA, ActivityNet-QA): readers of the lmms-lab
and Video-LLaVA layouts over videos these tests write, PyAV decoding, each family's frame
sampling, Video-LLaVA's judge protocol (never over the network: the OpenAI judge gets a fake
transport), and ``ficoco eval`` end to end on the Qwen proxy with a judge injected in-process."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pyarrow")

from click.testing import CliRunner  # noqa: E402

from ficoco.cli import main  # noqa: E402
from ficoco.evaluation.formats.videos import VideoFile, VideoInfo  # noqa: E402
from ficoco.evaluation.read import detect_format, read_benchmark  # noqa: E402
from ficoco.evaluation.records import BenchmarkDataError  # noqa: E402
from ficoco.evaluation.runner import judged_rows, load_predictions  # noqa: E402
from ficoco.evaluation.tasks import SCORERS, TASKS  # noqa: E402
from ficoco.evaluation.video_frames import check_takes_video, sample_frames  # noqa: E402
from ficoco.evaluation.video_qa import (  # noqa: E402
    JUDGE_SYSTEM,
    JudgeError,
    OpenAIJudge,
    parse_verdict,
    score_video_qa,
)

from .video_files import colored_video, frame_colors, scene_video, video_llava_files, video_qa_parquet  # noqa: E402

# under pytest-xdist (--dist loadgroup) one worker runs this module: its end-to-end fixture is costly
pytestmark = pytest.mark.xdist_group("video-qa")
VIDEO_TASKS = ("tgif_qa", "msvd_qa", "msrvtt_qa", "activitynetqa")
#: the video folder each benchmark's Video-LLaVA files use, and a file suffix its videos come in
VIDEO_LLAVA_FOLDERS = {"tgif_qa": ("mp4", ".mp4"), "msvd_qa": ("videos", ".avi"), "msrvtt_qa": ("videos/all", ".mp4"),
                       "activitynetqa": ("all_test", ".mkv")}


def exact_judge(question: str, answer: str, prediction: str) -> tuple[bool, float]:
    """An in-process stand-in for the GPT judge (tests only): yes with 5 for the reference answer,
    no with 1 otherwise. ``ficoco eval --judge tests.test_video_qa:exact_judge``."""
    yes = prediction.strip().lower() == answer.strip().lower()
    return yes, 5.0 if yes else 1.0


def test_every_video_task_is_registered_with_its_layouts():
    assert {t for t, spec in TASKS.items() if spec.modality == "video"} == set(VIDEO_TASKS)
    for task in VIDEO_TASKS:
        assert TASKS[task].llava_files == ("test_q.json",) and TASKS[task].video_dirs


# ------------------------------------------------------------------------------------ readers


def _prefix(task: str) -> str:
    return "v_" if task == "activitynetqa" else ""


@pytest.mark.parametrize("task", VIDEO_TASKS)
def test_lmms_lab_parquet_layout(task, tmp_path):
    folder = TASKS[task].video_dirs[0]
    for name in ("a", "b"):
        colored_video(tmp_path / folder / f"{_prefix(task)}clip_{name}.mp4", count=4)
    video_qa_parquet(tmp_path, [
        {"question_id": "q1", "question": "what is the man doing", "answer": "cooking", "video_name": "clip_a",
         "type": 0},
        {"question_id": "q2", "question": "is it raining", "answer": "no", "video_name": "clip_b", "type": 3},
    ])
    assert detect_format(task, tmp_path) == "parquet"
    records = read_benchmark(task, tmp_path)
    assert [r.sample_id for r in records] == ["q1", "q2"]
    if task == "activitynetqa":  # lmms-eval's prompt
        assert records[0].question == "What is the man doing? Answer the question using a single word or phrase."
    else:  # Video-LLaVA's: the question as it is
        assert records[0].question == "what is the man doing"
    assert records[0].meta["raw_question"] == "what is the man doing"
    assert records[0].answer == "cooking" and records[1].answer == "no"
    assert records[0].video().path(task, "q1") == tmp_path / folder / f"{_prefix(task)}clip_a.mp4"
    assert records[0].images() == []
    with pytest.raises(BenchmarkDataError, match="has no image"):
        records[0].image()


@pytest.mark.parametrize("task", VIDEO_TASKS)
def test_video_llava_layout(task, tmp_path):
    folder, suffix = VIDEO_LLAVA_FOLDERS[task]
    colored_video(tmp_path / folder / f"{_prefix(task)}v1{suffix}", count=4)
    colored_video(tmp_path / folder / f"{_prefix(task)}v2.mp4", count=4)
    video_llava_files(tmp_path, [{"video_name": "v1", "question": "what color is it", "question_id": "v1_0"},
                                 {"video_name": "v2", "question": "who is there", "question_id": "v2_1"}],
                      [{"answer": "red", "type": 4, "question_id": "v1_0"},
                       {"answer": "a dog", "type": 5, "question_id": "v2_1"}])
    for path in (tmp_path, tmp_path / "test_q.json"):
        assert detect_format(task, path) == "llava"
        records = read_benchmark(task, path)
        assert [r.sample_id for r in records] == ["v1_0", "v2_1"]
        assert records[0].question == "what color is it"  # Video-LLaVA asks the question verbatim
        assert [r.answer for r in records] == ["red", "a dog"] and records[1].meta["type"] == 5
        assert records[0].video().path(task, "v1_0").name == f"{_prefix(task)}v1{suffix}"
    assert len(read_benchmark(task, tmp_path, limit=1)) == 1


def test_missing_and_misplaced_files_are_named(tmp_path):
    colored_video(tmp_path / "all_test" / "v_there.mp4", count=4)
    video_qa_parquet(tmp_path, [{"question_id": "1", "question": "q", "answer": "a", "video_name": "there"},
                                {"question_id": "2", "question": "q", "answer": "a", "video_name": "gone"}])
    with pytest.raises(BenchmarkDataError, match=r"sample 2: video 'v_gone/gone' not found in .*all_test"):
        read_benchmark("activitynetqa", tmp_path)
    assert len(read_benchmark("activitynetqa", tmp_path, check_images=False)) == 2  # named when read instead
    elsewhere = tmp_path / "extracted"
    colored_video(elsewhere / "v_gone.webm", count=4)
    colored_video(elsewhere / "v_there.mp4", count=4)
    records = read_benchmark("activitynetqa", tmp_path, video_folder=elsewhere)
    assert records[1].video().path("activitynetqa", "2").name == "v_gone.webm"
    with pytest.raises(ValueError, match="video_folder is for video benchmarks"):
        read_benchmark("pope", tmp_path, video_folder=elsewhere)

    qa = tmp_path / "tgif"
    video_llava_files(qa, [{"video_name": "x", "question": "q", "question_id": 1},
                           {"video_name": "y", "question": "q", "question_id": 2}],
                      [{"answer": "a", "question_id": 2}, {"answer": "b", "question_id": 1}])
    with pytest.raises(BenchmarkDataError, match="no video folder"):
        read_benchmark("tgif_qa", qa)
    colored_video(qa / "mp4" / "x.mp4", count=4)
    colored_video(qa / "mp4" / "y.mp4", count=4)
    with pytest.raises(BenchmarkDataError, match="not in the same order"):
        read_benchmark("tgif_qa", qa)


# ----------------------------------------------------------------------------- decoding, frames


def test_pyav_reads_the_frames_asked_for(tmp_path):
    video = VideoFile("clip", [tmp_path])
    colored_video(tmp_path / "clip.mp4", count=16, fps=8)
    info = video.info("t", "0")
    assert info == VideoInfo(frames=16, fps=8.0, width=64, height=64)
    frames = video.read("t", "0", lambda info: [15, 0, 7, 7])
    assert frames.indices == (0, 7, 15) and frames.pixels.shape == (3, 64, 64, 3)
    colors = frame_colors(16)
    for pixels, index in zip(frames.pixels, frames.indices):
        assert max(abs(int(a) - b) for a, b in zip(pixels[32, 32], colors[index])) <= 8
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(BenchmarkDataError, match="broken.mp4 is corrupt or cannot be decoded"):
        VideoFile("broken", [tmp_path]).info("t", "3")


def test_a_header_that_overstates_the_frame_count(tmp_path, monkeypatch):
    colored_video(tmp_path / "clip.mp4", count=16)
    monkeypatch.setattr(VideoFile, "info", lambda self, task, sample_id: VideoInfo(20, 8.0, 64, 64))
    frames = VideoFile("clip", [tmp_path]).read("t", "0", lambda info: sample_frames("video_llava", info))
    assert frames.info.frames == 16 and frames.indices == (0, 2, 4, 6, 8, 10, 12, 15)  # sampled from the 16


def test_frame_rules_of_each_family():
    short, clip, long = VideoInfo(3, 30.0, 64, 64), VideoInfo(16, 8.0, 64, 64), VideoInfo(3000, 30.0, 64, 64)
    # Qwen2-VL / Qwen2.5-VL: 2 per second, at least 4, at most 32 (lmms-eval's cap) and the video's own, even
    assert sample_frames("qwen2_5_vl", clip) == [0, 4, 8, 12]
    assert sample_frames("qwen2_vl", VideoInfo(300, 30.0, 1, 1)) == list(range(0, 300, 15))
    assert len(sample_frames("qwen2_vl", long)) == 32 and len(sample_frames("qwen2_vl", long, max_frames=8)) == 8
    assert sample_frames("qwen2_vl", short) == [0, 1] and sample_frames("qwen2_vl", VideoInfo(1, 1.0, 1, 1)) == [0]
    # Video-LLaVA: 8 frames spread over the whole video, whatever its length
    assert sample_frames("video_llava", clip) == [0, 2, 4, 6, 8, 10, 12, 15]
    with pytest.raises(ValueError, match="LLaVA-1.5 models take no video.*Qwen2-VL / Qwen2.5-VL / Qwen3-VL"):
        sample_frames("llava", clip)
    with pytest.raises(ValueError, match="at least 1"):
        sample_frames("qwen3_vl", clip, max_frames=0)
    check_takes_video("qwen3_vl")


def test_qwen3_rule_is_the_processors_own():
    """Qwen3-VL's sampling equals transformers' ``Qwen3VLVideoProcessor.sample_frames`` (importable
    without torchvision) with the processor's fps and lmms-eval's 32-frame cap."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    settings = SimpleNamespace(fps=2, min_frames=4, max_frames=32)
    for total, fps in ((3, 30.0), (16, 8.0), (75, 25.0), (301, 29.97), (3000, 30.0), (9, 1.0)):
        expected = Qwen3VLVideoProcessor.sample_frames(settings, VideoMetadata(total_num_frames=total, fps=fps))
        assert sample_frames("qwen3_vl", VideoInfo(total, fps, 64, 64)) == expected.tolist(), (total, fps)


def test_qwen2_rule_is_the_processors_own():
    """Where torchvision is installed: Qwen2-VL / Qwen2.5-VL's sampling equals transformers'
    ``Qwen2VLVideoProcessor.sample_frames`` at 2 frames per second, capped at 32."""
    pytest.importorskip("torchvision")
    from types import SimpleNamespace

    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    settings = SimpleNamespace(num_frames=None, fps=2, temporal_patch_size=2, min_frames=4, max_frames=32)
    for total, fps in ((3, 30.0), (16, 8.0), (75, 25.0), (301, 29.97), (3000, 30.0), (9, 1.0)):
        expected = Qwen2VLVideoProcessor.sample_frames(settings, VideoMetadata(total_num_frames=total, fps=fps))
        assert sample_frames("qwen2_vl", VideoInfo(total, fps, 64, 64)) == expected.tolist(), (total, fps)


# ------------------------------------------------------------------------------------- judging


def test_verdicts_are_read_as_both_scripts_read_them():
    assert parse_verdict("{'pred': 'yes', 'score': 4}") == (True, 4.0)
    assert parse_verdict("Sure! {'pred': 'no', 'score': 4.8} done") == (False, 4.0)  # int(), as Video-LLaVA
    assert parse_verdict('{"pred": "Yes.", "score": "3"}') == (True, 3.0)
    for bad in ("yes, 4", "{'pred': 'maybe', 'score': 2}", "{'score': 2}", "{'pred': 'yes', 'score': 'high'}"):
        with pytest.raises(ValueError):
            parse_verdict(bad)


def test_openai_judge_request_retries_and_configuration(monkeypatch):
    calls = []

    def transport(url, headers, payload, timeout):
        calls.append((url, headers, payload))
        if len(calls) == 1:
            raise OSError("connection reset")
        if len(calls) == 2:
            return {"choices": [{"message": {"content": "I think it matches"}}]}
        return {"choices": [{"message": {"content": "{'pred': 'yes', 'score': 5}"}}]}

    judge = OpenAIJudge("sk-test", model="judge-model", base_url="http://judge.invalid/v1/", wait=0,
                        transport=transport)
    assert judge("what is he doing", "cooking", "he cooks") == (True, 5.0)
    url, headers, payload = calls[-1]
    assert url == "http://judge.invalid/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert payload["model"] == "judge-model" and payload["temperature"] == 0 and payload["max_tokens"] == 64
    assert payload["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert ("Question: what is he doing\nCorrect Answer: cooking\nPredicted Answer: he cooks\n\n"
            in payload["messages"][1]["content"])
    assert "{'pred': 'yes', 'score': 4.8}" in payload["messages"][1]["content"]
    failing = OpenAIJudge("k", attempts=2, wait=0, transport=lambda *a: {"choices": []})
    with pytest.raises(JudgeError, match="no verdict after 2 attempts"):
        failing("q", "a", "p")

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIJudge.from_env()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://local.invalid/v1")
    monkeypatch.setenv("FICOCO_JUDGE_MODEL", "local-judge")
    configured = OpenAIJudge.from_env()
    assert configured.url == "http://local.invalid/v1/chat/completions" and configured.name == "openai:local-judge"
    assert OpenAIJudge.from_env(model="other").model == "other"


def test_accuracy_and_mean_score():
    rows = [{"question": "q1", "raw_question": "q1 raw", "answer": "a", "prediction": "a", "type": 3},
            {"question": "q2", "answer": "b", "prediction": "c", "type": 3},
            {"question": "q3", "answer": "c", "prediction": "", "type": 4}]
    asked = []

    def judge(question, answer, prediction):
        asked.append(question)
        return (prediction == answer, 4.9 if prediction == answer else 1.0)

    result = score_video_qa(rows, judge)
    assert asked == ["q1 raw", "q2", "q3"]  # the benchmark's own question, not the model's prompt
    assert result["score"] == result["accuracy"] == pytest.approx(100 / 3)
    assert result["mean_score"] == pytest.approx((4 + 1 + 1) / 3)  # each score truncated to an integer
    assert result["n_yes"] == 1 and result["n_unparsed"] == 1
    assert result["per_type"]["yes/no"]["accuracy"] == 50.0 and result["per_type"]["color"]["n"] == 1
    assert SCORERS["activitynetqa"](rows)["skipped"] is True
    for bad in (lambda *a: (1, 3.0), lambda *a: (True, 7.0), lambda *a: "yes"):
        with pytest.raises(ValueError, match="returns \\(yes: bool, score in \\[0, 5\\]\\)"):
            score_video_qa(rows, bad)


def test_verdicts_are_kept_and_reused(tmp_path):
    rows = [{"sample_id": str(i), "question": f"q{i}", "answer": "a", "prediction": p} for i, p in enumerate("aab")]
    path, asked = tmp_path / "vanilla.judged.jsonl", []

    def judge(question, answer, prediction):
        asked.append(question)
        if len(asked) == 2:
            raise JudgeError("endpoint down")
        return exact_judge(question, answer, prediction)

    with pytest.raises(JudgeError):
        judged_rows(rows, judge, path)
    assert list(load_predictions(path)) == ["0"]  # the verdict given before the failure is kept
    judged = judged_rows(rows, judge, path)
    assert asked == ["q0", "q1", "q1", "q2"]  # sample 0 was not asked again
    assert [r["judge_yes"] for r in judged] == [True, True, False]
    changed = [dict(rows[0], prediction="z")] + rows[1:]
    judged_rows(changed, judge, path)
    assert asked[-1] == "q0"  # a new answer to sample 0 is judged anew


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def four_benchmarks(tmp_path_factory):
    """The four benchmarks over still procedural scenes the Qwen proxy answers about (its own kind
    of question): TGIF-QA and MSRVTT-QA in Video-LLaVA's files, MSVD-QA and ActivityNet-QA in
    lmms-lab's parquet."""
    from ficoco.proxy.scenes import make_split

    root = tmp_path_factory.mktemp("video-qa")
    scenes = [e for e in make_split("test", 60) if e.family == "existence"][:5]
    paths = {}
    for task, chosen in (("tgif_qa", scenes[:1]), ("msrvtt_qa", scenes[1:2])):
        folder, suffix = VIDEO_LLAVA_FOLDERS[task]
        for i, scene in enumerate(chosen):
            scene_video(root / task / folder / f"s{i}{suffix}", scene.image())
        paths[task] = video_llava_files(root / task, [{"video_name": f"s{i}", "question": s.question,
                                                       "question_id": f"{task}_{i}"} for i, s in enumerate(chosen)],
                                        [{"answer": s.answer, "question_id": f"{task}_{i}"}
                                         for i, s in enumerate(chosen)])
    for task, chosen in (("msvd_qa", scenes[2:3]), ("activitynetqa", scenes[3:5])):
        for i, scene in enumerate(chosen):
            scene_video(root / task / TASKS[task].video_dirs[0] / f"{_prefix(task)}s{i}.mp4", scene.image())
        paths[task] = video_qa_parquet(root / task, [
            # ActivityNet-QA's questions have no question mark: lmms-eval's prompt adds it
            {"question_id": f"{task}_{i}", "question": s.question.rstrip("?") if task == "activitynetqa" else s.question,
             "answer": s.answer, "video_name": f"s{i}", "type": 3} for i, s in enumerate(chosen)])
    return paths


def test_ficoco_eval_runs_the_four_benchmarks_on_the_qwen_proxy(four_benchmarks, tmp_path):
    """Vanilla and FiCoCo-V at a quarter of each frame's tokens answer every video through the Qwen
    proxy's processor (frames at 2 per second); the judge scores them; the tables give accuracy
    and mean score per benchmark, with no TFLOPs for videos. A rerun judges nothing again."""
    from ficoco.assets import embedded_model_dir

    args = ["eval", str(embedded_model_dir("qwen")), *[f"--data={t}={four_benchmarks[t]}" for t in VIDEO_TASKS],
            "--methods", "ficoco-v", "--retain", "0.25", "--batch-size", "2", "--no-plot", "--judge",
            "tests.test_video_qa:exact_judge", "--out", str(tmp_path)]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {(r["task"], r["variant"]) for r in results} == {(t, v) for t in VIDEO_TASKS
                                                          for v in ("vanilla", "ficoco-v@0.25")}
    for r in results:
        assert r["llm_tflops"] is None and not r["score"]["skipped"]
        assert 0 <= r["score"]["accuracy"] <= 100 and 0 <= r["score"]["mean_score"] <= 5
    vanilla = {r["task"]: r["score"] for r in results if r["variant"] == "vanilla"}
    assert sum(s["n_yes"] for s in vanilla.values()) >= 3  # the proxy sees the scene in the frames
    assert all(r["unparsed"] == 0 for r in results)
    table = (tmp_path / "results.md").read_text()
    assert "| variant | LLM TFLOPs (mean) | TGIF-QA GPT accuracy | MSVD-QA GPT accuracy |" in table
    assert "accuracy / mean score" in table and "video inputs are not costed" in table
    lines = load_predictions(tmp_path / "activitynetqa" / "vanilla.judged.jsonl")
    assert set(lines) == {"activitynetqa_0", "activitynetqa_1"} and lines["activitynetqa_0"]["judge"] == "exact_judge"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert len((tmp_path / "activitynetqa" / "vanilla.judged.jsonl").read_text().splitlines()) == 2


def test_ficoco_eval_without_a_judge_and_on_llava(four_benchmarks, tmp_path):
    """Without a judge the answers are kept and the benchmark marked unscored; LLaVA-1.5 refuses a
    video benchmark in one line before reading anything."""
    from ficoco.assets import embedded_model_dir

    out = CliRunner().invoke(main, ["eval", str(embedded_model_dir("qwen")), "--data",
                                    f"tgif_qa={four_benchmarks['tgif_qa']}", "--methods", "vanilla", "--frames", "4",
                                    "--no-plot", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "Not scored (no judge configured; predictions kept): TGIF-QA" in out.stdout
    assert len(load_predictions(tmp_path / "tgif_qa" / "vanilla.jsonl")) == 1
    refused = CliRunner().invoke(main, ["eval", "--data", f"msvd_qa={four_benchmarks['msvd_qa']}", "--out",
                                        str(tmp_path / "llava")])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "msvd_qa is a video benchmark and LLaVA-1.5 models take no video" in refused.output
    bad = CliRunner().invoke(main, ["eval", str(embedded_model_dir("qwen")), "--data",
                                    f"tgif_qa={four_benchmarks['tgif_qa']}", "--judge", "nowhere"])
    assert bad.exit_code != 0 and "expected none, openai or MODULE:NAME" in bad.output
