import json

import pytest

from samkit.cli.main import main

FAST = ["--dataset", "synthetic", "--train-size", "200", "--epochs", "1", "-q"]


def _run(capsys, *argv):
    rc = main(["tune", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_grid_tries_exactly_the_grid_and_recommends_the_best(tmp_path, capsys):
    rc, out, err = _run(capsys, *FAST, "--grid", "0.01,0.1,0.5", "--out", str(tmp_path))
    assert rc == 0, err
    res = json.loads((tmp_path / "tune.json").read_text())
    tried = sorted(t["params"]["rho"] for t in res["trials"])
    assert tried == [0.01, 0.1, 0.5]
    done = [t for t in res["trials"] if t["state"] == "COMPLETE"]
    top = max(t["value"] for t in done)
    assert res["best"]["val_acc"] >= top - 1e-3
    assert res["best"]["rho"] in tried
    assert f"rho = {res['best']['rho']:.4g}" in out
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_sampled_search_stays_in_range_and_resumes(tmp_path, capsys):
    args = [*FAST, "--trials", "3", "--rho-range", "0.02,0.2", "--tune-lr", "--out", str(tmp_path)]
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    res = json.loads((tmp_path / "tune.json").read_text())
    assert len(res["trials"]) == 3
    assert all(0.02 <= t["params"]["rho"] <= 0.2 for t in res["trials"])
    assert all(0.01 <= t["params"]["lr"] <= 1.0 for t in res["trials"])  # 0.1x .. 10x of SGD's 0.1
    assert "lr" in res["best"]
    # the same command again: the journal already holds 3 finished trials
    rc, _, _ = _run(capsys, *args)
    assert rc == 0
    again = json.loads((tmp_path / "tune.json").read_text())
    assert again["trials"] == res["trials"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--method", "sgd"], "no rho"),
        (["--method", "lion"], "lion"),
        (["--rho-range", "0.5,0.1"], "rho_range"),
        (["--grid", "0.1,-1"], "grid"),
        (["--trials", "0"], "trials"),
        (["--val-fraction", "0"], "val_fraction"),
        (["--model", "vit"], "vit"),
        # settings a grid or tune would ignore are refused, not dropped
        (["--grid", "0.1", "--trials", "5"], "Invalid trials value: 5 (a grid trains exactly"),
        (["--grid", "0.1", "--rho-range", "0.01,0.5"], "Invalid rho_range value"),
        (["--grid", "0.1", "--tune-lr"], "Invalid tune_lr value"),
        (["--baseline", "sam"], "Invalid baseline value: 'sam'"),
    ],
)
def test_bad_input_exit_2(argv, match, tmp_path, capsys):
    rc, _, err = _run(capsys, *FAST, "--out", str(tmp_path), *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err


@pytest.mark.parametrize(
    "change,where",
    [
        (["--method", "asam", "--grid", "0.5"], "method"),
        (["--grid", "0.05", "--epochs", "2"], "epochs"),
        (["--grid", "0.05", "--lr", "0.5"], "method.lr: 0.1 -> 0.5)"),
        # it dumped both searches' settings, every run of each, in one 2 KB line
        (["--grid", "0.05", "--seeds", "1"], "(seeds: [0, 1, 2] -> [0])"),
        (["--grid", "0.1", "--dataset", "digits"], "dataset: 'synthetic' -> 'digits', "),
    ],
)
def test_a_folder_of_another_search_is_refused_not_resumed(tmp_path, capsys, change, where):
    """Its trials were trained with other settings: resuming them would report them as
    this search's (it printed "1 done before" and recommended the old trial's rho)."""
    first = ["--dataset", "synthetic", "--train-size", "200", "--epochs", "1", "-q"]
    rc, _, err = _run(capsys, *first, "--grid", "0.05", "--out", str(tmp_path))
    assert rc == 0, err
    before = (tmp_path / "tune.json").read_text()
    later = [a for a in first if a not in ("--epochs", "1")] if "--epochs" in change else first
    rc, _, err = _run(capsys, *later, *change, "--out", str(tmp_path))
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "holds a search with other settings" in lines[0], err
    assert where in lines[0], lines[0]
    assert len(lines[0].replace(str(tmp_path), "OUT")) < 300, lines[0]  # only what differs
    assert (tmp_path / "tune.json").read_text() == before  # nothing was touched
    # the same search again resumes (nothing to do)
    rc, _, err = _run(capsys, *first, "--grid", "0.05", "--out", str(tmp_path))
    assert rc == 0, err


def test_ctrl_c_in_a_trial_is_one_line_and_the_trial_is_redone(tmp_path, capfd, monkeypatch):
    """Optuna printed its warning and a 25-line traceback, recorded the trial FAIL,
    and the resumed search never ran it again (a killed one was redone)."""
    from samkit.experiments import trainer

    grid = ["--grid", "0.01,0.1,0.5", "--seeds", "1"]
    rc, _, err = _run(capfd, *FAST, *grid, "--out", str(tmp_path / "whole"))
    assert rc == 0, err
    whole = json.loads((tmp_path / "whole" / "tune.json").read_text())

    real, calls = trainer.train, []

    def interrupted_second_trial(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train", interrupted_second_trial)
    cut = ["--out", str(tmp_path / "cut")]
    rc, out, err = _run(capfd, *FAST, *grid, *cut)
    assert rc == 130
    assert err == "samkit tune: interrupted (finished runs are saved; rerun to resume)\n"
    assert out == ""
    monkeypatch.undo()

    rc, out, err = _run(capfd, *FAST, *grid, *cut)
    assert rc == 0, err
    assert "Traceback" not in err and "Trial" not in err
    again = json.loads((tmp_path / "cut" / "tune.json").read_text())

    def complete(res):
        return {t["params"]["rho"]: t["value"] for t in res["trials"] if t["state"] == "COMPLETE"}

    assert complete(again) == complete(whole)  # the same trials, the same numbers
    strip = lambda best: {k: v for k, v in best.items() if k != "trial"}  # noqa: E731
    assert strip(again["best"]) == strip(whole["best"])
    (failed,) = [t for t in again["trials"] if t["state"] == "FAIL"]
    assert failed["redone"] is True
    assert out.count(f"{failed['params']['rho']:>10.4g}") == 1  # shown once, as its redo
    # a third run: everything is done, and the interrupted trial is not queued again
    rc, _, err = _run(capfd, *FAST, *grid, *cut)
    assert rc == 0, err
    assert json.loads((tmp_path / "cut" / "tune.json").read_text())["trials"] == again["trials"]


def test_tune_and_compare_do_not_share_a_folder(tmp_path, capsys):
    """Each overwrote the other's report.html (and compare its results.json)."""
    tuned, compared = tmp_path / "tuned", tmp_path / "compared"
    assert _run(capsys, *FAST, "--grid", "0.05", "--out", str(tuned))[0] == 0
    assert main(["compare", *FAST, "--optimizers", "sgd", "--no-sharpness", "--out",
                 str(compared)]) == 0  # fmt: skip
    capsys.readouterr()
    rc, _, err = _run(capsys, *FAST, "--grid", "0.05", "--out", str(compared))
    assert rc == 2 and "holds a samkit compare study" in err
    assert main(["compare", *FAST, "--optimizers", "sgd", "--no-sharpness", "--out",
                 str(tuned)]) == 2  # fmt: skip
    assert "holds a samkit tune search" in capsys.readouterr().err


def test_a_journal_cut_mid_record_resumes_and_a_garbled_one_is_one_line(tmp_path, capsys):
    """A process killed while appending left a partial last line; the next record fused
    with it and the search failed with json's message, naming no file."""
    args = [*FAST, "--grid", "0.01,0.05,0.1", "--out", str(tmp_path)]
    assert _run(capsys, *args)[0] == 0
    first = json.loads((tmp_path / "tune.json").read_text())
    journal = tmp_path / "optuna-journal.log"
    journal.write_bytes(journal.read_bytes()[:-40])  # the last record cut mid-way
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    again = json.loads((tmp_path / "tune.json").read_text())
    assert again["best"]["rho"] == first["best"]["rho"]
    journal.write_bytes(b"\x00\xff garbage\n" + journal.read_bytes())
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "optuna-journal.log' cannot be read" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["compare", "tune"])
def test_an_out_folder_of_other_files_is_refused(tmp_path, capsys, command):
    """`--out /` wrote a study into the root, `--out myproject` among the user's files, and
    an unreadable config.json was overwritten: a folder that holds no samkit study may hold
    only what an interrupted one leaves. Nothing is written there, not even the lock."""
    argv = [*FAST, "--grid", "0.05"] if command == "tune" else [*FAST, "--optimizers", "sgd"]
    notes, broken = tmp_path / "notes", tmp_path / "broken"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    broken.mkdir()
    (broken / "config.json").write_text("{")
    for folder, says in [(notes, "holds files that are not a samkit study's (todo.txt)"),
                         (broken, "holds a config.json that is not a readable samkit study's")]:  # fmt: skip
        rc = main([command, *argv, "--out", str(folder)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert sorted(p.name for p in broken.iterdir()) == ["config.json"]
    assert (broken / "config.json").read_text() == "{"
    # what an interrupted study leaves (its lock, its runs/) is still taken, and hidden
    # files a version control or the desktop leaves (.gitkeep, .DS_Store) are nobody's study
    fresh = tmp_path / "fresh"
    (fresh / "runs").mkdir(parents=True)
    (fresh / ".samkit.lock").write_text("")
    (fresh / ".gitkeep").write_text("")
    assert main([command, *argv, "--out", str(fresh)]) == 0


def test_a_journal_cut_short_is_refused_not_started_over(tmp_path, capsys):
    """A journal cut well before its end lost finished trials: the search started over and
    wrote over tune.json. (A last line cut by a kill is still dropped and redone.)"""
    out = tmp_path / "t"
    argv = [*FAST, "--grid", "0.02,0.05,0.1", "--out", str(out)]
    assert _run(capsys, *argv)[0] == 0
    journal, summary = out / "optuna-journal.log", out / "tune.json"
    data, before = journal.read_bytes(), summary.read_text()
    journal.write_bytes(data[: len(data) // 3])
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "lacks" in err and "finished trial(s) that tune.json lists" in err, err
    assert summary.read_text() == before
    journal.unlink()  # gone: refused before Optuna writes a new journal there
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "lacks" in err, err
    assert not journal.exists() and summary.read_text() == before


def test_a_search_of_an_older_samkit_is_named_as_one(tmp_path, capsys):
    """A samkit 0.1 search wrote no tune-settings.json: its folder read as one of files that
    are not a samkit study's, where the message that fits says why it cannot resume."""
    out = tmp_path / "t"
    argv = [*FAST, "--grid", "0.05", "--out", str(out)]
    assert _run(capsys, *argv)[0] == 0
    (out / "tune-settings.json").unlink()
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "holds a search whose settings were not recorded" in err, err
    rc = main(["compare", *FAST, "--optimizers", "sgd", "--out", str(out)])
    assert rc == 2 and "holds a samkit tune search" in capsys.readouterr().err
