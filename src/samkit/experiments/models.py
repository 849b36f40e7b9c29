"""Small models for 1-D signals: the MNIST-1D paper's models and a small ResNet.

Every model takes a batch of sequences ``x`` of shape ``(batch, length)``
(scikit-learn's 8x8 digits are fed as sequences of 64 values) and returns
logits of shape ``(batch, num_classes)``.

The CNN, GRU and MLP follow Greydanus, "Scaling down deep learning with
MNIST-1D" (arXiv 2011.14439), at the sizes of the paper: with the default
``in_len=40, num_classes=10`` the CNN has 5,210 parameters, the GRU 5,134 and
the MLP 15,210. The ResNet is ours: a small residual 1-D CNN with BatchNorm,
there to exercise SAM with normalisation layers.

>>> build_model("cnn").__class__.__name__
'ConvNet1D'
>>> count_parameters(build_model("cnn"))
5210
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "build_model",
    "list_models",
    "count_parameters",
    "ConvNet1D",
    "GRU1D",
    "MLP",
    "ResNet1D",
]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class ConvNet1D(nn.Module):
    """The MNIST-1D paper's CNN: three strided Conv1d layers + a linear head.

    Conv(1->c, k5, s2, p1) -> ReLU -> Conv(c->c, k3, s2, p1) -> ReLU ->
    Conv(c->c, k3, s2, p1) -> ReLU -> flatten -> Linear(c * L', classes),
    with ``L' = 5`` for sequences of 40 points (so Linear(125, 10) at c=25).
    """

    def __init__(self, in_len: int = 40, num_classes: int = 10, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out_len = _conv_out(_conv_out(_conv_out(in_len, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        if out_len < 1:
            raise ValueError(
                f"Invalid in_len value: {in_len} (the CNN needs sequences of at least 3 points)"
            )
        self.linear = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(1)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(h.flatten(1))


class GRU1D(nn.Module):
    """The MNIST-1D paper's GRU: bidirectional, hidden size 6, one input feature
    per time step; the outputs at all time steps are flattened into a linear head."""

    def __init__(
        self, in_len: int = 40, num_classes: int = 10, hidden: int = 6, bidirectional: bool = True
    ) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=bidirectional)
        self.linear = nn.Linear(in_len * hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.linear(out.flatten(1))


class MLP(nn.Module):
    """The MNIST-1D paper's MLP: in_len -> 100 -> 100 -> classes, ReLU."""

    def __init__(self, in_len: int = 40, num_classes: int = 10, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_len, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ResNet1D(nn.Module):
    """A small residual 1-D CNN (He et al., arXiv 1512.03385, scaled down):
    a stem conv, three stages of basic blocks (widths w, 2w, 4w; the last two
    halve the length), global average pooling and a linear head."""

    def __init__(
        self, in_len: int = 40, num_classes: int = 10, width: int = 16, blocks: int = 1
    ) -> None:
        super().__init__()
        if width < 1 or blocks < 1:
            raise ValueError(f"Invalid width/blocks value: {width}/{blocks} (must be >= 1)")
        self.stem = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(_Block(c, c_out, 2 if (stage > 0 and b == 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(self.stem(x.unsqueeze(1)))
        return self.linear(h.mean(-1))


_MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "cnn": (ConvNet1D, "MNIST-1D paper CNN: 3 conv layers, 25 channels (~5.2k params)"),
    "gru": (GRU1D, "MNIST-1D paper bidirectional GRU, hidden 6 (~5.1k params)"),
    "mlp": (MLP, "MNIST-1D paper MLP 40-100-100-10 (~15k params)"),
    "resnet": (ResNet1D, "small residual 1-D CNN with BatchNorm (~29k params)"),
}


def list_models() -> dict[str, str]:
    """Model names and one-line descriptions."""
    return {name: desc for name, (_, desc) in _MODELS.items()}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name (see :func:`list_models`).

    ``kwargs`` go to the model's constructor; all models take ``in_len``
    (sequence length) and ``num_classes``. ValueError on an unknown name or
    argument.
    """
    if name not in _MODELS:
        raise ValueError(f"Invalid model value: {name!r} (choose from {', '.join(_MODELS)})")
    cls = _MODELS[name][0]
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"Invalid model arguments for {name!r}: {kwargs} ({exc})") from exc
