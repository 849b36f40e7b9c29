"""One name per method: ``samkit rl``'s SAM-every-k is ``sam_every_k``, as in
``samkit compare``; ``everyk``, its old name, still works (a FutureWarning, one note on
the command line) and a run folder written under it is reused, not trained again."""

from __future__ import annotations

import json
import warnings

import pytest

from samkit.cli.main import main
from samkit.experiments import grid, rl
from samkit.experiments.registry import MethodInfo, method_info
from samkit.experiments.types import MethodDef

SMALL = [
    "--envs",
    "CartPole-v1",
    "--seeds",
    "1",
    "--timesteps",
    str(2 * rl.ENVS["CartPole-v1"].rollout),
    "--eval-episodes",
    "2",
    "--grid",
    "coarse",
    "-q",
]


def _config(*methods):
    return rl.build_config({"envs": ["CartPole-v1"], "methods": list(methods)})


def test_the_new_name_is_the_method_and_the_default():
    assert "sam_every_k" in rl.RL_METHODS and "everyk" not in rl.RL_METHODS
    assert "sam_every_k" in rl.DEFAULTS["methods"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name: no warning
        (v,) = _config("sam_every_k:k=2,rho=0.1").variants
    assert (v.label, v.method, v.options) == ("sam_every_k", "sam_every_k", {"rho": 0.1, "k": 2})


def test_the_old_name_maps_to_the_new_one_with_a_warning():
    with pytest.warns(FutureWarning, match="'everyk' is now called 'sam_every_k'"):
        (old,) = _config("everyk:k=2,rho=0.1").variants
    (new,) = _config("sam_every_k:k=2,rho=0.1").variants
    # the method is the new one, the options the same; the label is the name as written
    assert (old.method, old.options, old.label) == (new.method, new.options, "everyk")
    a, b = rl._sam_arguments(old), rl._sam_arguments(new)
    assert (a["rho"], a["sam_kwargs"]["policy"].k, a["sam_kwargs"]["policy"].scale_rho) == (
        b["rho"],
        b["sam_kwargs"]["policy"].k,
        b["sam_kwargs"]["policy"].scale_rho,
    )
    with pytest.warns(FutureWarning, match="sam_every_k"):
        assert grid.Variant("x", "everyk", {}).method == "sam_every_k"


def test_a_name_renamed_elsewhere_is_not_accepted_where_the_new_one_is_unknown():
    from samkit.experiments import gan

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="Invalid method value: 'everyk'"):
            gan.build_config({"methods": ["everyk"]})


def test_one_description_of_a_method():
    assert grid.MethodDef is MethodDef
    info = method_info("sam_every_k")
    assert isinstance(info, MethodInfo) and isinstance(info, MethodDef)
    assert info.uses_rho and info.defaults["k"] == 5 and info.rho_scale == 1.0


def _to_old_names(folder):
    """The run folder as samkit 0.2 wrote it: the method called ``everyk``."""
    for path in (folder / "runs" / "CartPole-v1").glob("everyk-seed0*.json"):
        record = json.loads(path.read_text())
        record["config"]["method"]["method"] = "everyk"
        if "method" in record and record["method"] == "sam_every_k":
            record["method"] = "everyk"
        path.write_text(json.dumps(record))
    return sorted(p.name for p in (folder / "runs" / "CartPole-v1").glob("everyk-*.json"))


def test_the_command_line_notes_the_old_name_and_reuses_an_old_folder(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    argv = ["rl", *SMALL[:-1], "--methods", "everyk:k=2,rho=0.1", "--out", str(out)]
    assert main([*argv, "-q"]) == 0
    _, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == [
        "samkit rl: note: method 'everyk' is now called 'sam_every_k' "
        "(the old name still works, for now)"
    ]
    first = json.loads((out / "results.json").read_text())
    (run,) = first["runs"]
    assert (run["label"], run["method"]) == ("everyk", "sam_every_k")
    assert first["settings"]["methods"][0]["method"] == "sam_every_k"

    assert _to_old_names(out) == ["everyk-seed0.json", "everyk-seed0.train.json"]

    def refuse(*args, **kwargs):
        raise AssertionError("an old run was trained or evaluated again")

    monkeypatch.setattr(rl, "train_run", refuse)
    monkeypatch.setattr(rl, "evaluate", refuse)
    assert main(argv) == 0  # not quiet: the log says what was reused
    _, err = capsys.readouterr()
    assert "everyk seed 0: done before, skipped" in err
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == first["runs"]  # the old files now carry the new name
