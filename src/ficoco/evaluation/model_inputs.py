"""A batch of benchmark samples as a model's inputs: prompts in its chat template, images or the
frames of a video through its processor. Used by ``ficoco eval`` (:mod:`.runner`) and the
lmms-eval plugin alike, so that both show a model the same pixels.

* **Images**: every image of a sample, in order, placed before the question, each as its own
  image placeholder (lmms-eval's LLaVA and Qwen-VL models do the same with MMMU's several images;
  the question keeps its ``<image i>`` references as text).
* **Videos** (families in :func:`~ficoco.evaluation.video_frames.video_model_types`): the frames
  the family's processor convention picks (:mod:`.video_frames`), decoded with PyAV, placed before
  the question as one video placeholder; Qwen-VL processors get the frames' metadata and
  ``do_sample_frames=False``. The LLaVA video families' processors take one frame count per call
  (:func:`~ficoco.evaluation.video_frames.frame_groups` splits a batch). Any other family is
  refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..adapters.families import QWEN_MODEL_TYPES
from ..prompts import chat_prompt, video_chat_prompt
from .formats.videos import Frames, VideoFile
from .video_frames import check_takes_video, sample_frames

#: pixel inputs cast to the model's dtype (the rest, token ids and grids, stay as they are)
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def read_frames(video: VideoFile, model_type: str, task: str, sample_id: str, max_frames: int | None = None) -> Frames:
    """The frames of ``video`` a ``model_type`` model is shown (``(T, H, W, 3)`` uint8 with their
    indices), in the order the family's rule gives them: a rule that shows a short video's frames
    more than once (LLaVA-OneVision's 32, Video-LLaVA's 8, as decord's ``get_batch`` over
    ``linspace`` indices does in their evaluations) gets each frame as often as it names it."""
    check_takes_video(model_type, task)
    frames = video.read(task, sample_id, lambda info: sample_frames(model_type, info, max_frames))
    wanted = sample_frames(model_type, frames.info, max_frames)  # the info of the frames actually there
    if tuple(wanted) == frames.indices:
        return frames
    position = {index: k for k, index in enumerate(frames.indices)}  # the reader decodes each frame once
    return Frames(frames.pixels[[position[i] for i in wanted]], tuple(wanted), frames.info)


def image_inputs(processor, questions: Sequence[str], images: Sequence[Sequence]) -> dict:
    """Processor outputs for ``questions[i]`` about ``images[i]`` (PIL images, in order), left-padded.
    Every row must hold the same number of images (decoder-side reductions need it)."""
    counts = {len(row) for row in images}
    if len(counts) != 1:
        raise ValueError(f"a batch holds samples with {sorted(counts)} images; batch like samples together")
    prompts = [chat_prompt(processor, q, len(row)) for q, row in zip(questions, images)]
    flat = [image for row in images for image in row]
    return processor(images=flat or None, text=prompts, return_tensors="pt", padding=True)


def video_inputs(processor, model_type: str, questions: Sequence[str], videos: Sequence[Frames]) -> dict:
    """Processor outputs for ``questions[i]`` about the frames ``videos[i]``, left-padded."""
    check_takes_video(model_type)
    prompts = [video_chat_prompt(processor, q) for q in questions]
    pixels = [v.pixels for v in videos]
    if model_type in QWEN_MODEL_TYPES:
        from transformers.video_utils import VideoMetadata

        # the frames are sampled already: the processor keeps them and derives positions / timestamps
        # from where they were in the video
        metadata = [VideoMetadata(total_num_frames=v.info.frames, fps=v.info.fps, width=v.info.width,
                                  height=v.info.height, frames_indices=list(v.indices)) for v in videos]
        return processor(text=prompts, videos=pixels, video_metadata=metadata, do_sample_frames=False,
                         return_tensors="pt", padding=True)
    return processor(text=prompts, videos=pixels, return_tensors="pt", padding=True)


def to_model(batch, model) -> dict:
    """``batch`` on the model's device, its pixel values in the model's dtype."""
    parameter = next(model.parameters())
    out = {k: (v.to(parameter.device) if hasattr(v, "to") else v) for k, v in batch.items()}
    for key in PIXEL_KEYS:
        if key in out:
            out[key] = out[key].to(parameter.dtype)
    return out


def visual_token_ids(processor) -> set[int]:
    """Token ids of the processor's image and video placeholders (what is not text in a prompt)."""
    ids = set()
    for name in ("image_token", "video_token"):
        token = getattr(processor, name, None) or ("<image>" if name == "image_token" else None)
        if token is not None:
            value = processor.tokenizer.convert_tokens_to_ids(token)
            if value is not None and value != processor.tokenizer.unk_token_id:
                ids.add(value)
    return ids
