"""PNG plots of landscapes and spectra, and the raw grids saved beside them.

matplotlib is imported inside each plotting function (a bare ``Figure``, no pyplot state), so
importing :mod:`samkit.sharpness` never needs it. Every file is written
atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write_via, finite

__all__ = ["save_grid", "plot_curves", "plot_surface", "plot_density"]


def _atomic(path: Path, write: Any, suffix: str) -> None:
    atomic_write_via(path, write, suffix)


def save_grid(
    path: str | os.PathLike[str], meta: dict[str, Any] | None = None, **arrays: Any
) -> Path:
    """Save arrays to ``path`` (``.npz``, or ``.json`` for plain lists) atomically.

    ``meta`` (JSON-serialisable) is stored as a ``meta`` JSON string in the
    ``.npz``, or as a ``meta`` key in the ``.json``. JSON is strict: a NaN or an
    infinite loss (far from the minimum) is written as null.
    """
    path = Path(path)
    if path.suffix == ".json":
        obj = {k: np.asarray(v).tolist() for k, v in arrays.items()}
        if meta:
            obj["meta"] = meta
        text = json.dumps(finite(obj), indent=1, allow_nan=False)

        def write(tmp: str) -> None:
            with open(tmp, "w") as fh:
                fh.write(text)

        _atomic(path, write, ".json")
        return path
    if path.suffix != ".npz":
        raise ValueError(f"Invalid path value: {str(path)!r} (expected a .npz or .json file)")
    arrs = {k: np.asarray(v) for k, v in arrays.items()}
    if meta:
        arrs["meta"] = np.asarray(json.dumps(finite(meta), allow_nan=False))

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez must not append ".npz" to the name
            np.savez(fh, **arrs)

    _atomic(path, write_npz, ".npz")
    return path


def _save_fig(fig: Any, path: Path) -> None:
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"), ".png")


def _figure(size: tuple[float, float]) -> tuple[Any, Any]:
    # A bare Figure (no pyplot): no global backend switch, nothing left open.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def plot_curves(
    path: str | os.PathLike[str],
    x: Sequence[float] | np.ndarray,
    curves: dict[str, Sequence[float] | np.ndarray],
    *,
    xlabel: str = "alpha",
    ylabel: str = "loss",
    title: str = "",
    marks: dict[str, float] | None = None,
    log_y: bool = False,
) -> Path:
    """One or more 1-D loss curves on shared axes; ``marks`` draws labelled
    vertical lines (e.g. ``{"SGD": 0, "SAM": 1}`` on an interpolation)."""
    path = Path(path)
    fig, ax = _figure((5.5, 3.8))
    for label, ys in curves.items():
        ax.plot(np.asarray(x), np.asarray(ys), marker="o", markersize=2.5, label=label)
    for label, pos in (marks or {}).items():
        ax.axvline(pos, color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            label,
            (pos, 1.0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10, pad=14 if marks else 6)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    return path


def plot_surface(
    path: str | os.PathLike[str],
    xs: np.ndarray,
    ys: np.ndarray,
    losses: np.ndarray,
    *,
    title: str = "",
    levels: int = 30,
) -> Path:
    """Contour plot of a 2-D loss grid (``losses[j, i]`` at ``(xs[i], ys[j])``),
    with levels spaced in log(loss) so the basin and the walls both show."""
    path = Path(path)
    z = np.asarray(losses, dtype=np.float64)
    fig, ax = _figure((5.0, 4.3))
    finite = z[np.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo > 0 and hi > lo:
        lev = np.geomspace(lo, hi, levels)
    else:
        lev = np.linspace(lo, hi if hi > lo else lo + 1.0, levels)
    cs = ax.contour(np.asarray(xs), np.asarray(ys), z, levels=lev, cmap="viridis", linewidths=0.8)
    fig.colorbar(cs, ax=ax, label="loss")
    ax.plot([0], [0], marker="*", color="red", markersize=8)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_aspect("equal", adjustable="box")
    _save_fig(fig, path)
    return path


def plot_density(
    path: str | os.PathLike[str], grid: np.ndarray, density: np.ndarray, *, title: str = ""
) -> Path:
    """Hessian eigenvalue density (log scale), from stochastic Lanczos quadrature."""
    path = Path(path)
    fig, ax = _figure((5.5, 3.8))
    d = np.asarray(density, dtype=np.float64)
    ax.semilogy(np.asarray(grid), np.maximum(d, 1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    return path
