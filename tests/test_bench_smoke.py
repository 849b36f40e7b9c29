"""benchmarks/overhead.py runs end to end and reports sane, complete results.

No assertions on wall time: only the structure of the JSON, that ratios are
positive finite numbers, and the things that are not timings (every
implementation computes the same perturbation and restores exactly; the
memory counts). The timing helpers are tested on their own.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("pytorch_optimizer")
    path = tmp_path_factory.mktemp("bench") / "out.json"
    overhead = load("overhead")
    returned = overhead.main(["--size", "tiny", "--trials", "2", "--json", str(path)])
    on_disk = json.loads(path.read_text())
    assert os.listdir(path.parent) == ["out.json"]  # written atomically, no temp file left
    return overhead, returned, on_disk


def positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_json_matches_return_value(result):
    _, returned, on_disk = result
    assert json.loads(json.dumps(returned)) == on_disk


def test_overhead_rows_and_ratios(result):
    overhead, _, res = result
    expected = [name for name, _ in overhead.CANDIDATES]
    for key in ("many", "large"):
        sec = res["overhead"][key]
        assert [r["method"] for r in sec["rows"]] == expected
        model = overhead.many_tensor_model(True) if key == "many" else overhead.large_model(True)
        assert sec["n_tensors"] == len(list(model.parameters()))
        assert sec["n_params"] == sum(p.numel() for p in model.parameters())
        for r in sec["rows"]:
            for field in ("seconds", "vs_samkit", "samkit_ratio", "vs_floor", "extra_memory_x"):
                assert positive_finite(r[field]), (key, r["method"], field, r[field])
        for field in ("pass_seconds", "floor_seconds"):
            assert positive_finite(sec[field])
        samkit = sec["rows"][0]
        assert samkit["vs_samkit"] == 1.0


def test_every_implementation_agrees_and_restores_exactly(result):
    _, _, res = result
    for sec in res["overhead"].values():
        for r in sec["rows"]:
            assert r["rel_error"] < 1e-5, r  # w + rho g/||g|| vs float64 maths
            assert r["exact_restore"], r


def test_memory_counts(result):
    _, _, res = result
    for sec in res["overhead"].values():
        rows = {r["method"]: r for r in sec["rows"]}
        # samkit keeps exactly one weight backup between steps, and its
        # steps allocate nothing parameter-sized on top.
        assert rows["samkit"]["held_memory_x"] == 1.0
        assert 1.0 <= rows["samkit"]["extra_memory_x"] < 1.05
        # The peer clones the weights every step and frees them after:
        # nothing held, one copy at the peak; its foreach path adds a second.
        assert rows["pytorch-optimizer"]["held_memory_x"] == 0.0
        assert rows["pytorch-optimizer foreach=True"]["extra_memory_x"] >= 2.0


def test_full_step_and_targets(result):
    overhead, _, res = result
    rows = res["full_step"]["rows"]
    assert [r["method"] for r in rows] == ["SGD", "samkit SAM", "pytorch-optimizer SAM"]
    assert all(positive_finite(r["vs_sgd"]) for r in rows)
    assert set(res["targets"]) == set(overhead.TARGETS)
    for t in res["targets"].values():
        assert positive_finite(t["value"]) and isinstance(t["met"], bool)
    assert all(positive_finite(v) for v in res["ratios"].values())
    assert res["settings"] == {"size": "tiny", "trials": 2, "rho": overhead.RHO, "reverse": False}


@pytest.mark.parametrize("argv", [["--trials", "0"], ["--size", "huge"], ["--threads", "-1"]])
def test_bad_arguments_exit_2(argv, capsys):
    overhead = load("overhead")
    with pytest.raises(SystemExit) as e:
        overhead.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip()


# ----------------------------------------------------------- _common helpers
def test_time_interleaved_runs_setup_before_every_call():
    common = load("_common")
    log = []
    out = common.time_interleaved(
        {
            "a": (lambda: log.append("a"), lambda: log.append("sa")),
            "b": (lambda: log.append("b"), None),
        },
        trials=3,
        number=2,
        warmup=1,
    )
    assert [len(v) for v in out.values()] == [3, 3]
    assert log.count("a") == log.count("sa") == 3 * 2 + 1
    assert log.count("b") == 3 * 2 + 1
    # Interleaved: after warm-up, a's trial (2 calls) then b's, round after round.
    assert log[3:] == (["sa", "a", "sa", "a", "b", "b"]) * 3
    with pytest.raises(ValueError, match="trials=0"):
        common.time_interleaved({"a": (lambda: None, None)}, trials=0, number=1, warmup=0)


def test_time_interleaved_rotates_the_order_when_asked():
    common = load("_common")
    log = []
    calls = {k: (lambda k=k: log.append(k), None) for k in "abc"}
    common.time_interleaved(calls, trials=4, number=1, warmup=0, rotate=True)
    assert "".join(log) == "abc" + "bca" + "cab" + "abc"  # each name at each position
    log.clear()
    common.time_interleaved(calls, trials=2, number=1, warmup=0)
    assert "".join(log) == "abcabc"


def test_paired_ratio_cancels_a_common_slowdown():
    common = load("_common")
    # Round 2 ran under load that slowed both candidates fivefold.
    assert common.paired_ratio([1.0, 5.0, 1.1], [2.0, 10.0, 2.2]) == 0.5
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="equal"):
        common.paired_ratio([1.0], [1.0, 2.0])


def test_peak_extra_bytes_sees_torch_cpu_allocations():
    common = load("_common")
    n = 1 << 20  # 4 MiB of float32
    kept = []

    def sequential():
        a = torch.ones(n)
        del a
        b = torch.ones(n)
        del b

    def overlapping():
        a = torch.ones(n)
        b = torch.ones(n)
        del a, b

    peak_seq = common.peak_extra_bytes(sequential)
    peak_both = common.peak_extra_bytes(overlapping)
    peak_kept = common.peak_extra_bytes(lambda: kept.append(torch.empty(n)))
    assert 4 * n <= peak_seq < 4 * n + 4096
    assert 8 * n <= peak_both < 8 * n + 4096
    assert 4 * n <= peak_kept < 4 * n + 4096


def test_write_json_is_atomic_and_print_table_aligns(tmp_path, capsys):
    common = load("_common")
    path = tmp_path / "sub" / "r.json"
    common.write_json(str(path), {"x": 1.5})
    assert json.loads(path.read_text()) == {"x": 1.5}
    assert os.listdir(path.parent) == ["r.json"]
    with pytest.raises(TypeError):
        common.write_json(str(path), {"x": object()})
    assert json.loads(path.read_text()) == {"x": 1.5}  # old file intact
    assert os.listdir(path.parent) == ["r.json"]  # no temp file left behind

    common.print_table(["name", "t"], [["a", 1234.4], ["bb", 0.123]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["| name | t    |", "|------|------|", "| a    | 1234 |", "| bb   | 0.12 |"]


def test_reverse_allocation_order_keeps_the_rows_and_their_checks(tmp_path):
    overhead = load("overhead")
    res = overhead.main(["--size", "tiny", "--trials", "1", "--reverse"])
    assert res["settings"]["reverse"] is True
    for sec in res["overhead"].values():
        assert [r["method"] for r in sec["rows"]] == [name for name, _ in overhead.CANDIDATES]
        assert all(r["exact_restore"] and r["rel_error"] < 1e-5 for r in sec["rows"])


def test_autorho_signals_refuses_bad_runs_before_training(capsys):
    signals = load("autorho_signals")
    assert signals.parse_runs(" gru@0.05, cnn_clean@1 ") == [("gru", 0.05), ("cnn_clean", 1.0)]
    for bad, words in (
        ("resnet@0.1", "unknown setting 'resnet'"),
        ("gru", "need SETTING@RHO"),
        ("gru@-1", "radius > 0"),
        ("gru@nan", "radius > 0"),
        ("gru@x", "radius > 0"),
        (",", "no run given"),
    ):
        with pytest.raises(ValueError, match=words):
            signals.parse_runs(bad)
        with pytest.raises(SystemExit) as exc:
            signals.main(["--runs", bad])
        assert exc.value.code == 2
        assert "--runs:" in capsys.readouterr().err


def test_autorho_signals_read_the_ascent_as_the_first_order_law_says():
    """The recorder reads g at w and g+ at w + e: at the first step (same weights and batch
    for both radii, the GRU smooth) ||g+ - g|| is rho ||H g^|| to first order, so the ratio
    doubles with rho; SAM's direction tends to the plain one as rho -> 0."""
    signals = load("autorho_signals")
    torch.set_num_threads(1)
    small = signals.record("gru_short", 1e-3, 0, epochs=1)
    double = signals.record("gru_short", 2e-3, 0, epochs=1)
    assert small["steps"] == double["steps"] == len(small["ratio"]) > 10
    assert len(small["agree"]) == len(small["transfer"]) == small["steps"] - 1
    assert 0 < small["ratio"][0] < 0.05
    assert double["ratio"][0] / small["ratio"][0] == pytest.approx(2.0, rel=0.02)
    assert max(abs(t) for t in small["transfer"][:5]) < 0.01
    assert all(-1.0 <= a <= 1.0 for a in small["agree"])


