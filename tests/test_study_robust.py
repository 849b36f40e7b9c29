"""A study that never lies or loses work (issue 10): diverged runs, resume after early
stopping, one study per folder, stale temporary files, tune's resume, the verdicts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import samkit
from samkit.cli.main import main
from samkit.experiments import study as study_mod
from samkit.experiments.settings import MethodSpec, StudyConfig, TrainConfig
from samkit.experiments.stats import t_threshold
from samkit.experiments.study import paired_verdicts, run_study

FAST = ["--dataset", "synthetic", "--train-size", "100", "--epochs", "1", "--seeds", "1"]


def _strict(text: str):
    def bad(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=bad)


def test_diverged_run_is_marked_left_out_and_the_json_stays_valid(tmp_path, capsys):
    # lr 1e12 sends SGD to NaN in its second step; SGD and SAM at the usual lr train on
    rc = main(
        [
            "compare",
            *FAST,
            "--seeds",
            "2",
            "--epochs",
            "2",
            "--optimizers",
            "sgd:lr=1e12,label=sgd-huge",
            "sgd",
            "sam",
            "--out",
            str(tmp_path),
            "-q",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = _strict((tmp_path / "results.json").read_text())  # no bare NaN anywhere
    rows = {r["label"]: r for r in res["summary"]}
    assert rows["sgd-huge"]["diverged"] == 2 and rows["sgd-huge"]["n"] == 0
    assert rows["sgd-huge"]["test_acc_mean"] is None  # not averaged into anything
    assert rows["sgd"]["diverged"] == 0 and rows["sgd"]["n"] == 2
    huge = [r for r in res["runs"] if r["label"] == "sgd-huge"]
    assert all(r["diverged"] and r["checkpoint"] is None for r in huge)
    assert not (tmp_path / "runs" / "sgd-huge-seed0.pt").exists()
    assert "sharpness" not in huge[0]
    for r in huge:  # the per-epoch log is strict JSON too
        for line in (tmp_path / "runs" / r["metrics"]).read_text().splitlines():
            _strict(line)
    assert "diverged (2/2)" in out  # the table says so instead of "10.20 +- 0.00"
    (v,) = [v for v in res["verdicts"] if v["label"] == "sgd-huge"]
    assert v["n"] == 0 and "no seed" in v["sentence"]
    # the interpolation took the finished SGD run, not the NaN one
    if res["interpolation"] is not None:
        assert res["interpolation"]["a"] == "sgd"
        assert all(math.isfinite(x) for x in res["interpolation"]["losses"])


def _early_config(**kw):
    return StudyConfig(
        methods=[MethodSpec("sgd", lr=0.3)],
        seeds=[0],
        dataset="synthetic",
        train_size=200,
        train=TrainConfig(epochs=12, batch_size=50, early_stopping=1),
        sharpness=True,
        sharpness_samples=50,
        sharpness_cheap=True,
        **kw,
    )


def test_resume_after_early_stopping_equals_never_stopping(tmp_path, monkeypatch):
    fake = {"hessian_top_eig": 1.0, "hessian_trace": 2.0, "worst_case_sharpness": 3.0}
    monkeypatch.setattr(study_mod, "sharpness_available", lambda: True)
    monkeypatch.setattr(study_mod, "_measure_sharpness", lambda *a, **k: dict(fake))
    (ref,) = run_study(_early_config(), tmp_path / "ref", progress=False, log=None)
    assert ref.record["stopped_early"] and ref.record["epochs_run"] < 12

    calls = []

    def interrupted(*a, **k):  # killed while measuring sharpness, after training stopped early
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(study_mod, "_measure_sharpness", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(_early_config(), tmp_path / "cut", progress=False, log=None)
    assert calls and (tmp_path / "cut" / "runs" / "sgd-seed0.state.pt").exists()
    monkeypatch.setattr(study_mod, "_measure_sharpness", lambda *a, **k: dict(fake))
    (again,) = run_study(_early_config(), tmp_path / "cut", progress=False, log=None)
    strip = lambda r: {k: v for k, v in r.items() if k != "epoch_time"}  # noqa: E731
    assert again.record["epochs_run"] == ref.record["epochs_run"]
    assert strip(again.record["final"]) == strip(ref.record["final"])
    lines = (tmp_path / "cut" / "runs" / "sgd-seed0.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, ref.record["epochs_run"] + 1))


HOLD = textwrap.dedent(
    """
    import sys, time
    from samkit.experiments.folder import study_folder
    with study_folder(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_one_study_per_folder_the_second_is_told(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["compare", *FAST, "--optimizers", "sgd", "--out", str(tmp_path), "-q"])
        err = capsys.readouterr().err
        assert rc == 2
        line = err.strip()
        assert "in use by another samkit process" in line and str(holder.pid) in line
        assert not (tmp_path / "runs").exists()  # nothing trained, nothing logged
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process (kill -9 included): the folder is free again
    rc = main(["compare", *FAST, "--optimizers", "sgd", "--out", str(tmp_path), "-q"])
    assert rc == 0


def test_stale_temporaries_cleaned_and_the_write_probe_is_unique(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir(parents=True)
    stale = [tmp_path / ".results.json.k2j3h4.tmp", runs / ".sgd-seed0.json.abc123.tmp"]
    for f in stale:
        f.write_text("half a file")
    (tmp_path / ".samkit-write-test").mkdir()  # a fixed-name probe would fail on this
    (tmp_path / "optuna-journal.log.lock").symlink_to("nowhere")  # a killed tune's lock
    keep = runs / "notes.txt"
    keep.write_text("mine")
    rc = main(["compare", *FAST, "--optimizers", "sgd", "--out", str(tmp_path), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert not any(f.exists() for f in stale)
    assert not os.path.lexists(tmp_path / "optuna-journal.log.lock")
    assert keep.read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_tune_resume_fails_stuck_trials_and_proposes_new_values(tmp_path, capsys):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    base = ["tune", *FAST, "-q", "--out", str(tmp_path), "--rho-range", "0.01,0.5"]
    rc = main([*base, "--trials", "2"])
    assert rc == 0, capsys.readouterr().err
    # a run killed mid-trial: one trial left RUNNING in the journal
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna-journal.log")))
    s = optuna.load_study(study_name="samkit-tune", storage=storage)
    stuck = s.ask()
    stuck_rho = stuck.suggest_float("rho", 0.01, 0.5, log=True)
    del s, storage

    rc = main([*base, "--trials", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads((tmp_path / "tune.json").read_text())
    states = [t["state"] for t in res["trials"]]
    assert "RUNNING" not in states and states.count("FAIL") == 1
    done = [t["params"]["rho"] for t in res["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 4
    assert stuck_rho in done  # the interrupted value was tried again
    assert len(set(done)) == len(done)  # a reseeded sampler would have proposed 2 again


def _rec(label, seed, value, diverged=False, metric="acc"):
    return {"label": label, "seed": seed, "final": {f"test_{metric}": value}, "diverged": diverged}


def test_paired_verdict_numbers_and_sentences():
    recs = [
        _rec("sgd", 0, 0.90),
        _rec("sgd", 1, 0.92),
        _rec("sgd", 2, 0.91),
        _rec("sam", 0, 0.93),
        _rec("sam", 1, 0.94),
        _rec("sam", 2, 0.95),
        _rec("rst", 0, 0.91),
        _rec("rst", 1, 0.91),
        _rec("rst", 2, float("nan"), diverged=True),
    ]
    sam, rst = paired_verdicts(recs, ["sgd", "sam", "rst"], "sgd")
    diffs = [3.0, 2.0, 4.0]  # points, seed by seed
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert sam["mean"] == pytest.approx(mean) and sam["se"] == pytest.approx(se)
    assert sam["exceeds"] and sam["better"]
    assert sam["sentence"].startswith("sam: +3.00 ± 0.58 points of test accuracy against sgd")
    assert "paired over 3 seeds" in sam["sentence"]
    assert (
        "5.2 standard errors, beyond 4.30 (the paired t-test at 95 % for 3 seeds)"
        in (sam["sentence"])
    )
    assert rst["n"] == 2 and rst["mean"] == pytest.approx(0.0)  # the diverged seed left out
    assert not rst["exceeds"] and "cannot tell them apart" in rst["sentence"]
    assert (
        "(rst diverged on 1 of its 3 seed(s): left out of the paired difference"
        in (rst["sentence"])
    )
    # two standard errors is not 95 % with few seeds: z = 3.4 on 3 seeds is within 4.30
    close = [_rec("sgd", s, 0.90) for s in range(3)] + [
        _rec("sam", s, 0.90 + d) for s, d in enumerate([0.01, 0.02, 0.03])
    ]
    (v,) = paired_verdicts(close, ["sgd", "sam"], "sgd")
    assert v["z"] == pytest.approx(3.46, abs=0.01) and not v["exceeds"]
    assert "within 4.30 (the paired t-test at 95 % for 3 seeds)" in v["sentence"]
    # the same difference on every seed (accuracy moves in steps): no spread, no verdict
    same = [_rec("sgd", s, 0.90) for s in range(2)] + [_rec("sam", s, 0.91) for s in range(2)]
    (v,) = paired_verdicts(same, ["sgd", "sam"], "sgd")
    assert v["se"] == 0 and not v["exceeds"] and "infinitely" not in v["sentence"]
    assert "the same difference on every seed" in v["sentence"]
    # ... also where float rounding leaves 1e-16 of spread (it read as 7e14 standard errors)
    rounded = [_rec("sgd", 0, 0.42), _rec("sgd", 1, 0.4133333333333333)]
    rounded += [_rec("sam", 0, 0.415), _rec("sam", 1, 0.4083333333333333)]
    diffs = [0.415 - 0.42, 0.4083333333333333 - 0.4133333333333333]
    assert diffs[0] != diffs[1]  # (the float differences are not equal)
    (v,) = paired_verdicts(rounded, ["sgd", "sam"], "sgd")
    assert (
        v["se"] == 0 and not v["exceeds"] and "the same difference on every seed" in v["sentence"]
    )
    (one,) = paired_verdicts(recs[:1] + recs[3:4], ["sgd", "sam"], "sgd")
    assert one["se"] is None and "one seed" in one["sentence"]
    (low,) = paired_verdicts(
        [
            _rec("a", 0, 1.0, metric="mse"),
            _rec("a", 1, 2.0, metric="mse"),
            _rec("b", 0, 0.5, metric="mse"),
            _rec("b", 1, 0.4, metric="mse"),
        ],
        ["a", "b"],
        "a",
        metric="mse",
        maximize=False,
    )
    assert low["mean"] == pytest.approx(-1.05) and low["better"]  # lower mse is better


@pytest.mark.parametrize(
    ("n", "value"), [(2, 12.706), (3, 4.303), (5, 2.776), (10, 2.262), (31, 2.042), (61, 2.000)]
)
def test_the_verdict_threshold_is_students_t_at_95_percent(n, value):
    """Tabulated two-sided 95 % critical values of t with n - 1 degrees of freedom (beyond
    30 the expansion, within 1e-3; t(60) = 2.000)."""
    assert t_threshold(n) == pytest.approx(value, abs=1e-3)


def test_settings_strings_are_not_booleans(tmp_path):
    from samkit.experiments import settings as st

    for text in ("false", "no", "0", ""):
        with pytest.raises(ValueError, match="sharpness"):
            st.build_study(st.merge({"sharpness": text, "optimizers": ["sgd"]}))
    assert st.parse_method("sam_every_k:scale_rho=false")["scale_rho"] is False


def test_resume_with_dropout_equals_never_stopping(tmp_path):
    """The RNG state is part of the training state: dropout draws the same masks."""
    import torch
    from torch import nn

    from samkit.experiments.problem import Data
    from samkit.experiments.registry import build_method
    from samkit.experiments.settings import TrainSpec
    from samkit.experiments.trainer import seed_everything, train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 5, generator=g), torch.randint(0, 3, (96,), generator=g)
    data = Data("toy", torch.utils.data.TensorDataset(x[:80], y[:80]), None, None)
    config = TrainConfig(epochs=3, batch_size=16, schedule="constant")

    def fresh():
        seed_everything(0)
        model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
        return model, build_method("sam", model, TrainSpec(lr=0.1), rho=0.05)

    model, method = fresh()
    ref = train(model, method, data, config, progress=False)
    ref_w = [p.detach().clone() for p in model.parameters()]

    class Stop(Exception):
        pass

    def stop(rec):
        if rec["epoch"] == 1:
            raise Stop

    state = tmp_path / "state.pt"
    model, method = fresh()
    with pytest.raises(Stop):
        train(model, method, data, config, state_path=state, callbacks=[stop], progress=False)
    torch.manual_seed(123)  # whatever ran in between, the resumed run restores its RNG
    model, method = fresh()
    res = train(model, method, data, config, state_path=state, progress=False)
    assert [r["train_loss"] for r in res.history] == [r["train_loss"] for r in ref.history]
    assert all(torch.equal(a, b) for a, b in zip(ref_w, model.parameters()))


NAN_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    class EvalNaN(nn.Module):
        # finite while training, NaN in eval mode (as a broken normalisation layer gives)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            out = self.lin(x)
            return out if self.training else out * float("nan")

    def make_model():
        return EvalNaN()

    def load():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(260, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])
    """
)


def test_a_model_giving_nan_at_evaluation_is_diverged_not_scored(tmp_path, capsys, monkeypatch):
    """Its NaN logits were scored as class 0 ("31.67 %" test accuracy, losses null, exit 0,
    a verdict) with no word that anything was wrong."""
    (tmp_path / "evalnan_mod.py").write_text(NAN_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["compare", "--model", "evalnan_mod:make_model", "--data", "evalnan_mod:load"]
    rc = main(
        [*argv, "--optimizers", "sgd,sam", "--seeds", "2", "--epochs", "2", "--no-sharpness"]
        + ["--out", str(tmp_path / "o")]
    )
    out, err = capsys.readouterr()
    assert rc == 1 and "every run diverged (4)" in err, err  # a table of nothing: exit 1
    res = _strict((tmp_path / "o" / "results.json").read_text())
    assert all(r["diverged"] and r["checkpoint"] is None for r in res["runs"])
    assert all(r["epochs_run"] == 1 for r in res["runs"])  # stopped at the first evaluation
    for row in res["summary"]:
        assert row["n"] == 0 and row["diverged"] == 2 and row["test_acc_mean"] is None
    assert "diverged (2/2)" in out and "%" not in out.split("test acc %")[1]
    (v,) = res["verdicts"]
    assert v["n"] == 0 and "no seed" in v["sentence"]
    assert (
        "sam diverged on 2 of its 2 seed(s); sgd diverged on 2 of its 2 seed(s)" in (v["sentence"])
    )
    assert err.count("DIVERGED") == 4


@pytest.mark.parametrize("target", ["results.json", "runs/sgd-seed0.pt", "report.html"])
def test_a_full_disk_is_one_line_and_leaves_no_half_written_file(
    target, tmp_path, capsys, monkeypatch
):
    """The results JSON, the checkpoint (torch.save) and the report each ended in up to
    four chained tracebacks."""
    import errno

    from samkit import _atomic

    out = tmp_path / "run"
    dest = out / target
    real = _atomic._temp_file

    def temp_file(path, mode, encoding):
        tmp, fh = real(path, mode, encoding)
        if path == dest:
            write = fh.write

            def full(data):
                write(data[: len(data) // 2])  # part of it reached the disk
                raise OSError(errno.ENOSPC, "No space left on device")

            fh.write = full
        return tmp, fh

    monkeypatch.setattr(_atomic, "_temp_file", temp_file)
    argv = ["compare", *FAST, "--optimizers", "sgd", "--no-sharpness", "-q", "--out", str(out)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err == f"samkit compare: error: no space left on device while writing {dest}\n"
    assert not dest.exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()  # space again: the rerun finishes the study
    assert main(argv) == 0
    assert dest.is_file()


def test_a_metrics_line_cut_off_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    import errno

    from samkit import _atomic

    log = tmp_path / "run.jsonl"
    _atomic.append_line(log, '{"epoch": 1}')
    real = os.write

    def half(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_atomic.os, "write", half)
    with pytest.raises(_atomic.NoSpaceError) as info:
        _atomic.append_line(log, '{"epoch": 2, "train_loss": 0.5}')
    monkeypatch.undo()
    assert info.value.filename == str(log)
    assert log.read_text() == '{"epoch": 1}\n'  # not half of the second line


def _one_sgd_run() -> StudyConfig:
    return StudyConfig(
        methods=[MethodSpec("sgd")],
        seeds=[0],
        dataset="synthetic",
        train_size=200,
        train=TrainConfig(epochs=1, batch_size=50),
        sharpness=False,
    )


@pytest.mark.parametrize(
    "edit",
    [
        {"final": {"test_acc": 5.0}},  # an accuracy of 500 %: it went into the table
        {"label": "other"},  # counted under another method
        {"seed": 7},  # paired with another seed
        {"diverged": "no"},
        {"time_per_epoch": "x"},
        {"final": []},
        {"checkpoint": "../../elsewhere/runs/sam-seed0.pt"},  # read another folder's weights
    ],
    ids=["acc", "label", "seed", "diverged", "time", "final", "checkpoint"],
)
def test_a_hand_edited_finished_record_is_trained_again_not_trusted(tmp_path, edit):
    config = _one_sgd_run()
    (ref,) = run_study(config, tmp_path, progress=False, log=None)
    path = tmp_path / "runs" / "sgd-seed0.json"
    record = json.loads(path.read_text())
    for k, v in edit.items():
        record[k] = {**record[k], **v} if isinstance(v, dict) else v
    path.write_text(json.dumps(record))
    lines = []
    (again,) = run_study(config, tmp_path, progress=False, log=lines.append)
    assert any("its record is malformed" in line for line in lines)
    assert again.record["final"]["test_acc"] == ref.record["final"]["test_acc"]
    assert json.loads(path.read_text())["label"] == "sgd"


@pytest.mark.parametrize("damage", ["truncated", "emptied", "removed"])
def test_a_finished_run_whose_checkpoint_is_damaged_is_trained_again(tmp_path, damage):
    """A truncated .pt of a finished run was kept ("kept: sgd (seed 0)"); only the report's
    interpolation failed on it, at the end, and the study exited 0."""
    config = _one_sgd_run()
    (ref,) = run_study(config, tmp_path, progress=False, log=None)
    checkpoint = tmp_path / "runs" / "sgd-seed0.pt"
    whole = checkpoint.read_bytes()
    if damage == "removed":
        checkpoint.unlink()
    else:
        checkpoint.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"")
    lines = []
    (again,) = run_study(config, tmp_path, progress=False, log=lines.append)
    assert any("its files damaged), retrained" in line for line in lines), lines
    assert checkpoint.read_bytes() == whole  # the same run, trained again
    assert again.record["final"]["test_acc"] == ref.record["final"]["test_acc"]
    lines.clear()
    run_study(config, tmp_path, progress=False, log=lines.append)  # and now kept
    assert any("done before, skipped" in line for line in lines), lines


def test_a_verdict_without_a_test_split_says_so():
    """Both runs finished; the data had no test split. The verdict said no seed on which
    both finished."""
    recs = [
        {"label": m, "seed": s, "final": {"val_acc": 0.5}, "diverged": False}
        for m in ("sgd", "sam")
        for s in (0, 1)
    ]
    (v,) = paired_verdicts(recs, ["sgd", "sam"], "sgd")
    assert (
        "no test acc to compare with sgd (both finished; the data has no test split"
        in (v["sentence"])
    )


@pytest.mark.parametrize("where", ["runs", "runs/sgd-seed0.json"])
def test_a_folder_or_file_in_a_runs_place_is_refused_before_training(tmp_path, where):
    """A directory where a run's record goes failed at the end of the run (traceback)."""
    if where == "runs":
        (tmp_path / "runs").write_text("")
    else:
        (tmp_path / where).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"Invalid out value: .* is not a (folder|file)"):
        samkit.compare(
            dataset="synthetic",
            train_size=200,
            methods=["sgd"],
            seeds=1,
            epochs=1,
            sharpness=False,
            out=tmp_path,
            quiet=True,
        )
    assert not (tmp_path / "results.json").exists()


def test_samples_that_cannot_be_batched_are_one_sentence(tmp_path):
    """Ragged samples failed in torch's collate inside the checks (a traceback)."""

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.randn(7 if i % 2 else 8), i % 3

    with pytest.raises(ValueError, match="Invalid data value: the training split cannot be"):
        samkit.compare(
            model=lambda: torch.nn.Linear(8, 3),
            train=Ragged(),
            test=Ragged(),
            methods=["sgd"],
            seeds=1,
            epochs=1,
            out=tmp_path,
            quiet=True,
        )


def test_the_report_names_its_metric_and_cost_reference_and_draws_every_loss(tmp_path, monkeypatch):
    """A loss that goes below 0 left its method out of the (legend-less) training-loss panel,
    and the next method's curve took its colour; the captions said "accuracy" for an MSE and
    "relative to SGD" in a study without SGD."""
    import matplotlib.axes

    import samkit

    drawn: list[tuple[str, str]] = []
    plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((self.get_title() or str(id(self)), kwargs.get("label"), kwargs.get("color")))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    y = x.sum(1)

    def model():
        return torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))

    result = samkit.compare(
        model=model, train=(x[:90], y[:90]), test=(x[90:], y[90:]), task="regression",
        loss=lambda o, t: (o - t) ** 2 - 5.0,  # below 0 once fitted
        methods=["adam", {"method": "adam", "lr": 1e-4, "label": "slow"}],
        seeds=1, epochs=3, batch_size=30, sharpness=False, out=tmp_path / "o", quiet=True,
    )  # fmt: skip
    assert min(r["train_loss_mean"] for r in result.rows) < 0
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Final test mse per method." in html and "Test mse against cost" in html
    assert "test accuracy" not in html.lower() and "Accuracy against" not in html
    assert "relative to adam" in html and "relative to SGD" not in html
    # each method drawn in both panels (none left out), in one colour per method
    colours = {}
    for _, label, colour in drawn:
        if label in ("adam", "slow"):
            colours.setdefault(label, set()).add(colour)
    assert {k: len(v) for k, v in colours.items()} == {"adam": 1, "slow": 1}
    assert colours["adam"] != colours["slow"]
    assert sum(label in ("adam", "slow") for _, label, _ in drawn) == 4


def test_the_report_says_when_the_folder_holds_runs_it_does_not(tmp_path):
    """`--seeds 2,` after `--seeds 0,1` wrote a one-seed report over the folder's runs
    without a word about the four others (the log said so, the report did not)."""
    args = dict(dataset="synthetic", train_size=200, methods=["sgd"], epochs=1, batch_size=50,
                sharpness=False, out=tmp_path, quiet=True)  # fmt: skip
    samkit.compare(seeds=[0], **args)
    assert "other finished run" not in (tmp_path / "report.html").read_text()
    samkit.compare(seeds=[1], **args)
    html = (tmp_path / "report.html").read_text()
    assert "1 other finished run(s) in this folder are not part of this study (sgd-seed0)" in html
