"""Checks of samkit.keras.SAMModel on one Keras backend, run as a child process.

Keras fixes its backend at import, so tests/test_keras.py starts this script
once per backend with ``KERAS_BACKEND`` set. Every check runs (a failure does
not hide the others) and the results are written as JSON to the path given
as the only argument: ``{check: {"ok": bool, "detail": str, "seconds": float}}``.

The references are hand computations in numpy (float64) of the formulas in
``samkit.keras.model``; Keras computes in float32. Tolerance: ``TOL`` below,
``|keras - hand| <= ATOL + RTOL * |hand|`` elementwise, a few float32 ulps
accumulated over the steps; each such check also asserts that the plain
(non-SAM) answer lies far outside it, so the check could fail.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
if BACKEND == "torch":
    import torch

    torch.set_num_threads(1)

from samkit.keras import SAMModel  # noqa: E402

ATOL, RTOL = 2e-6, 2e-5
TOL = f"atol {ATOL} + rtol {RTOL} (float32 against float64)"
N, D, C, BATCH = 48, 5, 3, 16  # 3 steps per epoch

RNG = np.random.RandomState(0)
X = RNG.randn(N, D).astype("float32")
Y = RNG.randint(0, C, size=N).astype("int32")
YR = RNG.randn(N, 1).astype("float32")  # regression targets


class CheckError(AssertionError):
    pass


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckError(message)


def close(got, want, what: str) -> float:
    """Assert elementwise closeness within the stated tolerance; return the max error."""
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = np.abs(g - w)
        if not np.all(err <= ATOL + RTOL * np.abs(w)):
            raise CheckError(
                f"{what}: weight {i} differs by up to {err.max():.3g} (tolerance {TOL})"
            )
        worst = max(worst, float(err.max()))
    return worst


def far(a, b, what: str) -> None:
    """The check is discriminative: the alternative answer is well outside the tolerance."""
    gap = max(float(np.abs(np.asarray(x, np.float64) - y).max()) for x, y in zip(a, b))
    expect(gap > 100 * ATOL, f"{what}: alternatives differ by only {gap:.3g}, the check is blind")


# ---------------------------------------------------------------- hand SAM ---


def mlp_grad(ws, x, y):
    """Loss and gradient of tanh-MLP + softmax cross-entropy (mean over the batch)."""
    w1, b1, w2, b2 = ws
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(x)
    loss = -np.log(p[np.arange(n), y]).mean()
    dz = p.copy()
    dz[np.arange(n), y] -= 1
    dz /= n
    dh = dz @ w2.T * (1 - h**2)
    return loss, [x.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)]


def mlp_accuracy(ws, x, y):
    w1, b1, w2, b2 = ws
    return float(((np.tanh(x @ w1 + b1) @ w2 + b2).argmax(1) == y).mean())


def split_bounds(n, k):
    sizes = [len(a) for a in np.array_split(np.arange(n), min(k, n))]
    stops = np.cumsum(sizes)
    return [(int(s - z), int(s)) for s, z in zip(stops, sizes)]


def hand_perturbation(ws, g, rho, adaptive=False, eta=0.01, eps=1e-12):
    if adaptive:
        t = [np.abs(w) + eta for w in ws]
        u = [ti * gi for ti, gi in zip(t, g)]
        d = [ti * ui for ti, ui in zip(t, u)]
    else:
        u = d = g
    norm = np.sqrt(sum(float((ui**2).sum()) for ui in u))
    return [rho * di / (norm + eps) for di in d]


def hand_sam_gradient(grad_fn, ws, x, y, rho, splits=1, adaptive=False, eta=0.01):
    """sum_k (n_k / n) grad L_k(w + e_k), e_k from grad L_k(w); and the losses at w and w + e."""
    n = len(x)
    total = [np.zeros_like(w) for w in ws]
    loss_w = loss_e = 0.0
    for a, b in split_bounds(n, splits):
        loss_k, g = grad_fn(ws, x[a:b], y[a:b])
        e = hand_perturbation(ws, g, rho, adaptive, eta)
        loss_ek, h = grad_fn([w + ei for w, ei in zip(ws, e)], x[a:b], y[a:b])
        total = [t + (b - a) / n * hi for t, hi in zip(total, h)]
        loss_w += (b - a) / n * loss_k
        loss_e += (b - a) / n * loss_ek
    return loss_w, loss_e, total


class HandSGD:
    def __init__(self, lr, momentum):
        self.lr, self.momentum, self.m = lr, momentum, None

    def step(self, ws, g):
        if self.m is None:
            self.m = [np.zeros_like(w) for w in ws]
        self.m = [self.momentum * m - self.lr * gi for m, gi in zip(self.m, g)]
        return [w + m for w, m in zip(ws, self.m)]


class HandAdam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-7):
        self.lr, self.b1, self.b2, self.eps, self.t, self.m, self.v = lr, b1, b2, eps, 0, None, None

    def step(self, ws, g):
        if self.m is None:
            self.m = [np.zeros_like(w) for w in ws]
            self.v = [np.zeros_like(w) for w in ws]
        self.t += 1
        alpha = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        self.m = [m + (gi - m) * (1 - self.b1) for m, gi in zip(self.m, g)]
        self.v = [v + (gi**2 - v) * (1 - self.b2) for v, gi in zip(self.v, g)]
        return [w - m * alpha / (np.sqrt(v) + self.eps) for w, m, v in zip(ws, self.m, self.v)]


def hand_fit(ws, opt, epochs, rho, splits=1, adaptive=False, eta=0.01, batch=BATCH, rows=N):
    """fit(shuffle=False) by hand: final weights and, per epoch, what Keras reports
    (loss and accuracy at w, means over the batches weighted by their size) and
    the loss at w + e it must not report."""
    ws = [np.asarray(w, np.float64) for w in ws]
    log = {"loss": [], "accuracy": [], "loss_at_w_plus_e": []}
    for _ in range(epochs):
        sums = np.zeros(3)
        for a in range(0, rows, batch):
            xb, yb = X[a : min(a + batch, rows)].astype(np.float64), Y[a : min(a + batch, rows)]
            loss_w, loss_e, g = hand_sam_gradient(mlp_grad, ws, xb, yb, rho, splits, adaptive, eta)
            sums += len(xb) * np.array([loss_w, mlp_accuracy(ws, xb, yb), loss_e])
            ws = opt.step(ws, g)
        for key, value in zip(log, sums / rows):
            log[key].append(float(value))
    return ws, log


# ----------------------------------------------------------------- models ---


def mlp(seed=0, hidden=8):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(C),
        ]
    )


def loss_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def weights(model):
    return [np.array(v) for v in model.trainable_variables]


def fit_sam(inner, optimizer, epochs=2, batch=BATCH, y=Y, loss=None, metrics=None, **sam_kwargs):
    sam = SAMModel(inner, **sam_kwargs)
    sam.compile(optimizer=optimizer, loss=loss or loss_ce(), metrics=metrics)
    history = sam.fit(X, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
    return sam, history.history


# ----------------------------------------------------------------- checks ---

CHECKS = {}
OURS = {}  # weights of some runs, for the tf-keras comparison


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def reported(hist, want, key):
    got = np.asarray(hist[key])
    expect(
        np.allclose(got, want[key], rtol=1e-5, atol=1e-6),
        f"fit reported {key} {got.tolist()}, by hand at w {want[key]}",
    )


@check
def sgd_momentum_matches_hand():
    """6 steps of SAM + SGD(momentum) against the hand formula; loss and accuracy reported at w."""
    inner = mlp()
    w0 = weights(inner)
    _, hist = fit_sam(inner, keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, metrics=["accuracy"])
    want, log = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.1)
    worst = close(weights(inner), want, "weights")
    plain, _ = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.0)
    far(want, plain, "SAM vs plain SGD")
    reported(hist, log, "loss")
    reported(hist, log, "accuracy")
    gap = np.abs(np.subtract(log["loss"], log["loss_at_w_plus_e"])).min()
    expect(gap > 1e-3, f"losses at w and w + e too close ({gap:.2g}) to tell apart")
    OURS["sgd"] = weights(inner)
    return f"max |keras - hand| {worst:.2g}; loss at w {np.round(hist['loss'], 5).tolist()}"


@check
def asam_adam_matches_hand():
    """ASAM (adaptive, eta=0.01, rho=0.5) with Adam against the hand formula."""
    inner = mlp(seed=1)
    w0 = weights(inner)
    fit_sam(inner, keras.optimizers.Adam(0.01), rho=0.5, adaptive=True)
    want, _ = hand_fit(w0, HandAdam(0.01), 2, rho=0.5, adaptive=True)
    worst = close(weights(inner), want, "weights")
    sam_l2, _ = hand_fit(w0, HandAdam(0.01), 2, rho=0.5, adaptive=False)
    far(want, sam_l2, "ASAM vs SAM")
    return f"max |keras - hand| {worst:.2g}"


@check
def micro_batches_average():
    """num_batch_splits=3 on batches of 16 (6, 5, 5 rows): size-weighted mean of the micro-batch SAM gradients."""
    inner = mlp(seed=2)
    w0 = weights(inner)
    _, hist = fit_sam(inner, keras.optimizers.SGD(0.1, momentum=0.9), rho=0.2, num_batch_splits=3)
    want, log = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.2, splits=3)
    worst = close(weights(inner), want, "weights")
    whole, _ = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.2, splits=1)
    far(want, whole, "3 micro-batches vs the whole batch")
    summed, _ = hand_fit(w0, HandSGD(0.3, 0.9), 2, rho=0.2, splits=3)  # tf-keras's sum
    far(want, summed, "mean vs sum of micro-batch gradients")
    reported(hist, log, "loss")
    return f"max |keras - hand| {worst:.2g}"


@check
def last_batch_smaller_than_splits():
    """18 rows, batches of 16: 4 micro-batches of 4, then the last batch of 2 as 2 one-row micro-batches."""
    inner = mlp(seed=10)
    w0 = weights(inner)
    sam = SAMModel(inner, rho=0.2, num_batch_splits=4)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss_ce())
    hist = sam.fit(X[:18], Y[:18], batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    want, log = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.2, splits=4, rows=18)
    worst = close(weights(inner), want, "weights")
    expect(np.all(np.isfinite(hist["loss"])), f"loss {hist['loss']}")
    reported(hist, log, "loss")
    return f"max |keras - hand| {worst:.2g}"


@check
def optimizer_gradient_accumulation_is_m_sharpness():
    """Keras' gradient_accumulation_steps=2 on batches of 8 == num_batch_splits=2 on batches of 16."""
    inner = mlp(seed=11)
    w0 = weights(inner)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2)
    fit_sam(inner, optimizer, batch=8, rho=0.2)
    want, _ = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.2, splits=2, batch=16)
    worst = close(weights(inner), want, "weights")
    one_ascent, _ = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.2, splits=1, batch=16)
    far(want, one_ascent, "one ascent per 16 rows vs per 8")
    return f"max |keras - hand| {worst:.2g}"


