"""Qwen-VL video inputs without torchvision (:mod:`ficoco.qwen_video`): the same patches as the
image processor for a still video, the processors' resize rules, the processor's own token
expansion, M-RoPE timing and Qwen3-VL timestamps from the frames' metadata, and (where torchvision
is installed) the same tensors as transformers' own video processors."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ficoco.checkpoint import load_processor
from ficoco.qwen_processor import image_only_processor
from ficoco.qwen_video import GENERATION_DEFAULTS, TorchQwenVideoProcessor, frame_size
from ficoco.testing import qwen_image_processor

from .torchvision_pythons import torchvision_pythons


def _still(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((size, size, 3)) * 255).astype(np.uint8)


def _processor(generation: str, **settings) -> TorchQwenVideoProcessor:
    return TorchQwenVideoProcessor(**{**GENERATION_DEFAULTS[generation], **settings})


@pytest.mark.parametrize("generation", ["qwen2_5_vl", "qwen3_vl"])
def test_a_still_video_gives_the_image_processors_patches(generation):
    """Two copies of a frame already at a valid size are one temporal patch holding the image, as
    the image processor builds it (it repeats an image over the temporal patch)."""
    unit = 2 * GENERATION_DEFAULTS[generation]["patch_size"]
    frame = _still(8 * unit)
    image = qwen_image_processor(generation)(images=[Image.fromarray(frame)], return_tensors="pt")
    video = _processor(generation, shortest_edge=(2 * unit) ** 2, longest_edge=(32 * unit) ** 2,
                       image_mean=qwen_image_processor(generation).image_mean,
                       image_std=qwen_image_processor(generation).image_std)([np.stack([frame, frame])])
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist() == [[1, 16, 16]]
    torch.testing.assert_close(video["pixel_values_videos"], image["pixel_values"], rtol=0, atol=1e-5)


def test_resize_rules_are_the_processors():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_resize
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_resize

    for frames, height, width in ((4, 64, 64), (8, 360, 640), (32, 720, 1280), (2, 30, 500), (16, 1080, 1920)):
        for low, high in ((128 * 28 * 28, 28 * 28 * 768), (4096, 25165824), (3136, 12845056)):
            assert frame_size(frames, height, width, factor=28, shortest_edge=low, longest_edge=high) == \
                qwen2_resize(height, width, factor=28, min_pixels=low, max_pixels=high)
            assert frame_size(frames, height, width, factor=32, shortest_edge=low, longest_edge=high,
                              per_video_area=True) == \
                qwen3_resize(frames, height, width, factor=32, min_pixels=low, max_pixels=high)


def test_frames_are_resized_padded_and_patched():
    processor = _processor("qwen2_vl")
    out = processor([np.stack([_still(64, s) for s in range(3)])], return_metadata=True)
    h, w = frame_size(3, 64, 64, factor=28, **processor.size)
    assert out["video_grid_thw"].tolist() == [[2, h // 14, w // 14]]  # 3 frames padded to 4
    assert out["pixel_values_videos"].shape == (2 * (h // 14) * (w // 14), 3 * 2 * 14 * 14)
    assert out["video_metadata"][0].total_num_frames == 3
    with pytest.raises(ValueError, match="frames are sampled before"):
        processor([np.stack([_still(64)] * 2)], do_sample_frames=True)


def test_saved_video_settings_are_read_where_transformers_reads_them(tmp_path):
    """``processor_config.json``'s ``video_processor`` entry first, then
    ``video_preprocessor_config.json``, then the image processor's ``preprocessor_config.json``."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 111}}))
    assert TorchQwenVideoProcessor.from_folder(tmp_path, "qwen2_vl").size["shortest_edge"] == 111
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 222}}))
    assert TorchQwenVideoProcessor.from_folder(tmp_path, "qwen2_vl").size["shortest_edge"] == 222
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"max_pixels": 333}}))
    loaded = TorchQwenVideoProcessor.from_folder(tmp_path, "qwen2_vl")
    assert loaded.size["longest_edge"] == 333
    assert loaded.size["shortest_edge"] == GENERATION_DEFAULTS["qwen2_vl"]["shortest_edge"]


