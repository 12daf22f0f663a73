"""Video-LLaVA's processor without torchvision (src/ficoco/video_llava_processor.py): the same
pixels as transformers' ``VideoLlavaVideoProcessor`` where torchvision exists, a checkpoint saved
and loaded with it, and ``ficoco eval`` answering a video benchmark on a Video-LLaVA checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ficoco.video_llava_processor import TorchVideoLlavaVideoProcessor

from .torchvision_pythons import torchvision_pythons

pytest.importorskip("av")
pytestmark = pytest.mark.xdist_group("video-llava-eval")
ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(8, 240, 320), (8, 360, 200), (4, 224, 224), (8, 100, 150)]

COMPARE = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from transformers import VideoLlavaVideoProcessor
    from ficoco.video_llava_processor import TorchVideoLlavaVideoProcessor

    rng = np.random.default_rng(0)
    gaps = []
    for t, h, w in json.loads(sys.argv[1]):
        videos = [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for _ in range(2)]
        ref = VideoLlavaVideoProcessor()(videos=videos, return_tensors="pt")["pixel_values_videos"]
        ours = TorchVideoLlavaVideoProcessor()(videos)["pixel_values_videos"]
        gaps.append([list(ref.shape), list(ours.shape), (ref - ours).abs().max().item()])
    print(json.dumps(gaps))
''')


def test_the_same_pixels_as_transformers_video_processor():
    """Resize (shorter side 224, antialiased bicubic on uint8), truncated centre crop and the fused
    normalisation give transformers' pixels to float32 rounding, for landscape, portrait, square
    and upscaled frames."""
    pythons = torchvision_pythons()
    if not pythons:
        pytest.skip("no interpreter with torchvision to compare with")
    for python in pythons:
        done = subprocess.run([python, "-c", COMPARE, json.dumps(SHAPES)], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        assert done.returncode == 0, done.stderr[-2000:]
        for (t, _, _), (ref, ours, gap) in zip(SHAPES, json.loads(done.stdout.strip().splitlines()[-1])):
            assert ref == ours == [2, t, 3, 224, 224]
            assert gap < 1e-5, (python, t, gap)


def test_preprocessing_by_hand():
    """A portrait video: resized to 403 x 224, rows 89..312 kept (``int(179 / 2)``), CLIP-normalised."""
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (3, 360, 200, 3), dtype=np.uint8)
    out = TorchVideoLlavaVideoProcessor()([video, video])["pixel_values_videos"]
    assert out.shape == (2, 3, 3, 224, 224) and torch.equal(out[0], out[1])
    frames = torch.from_numpy(video).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(frames, size=(403, 224), mode="bicubic", antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    expected = (resized[:, :, 89:313].float() / 255 - mean) / std
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must have as many frames each; got \\[3, 2\\]"):
        TorchVideoLlavaVideoProcessor()([video, video[:2]])
    with pytest.raises(ValueError, match="frames are sampled before"):
        TorchVideoLlavaVideoProcessor()([video], do_sample_frames=True)


CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() }}: {% for part in message['content'] %}"
                 "{% if part['type'] == 'video' %}<video>\n{% elif part['type'] == 'image' %}<image>\n"
                 "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Video-LLaVA (its real tower and frame geometry) with the LLaVA proxy's tokenizer plus
    a ``<video>`` token, saved with the torch-only processor."""
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    from ficoco.assets import embedded_model_dir
    from ficoco.testing import tiny_video_llava_config
    from ficoco.video_llava_processor import save_torch_video_llava_processor, torch_video_llava_processor

    folder = tmp_path_factory.mktemp("video-llava")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("llava"))
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    config = tiny_video_llava_config(llm_layers=2)
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_index = config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_index = config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    for name in ("pad", "bos", "eos"):
        setattr(config.text_config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    torch.manual_seed(0)
    VideoLlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor = torch_video_llava_processor(VideoLlavaImageProcessor(), tokenizer, CHAT_TEMPLATE, patch_size=14,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    save_torch_video_llava_processor(processor, folder)
    return folder


def test_the_checkpoint_loads_its_processor_and_counts_every_frame(checkpoint):
    from ficoco.checkpoint import load_processor
    from ficoco.prompts import video_chat_prompt

    processor = load_processor(checkpoint)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert isinstance(processor.video_processor, TorchVideoLlavaVideoProcessor)
    prompt = video_chat_prompt(processor, "what color is it")
    assert prompt.startswith("USER: <video>\n")
    video = np.random.default_rng(0).integers(0, 256, (8, 96, 128, 3), dtype=np.uint8)
    batch = processor(text=[prompt], videos=[video], return_tensors="pt", padding=True)
    assert batch["pixel_values_videos"].shape == (1, 8, 3, 224, 224)
    assert int((batch["input_ids"] == processor.video_token_id).sum()) == 8 * 257  # each frame's [CLS] + 256


def test_ficoco_eval_answers_a_video_benchmark_on_video_llava(checkpoint, tmp_path):
    """TGIF-QA in Video-LLaVA's files through ``ficoco eval``: 8 frames per video, vanilla and
    FiCoCo-V at 64 tokens per frame, judged in-process; the model is random, so only the run, the
    records and the judge's bookkeeping are checked."""
    from click.testing import CliRunner

    from ficoco.cli import main

    from .video_files import colored_video, video_llava_files

    data = tmp_path / "tgif"
    for name in ("a", "b"):
        colored_video(data / "mp4" / f"{name}.mp4", count=12)
    video_llava_files(data, [{"video_name": n, "question": "what color is it", "question_id": f"q{n}"} for n in "ab"],
                      [{"answer": "red", "question_id": f"q{n}"} for n in "ab"])
    out = tmp_path / "out"
    args = ["eval", str(checkpoint), f"--data=tgif_qa={data}", "--methods", "ficoco-v", "--retain", "64",
            "--batch-size", "2", "--no-plot", "--judge", "tests.test_video_qa:exact_judge",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {(r["task"], r["variant"]) for r in rows} == {("tgif_qa", "vanilla"), ("tgif_qa", "ficoco-v@64")}
    for row in rows:
        assert row["llm_tflops"] is None and row["score"]["n"] == 2 and not row["score"]["skipped"]
    judged = (out / "tgif_qa" / "vanilla.judged.jsonl").read_text().splitlines()
    assert len(judged) == 2
