"""Filter-normalised directions, 1-D / 2-D grids, interpolation, plots."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_hessian import quad_problem
from torch import nn

from samkit.sharpness import filter_normalized_direction, interpolate, loss_curve, loss_surface
from samkit.sharpness.plots import plot_curves, plot_density, plot_surface, save_grid


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10, 3)
    )


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 1, 12, generator=g), torch.randint(0, 3, (48,), generator=g)


def test_filter_normalisation():
    model = _cnn(0)
    d = filter_normalized_direction(model, seed=3)
    offset = 0
    for name, p in model.named_parameters():
        part = d[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if p.dim() <= 1:  # biases and BatchNorm affine parameters are left out
            assert torch.count_nonzero(part) == 0, name
        else:
            torch.testing.assert_close(
                part.reshape(p.shape[0], -1).norm(dim=1),
                p.detach().reshape(p.shape[0], -1).norm(dim=1),
            )
    assert offset == d.numel()
    assert torch.equal(d, filter_normalized_direction(model, seed=3))
    assert not torch.equal(d, filter_normalized_direction(model, seed=4))
    keep = filter_normalized_direction(model, seed=3, ignore_1d=False)
    bias = keep[offset - 3 :]  # the last Linear's bias, normalised as one filter
    torch.testing.assert_close(bias.norm(), model[4].bias.detach().norm())


def test_curve_and_surface_on_quadratic_are_exact():
    model, loss_fn, batches, a = quad_problem([3.0, 1.0, 0.5], seed=1)
    w = model.w.detach().clone()
    d1 = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    d2 = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)

    def exact(p):
        e = p - loss_fn.center
        return float(0.5 * e @ a @ e)

    al, ls = loss_curve(model, loss_fn, batches, direction=d1, alphas=[-1, 0, 0.5, 2])
    assert ls == pytest.approx([exact(w + float(t) * d1) for t in al], rel=1e-12)
    xs, ys, grid = loss_surface(
        model, loss_fn, batches, directions=(d1, d2), xs=[-1, 0, 1], ys=[0, 2]
    )
    assert grid.shape == (2, 3)
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            assert grid[j, i] == pytest.approx(exact(w + xv * d1 + yv * d2), rel=1e-12)
    assert torch.equal(model.w.detach(), w)


def test_random_curve_centre_is_the_loss():
    model = _cnn(0)
    x, y = _data()
    model.eval()
    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
    al, ls = loss_curve(model, F.cross_entropy, [(x, y)], alphas=np.linspace(-1, 1, 5))
    assert ls[2] == pytest.approx(base, rel=1e-6)
    assert ls.shape == (5,) and np.all(np.isfinite(ls))
    xs, ys, grid = loss_surface(
        model, F.cross_entropy, [(x, y)], xs=[-0.5, 0, 0.5], ys=[-0.5, 0, 0.5]
    )
    assert grid[1, 1] == pytest.approx(base, rel=1e-6)


def test_interpolate_endpoints_and_models_untouched():
    a, b = _cnn(0), _cnn(1)
    x, y = _data()
    for m in (a, b):  # different BatchNorm statistics in each
        m.train()
        m(x * (2.0 if m is b else 1.0))
    a.eval()
    b.train()
    snap = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    al, ls = interpolate(a, b, F.cross_entropy, list(zip(x.split(20), y.split(20))))
    assert al.shape == (25,) and al[0] == -0.25 and al[-1] == 1.25
    i0, i1 = int(np.argmin(abs(al))), int(np.argmin(abs(al - 1)))
    assert al[i0] == 0.0 and al[i1] == 1.0
    with torch.no_grad():
        a.eval()
        b.eval()
        la = float(F.cross_entropy(a(x), y))
        lb = float(F.cross_entropy(b(x), y))
        b.train()
    assert ls[i0] == pytest.approx(la, rel=1e-6)
    assert ls[i1] == pytest.approx(lb, rel=1e-6)
    assert not a.training and b.training
    for m, s in zip((a, b), snap):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())
    al2, ls2 = interpolate(a, b, F.cross_entropy, [(x, y)], alphas=[0.0, 1.0])
    assert ls2 == pytest.approx([la, lb], rel=1e-6)


def test_interpolate_rejects_other_architectures():
    x, y = _data()
    other = nn.Sequential(nn.Conv1d(1, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(50, 3))
    with pytest.raises(ValueError, match="model_b"):
        interpolate(_cnn(0), other, F.cross_entropy, [(x, y)])
    with pytest.raises(ValueError, match="n_points"):
        interpolate(_cnn(0), _cnn(1), F.cross_entropy, [(x, y)], n_points=1)
    with pytest.raises(ValueError, match="alphas"):
        loss_curve(_cnn(0), F.cross_entropy, [(x, y)], alphas=[float("nan")])


def test_save_grid_round_trip(tmp_path):
    xs, z = np.linspace(-1, 1, 4), np.arange(12.0).reshape(3, 4)
    p = save_grid(tmp_path / "g.npz", meta={"model": "cnn"}, xs=xs, losses=z)
    with np.load(p) as f:
        np.testing.assert_array_equal(f["losses"], z)
        assert json.loads(str(f["meta"])) == {"model": "cnn"}
    q = save_grid(tmp_path / "g.json", xs=xs, losses=z)
    assert json.loads(q.read_text())["losses"] == z.tolist()
    assert sorted(x.name for x in tmp_path.iterdir()) == [
        "g.json",
        "g.npz",
    ]  # no temporary files left
    with pytest.raises(ValueError, match="path"):
        save_grid(tmp_path / "g.txt", xs=xs)
    # far from the minimum the loss can overflow: null, never a bare Infinity / NaN
    z[0, 0], z[1, 1] = np.inf, np.nan
    r = save_grid(tmp_path / "h.json", meta={"range": float("inf")}, losses=z)
    text = r.read_text()
    assert "Infinity" not in text and "NaN" not in text
    back = json.loads(text)
    assert back["losses"][0][0] is None and back["losses"][1][1] is None
    assert back["meta"] == {"range": None}


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    xs = np.linspace(-1, 1, 9)
    grid = 1 + xs[None, :] ** 2 + 2 * xs[:, None] ** 2
    paths = [
        plot_curves(
            tmp_path / "c.png", xs, {"a": xs**2, "b": xs**2 + 1}, marks={"SGD": 0, "SAM": 1}
        ),
        plot_surface(tmp_path / "s.png", xs, xs, grid, title="t"),
        plot_density(tmp_path / "d.png", xs, np.exp(-(xs**2))),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_core_does_not_import_matplotlib():
    code = "import sys, samkit.sharpness; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_interpolate_is_exact_at_both_ends_with_frozen_parameters():
    """Frozen parameters were A's at every alpha, so alpha = 1 was not model B."""

    def make(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        m[0].weight.requires_grad_(False)
        return m

    a, b = make(0), make(1)
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    _, losses = interpolate(a, b, F.cross_entropy, [(x, y)], alphas=[0.0, 1.0])
    with torch.no_grad():
        assert losses[0] == pytest.approx(float(F.cross_entropy(a(x), y)), rel=1e-6)
        assert losses[1] == pytest.approx(float(F.cross_entropy(b(x), y)), rel=1e-6)