def test_the_qwen_proxy_processor_takes_videos_without_torchvision():
    """The processor ``load_processor`` gives the shipped Qwen2.5-VL proxy expands one video
    placeholder per LLM token and times the temporal patches by where the frames were."""
    from transformers.video_utils import VideoMetadata

    from ficoco.assets import embedded_model_dir

    processor = load_processor(embedded_model_dir("qwen"))
    if not isinstance(processor.video_processor, TorchQwenVideoProcessor):
        pytest.skip("torchvision is installed: the processor has transformers' own video processor")
    frames = np.stack([_still(64, s) for s in range(4)])
    metadata = VideoMetadata(total_num_frames=16, fps=8.0, frames_indices=[0, 4, 8, 12])
    out = processor(text=["user : <|vision_start|><|video_pad|><|vision_end|> what color ? assistant :"],
                    videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    t, h, w = out["video_grid_thw"][0].tolist()
    assert (t, h, w) == (2, 16, 16)  # the proxy's bounds: 64 px frames grow to 224 px
    assert int((out["input_ids"] == processor.video_token_id).sum()) == t * h * w // 4
    assert out["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per patch, sampled at 2 per second


def test_qwen3_processor_writes_frame_timestamps():
    from transformers.video_utils import VideoMetadata

    from ficoco.proxy.model import word_level_tokenizer
    from ficoco.proxy.qwen import CHAT_TEMPLATE, VISUAL_TOKENS

    tokenizer = word_level_tokenizer(["what", "seconds"], VISUAL_TOKENS)
    processor = image_only_processor("qwen3_vl", qwen_image_processor("qwen3_vl"), tokenizer, CHAT_TEMPLATE,
                                     _processor("qwen3_vl", shortest_edge=64 * 64, longest_edge=4 * 128 * 128))
    metadata = VideoMetadata(total_num_frames=40, fps=10.0, frames_indices=[0, 10, 20, 30])
    out = processor(text=["<|vision_start|><|video_pad|><|vision_end|> what"], videos=[np.stack([_still(64)] * 4)],
                    video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    t, h, w = out["video_grid_thw"][0].tolist()
    is_video = (out["input_ids"][0] == processor.video_token_id).int()
    runs = int((is_video[1:] > is_video[:-1]).sum()) + int(is_video[0])
    assert t == 2 and runs == t  # a run of placeholders per temporal patch, each after its timestamp
    assert int((out["input_ids"] == tokenizer.convert_tokens_to_ids("seconds")).sum()) == t
    assert int(is_video.sum()) == t * h * w // 4


COMPARE_QWEN = textwrap.dedent('''
    import json, sys
    import numpy as np, torch, transformers
    from ficoco.qwen_video import GENERATION_DEFAULTS, TorchQwenVideoProcessor

    generation = sys.argv[1]
    cls = getattr(transformers, {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor"}[generation])
    theirs = cls()
    ours = TorchQwenVideoProcessor(**{**GENERATION_DEFAULTS[generation], "shortest_edge": theirs.size["shortest_edge"],
                                      "longest_edge": theirs.size["longest_edge"], "image_mean": theirs.image_mean,
                                      "image_std": theirs.image_std})
    frames = (np.random.default_rng(0).random((6, 360, 640, 3)) * 255).astype(np.uint8)
    expected = theirs(videos=[frames], do_sample_frames=False, return_tensors="pt")
    got = ours([frames])
    gap = (got["pixel_values_videos"] - expected["pixel_values_videos"]).abs().max().item()
    print(json.dumps([got["video_grid_thw"].tolist(), expected["video_grid_thw"].tolist(), gap]))
''')


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen3_vl"])
def test_same_tensors_as_transformers_video_processors(generation):
    """Where torchvision is installed (this interpreter, or the vLLM environment's): transformers'
    own video processor gives the same grid and pixel values for the same sampled frames
    (resized: 360 x 640 frames); only the order of the rescale and normalisation arithmetic differs."""
    pythons = torchvision_pythons()
    if not pythons:
        pytest.skip("no interpreter with torchvision to compare with")
    for python in pythons:
        done = subprocess.run([python, "-c", COMPARE_QWEN, generation], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src")))
        assert done.returncode == 0, done.stderr[-2000:]
        got, expected, gap = json.loads(done.stdout.strip().splitlines()[-1])
        assert got == expected and gap <= 1e-5, (python, gap)


def test_the_proxy_processor_is_the_same_with_or_without_torchvision():
    """Where torchvision is installed: the Qwen proxy's ``AutoProcessor`` (transformers' video
    processor) and ficoco's torchvision-free one give the same inputs for the same frames."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from ficoco.assets import embedded_model_dir
    from ficoco.qwen_processor import load_image_only_processor

    folder = embedded_model_dir("qwen")
    frames = np.stack([_still(90, s) for s in range(6)])
    text = ["user : <|vision_start|><|video_pad|><|vision_end|> what color ? assistant :"]
    metadata = [VideoMetadata(total_num_frames=30, fps=10.0, frames_indices=[0, 5, 10, 15, 20, 25])]
    outputs = [p(text=text, videos=[frames], video_metadata=metadata, do_sample_frames=False, return_tensors="pt")
               for p in (AutoProcessor.from_pretrained(folder), load_image_only_processor(folder, "qwen2_5_vl"))]
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:
        torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=0, atol=1e-5, msg=key)
