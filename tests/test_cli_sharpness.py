"""`samkit sharpness` and `samkit landscape`, in-process, on checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samkit.cli.errors import UsageError
from samkit.cli.main import main
from samkit.cli.sharpness import parse_memory_budget
from samkit.experiments.checkpoint import save_checkpoint
from samkit.experiments.datasets import load_dataset
from samkit.experiments.models import build_model
from samkit.sharpness import GGNOperator, HessianOperator, hessian_trace, top_eigenvalues

SPEC = {"name": "synthetic", "seed": 0, "noise": 0.0, "val_fraction": 0.1, "train_size": None}


def _checkpoint(path, seed: int, steps: int):
    data = load_dataset(**SPEC)
    torch.manual_seed(seed)
    model = build_model("cnn", in_len=data.in_len, num_classes=data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(steps):
        sl = slice(100 * (i % 10), 100 * (i % 10) + 100)
        opt.zero_grad()
        F.cross_entropy(model(data.train.x[sl]), data.train.y[sl]).backward()
        opt.step()
    save_checkpoint(
        path,
        model,
        model_name="cnn",
        model_kwargs={"in_len": data.in_len, "num_classes": data.num_classes},
        dataset=SPEC,
        meta={"label": f"m{seed}"},
    )
    return model, data


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    a, data = _checkpoint(d / "a.pt", 0, 30)
    b, _ = _checkpoint(d / "b.pt", 1, 30)
    return d, a, b, data


def test_sharpness_json_matches_library(ckpts, capsys):
    d, a, _, data = ckpts
    code = main(
        [
            "sharpness",
            str(d / "a.pt"),
            str(d / "b.pt"),
            "--samples",
            "200",
            "--top-k",
            "2",
            "--trace-samples",
            "8",
            "--average",
            "--out",
            str(d / "s.json"),
            "-q",
        ]
    )
    assert code == 0
    out = json.loads((d / "s.json").read_text())
    assert [m["label"] for m in out["models"]] == ["m0", "m1"]
    r = out["models"][0]["results"]
    assert out["models"][0]["samples"] == 200
    op = HessianOperator(a, F.cross_entropy, [(data.train.x[:200], data.train.y[:200])])
    ref = top_eigenvalues(op, 2, tol=1e-6, max_iter=100)
    assert r["hessian_eigenvalues"] == pytest.approx(ref.eigenvalues, rel=2e-3)
    assert r["hessian_top_eig"] == r["hessian_eigenvalues"][0]
    assert r["worst_case_sharpness"] > 0 and r["hessian_trace_stderr"] >= 0
    assert {"average_case_sharpness", "loss", "hessian_trace"} <= set(r)
    text = capsys.readouterr().out
    assert "m0" in text and "worst-case" in text and "wrote" in text


def test_sharpness_ggn_proxy_labelled_and_exact(ckpts, capsys):
    from samkit.sharpness import ggn_trace

    d, a, _, data = ckpts
    args = ["sharpness", str(d / "a.pt"), "--samples", "150", "--trace-samples", "2", "--ggn"]
    assert main([*args, "--tol", "1e-6", "--out", str(d / "g.json"), "-q"]) == 0
    r = json.loads((d / "g.json").read_text())["models"][0]["results"]
    batches = [(data.train.x[:150], data.train.y[:150])]
    ref = top_eigenvalues(GGNOperator(a, F.cross_entropy, batches), tol=1e-9, max_iter=200)
    assert r["ggn_top_eig"] == pytest.approx(ref.eigenvalues[0], rel=1e-5)
    assert r["ggn_trace"] == pytest.approx(
        ggn_trace(a, F.cross_entropy, batches, seed=3).trace, rel=1e-6
    )
    assert "ggn top eig (proxy)" in capsys.readouterr().out
    # progress bars are on by default in the CLI (stderr; tqdm switches itself off
    # when stderr is not a terminal, so only the checkpoint header shows here)
    assert main([*args, "--out", str(d / "h.json")]) == 0
    assert "a.pt:" in capsys.readouterr().err


def test_memory_budget_values():
    assert parse_memory_budget(None) is None
    assert parse_memory_budget("auto") == parse_memory_budget(" AUTO ") == "auto"
    assert parse_memory_budget("1048576") == 2**20
    assert parse_memory_budget("512M") == parse_memory_budget("512MiB") == 512 * 2**20
    assert parse_memory_budget("2G") == parse_memory_budget("2gb") == 2 * 2**30
    assert parse_memory_budget("1.5K") == 1536 and parse_memory_budget("1e9") == 10**9
    for bad in ("0", "0.4", "-1", "", "lots", "2X", "nan", "inf", "1e999999999", "9" * 5000):
        with pytest.raises(UsageError, match="invalid --memory-budget value"):
            parse_memory_budget(bad)


def test_sharpness_product_and_budget_reach_the_operators(ckpts, capsys):
    """--product and --memory-budget give what the library gives with the same arguments,
    and the JSON and the table name the path that ran and the graphs kept."""
    d, a, _, data = ckpts
    batches = [(data.train.x[:100], data.train.y[:100])]
    probe = HessianOperator(a, F.cross_entropy, batches, memory_budget=10**12)
    probe.matvec(torch.zeros(probe.dim))
    budget = int(0.45 * probe.graph_bytes[0])  # cut into chunks, some rebuilt per product
    out = d / "budget.json"
    argv = ["sharpness", str(d / "a.pt"), "--samples", "100", "--trace-samples", "4", "--ggn"]
    argv += ["--product", "eager", "--memory-budget", str(budget), "--out", str(out), "-q"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["product"] == "eager" and doc["settings"]["memory_budget"] == budget
    r = doc["models"][0]["results"]

    op = HessianOperator(a, F.cross_entropy, batches, product="eager", memory_budget=budget)
    eig = top_eigenvalues(op, 1, tol=1e-3, seed=0)
    tr = hessian_trace(op, n_probes=4, basis=eig.basis, tridiagonal=eig.tridiagonal, seed=1)
    assert r["hessian_eigenvalues"] == eig.eigenvalues and r["hessian_trace"] == tr.trace
    info = r["hessian_product_path"]
    assert info["product"] == "eager" and info["path"] == "eager"
    assert info["memory_budget"] == budget and info["compile_seconds"] is None
    assert info["graph_chunks"] == len(op.batches) > 1
    assert 1 <= info["graphs_kept"] == op.graphs_kept < info["graph_chunks"]
    assert 0 < info["peak_graph_bytes"] <= budget

    ggn = GGNOperator(a, F.cross_entropy, batches, product="eager", memory_budget=budget)
    assert r["ggn_top_eig"] == top_eigenvalues(ggn, tol=1e-3, seed=0).eigenvalues[0]
    g = r["ggn_product_path"]
    assert g["path"] == "eager" and g["memory_budget"] == budget
    assert (g["graphs_kept"], g["graph_chunks"]) == (ggn.graphs_kept, len(ggn.batches))
    assert g["peak_graph_bytes"] <= budget

    text = capsys.readouterr().out
    kept = f"eager, {info['graphs_kept']}/{info['graph_chunks']} graphs kept"
    assert "products" in text.splitlines()[0] and kept in text


def test_sharpness_compiled_product_named_in_json_and_table(ckpts, capsys, monkeypatch):
    # the flag's path through the command, not the compiler (its products are tested in
    # test_hvp.py / test_ggn.py): torch.compile returns the function it is given
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    d, *_ = ckpts
    argv = ["sharpness", str(d / "a.pt"), "--samples", "60", "--trace-samples", "2", "--ggn"]
    assert main([*argv, "--product", "compiled", "--out", str(d / "c.json"), "-q"]) == 0
    text = capsys.readouterr().out
    assert main([*argv, "--product", "eager", "--out", str(d / "e.json"), "-q"]) == 0
    r = json.loads((d / "c.json").read_text())["models"][0]["results"]
    e = json.loads((d / "e.json").read_text())["models"][0]["results"]
    for key in ("hessian_product_path", "ggn_product_path"):
        info = r[key]
        assert info["product"] == info["path"] == "compiled" and info["compile_seconds"] > 0
        assert info["memory_budget"] is None and "graphs_kept" not in info
        assert e[key]["path"] == "eager" and e[key]["compile_seconds"] is None
    # reverse over reverse against double backward: the same matrix, to float32 rounding
    assert r["hessian_top_eig"] == pytest.approx(e["hessian_top_eig"], rel=1e-4)
    assert r["ggn_top_eig"] == pytest.approx(e["ggn_top_eig"], rel=1e-4)
    assert "compiled, compile" in text


def test_sharpness_default_out_and_density(ckpts):
    d, *_ = ckpts
    assert (
        main(
            [
                "sharpness",
                str(d / "a.pt"),
                "--samples",
                "100",
                "--trace-samples",
                "2",
                "--density",
                str(d / "spec.png"),
                "-q",
            ]
        )
        == 0
    )
    out = json.loads((d / "a.sharpness.json").read_text())
    assert out["settings"]["samples"] == 100
    assert (d / "spec.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(d / "spec.npz") as f:
        assert float(np.trapezoid(f["density"], f["grid"])) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "mode,keys", [("1d", {"alphas", "losses"}), ("2d", {"xs", "ys", "losses"})]
)
def test_landscape_modes(ckpts, mode, keys):
    d, *_ = ckpts
    png = d / f"l-{mode}.png"
    assert (
        main(
            [
                "landscape",
                str(d / "a.pt"),
                "--mode",
                mode,
                "--resolution",
                "5",
                "--samples",
                "100",
                "--out",
                str(png),
                "-q",
            ]
        )
        == 0
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    with np.load(png.with_suffix(".npz")) as f:
        assert keys <= set(f.files)
        z = f["losses"]
        assert z.shape == ((5,) if mode == "1d" else (5, 5))
        assert np.all(np.isfinite(z))


def test_landscape_path_endpoints(ckpts, capsys):
    d, a, b, data = ckpts
    assert (
        main(["landscape", str(d / "a.pt"), "--other", str(d / "b.pt"), "--samples", "150", "-q"])
        == 0
    )
    with np.load(d / "a.landscape-path.npz") as f:
        al, losses = f["alphas"], f["losses"]
    x, y = data.train.x[:150], data.train.y[:150]
    with torch.no_grad():
        la, lb = float(F.cross_entropy(a.eval()(x), y)), float(F.cross_entropy(b.eval()(x), y))
    assert losses[al == 0.0][0] == pytest.approx(la, rel=1e-5)
    assert losses[al == 1.0][0] == pytest.approx(lb, rel=1e-5)
    assert "barrier" in capsys.readouterr().out


def test_landscape_prints_the_losses_at_the_models_not_at_the_nearest_grid_point(ckpts, capsys):
    """With 10 points over [-0.25, 1.25] (or 4 over [-1, 1]) neither 0 nor 1 is on the grid:
    they are added, and the printed losses are the models' own."""
    d, a, b, data = ckpts
    x, y = data.train.x[:150], data.train.y[:150]
    with torch.no_grad():
        la, lb = float(F.cross_entropy(a.eval()(x), y)), float(F.cross_entropy(b.eval()(x), y))
    argv = ["landscape", str(d / "a.pt"), "--samples", "150", "-q"]
    assert main([*argv, "--other", str(d / "b.pt"), "--resolution", "10"]) == 0
    out = capsys.readouterr().out
    assert f"(alpha=0): {la:.4g};" in out and f"(alpha=1): {lb:.4g};" in out
    with np.load(d / "a.landscape-path.npz") as f:
        assert len(f["alphas"]) == 12 and {0.0, 1.0} <= set(f["alphas"].tolist())
    for mode in ("1d", "2d"):
        out_png = d / f"grid-{mode}.png"
        assert main([*argv, "--mode", mode, "--resolution", "4", "--out", str(out_png)]) == 0
        assert f"loss at the weights: {la:.4g};" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["sharpness", "{d}/missing.pt"], "not a file"),
        (["sharpness", "{d}"], "not a file"),  # a folder: no name for the output (a traceback)
        (["landscape", "{d}"], "not a file"),
        (["sharpness", "{d}/a.pt", "--rho", "-1"], "--rho"),
        (["sharpness", "{d}/a.pt", "--top-k", "0"], "--top-k"),
        (["sharpness", "{d}/a.pt", "--out", "{d}/x.txt"], "--out"),
        (["sharpness", "{d}/a.pt", "--memory-budget", "0"], "--memory-budget"),
        (["sharpness", "{d}/a.pt", "--memory-budget", "lots"], "--memory-budget"),
        (["sharpness", "{d}/a.pt", "--memory-budget", "2X"], "--memory-budget"),
        # checked before any checkpoint is read
        (["sharpness", "{d}/missing.pt", "--memory-budget", "-1"], "--memory-budget"),
        (["landscape", "{d}/a.pt", "--mode", "path"], "--other"),
        (["landscape", "{d}/a.pt", "--resolution", "1"], "--resolution"),
        (["landscape", "{d}/a.pt", "--samples", "-3"], "--samples"),
        (["landscape", "{d}/junk.pt"], "not a"),
        # a path from a model to itself (barrier 0), a model measured twice
        (["landscape", "{d}/a.pt", "--other", "{d}/../{d.name}/a.pt"], "the same file as"),
        (["sharpness", "{d}/a.pt", "{d}/a.pt"], "the same file as"),
    ],
)
def test_usage_errors(ckpts, capsys, argv, msg):
    d, *_ = ckpts
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([a.format(d=d) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_product_choice_error_is_one_line(ckpts, capsys):
    d, *_ = ckpts
    with pytest.raises(SystemExit) as exc:  # argparse's choices: exit 2, before any work
        main(["sharpness", str(d / "missing.pt"), "--product", "fast"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--product" in err and "'fast'" in err and "compiled" in err


def _strict(text):
    def refuse(constant):
        raise ValueError(f"bare {constant} in the JSON")

    return json.loads(text, parse_constant=refuse)


def test_sharpness_json_is_strict_when_a_measure_is_not_finite(ckpts, capsys):
    """A standard error from one probe is infinite: it was written as a bare Infinity,
    which is not JSON. (A ball so large that the loss overflows is refused: below.)"""
    d, *_ = ckpts
    out = d / "one-probe.json"
    argv = ["sharpness", str(d / "a.pt"), "--samples", "50", "--trace-samples", "1"]
    rc = main([*argv, "--average", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    res = _strict(out.read_text())["models"][0]["results"]
    assert res["hessian_trace_stderr"] is None  # inf from one probe, mapped to null
    assert math.isfinite(res["average_case_sharpness"])


@pytest.mark.parametrize("rho", ["1e10", "1e30"])
def test_a_ball_too_large_is_refused_not_measured_as_zero(ckpts, capsys, rho):
    """At 1e30 the ball's norm overflowed float32, the ascent was scaled to nothing and the
    worst case read 0 (exit 0)."""
    d, *_ = ckpts
    argv = ["sharpness", str(d / "a.pt"), "--samples", "50", "--trace-samples", "2", "-q"]
    rc = main([*argv, "--rho", rho, "--average", "--out", str(d / "huge.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "too large" in err, err


def test_sharpness_ball_too_large_for_the_model_is_one_line(ckpts, capsys):
    d, *_ = ckpts
    argv = ["sharpness", str(d / "a.pt"), "--samples", "50", "--trace-samples", "2", "-q"]
    rc = main([*argv, "--rho", "1e10", "--out", str(d / "big.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "Invalid rho value: 10000000000.0" in err and "too large" in err
    assert not (d / "big.json").exists()


def test_outputs_never_replace_files_that_are_not_samkit_outputs(ckpts, capsys, tmp_path):
    """`landscape --out mydata.png` replaced the user's mydata.npz with the grid, `sharpness
    --out results.json` a study's results: an existing file is replaced only if it is
    samkit's own output of that kind (a rerun into the same names still works)."""
    import numpy as np

    d, *_ = ckpts
    data = tmp_path / "mydata.npz"
    np.savez(data, x_train=np.zeros((3, 2)), y_train=np.zeros(3))
    study = tmp_path / "results.json"
    study.write_text('{"runs": []}')
    before = data.read_bytes(), study.read_bytes()
    for argv, name in [
        (["landscape", f"{d}/a.pt", "--mode", "1d", "--resolution", "3"], "mydata"),
        (["sharpness", f"{d}/a.pt", "--top-k", "1", "--density", str(tmp_path / "mydata.png")], ""),
        (["sharpness", f"{d}/a.pt", "--top-k", "1", "--out", str(study)], ""),
    ]:
        if name:
            argv += ["--out", str(tmp_path / f"{name}.png")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "exists and is not samkit's" in err and len(err.splitlines()) == 1, err
    assert (data.read_bytes(), study.read_bytes()) == before
    # samkit's own outputs are replaced on a rerun
    grid = tmp_path / "grid.png"
    argv = ["landscape", f"{d}/a.pt", "--mode", "1d", "--resolution", "3", "--out", str(grid)]
    assert main(argv) == 0 and main(argv) == 0
    out = tmp_path / "sharp.json"
    argv = ["sharpness", f"{d}/a.pt", "--top-k", "1", "--trace-samples", "2", "--out", str(out)]
    assert main(argv) == 0 and main(argv) == 0


def test_a_checkpoint_is_checked_against_its_own_settings_before_any_memory(ckpts, capsys):
    """A settings entry edited to channels=1e7 asked the allocator for a petabyte (one that
    fits would have taken the machine's memory); a shape mismatch was cut off after
    "Error(s) in loading state_dict for ConvNet1D:"; other files passed on torch's text
    (escape codes, errno numbers, advice to load with weights_only=False)."""
    d, *_ = ckpts
    ckpt = torch.load(d / "a.pt", weights_only=True)
    big = {**ckpt, "model": {**ckpt["model"], "kwargs": {**ckpt["model"]["kwargs"]}}}
    big["model"]["kwargs"]["channels"] = 10**7
    torch.save(big, d / "big.pt")
    key = next(iter(ckpt["state_dict"]))
    odd = {**ckpt, "state_dict": {**ckpt["state_dict"], key: torch.zeros(3)}}
    torch.save(odd, d / "odd.pt")
    torch.save({"format": "samkit-checkpoint", "module": torch.nn.Linear(2, 2)}, d / "obj.pt")
    (d / "cut.pt").write_bytes((d / "a.pt").read_bytes()[:200])
    for name, says in [
        ("big", "do not fit"),
        ("odd", f"({key}: (3,) in the file, "),
        ("obj", "samkit never runs a file's code"),
        ("cut", "(damaged, or not a file torch.save wrote)"),
    ]:
        assert main(["sharpness", str(d / f"{name}.pt"), "--out", str(d / f"{name}.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
        assert "\x1b" not in err and "weights_only=False" not in err


@pytest.mark.parametrize("command", ["sharpness", "landscape"])
def test_a_negative_seed_is_refused_as_the_studies_refuse_it(ckpts, capsys, command):
    d, *_ = ckpts
    with pytest.raises(SystemExit) as exc:  # argparse's type check: exit 2, before any work
        main([command, str(d / "a.pt"), "--seed", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--seed: invalid seed (an integer >= 0) value: '-1'" in err


def test_a_checkpoint_whose_settings_build_far_more_modules_is_stopped_early():
    """On the meta device tensors take no memory, but every module is still built: resnet
    blocks edited to 3000 took seconds and 480 MB before the shape check (10**7: hours)."""
    from samkit.experiments.checkpoint import check_checkpoint, rebuild_model
    from samkit.experiments.models import build_model

    state = build_model("resnet").state_dict()
    ckpt = {"model": {"name": "resnet", "kwargs": {"blocks": 3000}}, "state_dict": state}
    # stopped while building (a few hundred registrations), not by the shapes after it
    with pytest.raises(ValueError, match="far more tensors than the file's"):
        rebuild_model(check_checkpoint(ckpt, "x.pt"))
    ok = {"model": {"name": "resnet", "kwargs": {}}, "state_dict": state}
    assert isinstance(rebuild_model(check_checkpoint(ok, "x.pt")), torch.nn.Module)
