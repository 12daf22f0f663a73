#!/bin/bash
# PyPI's torchvision 0.28.0 (and torchaudio, torchcodec) are CUDA builds: their .so files need
# libc10_cuda.so, which torch 2.13.0+cpu lacks. vLLM 0.32's llava.py imports pixtral.py, which imports
# transformers' pixtral image processor, which imports torchvision at module level, so torchvision must
# import. Install it without deps, drop the CUDA C extension, and skip the op registrations that need it.
set -e
PY=/tmp/vllmenv/bin/python
/tmp/vllmenv/bin/pip uninstall -y torchaudio torchcodec torchvision || true
/tmp/vllmenv/bin/pip install --no-deps torchvision==0.28.0
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$SP/torchvision/_C.so"
$PY - "$SP/torchvision/__init__.py" <<'PYEOF'
import sys, re
p = sys.argv[1]; s = open(p).read()
old = """from torchvision import (
    _autograd_registrations,
    _meta_registrations,
    datasets,"""
new = """if extension._has_ops():  # CPU-only torch with PyPI's CUDA torchvision: no C ops
    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401
from torchvision import (
    datasets,"""
assert old in s, "unexpected torchvision/__init__.py"
open(p, "w").write(s.replace(old, new))
PYEOF
$PY -c "import torchvision, torchvision.transforms.v2.functional as F, torch; print('torchvision', torchvision.__version__, F.resize(torch.rand(3,10,10),[5,5]).shape)"
