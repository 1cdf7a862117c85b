"""Repository-level contracts: README set-up commands, CI script, console script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_demo_and_test_commands() -> None:
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert blocks[0].endswith("mtcae demo"), "first README command must run the main job"
    assert blocks[1].endswith("python -m pytest -q"), "second README command must run the tests"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_cmd = _bash_blocks((ROOT / "README.md").read_text())[1]
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_console_script_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--help"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    for command in ("demo-data", "preprocess", "train", "sweep", "demo", "table", "bench"):
        assert re.search(rf"\b{command}\b", out), f"`mtcae --help` does not list {command}"
