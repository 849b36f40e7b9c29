"""samkit.functional: the foreach path equals the per-tensor reference, and the maths is right."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samkit
from samkit import functional

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

shape = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def tensor_lists(draw, n_lists=1, dtype=None):
    """``n_lists`` parallel lists of random tensors (same shapes across lists)."""
    shapes = draw(st.lists(shape, min_size=1, max_size=5))
    dt = dtype or draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dt) for s in shapes] for _ in range(n_lists)]


def _clone(ts):
    return [t.clone() for t in ts]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------- foreach == reference


@given(tensor_lists(2), st.floats(-3, 3))
def test_add_and_add_scaled_foreach_equal_reference(lists, alpha):
    a, b = lists
    out = []
    for fe in (True, False):
        t = _clone(a)
        functional.add_(t, b, alpha=alpha, foreach=fe)
        u = _clone(a)
        functional.add_scaled_(u, _clone(b), alpha, foreach=fe)
        out.append((t, u))
    assert _equal(out[0][0], out[1][0]) and _equal(out[0][1], out[1][1])
    assert _equal(out[0][0], out[0][1])  # float scale: one fused add


@given(tensor_lists(2))
def test_mul_foreach_equals_reference_for_scalar_tensor_and_list_factors(lists):
    a, b = lists
    for factor in (0.37, torch.tensor(1.7, dtype=a[0].dtype), torch.tensor(1.7), b):
        out = []
        for fe in (True, False):
            t = _clone(a)
            functional.mul_(t, factor, foreach=fe)
            out.append(t)
        if isinstance(factor, float) and a[0].dtype in (torch.float16, torch.bfloat16):
            # torch's CPU foreach kernel rounds a Python scalar to the tensor's
            # dtype before multiplying; Tensor.mul_ keeps it in float32. Both
            # are within one rounding of the exact product (samkit's own paths
            # only multiply low-precision lists by tensors or by NaN).
            exact = [t.double() * factor for t in a]
            for o in out:
                torch.testing.assert_close([x.double() for x in o], exact, rtol=2e-2, atol=1e-3)
            continue
        assert _equal(*out)
    t = _clone(a)
    functional.mul_(t, b, foreach=False)
    assert _equal(t, [x * y for x, y in zip(a, b)])


@given(tensor_lists(1), st.floats(0, 1))
def test_abs_plus_and_copy_foreach_equal_reference(lists, eta):
    (a,) = lists
    outs = []
    for fe in (True, False):
        out = [torch.empty_like(t) for t in a]
        functional.abs_plus_(out, a, eta, foreach=fe)
        outs.append(out)
        dst = [torch.empty_like(t) for t in a]
        functional.copy_(dst, a, foreach=fe)
        assert _equal(dst, a)  # exact
    assert _equal(*outs)
    assert _equal(outs[1], [t.abs() + eta for t in a])


@given(tensor_lists(1))
def test_sq_norm_foreach_equals_reference_and_is_float32(lists):
    (a,) = lists
    s_fe, s_ref = functional.sq_norm(a, foreach=True), functional.sq_norm(a, foreach=False)
    assert torch.equal(s_fe, s_ref)
    assert s_fe.dtype == (torch.float64 if a[0].dtype == torch.float64 else torch.float32)
    assert s_fe.shape == ()
    expected = sum(float((t.double() ** 2).sum()) for t in a)
    assert float(s_fe) == pytest.approx(expected, rel=1e-5, abs=1e-30)


def test_sq_norm_of_half_does_not_overflow():
    # 300^2 * 1000 = 9e7 is far beyond float16's max (65504): accumulated in float32
    a = [torch.full((1000,), 300.0, dtype=torch.float16)]
    assert float(functional.sq_norm(a, foreach=True)) == pytest.approx(9e7, rel=1e-6)
    assert math.isfinite(float(functional.sq_norm(a, foreach=False)))


def test_sq_norm_of_mixed_list_accumulates_in_float64():
    a = [torch.full((2,), 3.0), torch.full((2,), 4.0, dtype=torch.float64)]
    for fe in (True, False):
        s = functional.sq_norm(a, foreach=fe)
        assert s.dtype == torch.float64 and float(s) == 50.0


def test_global_norm_sums_pieces():
    parts = [torch.tensor(9.0), torch.tensor(16.0), torch.tensor(0.0)]
    assert float(functional.global_norm(parts)) == 5.0
    with pytest.raises(ValueError, match="at least one"):
        functional.global_norm([])


# ------------------------------------------------------------- grouping


def test_group_by_device_splits_by_dtype_and_keeps_order():
    a = [
        torch.zeros(1),
        torch.zeros(2, dtype=torch.float64),
        torch.zeros(3),
        torch.zeros(4, dtype=torch.float64),
    ]
    b = [torch.ones(1), torch.ones(2), torch.ones(3), torch.ones(4)]
    groups = functional.group_by_device(a, b)
    cpu = torch.device("cpu")
    assert list(groups) == [(cpu, torch.float32), (cpu, torch.float64)]
    (a32, b32), (a64, b64) = groups[(cpu, torch.float32)], groups[(cpu, torch.float64)]
    assert [t.numel() for t in a32] == [1, 3] and [t.numel() for t in b32] == [1, 3]
    assert [t.numel() for t in a64] == [2, 4] and [t.numel() for t in b64] == [2, 4]
    assert a32[0] is a[0] and b64[1] is b[3]  # the same tensors, not copies


def test_group_by_device_fast_path_and_empty():
    a = [torch.zeros(2), torch.zeros(3)]
    ((ga,),) = functional.group_by_device(a).values()
    assert ga == a and ga is not a
    assert functional.group_by_device([]) == {}


def test_group_by_device_separates_devices():
    a = [torch.zeros(1), torch.zeros(1, device="meta"), torch.zeros(2)]
    groups = functional.group_by_device(a)
    assert {d.type for d, _ in groups} == {"cpu", "meta"}
    assert [t.numel() for t in groups[(torch.device("cpu"), torch.float32)][0]] == [1, 2]


# -------------------------------------------------------------- scaling


def test_scale_for_is_a_float_on_cpu_and_a_tensor_elsewhere():
    s = functional.scale_for(0.05, torch.tensor(2.0), 1e-12)
    assert isinstance(s, float) and s == pytest.approx(0.025)
    assert functional.scale_for(0.05, torch.tensor(0.0), 1e-12) == pytest.approx(
        0.05 / 1e-12
    )  # finite
    meta = functional.scale_for(
        0.05, torch.tensor(2.0, device="meta"), 1e-12
    )  # stands in for an accelerator
    assert isinstance(meta, torch.Tensor) and meta.device.type == "meta"


@given(tensor_lists(2, dtype=torch.float32), st.floats(-2, 2))
def test_add_scaled_tensor_scale_matches_float_scale(lists, scale):
    p, d = lists
    out_f, out_t = _clone(p), _clone(p)
    functional.add_scaled_(out_f, _clone(d), scale, foreach=True)
    for fe in (True, False):
        out_t = _clone(p)
        functional.add_scaled_(out_t, _clone(d), torch.tensor(scale), foreach=fe)
        # scale then add vs one fused add: equal up to one rounding
        torch.testing.assert_close(out_t, out_f, rtol=1e-6, atol=1e-6)


def test_add_scaled_with_tensor_scale_reads_nothing_to_the_host(monkeypatch):
    """The accelerator path: a tensor scale must never be read back (.item(), bool(), float()).

    On CPU, ``scale_for`` deliberately returns a float instead (reading a CPU
    0-d tensor is a memory load, not a device sync); the tensor path is the
    one used on GPUs, and is checked here.
    """
    p = [torch.randn(3), torch.randn(2, 2)]
    d = [torch.randn(3), torch.randn(2, 2)]
    expected = [pi + 0.5 * di for pi, di in zip(p, d)]
    scale = functional.scale_for(0.5, torch.tensor(1.0, device="meta"), 0.0)
    assert isinstance(scale, torch.Tensor)

    def boom(*a, **k):
        raise AssertionError("host read")

    for fe in (True, False):
        out, dirs = _clone(p), _clone(d)
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
                m.setattr(torch.Tensor, name, boom)
            functional.add_scaled_(out, dirs, torch.tensor(0.5), foreach=fe)
        torch.testing.assert_close(out, expected)


def test_complex_sq_norm_foreach_equals_reference():
    xs = [torch.randn(4, dtype=torch.complex64), torch.randn(3, 2, dtype=torch.complex128)]
    a = samkit.functional.sq_norm(xs, foreach=True)
    b = samkit.functional.sq_norm(xs, foreach=False)
    assert torch.equal(a, b)
    expected = sum(float(x.abs().square().sum()) for x in xs)
    assert float(a) == pytest.approx(expected, rel=1e-6)


@settings(max_examples=500, deadline=None)
@given(
    norm=st.one_of(
        st.floats(min_value=0.0, allow_infinity=True),
        st.sampled_from([0.0, 1e-45, 1e-38, 3.4e38, float("inf"), float("nan")]),
    ),
    rho=st.one_of(st.floats(min_value=1e-8, max_value=1e4), st.sampled_from([0.05, 0.1, 2.0])),
    eps=st.one_of(st.floats(min_value=1e-50, max_value=1.0), st.sampled_from([1e-12, 1e-46])),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_scale_for_is_the_tensor_arithmetic_bit_for_bit(norm, rho, eps, dtype):
    """scale_for computes rho / (norm + eps) on the host; it must be the float the 0-d
    tensor arithmetic gives (what samkit 0.1 used), including inf, nan and eps below
    float32's range."""
    t = torch.tensor(norm, dtype=dtype)
    want = float(rho / (t + eps))
    got = functional.scale_for(rho, t, eps)
    assert isinstance(got, float)
    assert got == want or (math.isnan(got) and math.isnan(want))