def bn_model(seed=4, momentum=0.9, dropout=0.0):
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((D,)),
        keras.layers.Dense(4),
        keras.layers.BatchNormalization(momentum=momentum),
    ]
    if dropout:
        layers.append(keras.layers.Dropout(dropout, seed=seed))
    layers.append(keras.layers.Dense(C))
    return keras.Sequential(layers)


@check
def unseeded_dropout_draws_the_same_masks_in_both_passes():
    """rho=0 with a Dropout that has no seed trains exactly as fit without SAM: on the
    torch backend such a layer draws from torch's global generator, and pass 2 drew new
    masks (0.07 away after 2 epochs) until the generator was put back between the passes."""

    def model():
        keras.utils.set_random_seed(5)
        return keras.Sequential(
            [keras.Input((D,)), keras.layers.Dense(4, activation="tanh"),
             keras.layers.Dropout(0.3), keras.layers.Dense(C)]
        )  # fmt: skip

    plain = model()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_ce())
    keras.utils.set_random_seed(1)
    plain.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    inner = model()
    keras.utils.set_random_seed(1)
    fit_sam(inner, keras.optimizers.SGD(0.1), rho=0.0)
    for i, (a, b) in enumerate(zip(weights(inner), weights(plain))):
        expect(np.array_equal(a, b), f"weight {i}: max diff {np.abs(a - b).max():.3g}")
    return "rho=0 equals fit bit for bit"


