"""`samkit compare` / `samkit.compare` on the user's own model and data (issue 10).

A model and data module is written in a temporary folder outside the project
and run through the CLI (``--model mod:fn --data mod:fn``, from that folder)
and through the API; both must write the same run folder with the same
numbers. The trainer's paired protocol is checked on the user's data: for a
seed every method sees the same initial weights and the same batches.
"""

from __future__ import annotations

import json
import os
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import samkit
from samkit.cli.main import main

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def make_model(hidden=12):
        return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def load():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(260, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])
    """
)


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (what other tools do)."""

    def bad(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=bad)


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder outside the project holding the user's module, as the current folder."""
    name = f"usermod_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, name


SETTINGS = ["--optimizers", "sgd", "sam", "--seeds", "2", "--epochs", "2", "--batch-size", "40"]


def test_own_model_and_data_through_cli_and_api_give_one_run_folder(user_folder, capsys):
    folder, mod = user_folder
    rc = main(
        [
            "compare",
            "--model",
            f"{mod}:make_model",
            "--data",
            f"{mod}:load",
            *SETTINGS,
            "--no-sharpness",
            "-q",
            "--out",
            "cli",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "sgd" in out and "sam" in out and "test acc %" in out
    assert "sam: " in out and "against sgd, paired over 2 seeds" in out  # the verdict sentence
    res = _strict((folder / "cli" / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["sgd", "sam"]
    assert res["problem"]["task"] == "classification" and res["problem"]["metric"] == "acc"
    assert res["settings"]["model_factory"]["name"] == f"{mod}:make_model"
    html = (folder / "cli" / "report.html").read_text()
    assert "Paired verdicts" in html and "data:image/png;base64," in html

    loader = __import__(mod)
    api = samkit.compare(
        model=loader.make_model,
        data=f"{mod}:load",
        methods=["sgd", "sam"],
        seeds=2,
        epochs=2,
        batch_size=40,
        sharpness=False,
        out=folder / "api",
        quiet=True,
    )
    assert api.results_path == folder / "api" / "results.json"
    api_runs = {r["key"]: r["final"] for r in api.to_dict()["runs"]}
    cli_runs = {r["key"]: r["final"] for r in res["runs"]}
    strip = lambda d: {k: v for k, v in d.items() if k != "epoch_time"}  # noqa: E731
    assert {k: strip(v) for k, v in api_runs.items()} == {k: strip(v) for k, v in cli_runs.items()}
    assert sorted(p.name for p in (folder / "api" / "runs").iterdir()) == sorted(
        p.name for p in (folder / "cli" / "runs").iterdir()
    )
    assert api.verdicts == [v["sentence"] for v in res["verdicts"]]


def test_npz_data_with_a_built_in_model_and_regression(tmp_path, capsys):
    g = np.random.default_rng(0)
    x = g.normal(size=(240, 5)).astype(np.float32)
    y = (x @ g.normal(size=5) + 0.1 * g.normal(size=240)).astype(np.float32)
    path = tmp_path / "arrays.npz"
    np.savez(path, x_train=x[:180], y_train=y[:180], x_test=x[180:], y_test=y[180:])
    argv = ["compare", "--model", "mlp", "--data", str(path), "--optimizers", "sgd", "sam"]
    argv += ["--seeds", "1", "--epochs", "2", "--batch-size", "30", "--lr", "0.01", "-q"]
    rc = main([*argv, "--no-sharpness", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = _strict((tmp_path / "o" / "results.json").read_text())
    assert res["problem"]["task"] == "regression"  # float targets
    assert res["problem"]["metric"] == "mse" and not res["problem"]["maximize"]
    run = res["runs"][0]
    # mse is the mean of the squared error over the test split (one output per target)
    assert run["final"]["test_mse"] == pytest.approx(run["final"]["test_loss"], rel=1e-6)
    assert "test mse (mean +- std)" in out


def test_compare_warns_before_training_on_data_without_a_test_split(tmp_path, capsys):
    """An .npz of x_train/y_train only trained every run, then showed a table of "-" and
    "no test acc to compare", without a word before (its help says x_test, y_test are
    needed). Now one line says so first; tune needs no test split and says nothing."""
    g = np.random.default_rng(0)
    path = tmp_path / "train_only.npz"
    np.savez(path, x_train=g.normal(size=(60, 5)), y_train=g.integers(0, 2, 60))
    import warnings

    argv = ["compare", "--model", "mlp", "--data", str(path), "--optimizers", "sgd"]
    with pytest.warns(RuntimeWarning, match="the data has no test split") as caught:
        rc = main([*argv, "--seeds", "1", "--epochs", "1", "-q", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert caught[0].filename.endswith("api.py")  # samkit's: one line in the CLI
    argv = ["tune", "--model", "mlp", "--data", str(path), "--grid", "0.05", "--seeds", "1"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main([*argv, "--epochs", "1", "-q", "--out", str(tmp_path / "t")]) == 0
    assert not [w for w in seen if "no test split" in str(w.message)]


class _Recording(Dataset):
    """A map-style dataset that records which samples are read, in order."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.x[i], self.y[i]


def _problem(n=120):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = (x.sum(1) > 0).long()
    return x, y


def _make():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_paired_protocol_same_batches_and_init_for_every_method(tmp_path, monkeypatch):
    x, y = _problem()
    train = _Recording(x[:100], y[:100])
    from samkit.experiments import trainer

    seen: list[tuple[str, int, list[int], torch.Tensor]] = []
    real = trainer.train

    def spy(model, method, data, config, **kw):
        first = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        start = len(train.reads)
        res = real(model, method, data, config, **kw)
        seen.append((method.name, kw["seed"], train.reads[start:], first))
        return res

    from samkit.experiments import study

    monkeypatch.setattr(study, "train", spy)
    samkit.compare(
        model=_make,
        train=train,
        test=(x[100:], y[100:]),
        methods=["sgd", "sam", "sam:rho=0,label=sam0"],
        seeds=[0, 1],
        epochs=2,
        batch_size=16,
        sharpness=False,
        out=tmp_path / "o",
        quiet=True,
        val_fraction=0.2,
    )
    by_seed: dict[int, list] = {}
    for _name, seed, reads, init in seen:
        by_seed.setdefault(seed, []).append((reads, init))
    for runs in by_seed.values():
        assert len(runs) == 3
        assert all(r[0] == runs[0][0] for r in runs)  # same samples, same order
        assert all(torch.equal(r[1], runs[0][1]) for r in runs)  # same initial weights
    assert by_seed[0][0][0] != by_seed[1][0][0]  # another seed, another order
    res = _strict((tmp_path / "o" / "results.json").read_text())
    finals = {(r["label"], r["seed"]): r["final"] for r in res["runs"]}
    for seed in (0, 1):  # rho = 0 SAM is SGD to the bit, on the user's data too
        assert finals[("sam0", seed)]["test_acc"] == finals[("sgd", seed)]["test_acc"]
        assert finals[("sam0", seed)]["train_loss"] == finals[("sgd", seed)]["train_loss"]


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y, self.epoch = x, y, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch))
        for i in order:
            yield self.x[i], self.y[i]


def test_streamed_data_iterable_and_factory(tmp_path):
    x, y = _problem()
    calls = []

    def factory(seed, epoch):
        calls.append((seed, epoch))
        order = torch.randperm(100, generator=torch.Generator().manual_seed(1000 * seed + epoch))
        for i in range(0, 100 - 19, 20):
            j = order[i : i + 20]
            yield x[j], y[j]

    results = {}
    for name, train in (("iterable", _Stream(x[:100], y[:100])), ("factory", factory)):
        r = samkit.compare(
            model=_make,
            train=train,
            val=(x[100:110], y[100:110]),
            test=(x[110:], y[110:]),
            methods=["sgd", "sam"],
            seeds=2,
            epochs=2,
            batch_size=20,
            sharpness=False,
            out=tmp_path / name,
            quiet=True,
        )
        results[name] = r
        assert all(row["n"] == 2 for row in r.rows)
        assert all(run["steps"] == 10 for run in r.to_dict()["runs"])  # 5 batches x 2 epochs
    assert {(0, 0), (0, 1), (1, 0), (1, 1)} <= set(calls)
    with pytest.raises(ValueError, match="saf.*map-style"):
        samkit.compare(model=_make, train=factory, methods=["sgd", "saf"], out=tmp_path / "x")


def test_user_loss_metrics_and_mixed_precision(tmp_path):
    x, y = _problem()

    def balanced_error(output, target):
        return (output.argmax(1) != target).double().mean()

    r = samkit.compare(
        model=_make,
        train=(x[:100], y[:100]),
        test=(x[100:], y[100:]),
        loss=nn.CrossEntropyLoss(label_smoothing=0.1),  # switched to reduction="none" for ESAM
        metrics={"err": balanced_error, "acc": samkit.experiments.problem.accuracy},
        methods=["sgd", "sam", "esam"],
        seeds=1,
        epochs=1,
        batch_size=20,
        amp="bf16",
        sharpness=False,
        out=tmp_path / "o",
        quiet=True,
    )
    d = r.to_dict()
    assert d["problem"]["metric"] == "err" and not d["problem"]["maximize"]
    run = d["runs"][0]
    assert run["final"]["test_err"] == pytest.approx(1 - run["final"]["test_acc"])
    assert "test err (mean +- std)" in r.table


def test_model_that_does_not_fit_the_data_fails_before_training(tmp_path):
    x, y = _problem()
    with pytest.raises(ValueError, match="fails on a batch"):
        samkit.compare(
            model=lambda: nn.Linear(5, 2),
            train=(x[:100], y[:100]),
            methods=["sgd"],
            out=tmp_path / "o",
            quiet=True,
        )
    with pytest.raises(
        ValueError,
        match=r"Invalid model value: labels must be in 0\.\.0 \(the model gives 1 logit\): found 1",
    ):
        samkit.compare(
            model=lambda: nn.Linear(4, 1),
            train=(x[:100], y[:100]),
            methods=["sgd"],
            out=tmp_path / "o",
            quiet=True,
        )
    assert not (tmp_path / "o" / "runs" / "sgd-seed0.json").exists()


def test_device_auto_and_cli_device_errors(tmp_path, capsys):
    from samkit.experiments.trainer import resolve_device

    want = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        want = "mps"
    assert resolve_device("auto").type == want
    if not torch.cuda.is_available():
        rc = main(
            ["compare", "--device", "cuda", "--dataset", "synthetic", "-q", "--out", str(tmp_path)]
        )
        assert rc == 2 and "CUDA is not available" in capsys.readouterr().err


def test_tensor_dataset_directly(tmp_path):
    x, y = _problem()
    r = samkit.compare(
        model=_make,
        train=TensorDataset(x[:100], y[:100]),
        test=TensorDataset(x[100:], y[100:]),
        methods=["sgd"],
        seeds=1,
        epochs=1,
        batch_size=25,
        sharpness=False,
        out=tmp_path / "o",
        quiet=True,
    )
    (run,) = r.to_dict()["runs"]
    assert run["steps"] == 3  # 100 - 10 % validation = 90 samples: 3 full batches of 25


def test_own_model_and_data_from_the_settings_file(user_folder, capsys):
    folder, mod = user_folder
    (folder / "study.toml").write_text(
        f'model = "{mod}:make_model"\nmodel_kwargs = {{ hidden = 5 }}\ndata = "{mod}:load"\n'
        'task = "classification"\ndevice = "cpu"\nnum_workers = 0\nbaseline = "sam"\n'
        'optimizers = ["sgd", "sam"]\nseeds = 1\nepochs = 1\nbatch_size = 50\nsharpness = false\n'
    )
    rc = main(["compare", "--config", "study.toml", "-q", "--out", "toml-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = _strict((folder / "toml-run" / "results.json").read_text())
    assert res["settings"]["model_kwargs"] == {"hidden": 5}
    assert res["runs"][0]["n_params"] == 6 * 5 + 5 + 5 * 3 + 3  # the factory got hidden=5
    assert [v["baseline"] for v in res["verdicts"]] == ["sam"]
    assert "sgd: " in out and "against sam" in out


def test_import_samkit_stays_torch_only_and_compare_is_lazy():
    import subprocess
    import sys

    code = (
        "import sys, samkit\n"
        "assert not [m for m in sys.modules if m.startswith('samkit.experiments')], 'eager'\n"
        "assert 'matplotlib' not in sys.modules and 'optuna' not in sys.modules\n"
        "assert callable(samkit.compare) and callable(samkit.tune)\n"
        "assert 'samkit.experiments.api' in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_worker_processes_give_the_same_numbers(tmp_path):
    """In-memory tensors are indexed directly without workers and through a DataLoader
    with them; both paths must feed the same batches."""
    x, y = _problem()
    finals = []
    for workers in (0, 1):
        r = samkit.compare(
            model=_make,
            train=(x[:100], y[:100]),
            test=(x[100:], y[100:]),
            methods=["sam"],
            seeds=1,
            epochs=2,
            batch_size=20,
            sharpness=False,
            num_workers=workers,
            out=tmp_path / str(workers),
            quiet=True,
        )
        (run,) = r.to_dict()["runs"]
        finals.append({k: v for k, v in run["final"].items() if k != "epoch_time"})
    assert finals[0] == finals[1]


def test_numpy_scalars_are_numbers_everywhere(tmp_path):
    """The optimizers took numpy.float32(0.05) as rho; the studies refused np.int64(1)
    seeds and np.float32 rho. One rule: numbers are numbers (stored as plain Python,
    so the run folder's JSON is written), a bool is not."""
    from samkit.experiments import gan, rl
    from samkit.experiments.tuning import TuneSpec

    x, y = _problem()
    r = samkit.compare(
        model=_make,
        train=(x[:100], y[:100]),
        methods=["sgd", {"method": "sam", "rho": np.float32(0.1), "label": "sam01"}, "asam"],
        seeds=np.int64(1),
        epochs=np.int64(1),
        batch_size=np.int32(25),
        rho=np.float32(0.05),
        lr=np.float64(0.05),
        train_size=np.int64(80),
        sharpness=False,
        out=tmp_path / "o",
        quiet=True,
    )
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    assert d["settings"]["seeds"] == [0] and d["settings"]["train"]["epochs"] == 1
    options = {m["label"]: m["options"]["rho"] for m in d["settings"]["methods"] if m["options"]}
    assert options["sam01"] == pytest.approx(0.1) and options["asam"] == pytest.approx(0.5)
    assert type(options["asam"]) is float and len(r.rows) == 3

    cfg = rl.build_config(
        {**rl.DEFAULTS, "envs": ["CartPole-v1"], "seeds": np.int64(2), "rho": [np.float32(0.1)]}
    )
    assert cfg.seeds == [0, 1] and json.dumps(cfg.to_dict())
    cfg = gan.build_config({**gan.DEFAULTS, "seeds": np.int64(1), "iterations": np.int64(5)})
    assert cfg.seeds == [0] and json.dumps(cfg.to_dict())
    spec = TuneSpec(trials=np.int64(3), sampler_seed=np.uint8(1))
    grid = TuneSpec(grid=[np.float32(0.05)])
    assert (type(spec.trials), type(spec.sampler_seed), type(grid.grid[0])) == (int, int, float)


def test_a_folder_holds_one_problem_of_your_own_too(tmp_path):
    """Other data in the same out= was trained over the old runs without a word; the
    task given explicitly, as it was inferred, is the same problem."""
    x, y = _problem()
    kw = dict(methods=["sgd"], seeds=1, epochs=1, sharpness=False, out=tmp_path, quiet=True)
    samkit.compare(model=_make, train=(x[:100], y[:100]), **kw)
    with pytest.raises(ValueError, match=r"holds a study of another problem \(data\.train\."):
        samkit.compare(model=_make, train=(x[:100] + 1, y[:100]), **kw)
    r = samkit.compare(model=_make, train=(x[:100], y[:100]), task="classification", **kw)
    assert r.to_dict()["executed_runs"] == 1  # its identity changed: retrained, not refused


@pytest.mark.parametrize("fraction", [0.3, 0.0])
def test_a_val_fraction_beside_your_own_validation_split_is_refused(tmp_path, fraction):
    """It was ignored (the data's own split is used) yet recorded as the study's problem."""
    x, y = _problem()
    with pytest.raises(ValueError, match=rf"Invalid val_fraction value: {fraction} \(your data"):
        samkit.compare(
            model=_make,
            train=(x[:80], y[:80]),
            val=(x[80:100], y[80:100]),
            test=(x[100:], y[100:]),
            val_fraction=fraction,
            methods=["sgd"],
            seeds=1,
            epochs=1,
            out=tmp_path,
            quiet=True,
        )
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_model_instance_is_refused_with_what_to_pass_instead(tmp_path):
    """An nn.Module is callable (its forward), so it passed for a factory and failed with
    forward()'s missing-argument message at the first call."""
    x, y = _problem()
    with pytest.raises(ValueError, match=r"Invalid model value: a Sequential instance; pass a fun"):
        samkit.compare(
            model=_make(),
            train=(x[:100], y[:100]),
            test=(x[100:], y[100:]),
            methods=["sgd"],
            seeds=1,
            epochs=1,
            out=tmp_path,
            quiet=True,
        )


def test_a_metrics_direction_is_read_from_the_words_of_its_name_or_asked_for():
    """Only exact names counted as higher-is-better: balanced_accuracy, top1_acc, roc_auc
    were minimised (a tune picked the rho at chance, the verdicts read upside down)."""
    from samkit.experiments.problem import higher_is_better

    def f(o, t):
        return 0.0

    higher = ("balanced_accuracy", "top1_acc", "roc_auc", "f1_macro", "mean_iou", "val-acc",
              "top-1", "neg_mse")  # fmt: skip
    for name in higher:
        assert higher_is_better(name, f) is True, name
    for name in ("val_loss", "rmse", "test_error", "nll"):
        assert higher_is_better(name, f) is False, name
    for name in ("custom", "acc_loss", "acc_drop"):
        with pytest.raises(ValueError, match=rf"cannot tell whether a higher '{name}' is better"):
            higher_is_better(name, f)
    f.higher_is_better = False  # a declared direction wins over the name
    assert higher_is_better("balanced_accuracy", f) is False


def test_an_undecidable_primary_metric_is_refused_before_training(tmp_path):
    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
    with pytest.raises(ValueError, match=r"^Invalid metrics value: cannot tell whether"):
        samkit.compare(model=lambda: torch.nn.Linear(4, 2), train=(x, y), methods=["sgd"],
                       metrics={"quality": lambda o, t: 0.5}, seeds=1, epochs=1,
                       out=tmp_path / "o", quiet=True)  # fmt: skip
    assert not (tmp_path / "o" / "runs").exists()


def test_a_factory_with_buffers_left_uninitialised_is_not_taken_for_an_unseeded_one(tmp_path):
    """The check compares parameters: a buffer of torch.empty (or NaN) differs between two
    calls without making the models differ."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.register_buffer("scratch", torch.full((3,), float("nan")))

        def forward(self, x):
            return self.lin(x)

    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
    result = samkit.compare(model=Net, train=(x, y), methods=["sgd"], seeds=1, epochs=1,
                            sharpness=False, out=tmp_path / "o", quiet=True)  # fmt: skip
    assert result.rows[0]["n"] == 1


@pytest.mark.parametrize("kind", ["same", "wider", "unseeded", "nan"])
def test_a_model_factory_must_give_a_fresh_identical_model_per_call(kind, tmp_path):
    """Every method must start from the same weights for a seed: one instance returned each
    call made each run continue from the last (Adam "+10 points" from a warm start), other
    widths or unseeded weights compared different models; all were accepted."""
    import numpy as np

    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
    one = torch.nn.Linear(4, 2)
    calls = []
    state = np.random.RandomState()  # (its own generator: not seeded by samkit)

    def factory():
        calls.append(1)
        if kind == "same":
            return one
        if kind == "wider":
            return torch.nn.Sequential(
                torch.nn.Linear(4, 4 * len(calls)), torch.nn.Linear(4 * len(calls), 2)
            )
        m = torch.nn.Linear(4, 2)
        if kind == "nan":  # it read as "other initial weights" (NaN != NaN)
            with torch.no_grad():
                m.weight.fill_(float("nan"))
            return m
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(state.randn(2, 4)))
        return m

    match = {"same": "returns the same module object", "wider": "returns another architecture",
             "unseeded": "returns other initial weights for the same seed",
             "nan": r"initial weights hold NaN or infinite values \(weight\)"}[kind]  # fmt: skip
    with pytest.raises(ValueError, match=match):
        samkit.compare(model=factory, train=(x, y), methods=["sgd", "sam"], seeds=1, epochs=1,
                       out=tmp_path / "o", quiet=True)  # fmt: skip
    assert not (tmp_path / "o" / "runs").exists() or not list((tmp_path / "o" / "runs").iterdir())


def test_a_torch_loss_modules_own_reduction_is_kept_and_broadcasting_refused():
    """reduction="none" then a plain mean lost the module's weighted mean (class weights:
    5.16 where torch gives 0.94; ignored targets counted in the denominator) and its sum;
    MSELoss on (B, 1) outputs and (B,) targets trained on a (B, B) broadcast, silently."""
    from torch import nn

    from samkit.experiments.problem import per_sample_loss

    g = torch.Generator().manual_seed(0)
    o, t = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    ignored = t.clone()
    ignored[::2] = -100
    cases = [
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.0, 10.0])), t),
        (nn.CrossEntropyLoss(), ignored),
        (nn.NLLLoss(weight=torch.tensor([2.0, 1.0, 1.0]), ignore_index=1), t),
        (nn.CrossEntropyLoss(reduction="sum"), t),
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]), label_smoothing=0.1), t),
    ]
    t255 = t.clone()
    t255[::3] = 255  # an ignore index above the classes (segmentation's "void")
    cases.append(
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.0, 10.0]), ignore_index=255), t255)
    )
    for module, target in cases:
        inputs = o.log_softmax(1) if isinstance(module, nn.NLLLoss) else o
        per = per_sample_loss(module)(inputs, target)
        assert per.shape == (8,)
        torch.testing.assert_close(per.mean(), module(inputs, target), rtol=1e-6, atol=0)
    # several elements per sample (segmentation maps, soft targets, multi-output sums)
    maps = torch.randn(4, 3, 5, 6, generator=g)
    labels = torch.randint(0, 3, (4, 5, 6), generator=g)
    void = labels.clone()
    void[:, :2] = -100
    for module, inputs, target in [
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0])), maps, labels),
        (nn.CrossEntropyLoss(), maps, void),
        (nn.CrossEntropyLoss(reduction="sum"), maps, labels),
        (nn.CrossEntropyLoss(), maps, torch.softmax(torch.randn(4, 3, 5, 6, generator=g), 1)),
        (
            nn.MSELoss(reduction="sum"),
            torch.randn(8, 4, generator=g),
            torch.randn(8, 4, generator=g),
        ),
    ]:
        per = per_sample_loss(module)(inputs, target)
        assert per.shape == inputs.shape[:1]
        torch.testing.assert_close(per.mean(), module(inputs, target), rtol=1e-6, atol=0)
    plain = per_sample_loss(nn.CrossEntropyLoss())(o, t)  # unweighted: the per-sample values
    assert torch.equal(plain, nn.CrossEntropyLoss(reduction="none")(o, t))
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"broadcasts the model's output \(8, 1\)"),
    ):
        per_sample_loss(nn.MSELoss())(torch.randn(8, 1), torch.randn(8))


NET = """
import torch
from torch import nn

WIDTH = {width}
SHIFT = {shift}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))

    def forward(self, x):
        return self.body(x)


def make():
    return Net()


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(60, 4, generator=g)

    def __len__(self):
        return 60

    def __getitem__(self, i):
        return self.x[i], int(self.x[i, 0] > SHIFT)


def load():
    return Data(), Data()
"""


def test_a_changed_model_class_or_dataset_code_is_another_problem(tmp_path, capsys):
    """The run identity held the factory's own source and a Dataset's length only: a class
    edited in the same file (width 4, then 256) or labels changed in a Dataset's code kept
    the old runs beside new ones, compared as one problem (+31 points, -86 points). Now the
    folder is another problem's, as for an edited factory."""

    from samkit.cli.main import main

    mod = tmp_path / "net.py"
    argv = ["compare", "--model", f"{mod}:make", "--data", f"{mod}:load", "--optimizers",
            "sgd", "--seeds", "1", "--epochs", "1", "--batch-size", "20", "--no-sharpness",
            "-q", "--out", str(tmp_path / "o")]  # fmt: skip

    def run(width, shift):
        mod.write_text(NET.format(width=width, shift=shift))
        os.utime(mod, ns=(time.time_ns(), time.time_ns()))
        rc = main(argv)
        return rc, capsys.readouterr().err

    assert run(4, 0.0)[0] == 0
    record = (tmp_path / "o" / "runs" / "sgd-seed0.json").read_text()
    assert run(4, 0.0)[0] == 0  # unchanged: the same run, kept
    assert (tmp_path / "o" / "runs" / "sgd-seed0.json").read_text() == record
    rc, err = run(256, 0.0)
    assert rc == 2 and "holds a study of another problem (" in err and "model_factory.built:" in err
    rc, err = run(4, 0.5)
    assert rc == 2 and "holds a study of another problem (" in err and "data.train.sampled:" in err
    assert (tmp_path / "o" / "runs" / "sgd-seed0.json").read_text() == record  # untouched


def test_a_metric_that_is_not_finite_on_a_batch_is_warned_before_training(tmp_path):
    """It passed the checks silently; every epoch's value was NaN (an epoch averages its
    batches), so early stopping stopped at its patience and the verdict blamed a missing
    test split. (Warned, not refused: an untrained model may make a metric undefined.)"""
    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
    with pytest.warns(UserWarning, match=r"metric 'acc' returned nan on a batch of the untrained"):
        samkit.compare(model=lambda: torch.nn.Linear(4, 2), train=(x, y), methods=["sgd"],
                       metrics={"acc": lambda o, t: float("nan")}, seeds=1, epochs=1,
                       out=tmp_path / "o", quiet=True)  # fmt: skip


def test_a_dataset_with_random_augmentation_keeps_its_fingerprint_between_runs():
    """The samples a Dataset is fingerprinted by are read under fixed seeds (the caller's
    random state restored), and twice: one augmenting from a generator of its own is
    fingerprinted by its code alone, so a rerun is never taken for another problem."""
    from samkit.experiments.userdata import _sampled_fingerprint

    class GlobalNoise(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))

        def __len__(self):
            return 40

        def __getitem__(self, i):
            return self.x[i] + 0.1 * torch.randn(3), 0

    class OwnNoise(GlobalNoise):
        def __init__(self):
            super().__init__()
            self.g = np.random.default_rng()

        def __getitem__(self, i):
            return self.x[i] + float(self.g.normal()), 0

    state = torch.get_rng_state()
    a, b = _sampled_fingerprint(GlobalNoise()), _sampled_fingerprint(GlobalNoise())
    assert a == b and "-" in a  # code and samples
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state untouched
    own = _sampled_fingerprint(OwnNoise())
    assert own == _sampled_fingerprint(OwnNoise()) and "-" not in own  # code alone


def test_a_model_that_cannot_take_the_evaluation_batch_is_refused_before_training(tmp_path):
    """The checks ran the val/test splits in training-sized batches, the evaluation in
    batches of eval_batch_size (2000): a model that only takes the training batch failed
    after its first epoch had trained."""

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            if x.shape[0] > 20:
                raise RuntimeError("batch too large")
            return self.lin(x)

    x, y = torch.randn(100, 4), torch.randint(0, 2, (100,))
    with pytest.raises(ValueError, match=r"fails on a batch of the (val|test) split"):
        samkit.compare(model=Fixed, train=(x, y), test=(x[:60], y[:60]), methods=["sgd"],
                       seeds=1, epochs=1, batch_size=20, sharpness=False,
                       out=tmp_path / "o", quiet=True)  # fmt: skip
    assert not (tmp_path / "o" / "runs").exists() or not list(
        (tmp_path / "o" / "runs").glob("*.json")
    )


def test_splits_whose_samples_differ_in_shape_are_named_as_the_data(tmp_path):
    """Test samples of 5 features beside training samples of 4 were blamed on the model
    ("'mlp' fails on a batch of the test split")."""
    g = np.random.default_rng(0)
    train = (g.normal(size=(60, 4)).astype("float32"), g.integers(0, 3, 60))
    test = (g.normal(size=(20, 5)).astype("float32"), g.integers(0, 3, 20))
    with pytest.raises(ValueError, match=r"the test split's samples have shape \(5,\), the "
                       r"training split's \(4,\)"):  # fmt: skip
        samkit.compare(model="mlp", train=train, test=test, methods=["sgd"], seeds=1, epochs=1,
                       out=tmp_path / "o", quiet=True)  # fmt: skip


def test_a_model_that_takes_samples_of_any_size_is_not_refused(tmp_path):
    """Evaluation at another size (FixRes; padded text) is the user's to choose: only a model
    that fails on the other split's samples is refused (the check refused the shape itself)."""
    g = np.random.default_rng(0)
    train = (g.normal(size=(60, 1, 8)).astype("float32"), g.integers(0, 3, 60))
    test = (g.normal(size=(20, 1, 12)).astype("float32"), g.integers(0, 3, 20))

    def model():
        return torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool1d(4), torch.nn.Flatten(), torch.nn.Linear(4, 3)
        )

    result = samkit.compare(model=model, train=train, test=test, methods=["sgd"], seeds=1,
                            epochs=1, sharpness=False, out=tmp_path / "o", quiet=True)  # fmt: skip
    assert result.rows[0]["test_acc_mean"] is not None


def test_a_study_refused_by_its_checks_leaves_no_folder_behind(tmp_path):
    """A refused study left a new folder holding only .samkit.lock; a folder that was there
    before is left as it was."""
    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))

    def nan_model():
        m = torch.nn.Linear(4, 2)
        with torch.no_grad():
            m.weight.fill_(float("nan"))
        return m

    args = dict(train=(x, y), test=(x, y), methods=["sgd"], seeds=1, epochs=1, quiet=True)
    with pytest.raises(ValueError, match="NaN"):
        samkit.compare(model=nan_model, out=tmp_path / "new" / "study", **args)
    assert not (tmp_path / "new" / "study").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="NaN"):
        samkit.compare(model=nan_model, out=tmp_path / "mine", **args)
    assert (tmp_path / "mine").is_dir()
