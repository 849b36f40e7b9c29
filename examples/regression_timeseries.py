"""Regression on a real time series with a recurrent model: yearly sunspots.

    python examples/regression_timeseries.py --seeds 3 --epochs 60

statsmodels ships the yearly sunspot numbers 1700-2008 (309 values; nothing
is downloaded). Each sample is a window of ``--window`` years and its target
the next year's value, all scaled by the training series' mean and standard
deviation. The split is chronological: windows ending before 1950 train (the
study draws its validation split from them), the later ones test. The model
is a GRU over the window with a linear head; the task is regression, so the
study reports the test mean squared error (lower is better) and the MAE.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import samkit


class GRURegressor(nn.Module):
    """GRU over the window (one value per step), last hidden state -> next value."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.head(out[:, -1]).squeeze(-1)


def load_data(window: int = 12, split_year: int = 1950) -> tuple[TensorDataset, TensorDataset]:
    import statsmodels.api as sm

    df = sm.datasets.sunspots.load_pandas().data
    years = df["YEAR"].to_numpy().astype(int)
    series = df["SUNACTIVITY"].to_numpy().astype(np.float64)
    train_part = series[years < split_year]
    mean, std = train_part.mean(), train_part.std()
    z = ((series - mean) / std).astype(np.float32)
    x = np.stack([z[i : i + window] for i in range(len(z) - window)])
    y = z[window:]
    target_year = years[window:]
    tr, te = target_year < split_year, target_year >= split_year
    return (
        TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr])),
        TensorDataset(torch.from_numpy(x[te]), torch.from_numpy(y[te])),
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--window", type=int, default=12)
    ap.add_argument("--out", default="samkit-runs/sunspots-gru")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    train, test = load_data(args.window)
    result = samkit.compare(
        model=GRURegressor,
        train=train,
        test=test,
        task="regression",
        methods=["adam", "sam:base=adam,lr=0.01", "looksam:base=adam,lr=0.01"],
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=16,
        sharpness=False,
        out=args.out,
        quiet=args.quiet,
    )
    print(result)
    return {
        "rows": result.rows,
        "verdicts": result.verdicts,
        "test_variance": float(test.tensors[1].var()),
        "out": str(result.out),
    }


if __name__ == "__main__":
    main()
