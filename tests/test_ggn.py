"""The generalised Gauss-Newton proxy: exact against J^T (d^2 loss / dz^2) J built from
full Jacobians, for cross-entropy and MSE, cached or not; its trace exact and unbiased."""

import statistics

import pytest
import torch
import torch.nn.functional as F
from budget_checks import check_budget_bookkeeping
from torch import nn

from samkit.sharpness import (
    GGNOperator,
    HessianOperator,
    ggn_trace,
    hessian_trace,
    param_vector,
    top_eigenvalues,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _exact_ggn(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def out(w):
        params = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        return torch.func.functional_call(model, params, (x,))

    w0 = param_vector(model)
    z = out(w0).detach()
    jac = torch.autograd.functional.jacobian(out, w0).reshape(z.numel(), -1)
    h_out = torch.autograd.functional.hessian(lambda zz: loss_fn(zz.view_as(z), y), z.reshape(-1))
    return jac.T @ h_out @ jac


#: every exactness test of the products runs over both product paths (the compiled
#: path's first call compiles: a few seconds per model and chunk shape)
PRODUCTS = ["eager", "compiled"]


@pytest.fixture(scope="module")
def problem():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    yr = torch.randn(30, 3, generator=g, dtype=torch.float64)
    return (
        model,
        x,
        y,
        yr,
        _exact_ggn(model, F.cross_entropy, x, y),
        _exact_ggn(model, F.mse_loss, x, yr),
    )


@pytest.mark.parametrize(
    "cache, product",
    [(None, "eager"), (True, "eager"), (False, "eager"), (None, "compiled")],
)
@pytest.mark.parametrize("split", [[30], [4, 11, 15]])
def test_ggn_products_exact(problem, cache, split, product):
    model, x, y, yr, g_ce, g_mse = problem
    for loss_fn, target, exact in ((F.cross_entropy, y, g_ce), (F.mse_loss, yr, g_mse)):
        batches = list(zip(x.split(split), target.split(split)))
        op = GGNOperator(model, loss_fn, batches, cache_graph=cache, product=product)
        torch.testing.assert_close(op.dense(), exact, rtol=1e-9, atol=1e-12)
        vs = torch.randn(3, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(op.matmat(vs), vs @ exact, rtol=1e-9, atol=1e-12)
        assert op.product_info["path"] == product


@pytest.mark.parametrize("product", PRODUCTS)
def test_ggn_is_psd_and_top_eigenvalue_exact(problem, product):
    model, x, y, _, g_ce, _ = problem
    evals = torch.linalg.eigvalsh(g_ce)
    assert float(evals[0]) > -1e-12  # positive semi-definite for a convex loss of the outputs
    op = GGNOperator(model, F.cross_entropy, [(x, y)], product=product)
    res = top_eigenvalues(op, 2, tol=1e-10, max_iter=op.dim)
    assert res.eigenvalues == pytest.approx(evals.flip(0)[:2].tolist(), rel=1e-7)
    # a proxy, not the Hessian: the two differ away from a minimum
    h = HessianOperator(model, F.cross_entropy, [(x, y)]).dense()
    assert not torch.allclose(h, g_ce, atol=1e-6)


def test_ggn_trace_exact_and_unbiased(problem):
    model, x, y, yr, g_ce, g_mse = problem
    split = list(zip(x.split([4, 11, 15]), y.split([4, 11, 15])))
    exact = ggn_trace(model, F.cross_entropy, split, exact=True)
    assert exact.trace == pytest.approx(float(g_ce.trace()), rel=1e-10)
    assert exact.exact and exact.stderr == 0.0
    mse = ggn_trace(model, F.mse_loss, [(x, yr)], exact=True)
    assert mse.trace == pytest.approx(float(g_mse.trace()), rel=1e-10)
    # one Rademacher vector per sample: unbiased, and the reported standard error is an upper bound
    runs = [ggn_trace(model, F.cross_entropy, [(x, y)], seed=s) for s in range(150)]
    values = [r.trace for r in runs]
    mean, sd = statistics.mean(values), statistics.stdev(values)
    assert abs(mean - float(g_ce.trace())) < 4 * sd / len(values) ** 0.5
    assert statistics.median(r.stderr for r in runs) >= 0.8 * sd


@pytest.mark.parametrize("product", PRODUCTS)
def test_ggn_trace_of_operator_agrees(problem, product):
    # the same matrix through Hutchinson on the operator: exact with a full deflation basis
    model, x, y, _, g_ce, _ = problem
    op = GGNOperator(model, F.cross_entropy, [(x, y)], product=product)
    assert hessian_trace(op, deflation_steps=op.dim).trace == pytest.approx(
        float(g_ce.trace()), rel=1e-8
    )


def test_ggn_bad_input(problem):
    model, x, y, *_ = problem

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.lin(x), self.lin(x)

    for product in PRODUCTS:
        op = GGNOperator(
            TwoHeads(), lambda out, t: F.cross_entropy(out[0], t), [(x, y)], product=product
        )
        with pytest.raises(ValueError, match="one output tensor"):
            op.matvec(torch.zeros(op.dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid product value"):
        GGNOperator(model, F.cross_entropy, [(x, y)], product="jit")
    with pytest.raises(ValueError, match="Invalid reduction value"):
        GGNOperator(model, nn.CrossEntropyLoss(reduction="none"), [(x, y)])


def test_ggn_memory_budget_bad_input(problem):
    model, x, y, *_ = problem
    for bad in (0, -5, 1.5, True, "lots"):
        with pytest.raises(ValueError, match="Invalid memory_budget value"):
            GGNOperator(model, F.cross_entropy, [(x, y)], memory_budget=bad)
    with pytest.raises(ValueError, match="memory_budget"):
        GGNOperator(model, F.cross_entropy, [(x, y)], memory_budget=10**6, cache_graph=False)
    op = GGNOperator(model, F.cross_entropy, [(x, y)], memory_budget="auto")
    assert isinstance(op.memory_budget, int) and op.memory_budget > 0 and not op.cache_graph


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_memory_budget_keeps_what_fits_and_rebuilds_the_rest(problem, loss, monkeypatch):
    model, x, y, yr, g_ce, g_mse = problem
    loss_fn, target, exact = (F.cross_entropy, y, g_ce) if loss == "ce" else (F.mse_loss, yr, g_mse)
    vs = torch.randn(
        3, exact.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    kept = GGNOperator(model, loss_fn, [(x, target)], product="eager")  # one graph, kept
    assert kept.cache_graph
    ref_v, ref_m = kept.matvec(vs[0]), kept.matmat(vs)
    # a budget the whole graph fits in: the same chunk, the same graph, the same bits
    whole = GGNOperator(model, loss_fn, [(x, target)], product="eager", memory_budget=10**12)
    assert torch.equal(whole.matvec(vs[0]), ref_v) and torch.equal(whole.matmat(vs), ref_m)
    assert whole.graphs_kept == 1 and len(whole.batches) == 1 and not whole.cache_graph
    total = whole.graph_bytes[0]
    assert total > 0
    for frac in (0.7, 0.45, 0.2):
        budget = int(frac * total)
        op = GGNOperator(model, loss_fn, [(x, target)], product="eager", memory_budget=budget)
        check_budget_bookkeeping(op, budget, vs, ref_v, ref_m, monkeypatch, atol=1e-13)
        torch.testing.assert_close(op.dense(), exact, rtol=1e-9, atol=1e-12)
        op.release()
        assert op.graphs_kept == 0
        torch.testing.assert_close(op.matvec(vs[0]), ref_v, rtol=1e-10, atol=1e-13)


def test_ggn_memory_budget_bit_for_bit_on_the_same_chunks(problem):
    # chunks small enough for the budget are not cut: every product then runs the kept
    # path's operations in its order, kept or rebuilt, so the results are the same bits
    model, x, y, *_ = problem
    split = list(zip(x.split(5), y.split(5)))
    ref = GGNOperator(model, F.cross_entropy, split, max_batch_size=5, cache_graph=True)
    whole = GGNOperator(model, F.cross_entropy, [(x, y)], memory_budget=10**12)
    whole.matvec(torch.zeros(whole.dim, dtype=torch.float64))
    budget = int(0.5 * whole.graph_bytes[0])  # half of it holds a 5-sample chunk
    op = GGNOperator(model, F.cross_entropy, split, max_batch_size=5, memory_budget=budget)
    vs = torch.randn(3, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(op.matvec(vs[0]), ref.matvec(vs[0]))
    assert torch.equal(op.matmat(vs), ref.matmat(vs))
    assert len(op.batches) == 6 and 1 <= op.graphs_kept < 6
    assert sum(b for b, g in zip(op.graph_bytes, op._kept) if g is not None) <= budget
    # (max_rows: the Lanczos basis allowed beside the graphs; a budget this small would
    # otherwise also choose the instruments' lean path, equal only to the tolerance)
    a = top_eigenvalues(op, 2, tol=1e-8, seed=0, max_rows=10**4)
    b = top_eigenvalues(ref, 2, tol=1e-8, seed=0)
    assert a.path == "full" and a.eigenvalues == b.eigenvalues
    lean = top_eigenvalues(op, 2, tol=1e-8, seed=0)
    assert lean.path == "lean" and lean.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-7)


def test_ggn_trace_equals_hessian_trace_for_piecewise_linear_nets():
    # a ReLU net is linear in each parameter tensor, so d^2 z / dw_j^2 = 0 and tr H = tr G
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model = model.double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    h = HessianOperator(model, F.cross_entropy, [(x, y)]).dense()
    g = ggn_trace(model, F.cross_entropy, [(x, y)], exact=True)
    assert g.trace == pytest.approx(float(h.trace()), rel=1e-9)
    assert not torch.allclose(h, GGNOperator(model, F.cross_entropy, [(x, y)]).dense())
    # not so with a smooth activation
    model[1] = nn.Tanh()
    h = HessianOperator(model, F.cross_entropy, [(x, y)]).dense()
    g = ggn_trace(model, F.cross_entropy, [(x, y)], exact=True)
    assert abs(g.trace - float(h.trace())) > 1e-4 * abs(g.trace)


def test_ggn_trace_refuses_a_diverged_model(problem):
    model, x, y, *_ = problem
    bad = _mlp()
    with torch.no_grad():
        bad[2].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="loss on the batches is nan"):
        ggn_trace(bad, F.cross_entropy, [(x, y)])
