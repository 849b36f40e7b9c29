"""Start-up cost: what ``import samkit`` and ``samkit --version`` / ``--help`` import.

``torch._dynamo`` takes over a second to import; the optimizers' ``torch.compile``
guards are made on the first compiled call instead (tests/test_compile.py checks
that compiled steps still equal eager ones). These tests measure the modules
imported, not times, so they hold on any machine. (Building any torch optimizer
imports Dynamo: torch's ``Optimizer.add_param_group`` is ``torch._disable_dynamo``'d.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_samkit_and_its_optimizers_does_not_import_dynamo():
    out = _run(
        "import sys, samkit\n"
        "print('torch' in sys.modules)\n"
        "from samkit import SAM, GSAM, ESAM, KSAM, MicroBatchSAM, VSAM\n"
        "import samkit.optim, samkit.functional, samkit.losses\n"
        "print('torch' in sys.modules, 'torch._dynamo' in sys.modules)\n"
    )
    # import samkit alone loads nothing heavy; the optimizers load torch, not Dynamo
    assert out.split() == ["False", "True", "False"]


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_cli_version_and_help_do_not_import_torch(flag):
    out = _run(
        "import contextlib, io, sys\n"
        "from samkit.cli.main import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        f"        main([{flag!r}])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "print('torch' in sys.modules)\n"
        "print(buf.getvalue())\n"
    )
    first, rest = out.split("\n", 1)
    assert first == "False"
    assert ("samkit 0." in rest) if flag == "--version" else ("compare" in rest and "tune" in rest)
