"""Files shipped inside the package: the embedded proxy models, trained by ``ficoco train-proxy``
(docs/proxy-model.md): ``proxy-llava/`` (LLaVA-1.5-shaped, the default model of ``ficoco demo``)
and ``proxy-qwen2.5-vl/`` (Qwen2.5-VL-shaped, ``ficoco demo --model qwen``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

EMBEDDED_MODEL_NAME = "proxy-llava"
#: the embedded models by the short name ``--model`` accepts
EMBEDDED_MODELS = {"llava": EMBEDDED_MODEL_NAME, "qwen": "proxy-qwen2.5-vl"}


def embedded_model_dir(name: str = "llava") -> Path:
    """Folder of an embedded proxy model (HF format: config, safetensors, processor): ``"llava"``
    or ``"qwen"`` (:data:`EMBEDDED_MODELS`).

    Raises FileNotFoundError naming the folder when this installation does not contain it."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"no embedded model {name!r}; one of {', '.join(EMBEDDED_MODELS)}")
    folder = Path(str(files(__name__) / EMBEDDED_MODELS[name]))
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"the embedded proxy model is missing from this installation ({folder}); train it with "
            f"`ficoco train-proxy{'' if name == 'llava' else ' --family ' + name} --out {folder}` or pass --model PATH")
    return folder
