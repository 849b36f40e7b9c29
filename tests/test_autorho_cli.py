"""``samkit compare`` and ``samkit tune`` with a self-tuning rho beside the grid (issue 11)."""

import json

import pytest

from samkit.cli.main import main
from samkit.experiments import report, tuning
from samkit.experiments import settings as st

FAST = ["--dataset", "synthetic", "--train-size", "200", "--seeds", "1", "-q"]


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "given,tokens",
    [
        (["sgd,sam,sam:rho=auto"], ["sgd", "sam", "sam:rho=auto"]),
        (["sam:rho=0.1,base=adam,adam"], ["sam:rho=0.1,base=adam", "adam"]),
        # an option whose value holds a colon stays with its spec
        (
            ["sam:base=adam,rho=auto:loss_equated", "sgd"],
            ["sam:base=adam,rho=auto:loss_equated", "sgd"],
        ),
        (
            ["sgd", "sam:rho=auto:loss_equated,lr=0.05,asam"],
            ["sgd", "sam:rho=auto:loss_equated,lr=0.05", "asam"],
        ),
    ],
)
def test_comma_separated_specs_split_at_method_names(given, tokens):
    assert st._method_tokens(given) == tokens


def test_auto_rho_gets_its_own_label_beside_the_grid():
    s = st.merge(
        {"optimizers": ["sgd,sam,sam:rho=auto,sam:rho=auto:loss_equated"], "rho": [0.02, 0.1]}
    )
    specs = st._method_specs(s)
    assert [m.label for m in specs] == [
        "sgd",
        "sam(rho=0.02)",
        "sam(rho=0.1)",
        "sam(rho=auto)",
        "sam(rho=auto-loss_equated)",
    ]
    assert specs[3].options["rho"] == "auto" and specs[4].options["rho"] == "auto:loss_equated"
    # without a grid: "sam" and "sam(rho=auto)", not two columns named "sam"
    specs = st._method_specs(st.merge({"optimizers": ["sam", "sam:rho=auto"]}))
    assert [m.label for m in specs] == ["sam", "sam(rho=auto)"]
    # a label the user gives wins
    specs = st._method_specs(st.merge({"optimizers": ["sam:rho=auto,label=mine"]}))
    assert [m.label for m in specs] == ["mine"]


# ------------------------------------------------------------------ report figure
def _record(key, label, rho_option):
    return {"key": key, "label": label, "config": {"method": {"options": {"rho": rho_option}}}}


def test_rho_series_keeps_moving_runs_per_seed_and_fixed_radii_as_lines():
    records = [
        _record("a0", "sam(rho=auto)", "auto"),
        _record("a1", "sam(rho=auto)", "auto"),
        _record("f0", "sam(rho=0.1)", 0.1),
        _record("g0", "gsam", 0.05),
        _record("s0", "sgd", None),
    ]
    histories = {
        "a0": [{"rho": 0.05}, {"rho": 0.05}],  # an auto run whose radius never moved is still shown
        "a1": [{"rho": 0.05}, {"rho": 0.075}, {}],  # an epoch without a rho is skipped
        "f0": [{"rho": 0.1}, {"rho": 0.1}],
        "g0": [{"rho": 0.05}, {"rho": 0.02}],  # a fixed option whose radius moves (a schedule)
        "s0": [{"train_loss": 1.0}],
    }
    moving, fixed = report._rho_series(records, histories)
    assert moving == {
        "sam(rho=auto)": [[0.05, 0.05], [0.05, 0.075]],
        "gsam": [[0.05, 0.02]],
    }
    assert fixed == {"sam(rho=0.1)": 0.1}
    # only fixed radii: no figure
    assert report._rho_series(records[2:3], histories) == ({}, {})


def test_compare_with_auto_rho_records_and_plots_its_radius(tmp_path, capsys):
    rc, out, err = _run(
        capsys,
        "compare",
        *FAST,
        "--epochs",
        "2",
        "--no-sharpness",
        "--optimizers",
        "sgd,sam,sam:rho=auto:loss_equated",
        "--rho",
        "0.02,0.1",
        "--out",
        str(tmp_path),
    )
    assert rc == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    labels = [r["label"] for r in results["summary"]]
    assert labels == ["sgd", "sam(rho=0.02)", "sam(rho=0.1)", "sam(rho=auto-loss_equated)"]
    assert "sam(rho=auto-loss_equated)" in out
    auto = next(r for r in results["runs"] if r["label"] == "sam(rho=auto-loss_equated)")
    assert auto["config"]["method"]["options"]["rho"] == "auto:loss_equated"
    history = [
        json.loads(line) for line in (tmp_path / "runs" / auto["metrics"]).read_text().splitlines()
    ]
    assert len(history) == 2 and all(h["rho"] > 0 for h in history)
    html = (tmp_path / "report.html").read_text()
    assert "<img alt='rho'" in html and "rho over training" in html

    # without an automatic radius the figure is left out
    rc, _, err = _run(
        capsys,
        "compare",
        *FAST,
        "--epochs",
        "1",
        "--no-sharpness",
        "--optimizers",
        "sgd,sam",
        "--out",
        str(tmp_path / "plain"),
    )
    assert rc == 0, err
    assert "<img alt='rho'" not in (tmp_path / "plain" / "report.html").read_text()


