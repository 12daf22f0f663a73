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


def test_qwen_code_runs_as_printed(monkeypatch, tmp_path):
    """The Qwen section's snippet, on the CPU with the embedded Qwen model: one answer per method."""
    blocks = _python_blocks("Qwen2-VL, Qwen2.5-VL and Qwen3-VL")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102 - the README's own code
    lines = printed.getvalue().strip().splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["ficoco-v", "ficoco-l"]
    assert all(line.split(" -> ")[1].strip() for line in lines)


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(pip install torch==2\.13\.0 -e '\.\[test\]'.*?)\n```", README).group(1)
    pytest_call = command.split("&&")[-1].strip()
    assert pytest_call.startswith("python -m pytest")
    assert pytest_call in (ROOT / ".ci" / "run").read_text()
