"""The settings of ``samkit gan``: its methods, defaults, the ``--quick`` preset, and
:func:`build_config`, which checks them all before anything is trained."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import grid
from .. import settings as st
from ..grid import MethodDef, Variant
from .data import MIXTURES

__all__ = ["PROTOCOL", "GAN_METHODS", "DEFAULTS", "QUICK", "KEYS", "GANConfig", "build_config"]

PROTOCOL = 1

GAN_METHODS: dict[str, MethodDef] = {
    "adam": MethodDef("Adam on both players"),
    "sam_g": MethodDef(
        "SAM (base Adam) on the generator, Adam on the discriminator", {"rho": 0.05}
    ),
    "sam_d": MethodDef(
        "SAM (base Adam) on the discriminator, Adam on the generator", {"rho": 0.05}
    ),
    "sam_both": MethodDef("SAM (base Adam) on both players, the same rho", {"rho": 0.05}),
}


DEFAULTS: dict[str, Any] = {
    "datasets": ["ring8", "grid25"],
    "methods": ["adam", "sam_g", "sam_d", "sam_both"],
    "rho": None,  # a list: each SAM method once per value
    "seeds": 5,
    "iterations": None,  # None: the data set's own (Ring-8 5000, Grid-25 8000)
    "batch_size": None,  # None: the data set's own (Ring-8 128, Grid-25 256)
    "lr": 1e-3,
    "beta1": 0.5,
    "z_dim": 16,
    "hidden": None,  # None: the data set's own (Ring-8 64, Grid-25 128)
    "depth": 3,
    "eval_every": 500,
    "eval_samples": 2500,
    "snapshots": 4,  # scatter plots: generated points at this many evenly spaced iterations
    "checkpoint_every": 1000,
    "baseline": None,  # default: adam, else the first method
    "device": "cpu",
    "out": None,
}

#: ``--quick``: Ring-8 only, two seeds, a short run.
QUICK: dict[str, Any] = {
    "datasets": ["ring8"],
    "seeds": 2,
    "iterations": 2000,
    # (no batch_size or hidden: each data set's own, Ring-8's being 128 and 64; set here,
    # --quick --datasets grid25 ran Grid-25 at Ring-8's size, which the docs say measures
    # nothing)
    "eval_every": 250,
    "eval_samples": 1000,
}

KEYS = frozenset(DEFAULTS)


@dataclass
class GANConfig:
    """A validated GAN study (see :func:`build_config`)."""

    datasets: list[str]
    variants: list[Variant]
    seeds: list[int]
    iterations: int | None  # None: each data set's own (see :meth:`resolved`)
    batch_size: int | None
    lr: float
    beta1: float
    z_dim: int
    hidden: int | None
    depth: int
    eval_every: int
    eval_samples: int
    snapshots: int
    checkpoint_every: int
    baseline: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": list(self.datasets),
            "methods": [v.to_dict() for v in self.variants],
            "seeds": list(self.seeds),
            "iterations": self.iterations,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "beta1": self.beta1,
            "z_dim": self.z_dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "eval_every": self.eval_every,
            "eval_samples": self.eval_samples,
            "snapshots": self.snapshots,
            "checkpoint_every": self.checkpoint_every,
            "baseline": self.baseline,
            "device": self.device,
            "protocol": PROTOCOL,
        }

    @property
    def labels(self) -> list[str]:
        return [v.label for v in self.variants]

    def resolved(self, dataset: str) -> GANConfig:
        """This study's settings for one data set: its own sizes where the study sets none."""
        iterations, batch_size, hidden = MIXTURES[dataset].sizes
        return dataclasses.replace(
            self,
            datasets=[dataset],
            iterations=self.iterations or iterations,
            batch_size=self.batch_size or batch_size,
            hidden=self.hidden or hidden,
        )

    def snapshot_iterations(self) -> list[int]:
        """Evenly spaced, ending at the last iteration."""
        n = self.snapshots
        return sorted({max(1, round(self.iterations * (i + 1) / n)) for i in range(n)})

    def eval_iterations(self) -> list[int]:
        points = set(range(self.eval_every, self.iterations + 1, self.eval_every))
        return sorted(points | {self.iterations} | set(self.snapshot_iterations()))


def build_config(s: dict[str, Any]) -> GANConfig:
    """A :class:`GANConfig` from merged settings; ValueError naming the bad setting."""
    unknown = sorted(set(s) - KEYS)
    if unknown:
        raise ValueError(f"Invalid setting: {', '.join(unknown)}")
    s = st.plain({**DEFAULTS, **s})  # NumPy scalars are numbers too
    datasets = grid.check_names("datasets", s["datasets"], MIXTURES)
    variants = grid.variants(s["methods"], s["rho"], GAN_METHODS)
    seeds = grid.seed_list(s["seeds"])
    st.check_int("iterations", s["iterations"], 1, 10**8, none_ok=True)
    st.check_int("batch_size", s["batch_size"], 2, 1 << 20, none_ok=True)
    st.check_float("lr", s["lr"], 0.0, lo_open=True)
    st.check_float("beta1", s["beta1"], 0.0, 1.0, hi_open=True)
    st.check_int("z_dim", s["z_dim"], 1, 4096)
    st.check_int("hidden", s["hidden"], 1, 65_536, none_ok=True)
    st.check_int("depth", s["depth"], 1, 64)
    st.check_int("eval_every", s["eval_every"], 1, 10**8)
    st.check_int("eval_samples", s["eval_samples"], 2, 20_000)
    st.check_int("snapshots", s["snapshots"], 1, 100)
    st.check_int("checkpoint_every", s["checkpoint_every"], 1, 10**8)
    baseline, device = grid.baseline_and_device(s, [v.label for v in variants], "adam")
    return GANConfig(
        datasets,
        variants,
        seeds,
        s["iterations"],
        s["batch_size"],
        float(s["lr"]),
        float(s["beta1"]),
        s["z_dim"],
        s["hidden"],
        s["depth"],
        s["eval_every"],
        s["eval_samples"],
        s["snapshots"],
        s["checkpoint_every"],
        baseline,
        device,
    )


def default_out(config: GANConfig) -> Path:
    return grid.default_out("gan", config.to_dict(), *config.datasets)
