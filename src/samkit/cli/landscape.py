"""``samkit landscape``: loss landscapes of trained checkpoints, as PNG + raw grid.

Three kinds (Li et al., arXiv 1712.09913; Goodfellow et al., arXiv 1412.6544):

  1d    loss along one random filter-normalised direction, alpha in [-R, R]
  2d    contour of the loss over two such directions, [-R, R]^2
  path  loss along the straight line from CHECKPOINT (alpha = 0) to --other
        (alpha = 1), from alpha = -0.25 to 1.25

Biases and normalisation parameters are left out of random directions. The
plot is written to --out (PNG) and the raw grid beside it (same name, .npz).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError, check_output_file, require_plots
from .sharpness import (
    add_data_arguments,
    check_checkpoint_files,
    check_data_arguments,
    load_model_and_batches,
)

EPILOG = """examples:
  samkit landscape runs/sam-seed0.pt                        # 1-D curve
  samkit landscape runs/sam-seed0.pt --mode 2d --resolution 31
  samkit landscape runs/sgd-seed0.pt --other runs/sam-seed0.pt   # SGD -> SAM path
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "landscape",
        help="loss landscape of a checkpoint (1-D, 2-D, or the path to another model): PNG + raw grid",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint written by the trainer (.pt)"
    )
    p.add_argument(
        "--other", metavar="CHECKPOINT", help="second checkpoint: plot the path between the two"
    )
    p.add_argument(
        "--mode", choices=("1d", "2d", "path"), help="default: path with --other, else 1d"
    )
    p.add_argument(
        "--resolution",
        type=int,
        help="points per axis (default 25; 21 for 2d); the weights (alpha 0) and, on a "
        "path, the other model (alpha 1) are added where the grid misses them",
    )
    p.add_argument(
        "--range",
        type=float,
        default=1.0,
        dest="span",
        help="half-width R of the 1d/2d grid in units of the direction (default 1)",
    )
    add_data_arguments(p)
    p.add_argument(
        "--out",
        metavar="PNG",
        help="plot file (default: beside the checkpoint, *.landscape-MODE.png)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from ..sharpness import landscape as ls
    from ..sharpness.plots import plot_curves, plot_surface, save_grid

    check_data_arguments(args)
    mode = args.mode or ("path" if args.other else "1d")
    if mode == "path" and not args.other:
        raise UsageError("--mode path needs --other CHECKPOINT")
    if mode != "path" and args.other:
        raise UsageError(f"--other is only used with --mode path (got --mode {mode})")
    res = args.resolution if args.resolution is not None else (21 if mode == "2d" else 25)
    high = 201 if mode == "2d" else 1001  # 201^2 = 40k loss evaluations already
    if not 2 <= res <= high:
        raise UsageError(f"invalid --resolution value: {res} (must be in [2, {high}] for {mode})")
    if not (math.isfinite(args.span) and 0 < args.span <= 1e6):
        raise UsageError(f"invalid --range value: {args.span!r} (must be in (0, 1e6])")
    check_checkpoint_files([args.checkpoint, *([args.other] if args.other else [])])
    out = (
        Path(args.out)
        if args.out is not None
        else Path(args.checkpoint).with_suffix(f".landscape-{mode}.png")
    )
    # both outputs (and matplotlib) are checked before the computation, not after it
    require_plots("the landscape plot")
    check_output_file(out, "--out", ".png")
    raw = check_output_file(out.with_suffix(".npz"), "--out", ".npz")
    progress = not args.quiet

    model, batches, info = load_model_and_batches(args.checkpoint, args)
    from ..experiments.checkpoint import safe_label

    name = info["label"] or safe_label(Path(args.checkpoint).stem)
    meta = {**info, "mode": mode, "seed": args.seed}
    if mode == "path":
        other, _, info_b = load_model_and_batches(args.other, args)
        name_b = info_b["label"] or safe_label(Path(args.other).stem)
        try:
            alphas, losses = ls.interpolate(
                model,
                other,
                F.cross_entropy,
                batches,
                alphas=_with(np.linspace(-0.25, 1.25, res), 0.0, 1.0),
                progress=progress,
            )
        except ValueError as exc:
            raise UsageError(
                f"cannot interpolate {args.checkpoint!r} and {args.other!r}: {exc}"
            ) from exc
        meta["other"] = info_b["checkpoint"]
        save_grid(raw, meta=meta, alphas=alphas, losses=losses)
        plot_curves(
            out,
            alphas,
            {f"{info['split']} loss": losses},
            marks={name: 0.0, name_b: 1.0},
            title=f"linear path {name} -> {name_b}",
        )
        inside = (alphas >= 0) & (alphas <= 1)
        at_a, at_b = losses[alphas == 0.0][0], losses[alphas == 1.0][0]  # on the grid, exactly
        print(
            f"loss at {name} (alpha=0): {at_a:.4g}; at {name_b} (alpha=1): {at_b:.4g}; "
            f"barrier on [0, 1]: {max(0.0, float(losses[inside].max()) - float(max(at_a, at_b))):.4g}"
        )
    elif mode == "1d":
        alphas, losses = ls.loss_curve(
            model,
            F.cross_entropy,
            batches,
            alphas=_with(np.linspace(-args.span, args.span, res), 0.0),
            seed=args.seed,
            progress=progress,
        )
        save_grid(raw, meta=meta, alphas=alphas, losses=losses)
        plot_curves(
            out,
            alphas,
            {f"{info['split']} loss": losses},
            xlabel="alpha (filter-normalised direction)",
            title=f"1-D landscape: {name}",
        )
        print(
            f"loss at the weights: {losses[alphas == 0.0][0]:.4g}; "
            f"at alpha = -{args.span:g} / +{args.span:g}: {losses[0]:.4g} / {losses[-1]:.4g}"
        )
    else:
        grid = _with(np.linspace(-args.span, args.span, res), 0.0)
        xs, ys, z = ls.loss_surface(
            model, F.cross_entropy, batches, xs=grid, ys=grid, seed=args.seed, progress=progress
        )
        save_grid(raw, meta=meta, xs=xs, ys=ys, losses=z)
        plot_surface(out, xs, ys, z, title=f"2-D landscape: {name}")
        print(
            f"loss at the weights: {z[ys == 0.0][0][xs == 0.0][0]:.4g}; "
            f"min / max on the grid: {z.min():.4g} / {z.max():.4g}"
        )
    print(f"wrote {out} and {raw}")
    return 0


def _with(grid: Any, *points: float) -> Any:
    """The grid with ``points`` on it (the weights at 0, the other model at 1), so that the
    losses printed there are measured there, not at the nearest grid point."""
    return np.union1d(grid, np.asarray(points, dtype=grid.dtype))
