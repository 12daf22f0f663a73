"""Video benchmarks on LLaVA-OneVision and LLaVA-NeXT-Video (src/ficoco/pooled_video_processor.py,
src/ficoco/evaluation/video_frames.py): the torch-only video processors give transformers' pixels
and placeholder counts where torchvision exists and hand-computed ones everywhere, the frame
rules pick lmms-eval's frames, and ``ficoco eval`` answers and scores a video benchmark on tiny
checkpoints of both families saved with their processors, refusing a reduction before the LLM in
one line before anything is answered."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ficoco.evaluation.formats.videos import VideoInfo
from ficoco.evaluation.video_frames import check_takes_video, frame_groups, sample_frames
from ficoco.pooled_video_processor import TorchLlavaNextVideoVideoProcessor, TorchLlavaOnevisionVideoProcessor

from .torchvision_pythons import torchvision_pythons

pytest.importorskip("av")
pytestmark = pytest.mark.xdist_group("pooled-video-eval")
ROOT = Path(__file__).resolve().parents[1]
SIGLIP = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
#: llava-hf's checkpoints' video settings, the class defaults, and a crop larger than the resize (padding)
CONFIGS = {
    "onevision-siglip": ("LlavaOnevisionVideoProcessor", SIGLIP),
    "onevision-default": ("LlavaOnevisionVideoProcessor", {}),
    "next-video-336": ("LlavaNextVideoVideoProcessor", {"size": {"shortest_edge": 336},
                                                        "crop_size": {"height": 336, "width": 336}}),
    "next-video-default": ("LlavaNextVideoVideoProcessor", {}),
    "next-video-padded": ("LlavaNextVideoVideoProcessor", {"size": {"shortest_edge": 200},
                                                           "crop_size": {"height": 224, "width": 256}}),
}
SHAPES = [(4, 240, 320), (3, 360, 200), (2, 384, 384), (4, 100, 150)]

COMPARE = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    import transformers
    from ficoco import pooled_video_processor as ours

    configs, shapes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    rng = np.random.default_rng(0)
    gaps = {}
    for name, (cls, settings) in configs.items():
        reference = getattr(transformers, cls)(**settings)
        mine = getattr(ours, "Torch" + cls)(**settings)
        for t, h, w in shapes:
            videos = [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for _ in range(2)]
            ref = reference(videos=videos, return_tensors="pt")["pixel_values_videos"]
            got = mine(videos)["pixel_values_videos"]
            gaps[f"{name} {t}x{h}x{w}"] = [list(ref.shape), list(got.shape), (ref - got).abs().max().item()]
    print(json.dumps(gaps))
''')


def _run(python: str, script: str, *args: str) -> str:
    done = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_same_pixels_as_transformers_video_processors():
    """Both families' preprocessing (OneVision: 384 x 384 whatever the aspect; NeXT-Video: shorter
    side, truncated centre crop, zero padding when the crop is larger) gives transformers' pixels to
    float32 rounding, for landscape, portrait, square and upscaled frames, at the checkpoints'
    settings and at the classes' defaults."""
    pythons = torchvision_pythons()
    if not pythons:
        pytest.skip("no interpreter with torchvision to compare with")
    for python in pythons:
        gaps = json.loads(_run(python, COMPARE, json.dumps(CONFIGS), json.dumps(SHAPES)))
        assert len(gaps) == len(CONFIGS) * len(SHAPES)
        for key, (ref, got, gap) in gaps.items():
            assert ref == got, (python, key)
            assert gap < 1e-5, (python, key, gap)
        assert gaps["onevision-siglip 3x360x200"][0] == [2, 3, 3, 384, 384]
        assert gaps["next-video-336 3x360x200"][0] == [2, 3, 3, 336, 336]
        assert gaps["next-video-padded 4x100x150"][0] == [2, 4, 3, 224, 256]


