"""The README's promises, checked: its "Use it" code runs as printed, and CI runs its test command."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(section: str) -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_use_it_code_runs_as_printed(tmp_path, monkeypatch):
    """Both snippets of "Use it", in one namespace as a reader would run them, on the CPU with
    the embedded model: an answer is printed and the reduction picture is written."""
    blocks = _python_blocks("Use it")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    question, _, answer = printed.getvalue().strip().partition(" -> ")
    assert question == namespace["questions"][0] and answer == namespace["answers"][0]
    assert (tmp_path / "reduction.png").read_bytes()[:4] == b"\x89PNG"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(pip install torch==2\.13\.0 -e '\.\[test\]'.*?)\n```", README).group(1)
    pytest_call = command.split("&&")[-1].strip()
    assert pytest_call.startswith("python -m pytest")
    assert pytest_call in (ROOT / ".ci" / "run").read_text()
