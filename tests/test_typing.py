"""``samkit.optim`` and ``samkit.functional`` stay clean under ``mypy --strict``
(``make lint`` runs ``mypy`` with pyproject's ``[tool.mypy]``, which checks the same paths)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["src/samkit/optim", "src/samkit/functional.py"]


def test_mypy_strict_clean() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it comes with samkit[dev])")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *CHECKED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"mypy --strict found problems:\n{proc.stdout}{proc.stderr}"
    assert "Success: no issues found" in proc.stdout, proc.stdout


def test_make_lint_checks_the_same_paths() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["files"] == CHECKED
    assert config["strict"] is True
    assert "python -m mypy" in (ROOT / "Makefile").read_text(encoding="utf-8")