@check
def batchnorm_once_per_step_and_exact_restore():
    """lr=0, ASAM rho=1, 2 micro-batches: weights come back bit-for-bit; BatchNorm moves once per step, by pass 1."""
    inner = bn_model()
    w0 = weights(inner)
    bn = inner.layers[1]
    fit_sam(inner, keras.optimizers.SGD(0.0), epochs=1, rho=1.0, adaptive=True, num_batch_splits=2)
    for i, (a, b) in enumerate(zip(weights(inner), w0)):
        expect(
            np.array_equal(a, b),
            f"weight {i} not restored exactly: max diff {np.abs(a - b).max():.3g}",
        )
    # Subtracting an e of this size (norm ~ rho = 1) instead of copying would
    # not round-trip in float32, so the bit-for-bit check can fail.
    e = [np.random.RandomState(1).randn(*w.shape).astype(np.float32) for w in w0]
    scale = np.float32(1.0 / np.sqrt(sum(float((x**2).sum()) for x in e)))
    expect(
        any(np.any((w + x * scale) - x * scale != w) for w, x in zip(w0, e)),
        "the restore check cannot tell copy from subtract",
    )
    # The BatchNorm input is x W + b (fixed, lr=0). Per step, one update with
    # the micro-batches' statistics averaged: m <- 0.9 m + 0.1 sum_k f_k stat_k.
    w, b = w0[0].astype(np.float64), w0[1].astype(np.float64)
    mean, var, twice = np.zeros(4), np.ones(4), np.zeros(4)
    for a in range(0, N, BATCH):
        act = X[a : a + BATCH].astype(np.float64) @ w + b
        parts = [(act[p:q], (q - p) / len(act)) for p, q in split_bounds(len(act), 2)]
        step_mean = sum(f * z.mean(0) for z, f in parts)
        mean = 0.9 * mean + 0.1 * step_mean
        var = 0.9 * var + 0.1 * sum(f * z.var(0) for z, f in parts)
        twice = 0.9 * (0.9 * twice + 0.1 * step_mean) + 0.1 * step_mean  # 2 updates a step
    got_mean, got_var = np.array(bn.moving_mean), np.array(bn.moving_variance)
    expect(
        np.allclose(got_mean, mean, rtol=1e-4, atol=1e-6)
        and np.allclose(got_var, var, rtol=1e-4, atol=1e-6),
        f"moving mean/variance {got_mean}, {got_var}; by hand {mean}, {var}",
    )
    expect(np.abs(twice - mean).max() > 1e-3, "BatchNorm check cannot tell 1 update from 2")
    return f"moving_mean {np.round(got_mean, 4).tolist()}"


