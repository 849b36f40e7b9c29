"""Does SAM help on *my* problem? Your model and data, in your own module.

This file is what a user writes: a function that builds a fresh model and a
function that returns the data. Run the study from the folder that holds it,
through the command line::

    samkit compare --model own_model_and_data:make_model \\
                   --data own_model_and_data:load_data --seeds 3 --epochs 30

or from Python (this file's ``main``)::

    python own_model_and_data.py --seeds 3 --epochs 30

The data is scikit-learn's breast-cancer set (569 tumours, 30 measurements,
benign or malignant; bundled with scikit-learn, nothing is downloaded),
standardised with the training statistics; a fixed 20 % is held out for
testing, and the study draws a validation split from the rest per seed.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import samkit


def make_model(hidden: int = 32) -> nn.Module:
    """A fresh model; the study calls it once per run, after seeding."""
    return nn.Sequential(nn.Linear(30, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def load_data() -> tuple[TensorDataset, TensorDataset]:
    """(train, test) as torch Datasets of (features, class)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # a fixed test split
    test, train = order[: len(y) // 5], order[len(y) // 5 :]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    x = (x - mean) / std
    as_set = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return as_set(train), as_set(test)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default="samkit-runs/own-model")
    args = ap.parse_args(argv)
    train, test = load_data()
    result = samkit.compare(
        model=make_model,
        train=train,
        test=test,
        methods=["sgd", "sam", "asam"],
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=32,
        lr=0.05,
        sharpness=False,
        out=args.out,
    )
    print(result)
    return {"rows": result.rows, "verdicts": result.verdicts, "out": str(result.out)}


if __name__ == "__main__":
    main()
