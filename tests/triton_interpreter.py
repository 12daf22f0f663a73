"""Run a check script in Triton's interpreter on the CPU: ``TRITON_INTERPRET`` must be set before
Triton is imported, so the script runs in a subprocess and prints its results as one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(script: str, cases: list) -> list:
    """The JSON list ``script`` prints for ``cases`` (passed as its first argument), one row per case."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == len(cases)
    return rows
