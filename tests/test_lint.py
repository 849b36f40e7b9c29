"""The tree stays formatted and lint-clean (``make lint`` runs the same two commands)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks", "examples"]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it comes with samkit[dev])")
    return [found]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_clean(args: list[str]) -> None:
    proc = subprocess.run(
        [*_ruff(), *args, *PATHS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, (
        f"ruff {' '.join(args)} found problems:\n{proc.stdout}{proc.stderr}"
    )


def test_no_merge_conflict_markers_are_left() -> None:
    """A merge left half-resolved must not land (markers in docs do not break any other test)."""
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    markers = ("<<<<<<< ", ">>>>>>> ", "=======\n")
    found = []
    for name in listed.stdout.splitlines():
        path = ROOT / name
        if (
            path.suffix not in {".py", ".md", ".toml", ".txt", ".cfg", ".yml", ".yaml", ""}
            or not path.is_file()
        ):
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{name}:{i + 1}" for i, line in enumerate(lines) if line.startswith(markers)]
    assert not found, f"merge conflict markers left in: {found}"
