"""A core install (`pip install -e .`, no extras): every command and module that needs
an optional package says which extra brings it (src/samkit/_extras.py).

A missing package is simulated with ``sys.modules[name] = None`` (in this process
for the commands, in a fresh interpreter for module imports)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from samkit.cli.main import main

NO_PLOTS = (
    "matplotlib is not installed, so the report has no plots (pip install 'samkit[experiments]')"
)


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


STUDIES = {
    "compare": (
        ["--dataset", "synthetic", "--train-size", "100", "--epochs", "1", "--seeds", "1"]
        + ["--optimizers", "sgd,sam", "--no-sharpness"],
        "results.json",
    ),
    "tune": (
        ["--dataset", "synthetic", "--train-size", "200", "--epochs", "1", "--seeds", "1"]
        + ["--grid", "0.05"],
        "tune.json",
    ),
    "gan": (
        ["--datasets", "ring8", "--methods", "adam,sam_g", "--seeds", "1", "--iterations", "20"]
        + ["--eval-every", "10", "--batch-size", "32", "--config", "{small}"],
        "results.json",
    ),
}


@pytest.mark.parametrize("command", list(STUDIES))
def test_a_study_without_matplotlib_writes_its_tables_and_says_plots_are_left_out(
    command, no_matplotlib, tmp_path, capsys
):
    """compare and gan trained every run, then ended in ModuleNotFoundError for matplotlib
    (no report, no results table printed)."""
    argv, results = STUDIES[command]
    small = tmp_path / "small.toml"  # a small GAN: evaluation dominates otherwise
    small.write_text("hidden = 16\ndepth = 2\nz_dim = 4\neval_samples = 200\n")
    argv = [a.format(small=small) for a in argv]
    out = tmp_path / "o"
    rc = main([command, *argv, "-q", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert err == f"samkit {command}: {NO_PLOTS}\n"
    assert "results:" in printed and "report:" in printed
    json.loads((out / results).read_text())
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png" not in page
    assert "matplotlib is not installed, so the report has no plots" in page


def test_plot_outputs_are_refused_before_any_work_without_matplotlib(
    no_matplotlib, tmp_path, capsys, monkeypatch
):
    from samkit.cli import landscape, sharpness

    def never(*a, **k):  # the computation must not start
        raise AssertionError("computed before the check")

    monkeypatch.setattr(landscape, "load_model_and_batches", never)
    monkeypatch.setattr(sharpness, "load_model_and_batches", never, raising=False)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")  # never read
    for argv, what in (
        (["landscape", str(ckpt), "--out", str(tmp_path / "l.png")], "the landscape plot"),
        (["sharpness", str(ckpt), "--density", str(tmp_path / "d.png")], "--density (a plot)"),
    ):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err == (
            f"samkit {argv[0]}: error: {what} needs matplotlib "
            "(pip install 'samkit[experiments]')\n"
        )


def _import_without(modules: list[str], statement: str, env: dict[str, str] | None = None):
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules) + statement
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


INTEGRATIONS = [  # (module, the framework it imports, the install hint)
    ("lightning", "lightning", "pip install 'samkit[lightning]'"),
    ("pytorch_lightning", "pytorch_lightning", "pip install pytorch-lightning"),
    ("huggingface", "transformers", "pip install 'samkit[huggingface]'"),
]


def test_an_integration_without_its_framework_names_the_extra():
    """A bare "ModuleNotFoundError: No module named 'lightning'" before (sb3 named its extra)."""
    tries = "".join(
        f"try:\n    import samkit.integrations.{module}\n"
        "except ModuleNotFoundError as e:\n    print(type(e).__name__, e.name, '|', e)\n"
        for module, _, _ in INTEGRATIONS
    )
    res = _import_without([missing for _, missing, _ in INTEGRATIONS], tries)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(INTEGRATIONS), res.stdout
    for line, (module, missing, extra) in zip(lines, INTEGRATIONS):
        kind, name, _, message = line.split(" ", 3)
        assert kind == "ModuleNotFoundError" and name == missing
        assert message.startswith(f"samkit.integrations.{module} needs {missing}, which is not")
        assert extra in message


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs keras installed")
def test_keras_without_its_backend_says_so_not_that_keras_3_is_missing():
    """With Keras 3 installed but its backend missing it said "needs Keras 3: pip install"."""
    res = _import_without(
        ["tensorflow"],
        "try:\n    import samkit.keras\nexcept ImportError as e:\n    print(e)\n",
        env={"KERAS_BACKEND": "tensorflow"},
    )
    assert res.returncode == 0, res.stderr
    message = res.stdout.strip()
    assert "Keras is installed but its backend 'tensorflow' (KERAS_BACKEND)" in message
    assert "KERAS_BACKEND=torch" in message and "needs Keras 3" not in message
    res = _import_without(
        ["keras"], "try:\n    import samkit.keras\nexcept ImportError as e:\n    print(e)\n"
    )
    assert "samkit.keras needs Keras 3: pip install 'samkit[keras]'" in res.stdout


def test_config_files_without_a_toml_parser_name_the_extra(tmp_path):
    """Python 3.10 without tomli (an `experiments` dependency there): every command that
    imported the settings failed with ModuleNotFoundError, --config or not."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("epochs = 1\n")
    res = _import_without(
        ["tomllib", "tomli"],
        "from samkit.experiments import settings\n"
        f"try:\n    settings.load_toml({str(cfg)!r})\n"
        "except ValueError as e:\n    print(e)\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        f"Invalid config value: reading {str(cfg)!r} needs tomli on Python 3.10 "
        "(pip install 'samkit[experiments]')"
    )
