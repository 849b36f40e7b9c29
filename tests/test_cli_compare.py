import json
import os

import pytest

from samkit.cli.main import main

FAST = [
    "--dataset",
    "synthetic",
    "--train-size",
    "200",
    "--epochs",
    "1",
    "--seeds",
    "1",
    "--no-sharpness",
    "-q",
]


def _run(capsys, *argv):
    rc = main(["compare", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_table_results_and_report(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = _run(
        capsys,
        "--quick",
        *FAST,
        "--seeds",
        "2",
        "--optimizers",
        "sgd,sam",
        "adam",
        "--rho",
        "0.05,0.1",
        "--out",
        str(out_dir),
    )
    assert rc == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    labels = [r["label"] for r in res["summary"]]
    assert labels == ["sgd", "sam(rho=0.05)", "sam(rho=0.1)", "adam"]
    assert len(res["runs"]) == 8 and res["executed_runs"] == 8
    rows = {r["label"]: r for r in res["summary"]}
    # the summary is the mean of the runs it summarises
    accs = [r["final"]["test_acc"] for r in res["runs"] if r["label"] == "adam"]
    assert rows["adam"]["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert rows["sam(rho=0.1)"]["cost_passes"] == pytest.approx(2.0)
    assert {
        r["config"]["method"]["options"]["rho"] for r in res["runs"] if r["method"] == "sam"
    } == {0.05, 0.1}
    for label in labels:
        assert label in out  # the printed table names every method
    assert "+-" in out and "cost vs SGD" in out
    html = (out_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<table>" in html

    # rerun: every run is skipped
    rc, out, err = _run(
        capsys,
        "--quick",
        *FAST,
        "--seeds",
        "2",
        "--optimizers",
        "sgd,sam",
        "adam",
        "--rho",
        "0.05,0.1",
        "--out",
        str(out_dir),
    )
    assert rc == 0
    assert json.loads((out_dir / "results.json").read_text())["executed_runs"] == 0
    assert not [p for p in os.listdir(out_dir) if p.endswith(".tmp")]


def test_asam_rho_is_on_its_own_scale_and_specs_parse(tmp_path, capsys):
    rc, _, err = _run(
        capsys,
        *FAST,
        "--optimizers",
        "asam",
        "sam:base=adam,lr=0.01,label=sam-adam",
        "--rho",
        "0.03",
        "--out",
        str(tmp_path),
    )
    assert rc == 0, err
    runs = {r["label"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert runs["asam"]["config"]["method"]["options"]["rho"] == pytest.approx(0.3)
    m = runs["sam-adam"]["config"]["method"]
    assert (m["base"], m["lr"], m["options"]["rho"]) == ("adam", 0.01, 0.03)


def test_toml_config_and_flags_override(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'dataset = "synthetic"\nmodel = "gru"\ntrain_size = 100\nepochs = 3\nseeds = [4]\n'
        'optimizers = ["sgd"]\nsharpness = false\nnoise = 0.2\n'
        '[[methods]]\nmethod = "sam"\nlabel = "sam-big"\nrho = 0.2\n'
    )
    rc, _, err = _run(
        capsys, "--config", str(cfg), "--epochs", "1", "-q", "--out", str(tmp_path / "o")
    )
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["sgd", "sam-big"]
    r0 = res["runs"][0]
    assert (r0["seed"], r0["config"]["model"], r0["config"]["noise"], r0["epochs_run"]) == (
        4,
        "gru",
        0.2,
        1,
    )


def test_default_out_dir_is_stable(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(capsys, *FAST, "--optimizers", "sgd")
    assert rc == 0
    (folder,) = os.listdir(tmp_path / "samkit-runs")
    assert folder.startswith("compare-synthetic-cnn-")
    rc, _, _ = _run(capsys, *FAST, "--optimizers", "sgd")
    assert os.listdir(tmp_path / "samkit-runs") == [folder]
    assert (
        json.loads((tmp_path / "samkit-runs" / folder / "results.json").read_text())[
            "executed_runs"
        ]
        == 0
    )


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--optimizers", "lion"], "lion"),
        (["--model", "vit"], "vit"),
        (["--dataset", "cifar"], "cifar"),
        (["--rho", "-0.1"], "rho"),
        (["--rho", "abc"], "rho"),
        (["--noise", "1.5"], "noise"),
        (["--seeds", "x"], "seeds"),
        (["--epochs", "0"], "epochs"),
        (["--optimizers", "sgd:rho=0.1"], "option"),
        (["--optimizers", "sam:base=lbfgs"], "base"),
    ],
)
def test_bad_input_one_line_exit_2(argv, match, capsys, tmp_path):
    rc, out, err = _run(capsys, *FAST, "--out", str(tmp_path), *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("samkit compare: error:") and match in lines[0]
    assert "Traceback" not in err


def test_broken_toml_and_unknown_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [1,\n")
    rc, _, err = _run(capsys, "--config", str(bad))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "not valid TOML" in err
    typo = tmp_path / "typo.toml"
    typo.write_text("epoch = 3\n")
    rc, _, err = _run(capsys, "--config", str(typo))
    assert rc == 2 and "epoch" in err
    rc, _, err = _run(capsys, "--config", str(tmp_path / "missing.toml"))
    assert rc == 2 and "missing.toml" in err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = _run(capsys, *FAST, "--out", str(blocker / "sub"))
    assert rc == 2
    # (it said "(File exists)", which is not what is wrong)
    assert len(err.strip().splitlines()) == 1 and f"is under {str(blocker)!r}, a file" in err
    rc, _, err = _run(capsys, *FAST, "--out", str(blocker))
    assert rc == 2 and "is a file, not a folder" in err


def test_list(capsys):
    rc, out, _ = _run(capsys, "--list")
    assert rc == 0
    for name in ("mnist1d", "digits", "cnn", "gru", "resnet", "sgd", "adam", "sam", "asam"):
        assert name in out


def test_interrupted_study_resumes_from_finished_runs(tmp_path, capsys, monkeypatch):
    from samkit.experiments import study

    real_train, calls = study.train, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*a, **k)

    monkeypatch.setattr(study, "train", flaky)
    argv = [*FAST, "--optimizers", "sgd,adam,sam", "--out", str(tmp_path)]
    rc, _, err = _run(capsys, *argv)
    assert rc == 130 and "rerun to resume" in err
    assert not (tmp_path / "results.json").exists()
    assert sorted(os.listdir(tmp_path / "runs"))[0:1] == ["sgd-seed0.json"]

    monkeypatch.setattr(study, "train", real_train)
    rc, _, _ = _run(capsys, *argv)
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["executed_runs"] == 2  # adam and sam; sgd was kept
    assert [r["label"] for r in res["runs"]] == ["sgd", "adam", "sam"]


def test_rerun_with_other_settings_says_which_runs_are_kept_and_retrained(tmp_path, capsys):
    """A rerun into the same --out with other settings retrained the changed runs and
    overwrote their results without a word."""
    loud = [a for a in FAST if a != "-q"]
    rc, _, err = _run(capsys, *loud, "--optimizers", "sgd,sam", "--out", str(tmp_path))
    assert rc == 0, err
    assert "holds finished runs" not in err  # a fresh folder: nothing to say
    rc, _, err = _run(capsys, *loud, "--optimizers", "sgd,sam:rho=0.1,adam", "--out", str(tmp_path))
    assert rc == 0, err
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if "holds finished runs" in line)
    assert lines[at].endswith("holds finished runs: 1 kept, 1 retrained with other settings, 1 new")
    assert lines[at + 1 : at + 4] == [
        "  kept: sgd (seed 0)",
        "  retrained (method.options.rho: 0.05 -> 0.1): sam (seed 0)",
        "  new: adam (seed 0)",
    ]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["executed_runs"] == 2


@pytest.mark.parametrize(
    "change,diff",
    [
        (["--dataset", "digits"], "dataset: 'synthetic' -> 'digits'"),
        (["--model", "mlp"], "model: 'cnn' -> 'mlp'"),
        (["--noise", "0.2"], "noise: 0.0 -> 0.2"),
        (["--train-size", "150"], "train_size: 200 -> 150"),
        (["--val-fraction", "0.2"], "val_fraction: 0.1 -> 0.2"),
    ],
)
def test_another_problem_in_the_same_folder_is_refused(tmp_path, capsys, change, diff):
    """--dataset digits into a synthetic study's folder retrained every run on digits
    and overwrote the checkpoints (one became another data set's)."""
    argv = [*FAST, "--optimizers", "sgd", "--out", str(tmp_path)]
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    checkpoint = (tmp_path / "runs" / "sgd-seed0.pt").read_bytes()
    for folder in ("this samkit's", "older", "without config.json"):
        if folder == "older":  # written before the problem was recorded
            cfg = json.loads((tmp_path / "config.json").read_text())
            del cfg["problem"]
            (tmp_path / "config.json").write_text(json.dumps(cfg))
        elif folder == "without config.json":  # the finished runs say it
            (tmp_path / "config.json").unlink()
        rc, _, err = _run(capsys, *argv, *change)
        assert rc == 2, err
        line = err.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in err
        assert line == (
            f"samkit compare: error: Invalid out value: {str(tmp_path)!r} holds a study of "
            f"another problem ({diff}); give another --out, or delete it to start over"
        )
        assert (tmp_path / "runs" / "sgd-seed0.pt").read_bytes() == checkpoint
    # more epochs are more of the same problem: retrained, not refused
    rc, _, err = _run(capsys, *argv, "--epochs", "2")
    assert rc == 0, err


def test_a_configs_relative_data_and_model_files_are_the_ones_beside_it(
    tmp_path, monkeypatch, capsys
):
    """They were read from the current folder only: run from elsewhere, a config took
    another folder's file of that name (300 rows where its own has 100), silently."""
    import numpy as np

    r = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for path, n in (("sub/arr.npz", 100), ("arr.npz", 300)):
        x, y = r.normal(size=(n, 6)).astype("float32"), r.integers(0, 3, n)
        np.savez(tmp_path / path, x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    (tmp_path / "sub" / "net.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Linear(6, 3)\n"
    )
    (tmp_path / "sub" / "c.toml").write_text(
        'data = "arr.npz"\nmodel = "net.py:make"\nepochs = 1\nseeds = [0]\n'
        'optimizers = ["sgd"]\nsharpness = false\n'
    )
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--config", "sub/c.toml", "--out", str(tmp_path / "o"), "-q"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "o" / "results.json").read_text())
    assert summary["settings"]["data"]["train"]["len"] == 100  # (its own, not ./arr.npz)
    assert summary["settings"]["model_factory"]["name"].endswith(":make")