def _hand_written_run(opt, source, cfg, loss_of) -> list[float]:
    """The trainer's batches and cosine learning rate in a loop written by hand, with
    ``opt.step`` of a closure returning ``loss_of(x, y, ids)``: the radius after each epoch."""
    from samkit.experiments.batches import steps_per_epoch, train_batches
    from samkit.experiments.trainer import lr_factor

    steps = steps_per_epoch(source, cfg["batch_size"])
    base_lr = opt.param_groups[0]["lr"]
    rhos = []
    for epoch in range(cfg["epochs"]):
        for i, (x, y, ids) in enumerate(train_batches(source, cfg["batch_size"], 0, epoch)):
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_factor(
                    epoch * steps + i, cfg["epochs"] * steps, "cosine", 0
                )

            def closure(x=x, y=y, ids=ids):
                loss = loss_of(x, y, ids)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad(set_to_none=True)
        rhos.append(float(opt.param_groups[0]["rho"]))
    return rhos


def test_autorho_no_report_mode_is_a_hand_written_plain_loop(tmp_path):
    """The autorho benchmark's "no reports" runs go through samkit's trainer with every
    validation report dropped; a loop written by hand (the same batches, the same cosine
    learning rate, ``opt.step(closure)`` and nothing else) gives the same run to the last
    bit: the same radius after every epoch and the same validation loss at the end."""
    from samkit.experiments.batches import evaluate

    autorho = load("autorho")
    cfg = autorho.run_config("cnn_clean", "auto:gradient_agreement@plain", 0, 4)
    rec = autorho.train_one(cfg, tmp_path)

    model, opt, data = autorho.build(cfg)  # the benchmark's model, data and SAM(rho="auto")
    loss_fn = torch.nn.functional.cross_entropy
    rhos = _hand_written_run(opt, data.train, cfg, lambda x, y, ids: loss_fn(model(x), y))
    val_loss = evaluate(model, data.val)["loss"]  # the trainer's evaluation

    assert len(set(rhos)) > 1  # "auto" moved the radius: the comparison is not of constants
    assert rec["rho"] == rhos, (rec["rho"], rhos)
    assert rec["final"]["val_loss"] == val_loss


