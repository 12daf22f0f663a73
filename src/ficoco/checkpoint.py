"""Loading a local checkpoint folder (weights, config, processor) for the command line, the
evaluation runner and the lmms-eval plugin, with one clear error per problem: a missing folder or
config, no processor, a model family ficoco does not run, a device this torch cannot use."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import torch

_DTYPES = MappingProxyType({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16})


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` this torch build can use (``None``: cuda if present, else cpu).

    Raises ``ValueError`` naming the problem: an unknown device string, or CUDA on a CPU-only build."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {device!r} asked for, but this torch ({torch.__version__}, {build}) sees no "
                             f"CUDA GPU; use --device cpu, or install a CUDA build of torch")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` / ``"auto"`` (the checkpoint's own) or a torch dtype."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}") from None


def checkpoint_config(path: str | Path) -> dict:
    """The ``config.json`` of the checkpoint folder ``path`` as a dict; a clear error if absent."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no checkpoint in {folder}: config.json is missing")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None


def check_supported(config: dict, where: str | Path):
    """The model family of a checkpoint's config, or one line naming the supported families."""
    from .adapters.families import BY_MODEL_TYPE, supported

    model_type = config.get("model_type")
    if model_type not in BY_MODEL_TYPE:
        architecture = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise ValueError(f"{where} is a {model_type!r} checkpoint ({architecture}); ficoco runs {supported()}")
    return BY_MODEL_TYPE[model_type]


def _processor_parts(folder: Path) -> list[str]:
    """What a processor needs that ``folder`` lacks (empty when it looks complete)."""
    missing = []
    has_image = (folder / "preprocessor_config.json").is_file()
    combined = folder / "processor_config.json"
    if not has_image and combined.is_file():
        try:
            has_image = "image_processor" in json.loads(combined.read_text())
        except json.JSONDecodeError:
            pass
    if not has_image:
        missing.append("an image processor (preprocessor_config.json)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("a tokenizer (tokenizer.json)")
    return missing


#: families whose transformers video processor needs torchvision, loaded with ficoco's torch-only one without it
TORCH_VIDEO_TYPES = ("video_llava", "llava_onevision", "llava_next_video")


def load_processor_without_torchvision(folder: str | Path, model_type: str):
    """The processor saved in ``folder`` for a ``model_type`` in :data:`TORCH_VIDEO_TYPES`, built
    with ficoco's torch-only video preprocessing (whether or not torchvision is installed)."""
    if model_type == "video_llava":
        from .video_llava_processor import load_torch_video_llava_processor as load
    elif model_type == "llava_onevision":
        from .pooled_video_processor import load_torch_llava_onevision_processor as load
    else:
        from .pooled_video_processor import load_torch_llava_next_video_processor as load
    return load(folder)


def load_processor(path: str | Path):
    """``AutoProcessor`` of the local folder ``path``, never looked up on a hub. On a machine
    without torchvision a Qwen-VL checkpoint gets its processor with ficoco's torch-only video
    preprocessing (:mod:`ficoco.qwen_processor`), and a Video-LLaVA, LLaVA-OneVision or
    LLaVA-NeXT-Video one likewise (:mod:`ficoco.video_llava_processor`,
    :mod:`ficoco.pooled_video_processor`)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    from .qwen_processor import PROCESSOR_CLASSES, load_image_only_processor

    folder = Path(path)
    model_type = checkpoint_config(folder).get("model_type")
    missing = _processor_parts(folder)
    if missing:
        raise FileNotFoundError(
            f"{folder} has no processor: it lacks {' and '.join(missing)}; save the model's processor next to "
            f"its weights with processor.save_pretrained({str(folder)!r})")
    try:
        if model_type in PROCESSOR_CLASSES and not is_torchvision_available():
            return load_image_only_processor(folder, model_type)
        if model_type in TORCH_VIDEO_TYPES and not is_torchvision_available():
            return load_processor_without_torchvision(folder, model_type)
        return AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"the processor in {folder} cannot be loaded: {first}") from None


def load_model(path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device | None = "cpu",
               attn_implementation: str | None = None):
    """The model of the local checkpoint folder ``path`` (its family picked from ``config.json``), in
    eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText

    folder = Path(path)
    check_supported(checkpoint_config(folder), folder)
    target = resolve_device(device)
    options = {"dtype": resolve_dtype(dtype), "local_files_only": True}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    return AutoModelForImageTextToText.from_pretrained(folder, **options).to(target).eval()


def is_proxy_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a model trained by ``ficoco train-proxy`` (the embedded one included):
    it knows only the procedural dataset's question language and answers in its own prompt format."""
    record = Path(path) / "training.json"
    if not record.is_file():
        return False
    try:
        return "dataset_version" in json.loads(record.read_text())
    except (json.JSONDecodeError, TypeError):
        return False
