"""The user examples run, learn, and show what their docstrings claim.

Each example exposes ``main(argv) -> dict``; most tests call it in-process
with a few steps. One test runs a script as a user would, in a subprocess.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"samkit_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(name: str, *argv: str) -> dict:
    torch.manual_seed(0)
    return load(name).main(list(argv))


def assert_learns(out: dict) -> None:
    assert all(math.isfinite(v) for v in out["losses"])
    assert out["last"] < 0.9 * out["first"], (out["first"], out["last"])


def test_plain_loop_learns():
    out = run("plain_loop", "--steps", "30")
    assert out["steps"] == 30
    assert len(out["losses"]) == 30
    assert_learns(out)
    assert out["accuracy"] > 0.3  # 10 classes: chance is about 0.1


def test_held_back_raises_the_radius_under_label_noise_where_the_gradients_alone_do_not():
    held = run("held_back", "--epochs", "30")
    plain = run("held_back", "--epochs", "30", "--no-hold-back")
    assert held["best"] is not None and plain["best"] is None  # reports came, once an epoch
    assert held["rhos"][-1] > 4 * held["rhos"][0]  # the held-back losses raised the radius
    assert held["test"] > plain["test"] + 0.03  # (0.508 and 0.410 here: a wide margin)


def test_amp_bf16_on_cpu():
    out = run("amp", "--steps", "30", "--device", "cpu")
    assert (out["device"], out["precision"]) == ("cpu", "bf16")  # auto on CPU
    assert out["scales"] == []  # bf16 needs no loss scaling
    assert out["finite"]
    assert_learns(out)


def test_amp_fp16_grad_scaler_matches_bf16_trend():
    out = run("amp", "--steps", "30", "--device", "cpu", "--precision", "fp16")
    assert out["precision"] == "fp16"
    assert out["finite"]
    # No overflow at the default scale: it stays put (growth needs 2000 clean steps).
    assert out["scales"] == [2.0**16] * 30
    assert_learns(out)


def test_amp_fp16_overflow_skips_and_backs_off():
    # A scale of 1e30 overflows fp16: each such step must be skipped (weights
    # restored, not stepped) and the scaler must halve its scale.
    out = run(
        "amp", "--steps", "12", "--device", "cpu", "--precision", "fp16", "--init-scale", "1e30"
    )
    s = out["scales"]
    assert s[0] == pytest.approx(0.5e30, rel=1e-6)  # the scale is kept in float32
    assert all(b == a / 2 for a, b in zip(s[:5], s[1:6]))
    assert out["finite"]
    assert out["steps"] == 12


def test_amp_auto_picks_the_device():
    mod = load("amp")
    out = mod.main(["--steps", "2"])
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert out["device"] == want
    assert out["precision"] == ("fp16" if want == "cuda" else "bf16")


@pytest.mark.parametrize("batch,micro", [(256, 4), (250, 3)])
def test_accumulation_equals_full_batch(batch, micro):
    out = run(
        "accumulation", "--steps", "25", "--batch", str(batch), "--micro", str(micro), "--check"
    )
    # Same gradients up to summation order: float32 rounding only.
    assert out["max_weight_diff"] < 1e-5
    assert max(abs(a - b) for a, b in zip(out["losses"], out["ref_losses"])) < 1e-4
    assert_learns(out)


def test_accumulation_rejects_bad_micro(capsys):
    with pytest.raises(SystemExit) as e:
        run("accumulation", "--micro", "0")
    assert e.value.code == 2
    assert "--micro" in capsys.readouterr().err


def test_two_step_bn_and_scheduler():
    steps = 30
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run("two_step", "--steps", str(steps), "--lr", "0.1")
    # BatchNorm statistics: one update per step (the pass at w), not two.
    assert out["bn_updates"] == steps
    assert out["steps"] == out["ascents"] == steps
    # The scheduler drives the base optimizer's LR through the SAM object.
    for i, lr in enumerate(out["lrs"]):
        assert lr == pytest.approx(0.05 * (1 + math.cos(math.pi * i / steps)), rel=1e-9, abs=1e-12)
    assert out["final_lr"] == pytest.approx(0.0, abs=1e-12)
    # SAM tells the scheduler a step happened: no "scheduler.step() before optimizer.step()".
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert_learns(out)


def test_example_runs_as_a_script():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_loop.py"), "--steps", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("loss ") and "->" in last and "train accuracy" in last


# ------------------------------------------- the study on the user's own problem
def _strict_json(path: Path) -> dict:
    import json

    def bad(name):
        raise ValueError(f"bare {name} in {path}")

    return json.loads(path.read_text(), parse_constant=bad)


def test_own_model_and_data_example_outside_the_project_cli_and_api(tmp_path, monkeypatch, capsys):
    import shutil
    import sys as _sys

    from samkit.cli.main import main as cli

    shutil.copy(EXAMPLES / "own_model_and_data.py", tmp_path / "own_model_and_data.py")
    monkeypatch.chdir(tmp_path)  # a folder outside the project, as a user's
    monkeypatch.delitem(_sys.modules, "own_model_and_data", raising=False)
    try:
        rc = cli(
            [
                "compare",
                "--model",
                "own_model_and_data:make_model",
                "--data",
                "own_model_and_data:load_data",
                "--optimizers",
                "sgd",
                "sam",
                "--seeds",
                "2",
                "--epochs",
                "2",
                "--batch-size",
                "64",
                "--no-sharpness",
                "-q",
                "--out",
                "cli-run",
            ]
        )
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "paired over 2 seeds" in out
        res = _strict_json(tmp_path / "cli-run" / "results.json")
        assert [r["label"] for r in res["summary"]] == ["sgd", "sam"]
        assert all(r["test_acc_mean"] > 0.8 for r in res["summary"])  # chance is 0.63
        assert (tmp_path / "cli-run" / "report.html").stat().st_size > 10_000

        mod = _sys.modules["own_model_and_data"]
        assert Path(mod.__file__).parent == tmp_path  # imported from the user's folder
        api = mod.main(["--seeds", "2", "--epochs", "2", "--out", str(tmp_path / "api-run")])
    finally:
        _sys.modules.pop("own_model_and_data", None)
    assert [r["label"] for r in api["rows"]] == ["sgd", "sam", "asam"]
    assert len(api["verdicts"]) == 2
    assert (
        _strict_json(tmp_path / "api-run" / "results.json")["problem"]["task"] == "classification"
    )


def test_regression_example_gru_on_sunspots(tmp_path):
    pytest.importorskip("statsmodels")
    out = run(
        "regression_timeseries", "--seeds", "1", "--epochs", "3", "--quiet", "--out", str(tmp_path)
    )
    res = _strict_json(tmp_path / "results.json")
    assert res["problem"] == {
        "task": "regression",
        "metric": "mse",
        "maximize": False,
        "metrics": ["mse", "mae"],
        "loss": "_per_sample_mse",
    }
    for row in out["rows"]:
        # better than predicting the test years' own mean (an oracle constant)
        assert row["test_mse_mean"] < out["test_variance"], row
    assert [r["label"] for r in out["rows"]] == ["adam", "sam", "looksam"]


def test_transformer_example_learns(tmp_path):
    out = run(
        "transformer",
        "--seeds", "1", "--epochs", "3", "--train-size", "400", "--quiet", "--out", str(tmp_path),
    )  # fmt: skip
    assert [r["label"] for r in out["rows"]] == ["adam", "sam", "sam_on"]
    assert all(r["test_acc_mean"] > 0.15 for r in out["rows"])  # 10 classes: chance is 0.1
    assert all(r["n"] == 1 and r["diverged"] == 0 for r in out["rows"])
