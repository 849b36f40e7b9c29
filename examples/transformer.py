"""SAM on a small transformer: handwritten digits read row by row.

    python examples/transformer.py --seeds 3 --epochs 20

scikit-learn's 8x8 digits (1797 images, bundled) are read as sequences of 8
tokens, one per image row of 8 pixels. The model embeds each row, adds a
learned position embedding, runs a small pre-norm ``nn.TransformerEncoder``
(d_model 32, 4 heads, 2 layers, dropout 0.1) and classifies the mean token.
Transformers are usually trained with Adam(W); SAM wraps the same AdamW.
Dropout draws from torch's RNG, which the study seeds per run and saves in
its training state, so an interrupted run resumes with the same numbers.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import samkit


class DigitTransformer(nn.Module):
    def __init__(self, d_model: int = 32, heads: int = 4, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.zeros(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=2 * d_model,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.position
        return self.head(self.norm(self.encoder(h).mean(1)))


def load_data() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[: len(y) // 5], order[len(y) // 5 :]
    as_set = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return as_set(train), as_set(test)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--train-size", type=int, help="use only this many training images")
    ap.add_argument("--out", default="samkit-runs/digits-transformer")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    train, test = load_data()
    result = samkit.compare(
        model=DigitTransformer,
        train=train,
        test=test,
        methods=["adam:base=adamw", "sam:base=adamw,lr=0.01", "sam_on:base=adamw,lr=0.01"],
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=64,
        sharpness=False,
        train_size=args.train_size,
        out=args.out,
        quiet=args.quiet,
    )
    print(result)
    return {"rows": result.rows, "verdicts": result.verdicts, "out": str(result.out)}


if __name__ == "__main__":
    main()
