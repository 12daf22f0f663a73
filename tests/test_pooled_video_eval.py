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
    assert sample_frames("llava_next_video", VideoInfo(961, 30.0, 64, 64)) == np.linspace(0, 960, 32, dtype=int).tolist()
    check_takes_video("llava_onevision")
    check_takes_video("llava_next_video")
    with pytest.raises(ValueError, match="LLaVA-NeXT models take no video; the families ficoco runs on videos: "
                                         "LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL"):
        sample_frames("llava_next", clip)


def test_frame_groups():
    assert frame_groups("llava_next_video", [2, 3, 2, 5]) == [[0, 2], [1], [3]]
    assert frame_groups("llava_onevision", [32, 32]) == [[0, 1]]
    assert frame_groups("qwen2_vl", [4, 6, 8]) == [[0, 1, 2]]  # Qwen-VL packs ragged videos in one call
    assert frame_groups("video_llava", []) == [] and frame_groups("qwen3_vl", []) == []
