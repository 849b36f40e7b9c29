"""Hessian-vector products against torch.autograd.functional.hessian."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from samkit.sharpness import HessianOperator, eval_mode, hvp, param_vector
from samkit.sharpness.hvp import prepare_batches


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(n: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _reference_hessian(model: nn.Module, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    w0 = param_vector(model)

    def f(w):
        ps = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    return torch.autograd.functional.hessian(f, w0)


@pytest.fixture(scope="module")
def setup():
    model = _mlp()
    x, y = _data()
    return model, x, y, _reference_hessian(model, x, y)


_REFS: dict[int, torch.Tensor] = {}


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    chunk=st.one_of(st.none(), st.integers(1, 30)),
    backend=st.sampled_from(["autograd", "func"]),
    cache=st.sampled_from([None, True, False]),
)
def test_hvp_matches_full_hessian_for_any_batching(setup, sizes, chunk, backend, cache):
    # the weighted mean over unequal batches is the full-data loss, whatever the chunking
    model, x, y, _ = setup
    n = sum(sizes)
    xs, ys = x[:n], y[:n]
    if n not in _REFS:
        _REFS[n] = _reference_hessian(model, xs, ys)
    ref = _REFS[n]
    batches = list(zip(xs.split(sizes), ys.split(sizes)))
    op = HessianOperator(
        model, F.cross_entropy, batches, max_batch_size=chunk, backend=backend, cache_graph=cache
    )
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(op.matvec(v), ref @ v, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        assert op.loss() == pytest.approx(float(F.cross_entropy(model(xs), ys)), rel=1e-12)


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_matmat_and_dense_equal_reference(setup, backend):
    model, x, y, h = setup
    op = HessianOperator(model, F.cross_entropy, [(x, y)], backend=backend)
    vs = torch.randn(4, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(vs), vs @ h, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.dense(), h, rtol=1e-9, atol=1e-11)
    assert op.n_matvecs == 4 + op.dim


def test_gradient_matches_autograd(setup):
    model, x, y, _ = setup
    op = HessianOperator(
        model, F.cross_entropy, list(zip(x.split(7), y.split(7))), max_batch_size=None
    )
    loss, g = op.loss_and_grad()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)


def test_list_form_and_param_subset(setup):
    model, x, y, h = setup
    vs = [torch.randn_like(p) for p in model.parameters()]
    out = hvp(model, F.cross_entropy, [(x, y)], vs)
    flat = torch.cat([v.reshape(-1) for v in vs])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out]), h @ flat)
    # Hessian over the last layer only = the matching diagonal block
    sub = ["2.weight", "2.bias"]
    op = HessianOperator(model, F.cross_entropy, [(x, y)], params=sub)
    k = op.dim
    torch.testing.assert_close(op.dense(), h[-k:, -k:])


def test_eval_mode_and_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)
    )
    model.train()
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    for _ in range(3):  # non-trivial running statistics
        model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = HessianOperator(model, F.cross_entropy, [(x, y)])
    op.matvec(torch.randn(op.dim))
    loss = op.loss()
    with eval_mode(model):
        expected = float(F.cross_entropy(model(x), y))
    assert loss == pytest.approx(expected, rel=1e-6)  # BN running stats, no dropout
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_restores_mixed_flags():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_prepare_batches_regroups_and_keeps_odd_shapes():
    xs = [torch.randn(n, 3) for n in (4, 5, 6)]
    ys = [torch.zeros(n) for n in (4, 5, 6)]
    out = prepare_batches(list(zip(xs, ys)), max_batch_size=7)
    assert [b[0].shape[0] for b in out] == [7, 7, 1]
    torch.testing.assert_close(torch.cat([b[0] for b in out]), torch.cat(xs))
    odd = [(torch.randn(2, 3), torch.zeros(2)), (torch.randn(2, 4), torch.zeros(2))]
    assert [b[0].shape for b in prepare_batches(odd)] == [(2, 3), (2, 4)]


def test_bad_input():
    model = _mlp()
    x, y = _data()
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, F.cross_entropy, [(x, y)], backend="jax")
    with pytest.raises(ValueError, match="batches"):
        HessianOperator(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="batches"):
        HessianOperator(model, F.cross_entropy, [(x, y[:3])])
    with pytest.raises(ValueError, match="batches"):
        HessianOperator(model, F.cross_entropy, [x])
    with pytest.raises(ValueError, match="max_batch_size"):
        HessianOperator(model, F.cross_entropy, [(x, y)], max_batch_size=0)
    with pytest.raises(ValueError, match="params"):
        HessianOperator(model, F.cross_entropy, [(x, y)], params=["nope"])
    op = HessianOperator(model, F.cross_entropy, [(x, y)])
    with pytest.raises(ValueError, match=f"length {op.dim}"):
        op.matvec(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="vs"):
        op.matmat(torch.zeros(op.dim, dtype=torch.float64))
