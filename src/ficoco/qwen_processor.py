"""Qwen-VL processors on machines without torchvision.

transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors refuse to be built (or loaded with
``AutoProcessor``) without a video processor, and every Qwen video processor needs torchvision.
Images alone need neither: the PIL image processor and the tokenizer do all the work. Here the
processor class of each generation is used as it is, with its video processor replaced by
ficoco's torch-only one (:class:`~ficoco.qwen_video.TorchQwenVideoProcessor`, for frames already
sampled) or left out; without one, asking for videos fails with one line saying torchvision is
needed. ``checkpoint.load_processor`` falls back to it only when torchvision is missing (with the
torch-only video processor), and the Qwen proxy model is saved with :func:`save_processor` so
that either path loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .qwen_video import TorchQwenVideoProcessor
from .torch_video_processor import CHAT_TEMPLATE_FILE

#: the processor class of each Qwen-VL generation, by ``config.model_type``
PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                     "qwen3_vl": "Qwen3VLProcessor"}


def _image_only_class(model_type: str) -> type:
    import transformers

    try:
        base = getattr(transformers, PROCESSOR_CLASSES[model_type])
    except KeyError:
        raise ValueError(f"no Qwen-VL processor for model type {model_type!r}; one of "
                         f"{', '.join(PROCESSOR_CLASSES)}") from None

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and (argument is None or isinstance(argument, TorchQwenVideoProcessor)):
            return None  # no torchvision: images only, or videos through ficoco's torch-only preprocessing
        return base.check_argument_for_proper_class(self, argument_name, argument)

    def _process_videos(self, *args, **kwargs):
        if self.video_processor is None:
            raise ImportError(f"{base.__name__} without a video processor (torchvision is not installed) reads images "
                              f"only; install torchvision to process videos")
        return base._process_videos(self, *args, **kwargs)

    return type(f"ImageOnly{base.__name__}", (base,),
                {"check_argument_for_proper_class": check_argument_for_proper_class,
                 "_process_videos": _process_videos, "__module__": __name__})


def image_only_processor(model_type: str, image_processor, tokenizer, chat_template: str | None = None,
                         video_processor: TorchQwenVideoProcessor | None = None):
    """The ``model_type`` generation's own processor class built from an image processor and a
    tokenizer, without torchvision: no video processor, or ficoco's torch-only one."""
    return _image_only_class(model_type)(image_processor=image_processor, tokenizer=tokenizer,
                                         video_processor=video_processor, chat_template=chat_template)


def load_image_only_processor(folder: str | Path, model_type: str):
    """:func:`image_only_processor` from the image processor, tokenizer and chat template saved in
    ``folder``, with the torch-only video preprocessing of the checkpoint's video settings
    (:meth:`~ficoco.qwen_video.TorchQwenVideoProcessor.from_folder`). The image processor is read
    with the PIL backend (all three generations use Qwen2-VL's image processor;
    ``AutoImageProcessor`` itself needs torchvision in some transformers 5.x releases)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = Path(folder)
    template = folder / CHAT_TEMPLATE_FILE
    return image_only_processor(model_type, Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                AutoTokenizer.from_pretrained(folder, local_files_only=True),
                                template.read_text() if template.is_file() else None,
                                TorchQwenVideoProcessor.from_folder(folder, model_type))


def save_processor(processor, folder: str | Path) -> None:
    """Save ``processor`` (with or without a video processor) so that ``AutoProcessor`` loads it
    where torchvision is installed and :func:`load_image_only_processor` where it is not: the
    tokenizer, the image processor, the chat template and ``processor_config.json`` naming the
    generation's processor class."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    video = getattr(processor, "video_processor", None)
    if video is not None and not isinstance(video, TorchQwenVideoProcessor):
        processor.save_pretrained(folder)
        return
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    if processor.chat_template:
        (folder / CHAT_TEMPLATE_FILE).write_text(processor.chat_template)
    base = type(processor).__mro__[1].__name__
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": base}, indent=2) + "\n")
