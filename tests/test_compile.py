"""torch.compile of a training step that calls ``opt.step(closure)``.

Dynamo drops attribute writes made inside a compiled optimizer method, so
SAM's step methods run eagerly (``torch.compiler.disable``; ``step`` only for
its own frame, so the closure -- forward and backward -- is still compiled).
Without that, SAM's second compiled step failed ("first_step() was called
twice") and the first one left the weights wrong.
"""

from __future__ import annotations

import pytest
import torch
from optim_registry import BASE_BY_NAME, METHOD_BY_NAME, make_data, make_model, methods, params_of

STEPS = 4


def _run(info, compiled: bool, backend: str):
    model = info.model(40)
    x, y = make_data(40)
    opt = info.make(BASE_BY_NAME["sgd_nesterov"], model)

    def train_step():
        opt.step(info.closure(model, x, y))
        opt.zero_grad()

    step = torch.compile(train_step, backend=backend) if compiled else train_step
    for _ in range(STEPS):
        step()
    return params_of(model), opt.steps, opt.ascents


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("info", methods(), ids=lambda m: m.name)
def test_compiled_training_step_equals_eager(info):
    """aot_eager traces the step as the default backend does, without code generation: the same bits."""
    eager = _run(info, compiled=False, backend="eager")
    compiled = _run(info, compiled=True, backend="aot_eager")
    assert compiled[1:] == eager[1:] == (STEPS, compiled[2])
    assert all(torch.equal(a, b) for a, b in zip(compiled[0], eager[0]))


@pytest.mark.parametrize("name", ["sam", "gsam"])
def test_inductor_compiled_training_step_matches_eager(name):
    """The default backend generates fused kernels: equal to float rounding."""
    info = METHOD_BY_NAME[name]
    eager = _run(info, compiled=False, backend="eager")
    compiled = _run(info, compiled=True, backend="inductor")
    assert compiled[1:] == eager[1:]
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)


def _run_compiled_model(info, backend: str | None):
    """A plain SAM loop on ``torch.compile(model)`` (the step itself eager), BatchNorm included."""
    model = make_model(40, bn=True)
    x, y = make_data(40)
    net = model if backend is None else torch.compile(model, backend=backend)
    opt = info.make(BASE_BY_NAME["sgd_nesterov"], model, model=net)
    for _ in range(STEPS):
        opt.step(info.closure(net, x, y))
        opt.zero_grad()
    return params_of(model), [b.clone() for b in model.buffers()], opt.steps, opt.ascents


@pytest.mark.parametrize("name", ["sam", "asam", "gsam", "looksam"])
def test_compiled_model_in_a_plain_loop_equals_eager(name):
    """``torch.compile(model)`` under SAM: same weights and BatchNorm buffers as eager.

    The second pass runs with BatchNorm's statistics frozen (``model=`` the
    compiled module); Dynamo guards on ``track_running_stats`` and traces that
    pass separately, so the statistics still move once per step.
    """
    info = METHOD_BY_NAME[name]
    eager = _run_compiled_model(info, backend=None)
    compiled = _run_compiled_model(info, backend="aot_eager")
    assert compiled[2:] == eager[2:]
    assert all(torch.equal(a, b) for a, b in zip(compiled[0], eager[0]))
    assert all(torch.equal(a, b) for a, b in zip(compiled[1], eager[1]))
    assert int(compiled[1][-1]) == STEPS  # num_batches_tracked: once per step


def test_inductor_compiled_model_matches_eager():
    info = METHOD_BY_NAME["sam"]
    eager = _run_compiled_model(info, backend=None)
    compiled = _run_compiled_model(info, backend="inductor")
    assert compiled[2:] == eager[2:]
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
