"""The bad-input review of issue 10 as a table: input, expected message, exit code.

Every row is a bad input a user could give the CLI. Each must end with exit
code 2 and one line on stderr naming the problem, no traceback, *before* any
training: where a valid method comes first (``sgd``), its run must not have
been trained (no ``runs/sgd-seed0.json``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from samkit.cli.main import main

FAST = ["--dataset", "synthetic", "--train-size", "100", "--epochs", "1", "--seeds", "1", "-q"]


def _cli(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# (flags after `samkit compare` + FAST, expected text in the one line)
COMPARE = [
    # a fraction that rounds to no sample (0 is "none", and works: below)
    (["--val-fraction", "0.0001"], "leaves no validation sample"),
    (["--jobs", "\u00b2"], "Invalid jobs value: '\u00b2'"),  # (a digit to isdigit, not to int)
    # worker processes cannot have DataLoader workers (it crashed with a traceback)
    (["--num-workers", "1", "--jobs", "2"], "Invalid jobs value: 2 with num_workers=1"),
    # labels whose runs would share files (both wrote runs/a_b_-seed0.*; the case on macOS)
    (
        ["--optimizers", "sgd:label=a(b)", "sgd:label=a_b_,lr=0.05"],
        "the labels 'a(b)' and 'a_b_' name the same run files",
    ),
    (
        ["--optimizers", "sam:label=SAM", "sgd:label=sam"],
        "the labels 'SAM' and 'sam' name the same",
    ),
    # method options checked before any run trains (they were checked when their run started)
    (["--optimizers", "sgd", "looksam:k=0"], "looksam"),
    (["--optimizers", "sgd", "rst:p=2"], "rst"),
    (["--optimizers", "sgd", "esam:beta=2"], "esam"),
    (["--optimizers", "sgd", "asam:eta=nan"], "eta"),
    (["--optimizers", "sgd", "asam:eta=inf"], "eta"),
    (["--optimizers", "sgd", "sam:rho=-1"], "rho"),
    (["--optimizers", "sgd", "sam:rho=1e308"], "Invalid rho value: 1e+308"),
    (["--optimizers", "sgd", "gsam:rho=1e39"], "Invalid rho value: 1e+39"),
    # torch reads these as float32: above its range a run failed mid-way with a traceback
    (["--lr", "1e39"], "Invalid lr value"),
    (["--weight-decay", "1e308"], "Invalid weight_decay value"),
    (["--optimizers", "sgd", "sam:lr=1e308"], "Invalid lr value"),
    (["--optimizers", "sgd", "sam:rho=abc"], "rho"),
    (["--optimizers", "sgd", "sam_on"], "normalisation"),
    (["--optimizers", "sgd", "msam:micro_batches=0"], "micro_batches"),
    (["--optimizers", "sgd", "gsam:alpha=-1"], "alpha"),
    (["--optimizers", "sgd", "swp:beta=0"], "beta"),
    (["--optimizers", "sgd", "sam_every_k:k=0"], "k"),
    (["--optimizers", "sgd", "saf:delay=-1"], "delay"),
    (["--optimizers", "sgd", "mesa:decay=2"], "decay"),
    (["--optimizers", "sgd", "rst:seed=-3"], "seed"),
    (["--optimizers", "sgd", "sam:rho=0.1,rho=0.2"], "twice"),
    (["--optimizers", "sgd", "sam:label=a b"], "label"),
    (["--optimizers", "sgd", "sam:label=\x1b[31mred"], "label"),
    (["--optimizers", "sgd", "sam:bogus=1"], "bogus"),
    (["--optimizers", "sgd", "sam:lr=0"], "lr"),
    (["--optimizers", "sgd", "sam:momentum=1"], "momentum"),
    (["--optimizers", "sgd", "sam:base=lbfgs"], "base"),
    (["--amp", "fp16", "--optimizers", "sgd", "msam"], "fp16"),
    # values that used to fall back to defaults silently
    (["--optimizers", "sgd", "--rho", ""], "rho"),
    (["--optimizers", "sgd", "--out", ""], "out"),
    # no upper bound before
    (["--optimizers", "sgd", "--epochs", "1000000"], "epochs"),
    (["--optimizers", "sgd", "--seeds", "5000"], "seeds"),
    (["--optimizers", "sgd", "--seeds", "0,2147483648"], "seeds"),
    (["--optimizers", "sgd", "--batch-size", "0"], "batch_size"),
    (["--optimizers", "sgd", "--train-size", "0"], "train_size"),
    (["--optimizers", "sgd", "--lr", "nan"], "lr"),
    (["--optimizers", "sgd", "--lr", "inf"], "lr"),
    (["--optimizers", "sgd", "--weight-decay", "-1"], "weight_decay"),
    (["--optimizers", "sgd", "--val-fraction", "1"], "val_fraction"),
    (["--optimizers", "sgd", "--noise", "nan"], "noise"),
    (["--optimizers", "sgd", "--early-stopping", "-1"], "early_stopping"),
    (["--optimizers", "sgd", "--val-fraction", "0", "--early-stopping", "2"], "early_stopping"),
    (["--optimizers", "sgd", "--num-workers", "-1"], "num_workers"),
    (["--optimizers", "sgd", "--device", "tpu"], "device"),
    (["--optimizers", "sgd", "--device", "cuda:99"], "device"),
    (["--optimizers", "sgd", "--baseline", "adam"], "baseline"),
    (["--optimizers", "sgd", "--task", "regression"], "regression"),
    (["--optimizers", "sgd", "--model", "nomodule:make"], "nomodule"),
    (["--optimizers", "sgd", "--model", "os:getcwd"], "Module"),
    (["--optimizers", "sgd", "--model", "os.path:nothere"], "nothere"),
    (["--optimizers", "sgd", "--data", "missing.npz"], "missing.npz"),
    (["--optimizers", "sgd", "--data", "json:loads"], "data"),
    (["--optimizers", "sgd", "--data", "nomodule:load"], "nomodule"),
    (["--optimizers", "sgd", "--optimizers", ""], "optimizer"),
    # --dataset beside --data was ignored; a train size beyond the data was recorded as asked
    (["--optimizers", "sgd", "--data", "x.npz", "--dataset", "digits"], "Invalid dataset value"),
    (["--optimizers", "sgd", "--train-size", "5000"], "synthetic data set has 1801 training"),
    (["--optimizers", "sgd", "--train-size", "5000", "--val-fraction", "0"], "has 2000 training"),
    # a rho list no method takes was ignored without a word
    (["--optimizers", "sgd", "adam", "--rho", "0.1"], "Invalid rho value: 0.1 (no method here"),
    (["--optimizers", "sgd", "sam:rho=0.1", "--rho", "0.2"], "no method here takes it: sam, sgd"),
    # the executor (issue 19)
    (
        ["--optimizers", "sgd", "--jobs", "0"],
        "Invalid jobs value: 0 (an int in [1, 1024] or 'auto')",
    ),
    (["--optimizers", "sgd", "--jobs", "lots"], "Invalid jobs value: 'lots'"),
    (["--optimizers", "sgd", "--threads", "0"], "Invalid threads value: 0"),
    (["--optimizers", "sgd", "--ray", " "], "Invalid ray value: ' '"),
]


@pytest.mark.parametrize("argv,match", COMPARE, ids=[" ".join(a)[:60] for a, _ in COMPARE])
def test_compare_bad_input_fails_before_training(argv, match, capsys, tmp_path):
    if "--device" in argv and "cuda:99" in argv and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    out = tmp_path / "run"
    fast = FAST[2:] if "--data" in argv else FAST  # --dataset and --data together are refused
    rc, _, err = _cli(capsys, ["compare", *fast, "--out", str(out), *argv])
    assert rc == 2, err
    line = _one_line(err)
    assert line.startswith("samkit compare: error:") and match in line, line
    assert not (out / "runs" / "sgd-seed0.json").exists()  # nothing trained
    assert "\x1b" not in line or "label" in line  # the escape is shown quoted (repr), not raw
    if "\x1b" in " ".join(argv):
        assert "\x1b" not in line  # printed as \x1b, never as a live escape sequence


# (TOML text, expected text)
TOML = [
    ('data = "x.npz"\n', "Invalid dataset value: 'synthetic' (a built-in data set; with your"),
    ("optimizers = 5\n", "optimizers"),
    ("out = 5\n", "out"),
    ('out = ""\n', "out"),
    ('sharpness = "false"\n', "sharpness"),
    ('sharpness = "no"\n', "sharpness"),
    ('sharpness_cheap = "yes"\n', "sharpness_cheap"),
    ("seeds = 1e9\n", "seeds"),
    ("seeds = 1000000000\n", "seeds"),
    ("seeds = [0, 0]\n", "seeds"),
    ("seeds = [-1]\n", "seeds"),
    ("epochs = 2.5\n", "epochs"),
    ('epochs = "3"\n', "epochs"),
    ("rho = []\n", "rho"),
    ('rho = ["a"]\n', "rho"),
    ("rho = [inf]\n", "rho"),
    ("model_kwargs = 3\n", "model_kwargs"),
    ("model_kwargs = {channels = -1}\n", "model"),
    ('model_kwargs = {channels = "many"}\n', "model"),
    ("model_kwargs = {nonsense = 1}\n", "model"),
    ('methods = [{label = "x"}]\n', "method"),
    ('methods = "sam"\n', "methods"),
    ('[[methods]]\nmethod = "sam"\nrho = nan\n', "rho"),
    ('[[methods]]\nmethod = "sam"\nrho = {a = 1}\n', "rho"),
    ('device = "gpu"\n', "device"),
    ('amp = "fp8"\n', "amp"),
    ('task = "ranking"\n', "task"),
    ('schedule = "step"\n', "schedule"),
    ("warmup_epochs = 100\n", "warmup_epochs"),
    ("label_smoothing = 1.0\n", "label_smoothing"),
    ("sharpness_samples = 0\n", "sharpness_samples"),
    ("epoch = 3\n", "epoch"),
    ("epochs = [1,\n", "not valid TOML"),
    ("jobs = 0\n", "Invalid jobs value: 0"),
    ("jobs = true\n", "Invalid jobs value: True"),
    ('threads = "2"\n', "Invalid threads value: '2'"),
    ("ray = 5\n", "Invalid ray value: 5"),
]


@pytest.mark.parametrize("text,match", TOML, ids=[t.strip()[:40] for t, _ in TOML])
def test_toml_bad_input(text, match, capsys, tmp_path):
    # flags would override the file: only --out and -q here, the rest in the file
    head = 'dataset = "synthetic"\ntrain_size = 100\nepochs = 1\n'
    if not text.startswith("optimizers"):
        head += 'optimizers = ["sgd"]\n'
    if text.startswith("epoch"):
        head = head.replace("epochs = 1\n", "")
    cfg = tmp_path / "c.toml"
    cfg.write_text(head + text)
    out = tmp_path / "run"
    argv = ["compare", "--config", str(cfg), "-q"]
    if not text.startswith("out"):
        argv += ["--out", str(out)]
    rc, _, err = _cli(capsys, argv)
    assert rc == 2, err
    line = _one_line(err)
    assert match in line, line
    assert not (out / "runs" / "sgd-seed0.json").exists()


TUNE = [
    (["--dataset", "digits", "--data", "x.npz"], "Invalid dataset value: 'digits'"),
    (["--train-size", "100000"], "has 1801 training samples"),
    (["--rho-range", "0.1,inf"], "rho_range"),
    (["--rho-range", "0.1"], "rho_range"),
    (["--rho-range", "nan,1"], "rho_range"),
    (["--rho-range", "a,b"], "rho-range"),
    (["--grid", "inf"], "grid"),
    (["--grid", "nan"], "grid"),
    (["--grid", ""], "grid"),
    (["--grid", "0.1,0.1"], "grid"),
    (["--sampler-seed", "-1"], "sampler_seed"),
    (["--trials", "100000"], "trials"),
    (["--method", "asam", "--grid", "0.1", "--base", "rmsprop"], "base"),
    (["--method", "msam", "--grid", "0.1", "--amp", "fp16"], "fp16"),
    (["--epochs", "0"], "epochs"),
    (["--jobs", "0"], "Invalid jobs value: 0"),
    (["--ray", "127.0.0.1:1"], "samkit tune runs its trials on this machine; use --jobs"),
]


@pytest.mark.parametrize("argv,match", TUNE, ids=[" ".join(a) for a, _ in TUNE])
def test_tune_bad_input(argv, match, capsys, tmp_path):
    out = tmp_path / "t"
    rc, _, err = _cli(
        capsys,
        [
            "tune",
            "--dataset",
            "synthetic",
            "--train-size",
            "100",
            "--epochs",
            "1",
            "-q",
            "--out",
            str(out),
            *argv,
        ],
    )
    assert rc == 2, err
    line = _one_line(err)
    assert line.startswith("samkit tune: error:") and match in line, line
    assert not (out / "optuna-journal.log").exists()  # no trial started


# (command, flags, expected text): samkit rl and samkit gan, refused before anything runs
STUDIES = [
    # --rho with no method that takes it was ignored without a word
    ("rl", ["--methods", "ppo", "--rho", "0.1"], "Invalid rho value: 0.1 (no method here"),
    ("gan", ["--methods", "adam", "--rho", "0.05,0.1"], "Invalid rho value: 0.05, 0.1 (no met"),
    ("gan", ["--methods", "adam", "sam_g:rho=0.1", "--rho", "0.05"], "takes it: adam, sam_g"),
    ("rl", ["--jobs", "0"], "Invalid jobs value: 0"),
    ("gan", ["--threads", "0"], "Invalid threads value: 0"),
]


@pytest.mark.parametrize("cmd,argv,match", STUDIES, ids=[" ".join(a) for _, a, _ in STUDIES])
def test_rl_and_gan_bad_input(cmd, argv, match, capsys, tmp_path):
    out = tmp_path / "run"
    rc, _, err = _cli(capsys, [cmd, "--seeds", "1", "-q", "--out", str(out), *argv])
    assert rc == 2, err
    line = _one_line(err)
    assert line.startswith(f"samkit {cmd}: error:") and match in line, line
    assert not (out / "runs").exists()


# (keyword arguments of samkit.compare, expected message regex): ValueError, nothing trained
API = [
    (dict(dataset="digits"), r"Invalid dataset value: 'digits' \(a built-in data set"),
    (dict(train_size=200), r"Invalid train_size value: 200 \(your training data has 108 sampl"),
    # out="" is Path(""), the current folder: the study's files were scattered there
    (dict(out=""), r"Invalid out value: '' \(a folder path"),
    (dict(out="  "), r"Invalid out value: '  '"),
    (dict(out=5), r"Invalid out value: 5"),
    # truthy non-booleans were taken as True
    (dict(quiet="yes"), r"Invalid quiet value: 'yes' \(must be true or false, a boolean, not a s"),
    (dict(progress=5), r"Invalid progress value: 5 \(must be true or false, a boolean\)"),
    (dict(quiet=0), r"Invalid quiet value: 0"),
    # a bool is never a number
    (dict(seeds=True), r"Invalid seeds value: True"),
    (dict(rho=True), r"Invalid rho value: True"),
    (dict(epochs=np.bool_(True)), r"Invalid epochs value"),
    (dict(rho=np.float32("nan")), r"Invalid rho value: nan \(must be a finite number"),
    (dict(jobs=0), r"Invalid jobs value: 0 \(an int in \[1, 1024\] or 'auto'\)"),
    (dict(threads=2.5), r"Invalid threads value: 2.5"),
    # a model made by a lambda cannot travel to a worker process: said before any training
    (dict(jobs=2), r"Invalid jobs value: 2 \(the runs cannot be sent to worker processes"),
]


def _api_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    return x, (x[:, 0] > 0).long()


@pytest.mark.parametrize("kwargs,match", API, ids=[repr(k)[:60] for k, _ in API])
def test_api_bad_input_is_a_value_error_before_training(kwargs, match, tmp_path, monkeypatch):
    import samkit

    monkeypatch.chdir(tmp_path)
    args = dict(
        model=lambda: torch.nn.Linear(4, 2),
        train=_api_problem(),
        methods=["sgd", "sam"],
        seeds=1,
        epochs=1,
        sharpness=False,
        out=tmp_path / "run",
        quiet=True,
    )
    with pytest.raises(ValueError, match=match):
        samkit.compare(**{**args, **kwargs})
    assert not list(tmp_path.rglob("*.json"))  # nothing trained, nowhere


def _labels(kind):
    y = torch.tensor([0, 1] * 60)
    if kind == "negative":
        y[::3] = -1
    elif kind == "huge":
        y[5] = 2**40
    elif kind == "bool":
        y = y.bool()
    elif kind == "late":  # beyond the first batch: it failed mid-training (IndexError)
        y[110] = -1
    elif kind == "uint8":
        y = y.to(torch.uint8) * 200
    return y


# (labels, expected message regex): the first words are about the labels, not the model
LABELS = [
    ("negative", r"^Invalid data value: labels must be in 0\.\.1 \(the model gives 2 logits\): "
     r"found -1$"),
    ("huge", r"^Invalid model value: (training )?labels must be in 0\.\.1 \(.*\): found 10995116"),
    ("bool", r"^Invalid data value: labels are booleans: class labels are integers 0\.\.1"),
    ("late", r"^Invalid data value: training labels must be in 0\.\.1 \(.*\): found -1$"),
    ("uint8", r"^Invalid model value: (training )?labels must be in 0\.\.1 \(.*\): found 200$"),
]  # fmt: skip


@pytest.mark.parametrize("kind,match", LABELS, ids=[k for k, _ in LABELS])
def test_labels_out_of_range_say_so_first(kind, match, tmp_path):
    """Negative labels said "labels run from -1 to 1 but the model gives 3 logits"
    (the model blamed); bool labels failed in the loss."""
    import samkit

    x = torch.randn(120, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        samkit.compare(
            model=lambda: torch.nn.Linear(4, 2),
            train=(x, _labels(kind)),
            methods=["sgd"],
            seeds=1,
            epochs=1,
            batch_size=20,
            val_fraction=0.0,
            sharpness=False,
            out=tmp_path / "run",
            quiet=True,
        )
    assert not (tmp_path / "run" / "runs" / "sgd-seed0.json").exists()


@pytest.mark.parametrize(
    "study,kwargs,match",
    [
        ("rl_study", dict(out=""), r"Invalid out value: ''"),
        ("rl_study", dict(quiet="no"), r"Invalid quiet value: 'no'"),
        ("rl_study", dict(quick=1), r"Invalid quick value: 1"),
        ("gan_study", dict(out=""), r"Invalid out value: ''"),
        ("gan_study", dict(progress="off"), r"Invalid progress value: 'off'"),
        ("tune", dict(out=""), r"Invalid out value: ''"),
        ("tune", dict(quiet="yes"), r"Invalid quiet value: 'yes'"),
    ],
)
def test_other_studies_api_bad_input(study, kwargs, match, tmp_path, monkeypatch):
    import samkit

    monkeypatch.chdir(tmp_path)
    args: dict = dict(seeds=1)
    if study == "tune":
        args = dict(
            model=lambda: torch.nn.Linear(4, 2),
            train=_api_problem(),
            grid=[0.05],
            seeds=1,
            epochs=1,
            quiet=True,
        )
    elif study == "gan_study":
        args.update(datasets=["ring8"], iterations=2, quiet=True)
    else:
        args.update(envs=["CartPole-v1"], quiet=True)
    with pytest.raises(ValueError, match=match):
        getattr(samkit, study)(**{**args, **kwargs})
    assert not list(tmp_path.rglob("*.json"))


# ------------------------------------------------- sharpness and landscape
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from samkit.experiments.checkpoint import save_checkpoint
    from samkit.experiments.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    save_checkpoint(
        path,
        build_model("mlp", in_len=40, num_classes=10, hidden=8),
        model_name="mlp",
        model_kwargs={"in_len": 40, "num_classes": 10, "hidden": 8},
        dataset={
            "name": "synthetic",
            "seed": 0,
            "noise": 0.0,
            "val_fraction": 0.1,
            "train_size": 50,
        },
        meta={"label": "plain"},
    )
    return path


def _crafted(tmp_path, path, **changes):
    ck = torch.load(path, weights_only=True)
    for key, value in changes.items():
        ck[key] = value
    out = tmp_path / "crafted.pt"
    torch.save(ck, out)
    return out, ck


def test_checkpoint_with_nan_weights_is_refused(checkpoint, tmp_path, capsys):
    ck = torch.load(checkpoint, weights_only=True)
    ck["state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in ck["state_dict"].items()}
    bad = tmp_path / "nan.pt"
    torch.save(ck, bad)
    for cmd in (
        ["sharpness", str(bad), "--samples", "20"],
        ["landscape", str(bad), "--samples", "20"],
    ):
        rc, _, err = _cli(capsys, [*cmd, "-q"])
        assert rc == 2
        assert "NaN" in _one_line(err)


def test_checkpoint_cannot_choose_the_cache_folder(checkpoint, tmp_path, capsys, monkeypatch):
    target = tmp_path / "chosen-by-the-file"
    spec = {"name": "mnist1d", "seed": 0, "noise": 0.0, "val_fraction": 0.1, "train_size": None}
    bad, _ = _crafted(tmp_path, checkpoint, dataset={**spec, "cache_dir": str(target)})
    rc, _, err = _cli(capsys, ["sharpness", str(bad), "--samples", "20", "-q"])
    assert rc == 2 and "cache_dir" in _one_line(err)
    assert not target.exists()  # no folder made, no file read there


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model": {"name": "user:evil:build", "kwargs": {}}}, "own code"),
        ({"model": {"name": "mlp", "kwargs": {"in_len": [1, 2]}}}, "plain values"),
        ({"model": {"name": "transformer", "kwargs": {}}}, "unknown model"),
        ({"dataset": {"name": "synthetic", "seed": "0"}}, "seed"),
        ({"dataset": "synthetic"}, "dataset"),
        ({"state_dict": {"w": 3}}, "state dict"),
    ],
)
def test_checkpoint_entries_are_validated(checkpoint, tmp_path, capsys, change, match):
    bad, _ = _crafted(tmp_path, checkpoint, **change)
    rc, _, err = _cli(capsys, ["sharpness", str(bad), "--samples", "20", "-q"])
    assert rc == 2 and match in _one_line(err)


@pytest.mark.parametrize("version", [99, "1", True, None, 1.0])
@pytest.mark.parametrize("cmd", ["sharpness", "landscape"])
def test_checkpoint_of_an_unknown_version_is_refused(checkpoint, tmp_path, capsys, cmd, version):
    """A newer layout (or a hand-edited "1") was read as if it were version 1."""
    bad, _ = _crafted(tmp_path, checkpoint, version=version)
    rc, _, err = _cli(capsys, [cmd, str(bad), "--samples", "20", "-q"])
    assert rc == 2, err
    line = _one_line(err)
    assert f"unknown version {version!r} (this samkit reads version 1)" in line, line


def test_labels_from_a_checkpoint_are_printed_and_plotted_safely(checkpoint, tmp_path, capsys):
    ck = torch.load(checkpoint, weights_only=True)
    ck["meta"]["label"] = "\x1b]0;owned\x07\x1b[31m$\\frac{$"
    bad = tmp_path / "label.pt"
    torch.save(ck, bad)
    rc, out, err = _cli(
        capsys, ["sharpness", str(bad), "--samples", "20", "--trace-samples", "2", "-q"]
    )
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out
    rc, out, err = _cli(
        capsys,
        [
            "landscape",
            str(bad),
            "--other",
            str(checkpoint),
            "--samples",
            "20",
            "--resolution",
            "3",
            "-q",
        ],
    )
    assert rc == 0, err  # the $\frac{$ label no longer crashes matplotlib's math parser
    assert "\x1b" not in out
    assert (tmp_path / "label.landscape-path.png").stat().st_size > 0


@pytest.mark.parametrize(
    "cmd,match",
    [
        (["sharpness", "--out", "{blocked}/r.json"], "a file, not a folder"),
        (["sharpness", "--out", "{tmp}/r.txt"], ".json"),
        (["sharpness", "--out", ""], "--out"),
        (["sharpness", "--density", "{blocked}/d.png"], "a file, not a folder"),
        (["sharpness", "--top-k", "100000"], "top-k"),
        (["sharpness", "--trace-samples", "1000000000"], "trace-samples"),
        # no finite loss in a ball this large: it wrote -Infinity / NaN into the JSON
        (["sharpness", "--rho", "1e308"], "invalid --rho value: 1e+308 (must be below 3.4e+38"),
        (["sharpness", "--rho", "1e39"], "--rho"),
        (["landscape", "--out", "{blocked}/l.png"], "a file, not a folder"),
        (["landscape", "--out", "{tmp}"], "--out"),
        (["landscape", "--resolution", "100000"], "resolution"),
        (["landscape", "--mode", "2d", "--resolution", "1000"], "resolution"),
        (["landscape", "--range", "inf"], "range"),
    ],
)
def test_instrument_outputs_and_bounds_checked_before_computing(
    checkpoint, tmp_path, capsys, monkeypatch, cmd, match
):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [a.format(blocked=blocker, tmp=tmp_path) for a in cmd]
    import samkit.cli.sharpness as cli_sharpness

    def never(*a, **k):  # the computation must not start
        raise AssertionError("loaded the checkpoint before checking the output")

    monkeypatch.setattr(cli_sharpness, "load_model_and_batches", never)
    import samkit.cli.landscape as cli_landscape

    monkeypatch.setattr(cli_landscape, "load_model_and_batches", never)
    rc, _, err = _cli(capsys, [argv[0], str(checkpoint), *argv[1:], "-q"])
    assert rc == 2, err
    assert match in _one_line(err)


def test_corrupt_training_state_is_reported_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "sam-seed0.state.pt").write_bytes(b"not a pickle at all")
    rc, _, err = _cli(capsys, ["compare", *FAST, "--optimizers", "sgd,sam", "--out", str(out)])
    assert rc == 2
    line = _one_line(err)
    assert "sam-seed0.state.pt" in line and "delete it" in line
    assert not (out / "runs" / "sgd-seed0.json").exists()


def _npz_files(folder):
    """Files a user might hand in as --data that are not usable .npz archives."""
    import numpy as np

    good = folder / "good.npz"
    np.savez(good, x_train=np.zeros((20, 4), "float32"), y_train=np.zeros(20, "int64"))
    (folder / "trunc.npz").write_bytes(good.read_bytes()[:300])  # a cut-off download
    np.savez(folder / "strx.npz", x_train=np.full((20, 4), "a"), y_train=np.zeros(20, "int64"))
    (folder / "text.npz").write_text("x_train,y_train\n1,2\n")
    np.save(folder / "single.npy", np.zeros(3))
    (folder / "single.npy").rename(folder / "single.npz")  # one array, not an archive
    return {
        "trunc.npz": "File is not a zip file",
        "strx.npz": "array x_train has dtype <U1",
        "text.npz": "not an archive written by numpy.savez",
        "single.npz": "a single array",
    }


def test_damaged_npz_files_are_refused_in_one_line(tmp_path, capsys):
    fast = ["--model", "mlp", "--epochs", "1", "--seeds", "1", "-q"]
    for name, match in _npz_files(tmp_path).items():
        out = tmp_path / f"run-{name}"
        argv = ["compare", "--data", str(tmp_path / name), *fast, "--out", str(out)]
        rc, _, err = _cli(capsys, argv)
        assert rc == 2, (name, err)
        line = _one_line(err)
        assert "Invalid data value" in line and match in line, line
        assert "unsafely" not in line  # numpy's advice for pickles, wrong for a text file
        assert not (out / "runs").exists()


@pytest.mark.parametrize("cmd", ["sharpness", "landscape"])
def test_an_empty_checkpoint_path_is_refused_in_one_line(cmd, capsys):
    rc, _, err = _cli(capsys, [cmd, ""])
    assert rc == 2, err
    assert "invalid checkpoint value: '' (an empty path)" in _one_line(err)


def test_val_and_test_splits_of_user_data_are_checked_before_training(tmp_path, capsys):
    """They are read only after the first epoch: each of these trained a run, then
    failed with a traceback."""
    import numpy as np

    r = np.random.RandomState(0)
    x, y = r.randn(60, 10).astype("float32"), r.randint(0, 3, 60)
    cases = {
        "featmis": ({"x_test": r.randn(20, 7).astype("float32"), "y_test": r.randint(0, 3, 20)},
                    "fails on a batch of the test split"),
        "testlab": ({"x_test": r.randn(20, 10).astype("float32"),
                     "y_test": np.r_[r.randint(0, 3, 19), 7]},
                    "Invalid data value: test labels must be in 0..2 (the model gives 3 logits): "
                    "found 7"),
        "vallab": ({"x_val": r.randn(20, 10).astype("float32"),
                    "y_val": np.r_[9, r.randint(0, 3, 19)]},
                   "val labels must be in 0..2 (the model gives 3 logits): found 9"),
        "ytestfloat": ({"x_test": r.randn(20, 10).astype("float32"),
                        "y_test": r.randint(0, 3, 20).astype("float32")},
                       "the test targets are torch.float32"),
    }  # fmt: skip
    fast = ["--model", "mlp", "--epochs", "1", "--seeds", "1", "--no-sharpness", "-q"]
    for name, (extra, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, x_train=x, y_train=y, **extra)
        out = tmp_path / f"run-{name}"
        rc, _, err = _cli(capsys, ["compare", "--data", str(path), *fast, "--out", str(out)])
        assert rc == 2, (name, err)
        line = _one_line(err)
        assert match in line, line
        assert not (out / "runs").exists() or not any((out / "runs").glob("*.json"))


def test_user_code_calling_sys_exit_is_an_error_not_a_silent_exit(tmp_path, capsys, monkeypatch):
    """A model/data function (or its module) calling sys.exit ended samkit with that code
    and no output (exit 0: "success")."""
    (tmp_path / "exiting_mods.py").write_text(
        "import sys\ndef model(**kw):\n    sys.exit(0)\ndef data():\n    sys.exit(3)\n"
    )
    (tmp_path / "exiting_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    fast = ["--seeds", "1", "--epochs", "1", "--no-sharpness", "-q"]
    cases = [
        (["--model", "exiting_mods:model", "--dataset", "synthetic"], "raised SystemExit: 0"),
        (["--data", "exiting_mods:data", "--model", "mlp"], "raised SystemExit: 3"),
        (["--model", "exiting_import:f", "--dataset", "synthetic"], "raised SystemExit: 3"),
    ]
    for i, (argv, match) in enumerate(cases):
        rc, _, err = _cli(capsys, ["compare", *argv, *fast, "--out", str(tmp_path / f"o{i}")])
        assert rc == 2, err
        assert match in _one_line(err)


# ------------------------------------------- the user's own data and model code
USER_MODULE = """
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