# ------------------------------------------- the paper's ascent == SAM's kernels

_SHAPES = [(7, 3), (5,), (2, 3, 4), (1,)]


def _sam_first_step(weights, grads, **kw):
    """SAM's weights at ``w + e`` (its own path: prepare_ascent, measure_, perturb_)."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = samkit.SAM(torch.optim.SGD(params, lr=0.1), **kw)
    assert opt.first_step(zero_grad=False)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sam_ascent_reference_equals_sams_path(threads, foreach, adaptive, weight_decay, dtype):
    """To one rounding of ``w + e``: on CPU the kernels fuse ``w + s d`` and ``g + wd w``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads + 2 * adaptive + 4 * foreach)
        for trial in range(10):
            scale = 10.0 ** (trial % 5 - 2)
            weights = [torch.randn(s, generator=gen, dtype=dtype) for s in _SHAPES]
            grads = [scale * torch.randn(s, generator=gen, dtype=dtype) for s in _SHAPES]
            kw = dict(rho=0.5, adaptive=adaptive, ascent_weight_decay=weight_decay)
            ref = functional.sam_ascent(weights, grads, rho=0.5, adaptive=adaptive, eta=0.01,
                                        weight_decay=weight_decay)  # fmt: skip
            got = _sam_first_step(weights, grads, foreach=foreach, **kw)
            # |e| at most rho T^2 (|g| + wd |w|) / ||u||, each term from float64
            w64 = [w.double() for w in weights]
            t = [w.abs() + 0.01 if adaptive else torch.ones_like(w) for w in w64]
            u = [ti * (g.double() + weight_decay * w) for ti, g, w in zip(t, grads, w64)]
            norm = torch.stack([x.norm() for x in u]).norm()
            eps = torch.finfo(dtype).eps
            for w, ti, g, r, x in zip(w64, t, grads, ref, got):
                size = w.abs() + 0.5 * ti * ti * (g.double().abs() + weight_decay * w.abs()) / norm
                assert ((x.double() - r.double()).abs() <= 4 * eps * size).all()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sam_ascent_reference_is_sams_path_bit_for_bit_where_they_round_alike(adaptive, dtype):
    """With ``||u||`` a power of two the scale ``rho / ||u||`` is exact, fused or not: equal bits.

    SAM: 64 gradient entries of +-1 give ``||g|| = 8``. ASAM: ``w = 0`` gives ``T_w = eta``
    (0.5), ``u = g / 2`` and ``||u|| = 4``."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 8), (16,), (2, 2, 4)]  # 64 entries
    signs = [torch.randint(0, 2, s, generator=gen).to(dtype) * 2 - 1 for s in shapes]
    weights = [
        torch.zeros(s, dtype=dtype) if adaptive else torch.randn(s, generator=gen, dtype=dtype)
        for s in shapes
    ]
    kw = dict(rho=0.5, adaptive=adaptive, eta=0.5, ascent_eps=1e-30)
    ref = functional.sam_ascent(weights, signs, rho=0.5, adaptive=adaptive, eta=0.5, eps=1e-30)
    for foreach in (True, False):
        got = _sam_first_step(weights, signs, foreach=foreach, **kw)
        assert _equal(ref, got)
    # and the reference is not trivially the input
    assert not _equal(ref, weights)


def test_sam_ascent_reference_reads_like_the_paper():
    """e = rho g / ||g|| on a hand-sized example (SAM), and ASAM's T_w^2 g / ||T_w g||."""
    w, g = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])  # ||g|| = 5
    (out,) = functional.sam_ascent([w], [g], rho=0.5, eps=0.0)
    assert torch.equal(out, w + 0.5 * g / 5)
    (out,) = functional.sam_ascent([w], [g], rho=0.5, eps=0.0, adaptive=True, eta=0.0)
    t = w.abs()
    assert torch.allclose(out, w + 0.5 * t * t * g / (t * g).norm())
    assert torch.equal(w, torch.tensor([1.0, 2.0])) and torch.equal(g, torch.tensor([3.0, 4.0]))