@check
def rho_zero_equals_plain_training():
    """rho=0 with BatchNorm and dropout: bit-for-bit the weights, statistics and seeds of the inner model's own fit."""
    a, b = bn_model(seed=5, dropout=0.3), bn_model(seed=5, dropout=0.3)
    fit_sam(a, keras.optimizers.SGD(0.1, momentum=0.9), rho=0.0)
    b.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss_ce())
    b.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for va, vb in zip(a.variables, b.variables):
        x, y = np.array(va), np.array(vb)
        if not np.array_equal(x, y):
            raise CheckError(
                f"{va.path} differs from plain training by {np.abs(x.astype(float) - y).max():.3g}"
            )
    far(weights(a), weights(bn_model(seed=5, dropout=0.3)), "trained vs initial")
    return f"{len(a.variables)} variables equal bit-for-bit"


class Flip(keras.layers.Layer):
    """Multiplies by (-1)^count in training and counts its training calls: a stand-in for a seed."""

    def build(self, shape):
        self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False)

    def call(self, x, training=False):
        if not training:
            return x
        sign = keras.ops.cast(1 - 2 * (self.count % 2), x.dtype)
        self.count.assign(self.count + 1)
        return x * sign


def lin_grad(sign):
    def grad(ws, x, y):
        w, b = ws
        pred = sign * x @ w + b
        r = 2 * (pred - y) / len(x)
        return float(((pred - y) ** 2).mean()), [sign * x.T @ r, r.sum(0)]

    return grad


@check
def pass_two_sees_pass_one_state():
    """Non-trainable state: pass 2 starts from the state pass 1 started from; it advances once per micro-batch."""
    for splits in (1, 2):
        keras.utils.set_random_seed(6)
        inner = keras.Sequential([keras.Input((D,)), Flip(), keras.layers.Dense(1)])
        w0 = weights(inner)
        fit_sam(
            inner, keras.optimizers.SGD(0.1), y=YR, loss="mse", rho=0.5, num_batch_splits=splits
        )
        ws = [w.astype(np.float64) for w in w0]
        count, opt = 0, HandSGD(0.1, 0.0)
        for _ in range(2):
            for a in range(0, N, BATCH):
                xb, yb = X[a : a + BATCH].astype(np.float64), YR[a : a + BATCH]
                total = [np.zeros_like(w) for w in ws]
                for p, q in split_bounds(len(xb), splits):
                    grad = lin_grad((-1.0) ** count)  # the same sign in both passes
                    _, g = grad(ws, xb[p:q], yb[p:q])
                    e = hand_perturbation(ws, g, 0.5)
                    _, h = grad([w + ei for w, ei in zip(ws, e)], xb[p:q], yb[p:q])
                    total = [t + (q - p) / len(xb) * hi for t, hi in zip(total, h)]
                    count += 1
                ws = opt.step(ws, total)
        got = int(np.array(inner.layers[0].count))
        expect(got == count, f"splits={splits}: state advanced {got} times, expected {count}")
        close(weights(inner), ws, f"splits={splits} weights")
    return f"count {count} after 6 steps of 2 micro-batches"


