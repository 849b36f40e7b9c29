"""Datasets for the comparative study: MNIST-1D, scikit-learn digits, synthetic.

All datasets are small 1-D classification problems held in memory as float32
tensors ``x`` of shape ``(n, length)`` and int64 labels ``y``:

* ``"mnist1d"``: MNIST-1D (Greydanus, arXiv 2011.14439), generated offline by
  the ``mnist1d`` package with its default arguments (seed 42): 4000 train and
  1000 test sequences of 40 points, 10 classes. The generated arrays are cached
  on disk (``$SAMKIT_CACHE`` or ``~/.cache/samkit``), written atomically.
* ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, bundled
  with scikit-learn, no download), flattened to sequences of 64 values and
  standardised with training statistics; a fixed 20 % test split.
* ``"synthetic"``: noisy, randomly shifted class templates (2000 + 500
  sequences of 40 points, 10 classes); needs nothing but numpy, for tests.

A validation split is carved out of the training set (``val_fraction``,
stratified, chosen by ``seed``). Label noise is *symmetric*: exactly
``round(noise * n_train)`` training samples, chosen by ``seed``, get a label
drawn uniformly from the *other* classes, so the fraction of wrong training
labels is ``noise`` (up to rounding). Validation and test labels stay clean,
so model selection and evaluation measure the true task.

``load_dataset(**dataset.spec)`` rebuilds the same dataset, which is how
checkpoints record their data.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from .._atomic import atomic_open

__all__ = ["Split", "Dataset", "load_dataset", "list_datasets", "cache_dir", "add_label_noise"]

_DATASETS = {
    "mnist1d": "MNIST-1D (Greydanus 2020): 4000/1000 sequences of 40 points, 10 classes",
    "digits": "scikit-learn 8x8 digits as sequences of 64 values, 10 classes",
    "synthetic": "noisy shifted templates, 2000/500 sequences of 40 points, 10 classes (no dependencies)",
}


@dataclass(frozen=True)
class Split(TorchDataset):
    """Inputs ``x`` (float32, ``(n, length)``) and labels ``y`` (int64, ``(n,)``).

    A map-style torch Dataset; ``split[index_tensor]`` gives a whole batch at
    once, which the trainer's DataLoader uses instead of collating samples.
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


