"""Files shipped inside the package: the embedded proxy LLaVA (``proxy-llava/``, trained by
``ficoco train-proxy``; see docs/proxy-model.md), the default model of ``ficoco demo``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

EMBEDDED_MODEL_NAME = "proxy-llava"


def embedded_model_dir() -> Path:
    """Folder of the embedded proxy model (HF format: config, safetensors, processor).

    Raises FileNotFoundError naming the folder when this installation does not contain it."""
    folder = Path(str(files(__name__) / EMBEDDED_MODEL_NAME))
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"the embedded proxy model is missing from this installation ({folder}); train it with "
            f"`ficoco train-proxy --out {folder}` or pass --model PATH")
    return folder