def test_autorho_held_back_mode_is_a_hand_written_loop_holding_back_by_id(tmp_path):
    """The benchmark's "held back" runs (``@heldback``) train on the training and validation
    splits together (the validation labels made as noisy as the training labels) and report
    nothing; a hand-written loop over the same batches whose closure calls
    ``opt.hold_back(losses, ids)`` gives the same run to the last bit."""
    from samkit.experiments.batches import evaluate

    autorho = load("autorho")
    cfg = autorho.run_config("mlp_digits_noise20", "auto:gradient_agreement@heldback", 0, 6)
    assert cfg["held_back"] == 0.1 and cfg["reports"] is False
    rec = autorho.train_one(cfg, tmp_path)

    model, opt, data = autorho.build(cfg)
    union = autorho._all_labelled(data, cfg["noise"], cfg["seed"])
    assert len(union.train) == len(data.train) + len(data.val)
    flipped = (union.train.y[len(data.train) :] != data.val.y).double().mean().item()
    assert flipped == pytest.approx(0.2, abs=0.01)  # the validation labels made as noisy
    loss_fn = torch.nn.functional.cross_entropy
    rhos = _hand_written_run(
        opt,
        union.train,
        cfg,
        lambda x, y, ids: opt.hold_back(loss_fn(model(x), y, reduction="none"), ids),
    )

    assert opt.rho_controller.best is not None  # the held-back samples were reported
    assert len(set(rhos)) > 1
    assert rec["rho"] == rhos, (rec["rho"], rhos)
    assert rec["final"]["val_loss"] == evaluate(model, data.val)["loss"]


def test_autorho_timing_times_the_held_back_loop_against_the_same_per_sample_losses(monkeypatch):
    """The held-back loop's step time is read against SAM at 0.05 twice: with the mean loss,
    and with the mean of the per-sample losses it computes (what hold_back and the controller
    add); the table shows both. (No assertion on times: the ratios are positive and finite.)"""
    autorho = load("autorho")
    calls = []
    original = autorho.time_interleaved

    def spy(runs, **kw):
        calls.append(list(runs))
        return original(runs, **{**kw, "warmup": 2})

    monkeypatch.setattr(autorho, "time_interleaved", spy)
    held = "auto:gradient_agreement@heldback"
    ratios = autorho.time_steps("mlp_digits_noise20", [held], trials=2, steps=1)
    assert calls == [["rho=0.05", autorho.PER_SAMPLE, held]]
    assert set(ratios) == {autorho.PER_SAMPLE, held, f"{held} / per-sample"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    # without a held-back candidate, no per-sample reference is timed
    assert set(autorho.time_steps("mlp_digits_noise20", ["auto:gradient_agreement"], 1, 1)) == {
        "auto:gradient_agreement"
    }


def test_trace_coverage_refuses_bad_arguments_and_measures_each_estimators_error_bar(
    tmp_path, capsys
):
    coverage = load("trace_coverage")
    with pytest.raises(SystemExit) as exc:
        coverage.main(["--seeds", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--seeds" in capsys.readouterr().err
    assert coverage.main(["--seeds", "200", "--probes", "10", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "trace_coverage.json").read_text())["results"]
    # the default's and Hutchinson's reported errors match their spread; XTrace's runs low
    for method in ("deflated", "hutchinson"):
        assert 0.8 < res[method]["rms_stderr"] / res[method]["rms_error"] < 1.25, method
    assert res["xtrace"]["rms_stderr"] / res["xtrace"]["rms_error"] < 0.85
    assert res["xtrace"]["coverage"] < res["deflated"]["coverage"]