def test_onevision_preprocessing_by_hand():
    """A flat frame stays flat through the antialiased resize, so its pixels are the normalised
    colour itself; a textured one is the bicubic resize to 384 x 384, normalised."""
    flat = np.ascontiguousarray(np.broadcast_to(np.array([10, 128, 250], np.uint8), (2, 50, 70, 3)))
    out = TorchLlavaOnevisionVideoProcessor(**SIGLIP)([flat])["pixel_values_videos"]
    assert out.shape == (1, 2, 3, 384, 384)
    for channel, value in enumerate((10, 128, 250)):
        assert torch.allclose(out[0, :, channel], torch.tensor((value / 255 - 0.5) / 0.5), atol=1e-6)
    video = np.random.default_rng(2).integers(0, 256, (2, 90, 160, 3), dtype=np.uint8)
    out = TorchLlavaOnevisionVideoProcessor()([video])["pixel_values_videos"][0]
    resized = torch.nn.functional.interpolate(torch.from_numpy(video).permute(0, 3, 1, 2), size=(384, 384),
                                              mode="bicubic", antialias=True).float()
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(out[1, 2, 7, 300], (resized[1, 2, 7, 300] / 255 - mean[2]) / std[2], atol=1e-5, rtol=0)


def test_next_video_preprocessing_by_hand():
    """A portrait video at 336: resized to 604 x 336 (``int(336 * 360 / 200)``), rows 134..469
    kept (``int(268 / 2)``); a crop larger than the frame pads it with zeros around it."""
    video = np.random.default_rng(1).integers(0, 256, (3, 360, 200, 3), dtype=np.uint8)
    processor = TorchLlavaNextVideoVideoProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    out = processor([video, video])["pixel_values_videos"]
    assert out.shape == (2, 3, 3, 336, 336) and torch.equal(out[0], out[1])
    resized = torch.nn.functional.interpolate(torch.from_numpy(video).permute(0, 3, 1, 2), size=(604, 336),
                                              mode="bicubic", antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(out[0], (resized[:, :, 134:470].float() / 255 - mean) / std, atol=1e-5, rtol=0)
    square = np.full((1, 224, 224, 3), 255, np.uint8)
    padded = TorchLlavaNextVideoVideoProcessor(crop_size={"height": 230, "width": 240})([square])
    frame = padded["pixel_values_videos"][0, 0]
    assert frame.shape == (3, 230, 240)
    zero = (-mean / std).view(3)  # a padded pixel: black, normalised
    torch.testing.assert_close(frame[:, 0, 0], zero, atol=1e-6, rtol=0)  # 3 rows and 8 columns before
    torch.testing.assert_close(frame[:, 2, 100], zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(frame[:, 3, 8], ((1 - mean) / std).view(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(frame[:, 100, 7], zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(frame[:, 226, 231], ((1 - mean) / std).view(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(frame[:, 227, 232], zero, atol=1e-6, rtol=0)  # 3 rows and 8 columns after


def test_processors_refuse_what_they_cannot_do_in_one_line():
    video = np.zeros((3, 64, 64, 3), np.uint8)
    for make, family in ((TorchLlavaOnevisionVideoProcessor, "LLaVA-OneVision"),
                         (TorchLlavaNextVideoVideoProcessor, "LLaVA-NeXT-Video")):
        with pytest.raises(ValueError, match=f"{family}'s videos in one call must have as many frames each; "
                                             r"got \[3, 2\]"):
            make()([video, video[:2]])
        with pytest.raises(ValueError, match="frames are sampled before"):
            make()([video], do_sample_frames=True)
    with pytest.raises(ValueError, match="resample=1 is not supported without torchvision: 2 .bilinear. or 3"):
        TorchLlavaOnevisionVideoProcessor(resample=1)
    with pytest.raises(ValueError, match="size=.'longest_edge': 9. is not supported without torchvision"):
        TorchLlavaNextVideoVideoProcessor(size={"longest_edge": 9})
    with pytest.raises(TypeError, match="has no setting fps"):
        TorchLlavaNextVideoVideoProcessor(fps=2)


# ------------------------------------------------------------------------------- frame rules


def test_frame_rules():
    """OneVision: 32 frames by ``linspace(0, total - 1, 32)`` truncated, short videos repeating
    frames; NeXT-Video: one a second (every ``round(fps)``-th frame), 32 by ``linspace`` when that
    is more; ``max_frames`` replaces the 32 for both."""
    clip, long = VideoInfo(16, 8.0, 64, 64), VideoInfo(3000, 30.0, 64, 64)
    assert sample_frames("llava_onevision", clip) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9,
                                                      10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15]
    assert sample_frames("llava_onevision", long) == np.linspace(0, 2999, 32, dtype=int).tolist()
    assert sample_frames("llava_onevision", long)[:3] == [0, 96, 193]
    assert sample_frames("llava_onevision", long, max_frames=4) == [0, 999, 1999, 2999]
    assert sample_frames("llava_next_video", clip) == [0, 8]
    assert sample_frames("llava_next_video", VideoInfo(100, 29.97, 64, 64)) == [0, 30, 60, 90]
    assert sample_frames("llava_next_video", VideoInfo(100, 29.97, 64, 64), max_frames=3) == [0, 49, 99]
    assert sample_frames("llava_next_video", VideoInfo(5, 0.4, 64, 64)) == [0, 1, 2, 3, 4]  # under 1 fps: all
    assert sample_frames("llava_next_video", long) == np.linspace(0, 2999, 32, dtype=int).tolist()
    assert sample_frames("llava_next_video", VideoInfo(960, 30.0, 64, 64)) == list(range(0, 960, 30))  # 32: kept
    over = np.linspace(0, 960, 32, dtype=int).tolist()
    assert sample_frames("llava_next_video", VideoInfo(961, 30.0, 64, 64)) == over  # 33 a second: 32 spread
    check_takes_video("llava_onevision")
    check_takes_video("llava_next_video")
    with pytest.raises(ValueError, match="LLaVA-NeXT models take no video; the families ficoco runs on videos: "
                                         "LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL"):
        sample_frames("llava_next", clip)


def test_read_frames_repeats_what_the_rule_repeats(tmp_path):
    """A 12-frame clip shows LLaVA-OneVision 32 frames (each decoded once, repeated as
    ``linspace`` names them) and Video-LLaVA a 5-frame clip 8; LLaVA-NeXT-Video its 2 seconds."""
    from ficoco.evaluation.formats.videos import VideoFile
    from ficoco.evaluation.model_inputs import read_frames

    from .video_files import colored_video

    colored_video(tmp_path / "clip.mp4", count=12, fps=8)
    colored_video(tmp_path / "short.mp4", count=5, fps=8)
    frames = read_frames(VideoFile("clip", [tmp_path]), "llava_onevision", "tgif_qa", "0")
    assert frames.indices == tuple(np.linspace(0, 11, 32, dtype=int)) and frames.pixels.shape == (32, 64, 64, 3)
    assert frames.indices[:4] == (0, 0, 0, 1)
    assert np.array_equal(frames.pixels[0], frames.pixels[2]) and not np.array_equal(frames.pixels[0], frames.pixels[3])
    assert read_frames(VideoFile("clip", [tmp_path]), "llava_onevision", "t", "0", max_frames=3).indices == (0, 5, 11)
    short = read_frames(VideoFile("short", [tmp_path]), "video_llava", "tgif_qa", "0")
    assert short.indices == (0, 0, 1, 1, 2, 2, 3, 4) and short.pixels.shape[0] == 8
    assert read_frames(VideoFile("clip", [tmp_path]), "llava_next_video", "tgif_qa", "0").indices == (0, 8)


def test_frame_groups():
    assert frame_groups("llava_next_video", [2, 3, 2, 5]) == [[0, 2], [1], [3]]
    assert frame_groups("llava_onevision", [32, 32]) == [[0, 1]]
    assert frame_groups("qwen2_vl", [4, 6, 8]) == [[0, 1, 2]]  # Qwen-VL packs ragged videos in one call
    assert frame_groups("video_llava", []) == [] and frame_groups("qwen3_vl", []) == []


# ------------------------------------------------------------------------------- checkpoints and ficoco eval

CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() }}: {% for part in message['content'] %}"
                 "{% if part['type'] == 'video' %}<video>\n{% elif part['type'] == 'image' %}<image>\n"
                 "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _tokenizer():
    """The LLaVA proxy's tokenizer with a ``<video>`` token."""
    from transformers import AutoTokenizer

    from ficoco.assets import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("llava"))
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    return tokenizer


def _with_tokens(config, tokenizer):
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_index = config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_index = config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    for name in ("pad", "bos", "eos"):
        setattr(config.text_config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    return config


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """A tiny LLaVA-OneVision (SigLIP-384/14's 27 x 27 patches, its tower depth, frames pooled to
    14 x 14) saved with the torch-only processor at llava-hf's settings."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from ficoco.pooled_video_processor import save_torch_llava_onevision_processor, torch_llava_onevision_processor
    from ficoco.testing import tiny_llava_onevision_config, tiny_llava_onevision_image_processor

    folder = tmp_path_factory.mktemp("onevision")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(_with_tokens(tiny_llava_onevision_config(llm_layers=4), tokenizer))
    model.eval().save_pretrained(folder)
    processor = torch_llava_onevision_processor(
        tiny_llava_onevision_image_processor(), tokenizer, CHAT_TEMPLATE,
        TorchLlavaOnevisionVideoProcessor(**SIGLIP), num_image_tokens=729, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9")
    save_torch_llava_onevision_processor(processor, folder)
    return folder


@pytest.fixture(scope="module")
def next_video(tmp_path_factory):
    """A tiny LLaVA-NeXT-Video (CLIP-336/14's 24 x 24 patches, frames pooled 2 x 2 to 12 x 12)
    saved with the torch-only processor at LLaVA-NeXT-Video-7B's settings (336 px)."""
    from transformers import LlavaNextVideoForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ficoco.pooled_video_processor import save_torch_llava_next_video_processor, torch_llava_next_video_processor
    from ficoco.testing import LLAVA_NEXT_PINPOINTS, tiny_llava_next_video_config

    folder = tmp_path_factory.mktemp("next-video")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(_with_tokens(tiny_llava_next_video_config(llm_layers=4),
                                                                tokenizer))
    model.eval().save_pretrained(folder)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS])
    videos = TorchLlavaNextVideoVideoProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = torch_llava_next_video_processor(images, tokenizer, CHAT_TEMPLATE, videos, patch_size=14,
                                                 vision_feature_select_strategy="default",
                                                 num_additional_image_tokens=1)
    save_torch_llava_next_video_processor(processor, folder)
    return folder


#: per family: the fixture, the video processor class, pixels per frame side, placeholders of T frames
FAMILIES = {"onevision": ("onevision", TorchLlavaOnevisionVideoProcessor, 384, lambda t: t * 196 + 1),
            "next_video": ("next_video", TorchLlavaNextVideoVideoProcessor, 336, lambda t: t * 144)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_processor_loads_and_counts_every_frame(family, request):
    """``load_processor`` on the saved folder: the torch-only video processor without torchvision,
    the checkpoint's settings, and transformers' own placeholder counts (OneVision: 196 a frame and
    one newline; NeXT-Video: 144 a frame), which the model's video features fill."""
    from ficoco.checkpoint import load_model, load_processor
    from ficoco.prompts import video_chat_prompt

    name, video_class, side, placeholders = FAMILIES[family]
    folder = request.getfixturevalue(name)
    processor = load_processor(folder)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert type(processor.video_processor) is video_class
        saved = processor.video_processor.to_dict()
        assert saved["size"] == ({"height": 384, "width": 384} if family == "onevision" else {"shortest_edge": 336})
        assert saved["image_mean"] == ([0.5] * 3 if family == "onevision" else [0.48145466, 0.4578275, 0.40821073])
    prompt = video_chat_prompt(processor, "what color is it")
    assert prompt.startswith("USER: <video>\n")
    video = np.random.default_rng(0).integers(0, 256, (3, 96, 128, 3), dtype=np.uint8)
    batch = processor(text=[prompt, prompt], videos=[video, video], return_tensors="pt", padding=True)
    assert batch["pixel_values_videos"].shape == (2, 3, 3, side, side)
    counts = (batch["input_ids"] == processor.video_token_id).sum(dim=1).tolist()
    assert counts == [placeholders(3)] * 2
    model = load_model(folder)
    with torch.inference_mode():  # transformers checks that the features fill the placeholders exactly
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


FULL_COMPARE = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from transformers import AutoProcessor
    from ficoco.checkpoint import load_processor_without_torchvision
    from ficoco.prompts import video_chat_prompt

    out = {}
    for model_type, folder in json.loads(sys.argv[1]).items():
        reference = AutoProcessor.from_pretrained(folder, local_files_only=True)
        mine = load_processor_without_torchvision(folder, model_type)
        rng = np.random.default_rng(0)
        videos = [rng.integers(0, 256, (3, 90, 120, 3), dtype=np.uint8) for _ in range(2)]
        prompts = [video_chat_prompt(reference, "what is it"), video_chat_prompt(reference, "is it red")]
        ref = reference(text=prompts, videos=videos, return_tensors="pt", padding=True)
        got = mine(text=prompts, videos=videos, return_tensors="pt", padding=True)
        out[model_type] = [type(reference.video_processor).__name__, type(mine.video_processor).__name__,
                           torch.equal(ref["input_ids"], got["input_ids"]),
                           (ref["pixel_values_videos"] - got["pixel_values_videos"]).abs().max().item()]
    print(json.dumps(out))
''')


def test_saved_processors_are_transformers_own_where_torchvision_exists(onevision, next_video):
    """Where torchvision is installed, ``AutoProcessor`` loads the saved folders as transformers'
    own processors (with their torchvision video processors), and ficoco's torch-only ones built
    from the same folders give the same token ids and pixels."""
    pythons = torchvision_pythons()
    if not pythons:
        pytest.skip("no interpreter with torchvision to compare with")
    folders = {"llava_onevision": str(onevision), "llava_next_video": str(next_video)}
    for python in pythons:
        out = json.loads(_run(python, FULL_COMPARE, json.dumps(folders)))
        assert out["llava_onevision"][:3] == ["LlavaOnevisionVideoProcessor", "TorchLlavaOnevisionVideoProcessor", True]
        assert out["llava_next_video"][:3] == ["LlavaNextVideoVideoProcessor", "TorchLlavaNextVideoVideoProcessor",
                                               True]
        assert out["llava_onevision"][3] < 1e-5 and out["llava_next_video"][3] < 1e-5, (python, out)


@pytest.fixture(scope="module")
def tgif(tmp_path_factory):
    """TGIF-QA in Video-LLaVA's files: a 1.5 s and a 3 s clip at 8 fps (LLaVA-NeXT-Video is shown 2
    and 3 frames of them, one a second, so one batch takes two calls; LLaVA-OneVision 32 of each,
    the short one's repeated)."""
    from .video_files import colored_video, video_llava_files

    data = tmp_path_factory.mktemp("tgif")
    for name, count in (("a", 12), ("b", 24)):
        colored_video(data / "mp4" / f"{name}.mp4", count=count, fps=8)
    return video_llava_files(data, [{"video_name": n, "question": "what color is it", "question_id": f"q{n}"}
                                    for n in "ab"], [{"answer": "red", "question_id": f"q{n}"} for n in "ab"])


def _eval(folder, data, out, *methods: str):
    from click.testing import CliRunner

    from ficoco.cli import main

    return CliRunner().invoke(main, ["eval", str(folder), f"--data=tgif_qa={data}", "--methods", ",".join(methods),
                                     "--retain", "64", "--batch-size", "2", "--no-plot", "--judge",
                                     "tests.test_video_qa:exact_judge", "--out", str(out)])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ficoco_eval_answers_a_video_benchmark(family, request, tgif, tmp_path):
    """Vanilla and FastV at 64 tokens a frame answer both videos of one batch (NeXT-Video's two
    frame counts in two calls), judged in-process; the model is random, so the run, the records
    and the judge's bookkeeping are checked. A reduction before the LLM (FiCoCo-V) is refused in
    one line before any answer is written."""
    from ficoco.evaluation.runner import load_predictions

    folder = request.getfixturevalue(FAMILIES[family][0])
    result = _eval(folder, tgif, tmp_path / "ok", "fastv")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "ok" / "results.json").read_text())["results"]
    assert {(r["task"], r["variant"]) for r in rows} == {("tgif_qa", "vanilla"), ("tgif_qa", "fastv@64")}
    for row in rows:
        assert row["llm_tflops"] is None and row["score"]["n"] == 2 and not row["score"]["skipped"]
        assert 0 <= row["score"]["accuracy"] <= 100 and 1 <= row["score"]["mean_score"] <= 5
    for label in ("vanilla", "fastv@64"):
        predictions = load_predictions(tmp_path / "ok" / "tgif_qa" / f"{label}.jsonl")
        assert set(predictions) == {"qa", "qb"} and all(p["answer"] == "red" for p in predictions.values())
        assert len(load_predictions(tmp_path / "ok" / "tgif_qa" / f"{label}.judged.jsonl")) == 2
    refused = _eval(folder, tgif, tmp_path / "refused", "ficoco-v")
    name = "LLaVA-OneVision" if family == "onevision" else "LLaVA-NeXT-Video"
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    errors = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"Error: tgif_qa is a video benchmark: ficoco-v reduces before the LLM, which {name}'s videos do not take")
    assert refused.output.rstrip().endswith("on videos use a decoder-side method")  # nothing after the line
    assert not list((tmp_path / "refused").rglob("*.jsonl"))  # refused before vanilla answered anything