X = np.random.RandomState(0).randn(100, 6).astype("float32")
Y = np.arange(100) % 3


def arrays(x, y):
    return (x[:80], y[:80]), (x[80:], y[80:])


def string_labels():
    return arrays(X, np.array(["cat", "dog", "eel"])[Y])


def object_features():
    return arrays(np.array([object()] * 100), Y)


class Broken(Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        return [][i]  # the user's bug: IndexError


def broken_dataset():
    return Broken(), TensorDataset(torch.tensor(X[80:]), torch.tensor(Y[80:]))


class Named(Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.tensor(X[i]), "abc"[Y[i]]


def string_items():
    return Named(), TensorDataset(torch.tensor(X[80:]), torch.tensor(Y[80:]))


class NoWorkers(Broken):
    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is not None:
            raise OSError("the file handle does not survive the fork")
        return torch.tensor(X[i]), int(Y[i])


def no_workers():
    return NoWorkers(), TensorDataset(torch.tensor(X[80:]), torch.tensor(Y[80:]))


def good():
    return arrays(X, Y)


class FailsInEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        if not self.training:
            raise RuntimeError("no eval mode here")
        return self.lin(x)


def fails_in_eval():
    return FailsInEval()


def model():
    return nn.Linear(6, 3)
"""


def _line_of(text: str) -> int:
    return next(i for i, line in enumerate(USER_MODULE.splitlines(), 1) if text in line)


LINES = {
    "bug": _line_of("[][i]"),
    "raise_": _line_of("raise RuntimeError"),
    "fork": _line_of("raise OSError"),
}

# (--data function, --model, expected text in the one line); {m}: the module's name
USER_CODE = [
    ("string_labels", "mlp", "Invalid train y value: dtype <U3 (strings), numbers expected"),
    ("object_features", "mlp", "Invalid train x value: dtype object (Python objects)"),
    ("string_items", "mlp", "Invalid train y value: dtype <U1 (strings)"),
    (
        "broken_dataset",
        "mlp",
        "in your data function {m}:broken_dataset: IndexError: list index out of range "
        "({m}.py:{bug}, in Broken.__getitem__); --debug shows the traceback",
    ),
    # raised after the first epoch trained (the model is only put in eval mode then)
    (
        "good",
        "{m}:fails_in_eval",
        "in your model function {m}:fails_in_eval: RuntimeError: no eval mode here "
        "({m}.py:{raise_}, in FailsInEval.forward)",
    ),
    # raised in a DataLoader worker: torch re-raises it with the traceback as text
    (
        "no_workers --num-workers 1",
        "{m}:model",
        "in your data function {m}:no_workers: OSError: the file handle does not survive the "
        "fork ({m}.py:{fork}, in __getitem__)",
    ),
]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"usercode_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    return name


@pytest.mark.parametrize("data,model,match", USER_CODE, ids=[d[:20] for d, _, _ in USER_CODE])
def test_user_data_and_model_errors_are_one_line(data, model, match, user_module, capsys):
    """Each was a traceback (torch's TypeError on a string array, or the user's own
    IndexError from deep inside samkit's batching)."""
    m = user_module
    data, *extra = data.split()
    argv = ["compare", "--data", f"{m}:{data}", "--model", model.format(m=m), *extra]
    fast = ["--optimizers", "sgd", "--seeds", "1", "--epochs", "1", "--no-sharpness", "-q"]
    rc, _, err = _cli(capsys, [*argv, *fast, "--out", "o"])
    assert rc == 2, err
    line = _one_line(err)
    assert line.startswith("samkit compare: error: ") and match.format(m=m, **LINES) in line, line


def test_debug_prints_the_traceback_too(user_module, capsys):
    m = user_module
    argv = ["compare", "--data", f"{m}:broken_dataset", "--model", "mlp", "--seeds", "1", "-q"]
    rc, _, err = _cli(capsys, [*argv, "--out", "o", "--debug"])
    assert rc == 2
    assert err.startswith("Traceback") and f'{m}.py", line {LINES["bug"]}, in __getitem__' in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("samkit compare: error: in your data function") and "--debug" not in last


def test_every_subcommand_has_debug():
    from samkit.cli.main import SUBCOMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)
    for name, parser in sub.choices.items():
        assert "--debug" in parser.format_help(), name


def test_labels_that_use_few_classes_are_warned_once_in_one_line(tmp_path):
    """One stray label 255 among 0..2 sized a built-in model for 256 classes, silently;
    a class missing from 0..9 is ordinary and not warned."""
    import subprocess
    import sys

    import samkit

    r = np.random.RandomState(0)
    x, y = r.randn(120, 6).astype("float32"), r.randint(0, 3, 120)
    y[5] = 255
    args = dict(methods=["sgd"], seeds=1, epochs=1, batch_size=40, sharpness=False, quiet=True)
    with pytest.warns(UserWarning, match=r"labels use 4 of the 256 classes 0\.\.255"):
        samkit.compare(model="mlp", train=(x, y), out=tmp_path / "stray", **args)
    ten = np.r_[np.arange(10), r.randint(0, 10, 110)]
    ten[ten == 7] = 8  # class 7 never occurs: 9 of 10 used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samkit.compare(
            model="mlp", train=(x, ten), test=(x[:40], ten[:40]), out=tmp_path / "nine", **args
        )
    path = tmp_path / "stray.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:40], y_test=y[:40] % 3)
    cmd = [sys.executable, "-m", "samkit.cli.main", "compare", "--data", str(path), "--model",
           "mlp", "--epochs", "1", "--seeds", "1", "--no-sharpness", "-q", "--optimizers", "sgd",
           "--out", str(tmp_path / "cli")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "warning" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith(
        "samkit: warning: the training labels use 4 of"
    ), done.stderr


def test_an_api_setting_that_is_the_clis_names_only_itself(tmp_path):
    """optimizers= beside a valid sharpness=False read 'Invalid setting: optimizers,
    sharpness', naming the valid one too."""
    import samkit

    with pytest.raises(
        ValueError, match=r"^Invalid setting: optimizers \(the methods are methods=\)$"
    ):
        samkit.compare(optimizers=["sgd"], sharpness=False, out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"^Invalid setting: rho$"):
        samkit.tune(model="mlp", train=_api_problem(), rho=[0.1], epochs=1, out=tmp_path / "t")


def test_tune_on_streamed_training_data_without_val_is_refused_before_any_trial(tmp_path):
    """No validation split is drawn from an IterableDataset or a batch factory: every
    trial trained, then 'no trial completed (all pruned ...)' blamed the lr and the range."""
    import samkit

    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    def factory(seed, epoch):
        return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    for train, what in ((Stream(), "an IterableDataset"), (factory, "a batch factory")):
        with pytest.raises(
            ValueError, match=rf"^Invalid val value: None .*streamed training data, {what}"
        ):
            samkit.tune(model=lambda: torch.nn.Linear(4, 2), train=train, grid=[0.05], seeds=1,
                        epochs=1, out=tmp_path / "t", quiet=True)  # fmt: skip
        assert not (tmp_path / "t").exists() or not list((tmp_path / "t").iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--seed", "3", "--quick"],  # was --seeds 3: three seeds, not seed 3
        ["tune", "--rho", "0.05,0.2", "--quick"],  # was --rho-range: a log-uniform search
    ],
)
def test_no_abbreviations(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"unrecognized arguments: {' '.join(argv[1:3])}" in line, line


def test_python_dash_m_samkit_is_the_command():
    import subprocess
    import sys

    import samkit

    done = subprocess.run(
        [sys.executable, "-m", "samkit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"samkit {samkit.__version__}"


def test_val_fraction_zero_is_no_validation_split(tmp_path, capsys):
    """Documented as valid, it always failed: "the val split yields no batch"."""
    import json

    out = tmp_path / "o"
    rc, _, err = _cli(capsys, ["compare", *FAST, "--val-fraction", "0", "--out", str(out)])
    assert rc == 0, err
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs and all(r["final"].get("val_acc") is None for r in runs)
    assert all(r["final"]["test_acc"] is not None for r in runs)


def test_a_study_where_every_run_diverged_exits_1(tmp_path, capsys):
    """--lr 1e30: every run diverged, the table compared nothing, and the exit said success."""
    out = tmp_path / "o"
    rc, _, err = _cli(capsys, ["compare", *FAST, "--optimizers", "sgd", "--lr", "1e30",
                               "--out", str(out)])  # fmt: skip
    assert rc == 1
    assert "every run diverged (1): the table compares nothing" in err
    assert (out / "results.json").is_file()  # the study itself is written