@check
def zero_gradient_gives_zero_perturbation():
    """A model at an exact minimum (zero gradient): no NaN, weights stay put; ASAM's e is zero too."""
    inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    zeros = np.zeros((N, 1), "float32")
    fit_sam(inner, keras.optimizers.SGD(0.1, momentum=0.9), epochs=1, y=zeros, loss="mse")
    for w in weights(inner):
        expect(np.all(w == 0), f"weights moved to {w} (or NaN)")
    w = [keras.ops.convert_to_tensor(v) for v in weights(mlp())]
    for adaptive in (False, True):
        sam = SAMModel(mlp(), rho=0.05, adaptive=adaptive)
        e = sam._ascent(w, [keras.ops.zeros_like(t) for t in w])
        e = [np.array(keras.ops.convert_to_numpy(t)) for t in e]
        expect(all(np.all(x == 0) for x in e), f"adaptive={adaptive}: e = {e}")
    return "weights finite and zero; e = 0 for SAM and ASAM"


@check
def save_load_resumes_exactly():
    """fit 1 epoch, save the wrapper (.keras), load, fit 1 more: the 2-epoch hand result (Adam state, settings kept)."""
    kwargs = dict(rho=0.3, adaptive=True, eta=0.02, num_batch_splits=2)
    inner = mlp(seed=7)
    w0 = weights(inner)
    sam, _ = fit_sam(inner, keras.optimizers.Adam(0.01), epochs=1, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sam.keras"
        sam.save(path)
        loaded = keras.models.load_model(path)
    expect(type(loaded) is SAMModel, f"loaded a {type(loaded).__name__}")
    got = {k: getattr(loaded, k) for k in ("rho", "adaptive", "eta", "num_batch_splits", "eps")}
    expect(got == {**kwargs, "eps": 1e-12}, f"settings after load: {got}")
    loaded.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    want, _ = hand_fit(w0, HandAdam(0.01), 2, rho=0.3, splits=2, adaptive=True, eta=0.02)
    worst = close(weights(loaded), want, "resumed weights")
    fresh = HandAdam(0.01)  # what a lost optimizer state would give
    first, _ = hand_fit(w0, HandAdam(0.01), 1, rho=0.3, splits=2, adaptive=True, eta=0.02)
    restarted, _ = hand_fit(first, fresh, 1, rho=0.3, splits=2, adaptive=True, eta=0.02)
    far(want, restarted, "resumed vs restarted optimizer")
    return f"max |keras - hand| {worst:.2g}"


@check
def bad_arguments_raise():
    inner = mlp()
    cases = [
        (dict(rho=-1.0), "Invalid rho value"),
        (dict(rho=float("nan")), "Invalid rho value"),
        (dict(rho=True), "Invalid rho value"),
        (dict(eta=-0.1), "Invalid eta value"),
        (dict(eps=0.0), "Invalid eps value"),
        (dict(num_batch_splits=0), "Invalid num_batch_splits value"),
        (dict(num_batch_splits=2.0), "Invalid num_batch_splits value"),
        (dict(adaptive="yes"), "Invalid adaptive value"),
    ]
    for kwargs, message in cases:
        try:
            SAMModel(inner, **kwargs)
        except ValueError as error:
            expect(message in str(error), f"{kwargs}: message {error!s}")
        else:
            raise CheckError(f"{kwargs} accepted")
    for model in ("not a model", object()):
        try:
            SAMModel(model)
        except ValueError as error:
            expect("Invalid model value" in str(error), str(error))
        else:
            raise CheckError(f"model={model!r} accepted")
    return f"{len(cases) + 2} refusals"


if BACKEND == "torch":

    @check
    def torch_compile_refused():
        sam = SAMModel(mlp())
        sam.compile(optimizer="sgd", loss=loss_ce(), jit_compile=True)
        try:
            sam.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
        except ValueError as error:
            expect("jit_compile" in str(error), str(error))
        else:
            raise CheckError("jit_compile=True accepted on torch")
        return "refused"


if BACKEND == "tensorflow":

    @check
    def xla_matches_hand():
        """TensorFlow with jit_compile=True (XLA, the default on GPU machines), 2 micro-batches."""
        inner = mlp(seed=8)
        w0 = weights(inner)
        sam = SAMModel(inner, rho=0.1, num_batch_splits=2)
        sam.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss_ce(), jit_compile=True
        )
        sam.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        want, _ = hand_fit(w0, HandSGD(0.1, 0.9), 2, rho=0.1, splits=2)
        OURS["xla_splits2"] = weights(inner)
        return f"max |keras - hand| {close(weights(inner), want, 'weights'):.2g}"

    @check
    def tf_distribute_refused():
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            sam = SAMModel(mlp())
            sam.compile(optimizer="sgd", loss=loss_ce())
        try:
            sam.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
        except NotImplementedError as error:
            expect("tf.distribute" in str(error), str(error))
        else:
            raise CheckError("trained under a tf.distribute strategy")
        return "refused"

    @check
    def matches_tf_keras():
        """tf-keras's SharpnessAwareMinimization on a model without dropout or BatchNorm.

        Same runs as sgd_momentum_matches_hand (no split) and xla_matches_hand
        (2 splits). Without splits the two agree at the same learning rate; tf-keras
        sums the micro-batch gradients, so with 2 splits it agrees with SAMModel
        run at twice its learning rate.
        """
        import tf_keras

        out = []
        for splits, seed, key in ((None, 0, "sgd"), (2, 8, "xla_splits2")):
            expect(key in OURS, f"run {key} missing (its check failed)")
            ref = tf_keras.Sequential(
                [
                    tf_keras.Input((D,)),
                    tf_keras.layers.Dense(8, activation="tanh"),
                    tf_keras.layers.Dense(C),
                ]
            )
            ref.set_weights(weights(mlp(seed=seed)))
            tk = tf_keras.models.experimental.SharpnessAwareMinimization(
                ref, rho=0.1, num_batch_splits=splits
            )
            lr = 0.1 / (splits or 1)
            tk.compile(
                optimizer=tf_keras.optimizers.SGD(lr, momentum=0.9),
                loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            tk.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
            theirs = [np.array(v) for v in ref.trainable_variables]
            worst = close(OURS[key], theirs, f"num_batch_splits={splits}")
            if splits:
                same_lr, _ = hand_fit(weights(mlp(seed=seed)), HandSGD(lr, 0.9), 2, 0.1, splits)
                far(same_lr, theirs, "SAMModel at tf-keras's learning rate vs tf-keras")
            out.append(f"splits={splits}: max diff {worst:.2g}")
        return "; ".join(out)


@check
def docstring_example():
    import doctest

    import samkit.keras.model

    result = doctest.testmod(samkit.keras.model, optionflags=doctest.ELLIPSIS)
    expect(result.attempted > 0 and result.failed == 0, f"doctest: {result}")
    return f"{result.attempted} examples"


@check
def example_runs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import keras_sam

    out = keras_sam.main(["--epochs", "2"])
    expect(out["backend"] == BACKEND, f"example ran on {out['backend']}")
    expect(out["losses"][-1] < 0.9 * out["losses"][0], f"example did not learn: {out['losses']}")
    expect(out["accuracy"] > 0.5, f"test accuracy {out['accuracy']} (chance 0.1)")
    return f"losses {np.round(out['losses'], 3).tolist()}, accuracy {out['accuracy']:.2f}"


def main(argv: list[str]) -> int:
    results = {}
    only = set(argv[1:])
    for name, fn in CHECKS.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as error:  # every check reports; the parent test fails on any
            detail, ok = "".join(traceback.format_exception_only(error)).strip(), False
            if not isinstance(error, (CheckError, AssertionError)):
                detail += "\n" + traceback.format_exc()
        results[name] = {
            "ok": ok,
            "detail": detail,
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(
            f"{BACKEND} {name}: {'ok' if ok else 'FAILED'} {results[name]['seconds']}s", flush=True
        )
    Path(argv[0]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