@dataclass
class Dataset:
    """Train / validation / test splits plus what is needed to rebuild them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_len: int
    spec: dict[str, Any]
    clean_train_y: Tensor = field(repr=False)

    @property
    def noisy_mask(self) -> Tensor:
        """True where a training label was corrupted."""
        return self.train.y != self.clean_train_y


def list_datasets() -> dict[str, str]:
    """Dataset names and one-line descriptions."""
    return dict(_DATASETS)


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Where generated data is cached: ``path``, ``$SAMKIT_CACHE`` or ``~/.cache/samkit``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("SAMKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "samkit"


_resolve_cache = cache_dir  # load_dataset's argument shadows the function


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _mnist1d_arrays(cache: Path) -> dict[str, np.ndarray]:
    path = cache / "mnist1d-default-seed42.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):  # corrupt cache: regenerate below
            pass
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(
            "Invalid dataset value: 'mnist1d' needs the mnist1d package (pip install 'samkit[experiments]')"
        ) from exc
    # make_dataset reseeds the global numpy / random generators; keep the caller's.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {
        "x": np.asarray(d["x"], np.float32),
        "y": np.asarray(d["y"], np.int64),
        "x_test": np.asarray(d["x_test"], np.float32),
        "y_test": np.asarray(d["y_test"], np.int64),
    }
    try:
        _atomic_savez(path, **arrays)
    except OSError:  # read-only home: generation is cheap enough to redo
        pass
    return arrays


def _digits_arrays() -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise ValueError(
            "Invalid dataset value: 'digits' needs scikit-learn (pip install 'samkit[experiments]')"
        ) from exc
    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    perm = np.random.default_rng(1234).permutation(len(y))  # fixed test split, like MNIST-1D's
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


def _synthetic_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    length, classes = 40, 10
    t = np.linspace(0, 1, length, dtype=np.float32)
    templates = np.stack(
        [np.sin(2 * np.pi * (k % 5 + 1) * t + (k // 5) * np.pi / 2) for k in range(classes)]
    )

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        shift = rng.integers(-4, 5, n)
        x = np.stack([np.roll(templates[c], s) for c, s in zip(y, shift)])
        x = x + 0.6 * rng.standard_normal(x.shape)
        return x.astype(np.float32), y.astype(np.int64)

    x, y = draw(2000)
    xt, yt = draw(500)
    return {"x": x, "y": y, "x_test": xt, "y_test": yt}


def add_label_noise(y: Tensor, rate: float, num_classes: int, *, seed: int) -> Tensor:
    """Symmetric label noise: exactly ``round(rate * len(y))`` labels, chosen at
    random, are replaced by a label drawn uniformly from the other classes."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"Invalid noise value: {rate!r} (must be in [0, 1])")
    g = torch.Generator().manual_seed(10_007 * seed + 1)
    n = int(y.shape[0])
    k = int(round(rate * n))
    out = y.clone()
    if k == 0:
        return out
    which = torch.randperm(n, generator=g)[:k]
    # an offset in 1..C-1 guarantees a different class, uniform over the others
    offset = torch.randint(1, num_classes, (k,), generator=g)
    out[which] = (y[which] + offset) % num_classes
    return out


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val.append(idx[: int(round(fraction * len(idx)))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[val_idx] = False
    train_idx = np.flatnonzero(mask)
    return rng.permutation(train_idx), val_idx


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    noise: float = 0.0,
    val_fraction: float = 0.1,
    train_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load a dataset (see :func:`list_datasets`) with a validation split and label noise.

    Args:
        name: ``"mnist1d"``, ``"digits"`` or ``"synthetic"``.
        seed: chooses the validation split, the training subset and the noisy labels.
        noise: fraction of training labels replaced by a wrong class (0 to 1).
        val_fraction: fraction of the training set held out for validation
            (0 to < 1; stratified by class). With 0 the validation split is empty.
        train_size: keep only this many training samples (after the split), for
            quick runs; None keeps all. More than there are is refused.
        cache_dir: where generated data is cached (not part of ``spec``).
    """
    if name not in _DATASETS:
        raise ValueError(f"Invalid dataset value: {name!r} (choose from {', '.join(_DATASETS)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r} (must be an int >= 0)")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
        raise ValueError(f"Invalid noise value: {noise!r} (must be in [0, 1])")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0.0 <= val_fraction < 1.0
    ):
        raise ValueError(f"Invalid val_fraction value: {val_fraction!r} (must be in [0, 1))")
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise ValueError(f"Invalid train_size value: {train_size!r} (must be an int >= 1 or None)")

    if name == "mnist1d":
        arrays = _mnist1d_arrays(_resolve_cache(cache_dir))
    elif name == "digits":
        arrays = _digits_arrays()
    else:
        arrays = _synthetic_arrays()

    x, y = arrays["x"], arrays["y"]
    train_idx, val_idx = _stratified_split(y, float(val_fraction), seed)
    if val_fraction > 0 and len(val_idx) == 0:  # (0 asks for none; this asked for some)
        raise ValueError(
            f"Invalid val_fraction value: {val_fraction!r} leaves no validation sample of the "
            f"{name} data set ({len(y)} training samples); use 0 for no validation split"
        )
    if train_size is not None:
        if train_size > len(train_idx):  # it was recorded as asked, and all were used
            raise ValueError(
                f"Invalid train_size value: {train_size} (the {name} data set has "
                f"{len(train_idx)} training samples"
                + (" after the validation split" if len(val_idx) else "")
                + "; leave train_size out to use them all)"
            )
        train_idx = train_idx[:train_size]
    num_classes = int(max(y.max(), arrays["y_test"].max()) + 1)

    def split(xs: np.ndarray, ys: np.ndarray) -> Split:
        return Split(
            torch.from_numpy(np.ascontiguousarray(xs, np.float32)),
            torch.from_numpy(ys.astype(np.int64)),
        )

    train = split(x[train_idx], y[train_idx])
    clean = train.y
    noisy = add_label_noise(clean, float(noise), num_classes, seed=seed)
    spec = {
        "name": name,
        "seed": seed,
        "noise": float(noise),
        "val_fraction": float(val_fraction),
        "train_size": train_size,
    }
    return Dataset(
        name=name,
        train=Split(train.x, noisy),
        val=split(x[val_idx], y[val_idx]),
        test=split(arrays["x_test"], arrays["y_test"]),
        num_classes=num_classes,
        in_len=int(x.shape[1]),
        spec=spec,
        clean_train_y=clean,
    )
