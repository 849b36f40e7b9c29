import json
import math

import pytest
import torch

from samkit.experiments.datasets import load_dataset
from samkit.experiments.methods import TrainSpec, build_method
from samkit.experiments.models import build_model
from samkit.experiments.trainer import ResumeError, TrainConfig, lr_factor, seed_everything, train


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0, train_size=400)


def _setup(data, method="sgd", model="cnn", seed=0, **opts):
    seed_everything(seed)
    m = build_model(model, in_len=data.in_len, num_classes=data.num_classes)
    base = "adam" if method == "adam" else "sgd"
    spec = TrainSpec(base=base, lr=0.01 if base == "adam" else 0.05)
    return m, build_method(method, m, spec, **opts)


def _weights(model):
    return torch.cat(
        [p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()]
    )


@pytest.mark.parametrize("model_name", ["cnn", "gru"])
def test_convolutional_and_recurrent_models_learn(data, model_name):
    model, method = _setup(data, "adam", model=model_name)
    res = train(model, method, data, TrainConfig(epochs=4, batch_size=50), progress=False)
    first, last = res.history[0], res.history[-1]
    assert last["train_loss"] < first["train_loss"] < math.log(10) + 0.1
    assert last["test_acc"] > 0.3  # chance is 0.1


def test_same_seed_same_numbers(data):
    runs = []
    for _ in range(2):
        model, method = _setup(data, "sam", rho=0.05)
        res = train(
            model, method, data, TrainConfig(epochs=2, batch_size=50), seed=3, progress=False
        )
        runs.append((res.history, _weights(model)))
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_time"} for r in h]  # noqa: E731
    assert strip(runs[0][0]) == strip(runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_passes_count_forward_backward(data):
    for name, per_step in (("sgd", 1), ("sam", 2), ("asam", 2)):
        model, method = _setup(data, name)
        res = train(model, method, data, TrainConfig(epochs=1, batch_size=100), progress=False)
        assert res.steps == 4
        assert res.passes == per_step * res.steps


def test_metrics_jsonl_written_per_epoch(data, tmp_path):
    model, method = _setup(data)
    path = tmp_path / "m.jsonl"
    path.write_text("stale line from an old run\n")
    res = train(
        model,
        method,
        data,
        TrainConfig(epochs=3, batch_size=100),
        metrics_path=path,
        progress=False,
    )
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines == json.loads(json.dumps(res.history))
    assert {"train_loss", "train_acc", "val_acc", "test_acc", "lr", "passes"} <= set(lines[0])


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_bit_for_bit(data, tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=100)
    model, method = _setup(data, "sam", rho=0.1)
    ref = train(model, method, data, cfg, seed=1, progress=False)
    ref_w = _weights(model)

    state = tmp_path / "state.pt"
    model, method = _setup(data, "sam", rho=0.1)

    def stop(rec):
        if rec["epoch"] == 2:
            raise _Stop

    metrics = tmp_path / "m.jsonl"
    with pytest.raises(_Stop):
        train(
            model,
            method,
            data,
            cfg,
            seed=1,
            state_path=state,
            metrics_path=metrics,
            callbacks=[stop],
            progress=False,
        )
    assert state.is_file()
    assert len(metrics.read_text().splitlines()) == 2  # epoch 2 was logged, its state not saved
    model, method = _setup(
        data, "sam", rho=0.1, seed=99
    )  # fresh weights: must come from the state file
    res = train(
        model, method, data, cfg, seed=1, state_path=state, metrics_path=metrics, progress=False
    )
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert torch.equal(_weights(model), ref_w)
    assert res.passes == ref.passes and res.steps == ref.steps
    assert [r["test_acc"] for r in res.history] == [r["test_acc"] for r in ref.history]


def test_early_stopping_keeps_best_validation_weights(data, tmp_path):
    model, method = _setup(data, "sgd")
    # lr far too high: validation accuracy stalls, patience 1 stops early
    for g in method.optimizer.param_groups:
        g["lr"] = 5.0
    res = train(
        model,
        method,
        data,
        TrainConfig(epochs=8, batch_size=50, early_stopping=1, schedule="constant"),
        progress=False,
        checkpoint_path=tmp_path / "c.pt",
        model_spec=("cnn", {"in_len": 40}),
    )
    vals = [r["val_acc"] for r in res.history]
    best = max(range(len(vals)), key=lambda i: (vals[i], -i))
    assert res.final["epoch"] == best + 1
    if res.stopped_early:
        assert len(vals) == best + 2
    from samkit.experiments.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck["dataset"] == data.spec and ck["meta"]["epoch"] == best + 1


def test_early_stopping_needs_validation():
    d = load_dataset("synthetic", val_fraction=0.0, train_size=100)
    model, method = _setup(d)
    with pytest.raises(ValueError, match="early_stopping"):
        train(model, method, d, TrainConfig(epochs=1, early_stopping=2), progress=False)


def test_lr_schedule_values():
    assert lr_factor(0, 100, "cosine", 0) == 1.0
    assert lr_factor(50, 100, "cosine", 0) == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine", 0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(37, 100, "constant", 0) == 1.0
    assert [lr_factor(i, 100, "cosine", 4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, "cosine", 4) == 1.0


def test_lr_is_set_each_step(data):
    model, method = _setup(data)
    res = train(model, method, data, TrainConfig(epochs=2, batch_size=100), progress=False)
    # 8 steps in all; the lr recorded after epoch 1 is the one of step 3 (0-based)
    assert res.history[0]["lr"] == pytest.approx(0.05 * lr_factor(3, 8, "cosine", 0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": 0}, "epochs"),
        ({"schedule": "step"}, "schedule"),
        ({"early_stopping": 0}, "early_stopping"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_optimizer_hears_validation_loss_and_rho_is_recorded(data):
    model, method = _setup(data, "sam", rho=0.07)
    heard = []
    method.optimizer.observe_validation = heard.append  # the self-tuning-rho hook, when present
    res = train(model, method, data, TrainConfig(epochs=3, batch_size=100), progress=False)
    assert heard == [r["val_loss"] for r in res.history]
    assert [r["rho"] for r in res.history] == [0.07, 0.07, 0.07]
    model, method = _setup(data, "sgd")
    res = train(model, method, data, TrainConfig(epochs=1, batch_size=100), progress=False)
    assert "rho" not in res.history[0]  # plain SGD has no rho


def _interrupted_state(data, tmp_path, *, tag):
    """A state after epoch 1 of a 3-epoch run tagged ``tag``."""
    cfg = TrainConfig(epochs=3, batch_size=100)
    model, method = _setup(data, "sgd")

    def stop(rec):
        if rec["epoch"] == 2:
            raise _Stop

    state = tmp_path / "state.pt"
    with pytest.raises(_Stop):
        train(model, method, data, cfg, seed=1, state_path=state, state_tag=tag,
              callbacks=[stop], progress=False)  # fmt: skip
    return cfg, state


def test_a_state_left_by_the_run_under_other_settings_is_not_resumed(data, tmp_path):
    """A run killed mid-way, then rerun with another learning rate, resumed the old run's
    weights and schedule and reported them as the new run's."""
    cfg, state = _interrupted_state(data, tmp_path, tag={"lr": 0.1})
    model, method = _setup(data, "sgd")
    fresh = train(model, method, data, cfg, seed=1, progress=False)
    model, method = _setup(data, "sgd")
    res = train(model, method, data, cfg, seed=1, state_path=state, state_tag={"lr": 0.05},
                progress=False)  # fmt: skip
    assert [r["epoch"] for r in res.history] == [1, 2, 3]  # trained from its first epoch
    assert [r["train_loss"] for r in res.history] == [r["train_loss"] for r in fresh.history]
    # the same tag resumes (epoch 1 from the state)
    cfg, state = _interrupted_state(data, tmp_path, tag={"lr": 0.1})
    saved = torch.load(state, weights_only=True)["history"]
    model, method = _setup(data, "sgd", seed=99)
    res = train(model, method, data, cfg, seed=1, state_path=state, state_tag={"lr": 0.1},
                progress=False)  # fmt: skip
    assert res.history[0] == saved[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("train_time", "abc"),
        ("train_time", float("nan")),
        ("bad_epochs", "x"),
        ("bad_epochs", -1),
        ("best", ["x", "y", None]),
        ("stopped", "yes"),
        ("history", "repeated"),  # the history ten times over
        ("rng", {"torch": torch.zeros(3, dtype=torch.uint8)}),
    ],
)
def test_a_malformed_training_state_is_refused_in_one_sentence(data, tmp_path, field, value):
    cfg, state = _interrupted_state(data, tmp_path, tag=None)
    st = torch.load(state, weights_only=True)
    st[field] = st["history"] * 10 if value == "repeated" else value
    torch.save(st, state)
    model, method = _setup(data, "sgd")
    with pytest.raises(ResumeError, match="Invalid training state: .*delete it"):
        train(model, method, data, cfg, seed=1, state_path=state, progress=False)
