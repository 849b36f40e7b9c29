import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from samkit.experiments.datasets import add_label_noise, load_dataset


@pytest.mark.parametrize(
    "name,n_train,n_test,length", [("synthetic", 2000, 500, 40), ("digits", 1438, 359, 64)]
)
def test_sizes_and_split(name, n_train, n_test, length):
    d = load_dataset(name, seed=0, val_fraction=0.1)
    assert len(d.train) + len(d.val) == n_train
    assert len(d.test) == n_test
    assert d.in_len == length and d.train.x.shape[1] == length
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    # stratified: every class has round(10 %) of its samples in validation
    counts = torch.bincount(torch.cat([d.train.y, d.val.y]), minlength=10)
    val_counts = torch.bincount(d.val.y, minlength=10)
    assert torch.equal(val_counts, torch.round(counts.double() * 0.1).long())


def test_mnist1d_generated_once_cached_atomically_and_rng_kept(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    # generation reseeds numpy's global generator; the caller's state must survive
    d = load_dataset("mnist1d", seed=0, val_fraction=0.0, cache_dir=cache)
    assert np.random.rand() == expected
    assert (len(d.train), len(d.val), len(d.test), d.in_len, d.num_classes) == (
        4000,
        0,
        1000,
        40,
        10,
    )
    assert os.listdir(cache) == ["mnist1d-default-seed42.npz"]  # no temporary file left behind
    # the generator standardises the data (mean 0, std 1 over train + test)
    allx = torch.cat([d.train.x, d.test.x])
    assert abs(allx.mean().item()) < 1e-3 and abs(allx.std().item() - 1) < 1e-3
    import mnist1d.data

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)
    again = load_dataset("mnist1d", seed=0, val_fraction=0.0, cache_dir=cache)
    assert torch.equal(again.test.x, d.test.x) and torch.equal(again.test.y, d.test.y)
    assert torch.equal(torch.sort(again.train.y).values, torch.sort(d.train.y).values)


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.4, 0.8])
def test_noise_touches_train_labels_only_at_the_rate(noise):
    clean = load_dataset("synthetic", seed=1)
    noisy = load_dataset("synthetic", seed=1, noise=noise)
    n = len(noisy.train)
    assert torch.equal(noisy.train.x, clean.train.x)
    assert torch.equal(noisy.clean_train_y, clean.train.y)
    assert int(noisy.noisy_mask.sum()) == round(noise * n)
    assert torch.equal(noisy.val.y, clean.val.y) and torch.equal(noisy.test.y, clean.test.y)
    assert torch.equal(noisy.val.x, clean.val.x)


def test_seed_changes_split_and_noise_spec_round_trip():
    a = load_dataset("synthetic", seed=0, noise=0.3, train_size=500)
    b = load_dataset(**a.spec)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert len(a.train) == 500
    c = load_dataset("synthetic", seed=1, noise=0.3, train_size=500)
    assert not torch.equal(a.train.y, c.train.y)


@given(
    n=st.integers(1, 300),
    rate=st.floats(0, 1),
    classes=st.integers(2, 12),
    seed=st.integers(0, 1000),
)
def test_label_noise_law(n, rate, classes, seed):
    y = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
    out = add_label_noise(y, rate, classes, seed=seed)
    changed = out != y
    assert int(changed.sum()) == round(rate * n)  # every chosen label really changes
    assert out.min() >= 0 and out.max() < classes
    assert torch.equal(y, y.clone())  # input untouched


def test_noise_is_uniform_over_other_classes():
    y = torch.zeros(20000, dtype=torch.long)
    out = add_label_noise(y, 1.0, 5, seed=0)
    freq = torch.bincount(out, minlength=5).double() / len(y)
    assert freq[0] == 0
    assert torch.allclose(freq[1:], torch.full((4,), 0.25, dtype=torch.float64), atol=0.015)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "cifar"}, "dataset"),
        ({"name": "synthetic", "noise": 1.5}, "noise"),
        ({"name": "synthetic", "noise": -0.1}, "noise"),
        ({"name": "synthetic", "val_fraction": 1.0}, "val_fraction"),
        ({"name": "synthetic", "seed": -1}, "seed"),
        ({"name": "synthetic", "train_size": 0}, "train_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)