# ------------------------------------------------------------------ tune
def test_tune_trains_auto_beside_the_grid_as_compare_would(tmp_path, capsys):
    args = [
        "tune",
        *FAST,
        "--epochs",
        "3",
        "--grid",
        "0.02,0.1",
        "--auto",
        "auto,sam:rho=auto:loss_equated",
        "--out",
        str(tmp_path / "t"),
    ]
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    res = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert [a["rho"] for a in res["auto"]] == ["auto", "auto:loss_equated"]
    for a in res["auto"]:
        assert len(a["rho_history"]) == 1 and len(a["rho_history"][0]) == 3
        assert a["final_rho"] == a["rho_history"][0][-1]
        assert a["value"] == pytest.approx(a["per_seed"][0])
        assert f"rho = {a['rho']}: validation" in out
    assert sorted(t["params"]["rho"] for t in res["trials"]) == [0.02, 0.1]  # auto is no trial
    assert res["best"]["rho"] in (0.02, 0.1)
    html = (tmp_path / "t" / "report.html").read_text()
    assert "<img alt='rho'" in html

    # the same run through samkit compare: the same validation accuracy and radii
    rc, _, err = _run(
        capsys,
        "compare",
        *FAST,
        "--epochs",
        "3",
        "--no-sharpness",
        "--optimizers",
        "sam:rho=auto:loss_equated",
        "--out",
        str(tmp_path / "c"),
    )
    assert rc == 0, err
    run = json.loads((tmp_path / "c" / "results.json").read_text())["runs"][0]
    history = [
        json.loads(line)
        for line in (tmp_path / "c" / "runs" / run["metrics"]).read_text().splitlines()
    ]
    le = res["auto"][1]
    assert le["value"] == pytest.approx(history[-1]["val_acc"], abs=1e-12)
    assert le["rho_history"][0] == pytest.approx([h["rho"] for h in history], rel=1e-12)


def test_tune_auto_runs_are_reused_on_rerun(tmp_path, capsys, monkeypatch):
    args = ["tune", *FAST, "--epochs", "1", "--grid", "0.05", "--auto", "--out", str(tmp_path)]
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    first = json.loads((tmp_path / "tune.json").read_text())["auto"]

    def no_training(*a, **k):
        raise AssertionError("a finished automatic run was trained again")

    monkeypatch.setattr(tuning.OpenTune, "_train_seed", no_training)
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    assert json.loads((tmp_path / "tune.json").read_text())["auto"] == first
    # another epoch count is another run: it trains (and so reaches the patched trainer)
    with pytest.raises(AssertionError, match="trained again"):
        main(
            [
                "tune",
                *FAST,
                "--epochs",
                "2",
                "--grid",
                "0.05",
                "--auto",
                "--out",
                str(tmp_path / "b"),
            ]
        )


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--auto", "auto:nope"], "auto:nope"),
        (["--auto", "0.1"], "auto"),
        (["--auto", "adam:rho=auto"], "--auto"),
        (["--auto", ","], "--auto"),
    ],
)
def test_tune_bad_auto_exit_2(argv, match, tmp_path, capsys):
    rc, _, err = _run(capsys, "tune", *FAST, "--epochs", "1", "--out", str(tmp_path), *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err
    assert not (tmp_path / "auto").exists()


def test_tune_spec_validates_auto():
    assert tuning.TuneSpec(auto=("auto", "auto:validation_search")).auto == [
        "auto",
        "auto:validation_search",
    ]
    for bad, match in (
        (["auto", "auto"], "duplicates"),
        ([], "auto"),
        ("auto", "auto"),
        (["x"], "'x'"),
    ):
        with pytest.raises(ValueError, match=f"Invalid auto value: .*{match}"):
            tuning.TuneSpec(auto=bad)
