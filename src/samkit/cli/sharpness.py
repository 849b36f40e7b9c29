"""``samkit sharpness``: Hessian spectrum and worst-case sharpness of trained models.

Reads checkpoints written by the trainer (``samkit compare`` leaves them in
``<run folder>/runs/*.pt``), rebuilds each model and its dataset, and measures
on a fixed set of samples (default: the first 1000 training samples, with the
labels trained on), with the model in eval mode:

  top Hessian eigenvalue(s)   Lanczos, relative error bound <= --tol
  Hessian trace               deflated Hutchinson, --trace-samples probes (+- standard error)
  worst-case sharpness        max L(w + d) - L(w) over |d| <= rho, --ascent-steps steps
  average-case sharpness      E L(w + d) - L(w), d Gaussian with E|d|^2 = rho^2 (--average)
  GGN top eigenvalue, trace   the generalised Gauss-Newton matrix, a cheaper PSD proxy
                              of the Hessian, not the Hessian (--ggn)

The products run eagerly or torch.compile'd (--product; auto: compiled only once
the eager products have taken about what a compile costs), through gradient graphs
kept in memory, or within --memory-budget bytes of them (the rest rebuilt per product).
Writes a JSON file (atomically) and prints a table; both name the product path that ran.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from .._atomic import finite
from .._atomic import write_json_atomic as _write_json_atomic
from .errors import UsageError, check_output_file, require_plots

EPILOG = """examples:
  samkit sharpness samkit-runs/compare-*/runs/sam-seed0.pt
  samkit sharpness runs/sgd-seed0.pt runs/sam-seed0.pt --top-k 3 --out sharp.json
  samkit sharpness model.pt --adaptive --rho 0.5 --average
  samkit sharpness model.pt --density spectrum.png      # eigenvalue density (SLQ) + raw .npz
  samkit sharpness model.pt --product compiled --memory-budget 2G
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sharpness",
        help="Hessian top eigenvalues, trace and worst-case sharpness of trained checkpoints",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="checkpoint(s) written by the trainer (.pt)",
    )
    add_data_arguments(p)
    p.add_argument("--top-k", type=int, default=1, help="number of top eigenvalues (default 1)")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-3,
        help="relative tolerance of the eigenvalues (default 1e-3)",
    )
    p.add_argument(
        "--trace-samples", type=int, default=32, help="Hutchinson probes for the trace (default 32)"
    )
    p.add_argument(
        "--rho", type=float, default=0.05, help="radius of the worst-case ball (default 0.05)"
    )
    p.add_argument(
        "--adaptive", action="store_true", help="adaptive ball scaled by |w| (ASAM; use rho ~0.5)"
    )
    p.add_argument(
        "--ascent-steps", type=int, default=10, help="ascent steps for the worst case (default 10)"
    )
    p.add_argument(
        "--average", action="store_true", help="also the average-case (Gaussian) sharpness"
    )
    p.add_argument(
        "--ggn",
        action="store_true",
        help="also the top eigenvalue and trace of the generalised Gauss-Newton matrix "
        "(a cheaper proxy, labelled ggn; not the Hessian)",
    )
    p.add_argument(
        "--density",
        metavar="PNG",
        help="also plot the eigenvalue density (stochastic Lanczos) here",
    )
    p.add_argument(
        "--product",
        choices=("auto", "eager", "compiled"),
        default="auto",
        help="Hessian / GGN products run eagerly or torch.compile'd; auto (default) compiles "
        "once the eager products have taken about what a compile costs, and keeps the faster",
    )
    p.add_argument(
        "--memory-budget",
        metavar="BYTES",
        help="bytes the kept gradient graphs may hold (suffixes K, M, G, T: powers of 1024, "
        "e.g. 512M, 2G), or auto (half the free memory); the chunks whose graphs do not fit "
        "are rebuilt for every product (default: keep the whole graph)",
    )
    p.add_argument(
        "--out",
        metavar="JSON",
        help="results file (default: beside the checkpoint, *.sharpness.json)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Which samples the measures use (shared with ``samkit landscape``)."""
    p.add_argument(
        "--split",
        choices=("train", "test", "val"),
        default="train",
        help="data split to measure on (default train: the labels the model was trained on)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1000,
        help="number of samples (default 1000; 0 = whole split)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1000, help="samples per forward pass (default 1000)"
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the random vectors and directions (default 0)",
    )


def _positive(name: str, value: Any, *, zero: bool = False) -> None:
    ok = value is not None and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        raise UsageError(f"invalid --{name} value: {value!r} (must be {'>= 0' if zero else '> 0'})")


#: --memory-budget's suffixes (binary: 2G is 2 GiB, what memory is sized in)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory_budget(text: str | None) -> int | str | None:
    """--memory-budget: ``None`` (keep the whole graph), ``"auto"``, or bytes >= 1.

    Bytes are a number with an optional suffix K, M, G or T (powers of 1024; a
    trailing ``B`` or ``iB`` is allowed: ``512M``, ``1.5GiB``, ``1048576``, ``1e9``).
    """
    if text is None:
        return None
    s = text.strip()
    if s.lower() == "auto":
        return "auto"
    # bounded lengths: 1e999999999 would make a billion-digit int before any check
    number = r"(?:\d{1,20}(?:\.\d{0,20})?|\.\d{1,20})(?:e\d{1,2})?"
    m = re.fullmatch(rf"({number})\s*([kmgt]?)(i?b)?", s, re.IGNORECASE)
    if m is not None and (m[3] is None or m[3].lower() == "b" or m[2]):
        n = int(Fraction(m[1]) * _UNITS[m[2].lower()])
        if n >= 1:
            return n
    shown = text if len(text) <= 40 else text[:37] + "..."
    raise UsageError(
        f"invalid --memory-budget value: {shown!r} (bytes >= 1, e.g. 512M or 2G, or auto)"
    )


def product_info(op: Any) -> dict[str, Any]:
    """The product path an operator ran (``op.product_info``) and, with a memory
    budget, the gradient graphs it kept. Read before ``op.release()``."""
    info = dict(op.product_info or {})
    info["memory_budget"] = op.memory_budget
    if op.memory_budget is not None:
        info["graphs_kept"] = op.graphs_kept
        info["graph_chunks"] = len(op.batches)
        info["peak_graph_bytes"] = op.peak_graph_bytes
    return info


def product_text(info: dict[str, Any]) -> str:
    """One table cell: ``eager``, ``compiled, compile 14.2 s``, ``eager, 2/5 graphs kept``."""
    parts = [str(info.get("path", "eager"))]
    if info.get("compile_seconds") is not None:
        parts.append(f"compile {info['compile_seconds']:.1f} s")
    if info.get("memory_budget") is not None and info.get("path") == "eager":
        parts.append(f"{info['graphs_kept']}/{info['graph_chunks']} graphs kept")
    return ", ".join(parts)


def load_model_and_batches(path: str, args: argparse.Namespace) -> tuple[Any, list, dict[str, Any]]:
    """Rebuild the model of a checkpoint and the fixed batches to measure on.

    The checkpoint is validated first (:func:`~samkit.experiments.checkpoint.check_checkpoint`):
    nothing in it is used as is (no path, no code), and NaN weights are refused.
    """
    from ..experiments.checkpoint import (
        check_checkpoint,
        load_checkpoint,
        rebuild_dataset,
        rebuild_model,
        safe_label,
    )

    try:
        checked = check_checkpoint(load_checkpoint(path), path)
        model = rebuild_model(checked)
        data = rebuild_dataset(checked)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        # torch's reason can span lines: the CLI reports one
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot use {safe_label(path, 200)!r}: {reason}") from exc
    model.eval()
    split = getattr(data, args.split)
    if len(split) == 0:
        raise UsageError(f"the {args.split} split of {path!r} is empty (choose another --split)")
    n = len(split) if args.samples == 0 else min(args.samples, len(split))
    bs = args.batch_size
    batches = [(split.x[i : min(i + bs, n)], split.y[i : min(i + bs, n)]) for i in range(0, n, bs)]
    info = {
        "checkpoint": str(path),
        "model": checked["model"][0],
        "dataset": checked["dataset"]["name"],
        "label": checked["label"],
        "split": args.split,
        "samples": n,
    }
    return model, batches, info


def check_data_arguments(args: argparse.Namespace) -> None:
    paths = list(getattr(args, "checkpoints", None) or [])
    paths += [getattr(args, name, None) for name in ("checkpoint", "other")]
    for p in paths:
        if p is not None and not str(p).strip():
            raise UsageError(f"invalid checkpoint value: {p!r} (an empty path)")
    if args.samples is None or args.samples < 0:
        raise UsageError(f"invalid --samples value: {args.samples!r} (must be >= 0)")
    if args.batch_size is None or args.batch_size < 1:
        raise UsageError(f"invalid --batch-size value: {args.batch_size!r} (must be >= 1)")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON: a non-finite measure (a loss that overflowed far from the
    minimum, a standard error from one probe) is written as null."""
    _write_json_atomic(path, finite(obj), indent=2)


#: the weights are float32: a ball radius above this is an infinite perturbation
FLOAT32_MAX = 3.4028234663852886e38


def check_radius(rho: float) -> None:
    """--rho: > 0, and a radius whose perturbed weights are representable at all."""
    _positive("rho", rho)
    if rho >= FLOAT32_MAX:
        raise UsageError(
            f"invalid --rho value: {rho!r} (must be below {FLOAT32_MAX:.3g}, the float32 range "
            "of the weights: a larger ball gives no finite loss)"
        )


def _seed(text: str) -> int:
    """A seed as the studies take it: an integer >= 0 (torch refuses a negative one)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_seed.__name__ = "seed (an integer >= 0)"  # (argparse names the type in its error)


def check_checkpoint_files(paths: list[str]) -> None:
    """Each checkpoint is a file, before an output name is derived from it (``.`` has no
    name to derive one from) or anything is read."""
    from ..experiments.checkpoint import safe_label

    seen: dict[Path, str] = {}
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(
                f"cannot use {safe_label(path, 200)!r}: Invalid path value: "
                f"{safe_label(path, 200)!r} is not a file"
            )
        same = seen.setdefault(Path(path).resolve(), path)
        if same != path or paths.count(path) > 1:
            # (a model measured twice, or a path from a model to itself: barrier 0)
            raise UsageError(
                f"cannot use {safe_label(path, 200)!r}: it is the same file as "
                f"{safe_label(same, 200)!r}; give each checkpoint once"
            )


def _default_out(checkpoints: list[str]) -> Path:
    first = Path(checkpoints[0])
    if len(checkpoints) == 1:
        return first.with_suffix(".sharpness.json")
    return first.parent / "sharpness.json"


def run(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from .. import sharpness as sh
    from ..experiments.checkpoint import safe_label
    from ..sharpness.hessian import hessian_trace, spectral_density, top_eigenvalues

    check_data_arguments(args)
    for flag, value, high in (
        ("top-k", args.top_k, 1000),
        ("trace-samples", args.trace_samples, 100_000),
        ("ascent-steps", args.ascent_steps, 100_000),
    ):
        if not 1 <= value <= high:
            raise UsageError(f"invalid --{flag} value: {value} (must be in [1, {high}])")
    _positive("tol", args.tol)
    check_radius(args.rho)
    budget = parse_memory_budget(args.memory_budget)
    ops = {"product": args.product, "memory_budget": budget}
    if args.density is not None and len(args.checkpoints) > 1:
        raise UsageError("--density takes one checkpoint")
    # every output is checked before the computation, not after it
    if args.density is not None:
        require_plots("--density (a plot)")
        check_output_file(Path(args.density), "--density", ".png")
        check_output_file(Path(args.density).with_suffix(".npz"), "--density", ".npz")
    check_checkpoint_files(args.checkpoints)  # (the flags first: a bad one is reported first)
    out = Path(args.out) if args.out is not None else _default_out(args.checkpoints)
    check_output_file(out, "--out", ".json")

    progress = not args.quiet
    rows, results = [], []
    for path in args.checkpoints:
        model, batches, info = load_model_and_batches(path, args)
        t0 = time.perf_counter()
        if progress:
            print(f"{Path(path).name}:", file=sys.stderr, flush=True)
        op = sh.HessianOperator(model, F.cross_entropy, batches, **ops)
        eig = top_eigenvalues(op, args.top_k, tol=args.tol, seed=args.seed, progress=progress)
        tr = hessian_trace(
            op,
            n_probes=args.trace_samples,
            basis=eig.basis,
            tridiagonal=eig.tridiagonal,
            seed=args.seed + 1,
            progress=progress,
        )
        density = None
        if args.density:
            density = spectral_density(
                op, n_steps=min(80, op.dim), seed=args.seed + 2, progress=progress
            )
        products = product_info(op)  # before release() drops the kept graphs
        op.release()
        try:  # a ball too large for this model: one line, not a traceback
            wc, avg = _balls(sh, model, op, args, progress)
        except ValueError as exc:
            raise UsageError(f"cannot measure {safe_label(path, 200)!r}: {exc}") from exc
        res: dict[str, Any] = {
            "loss": wc.loss,
            "hessian_top_eig": eig.eigenvalues[0],
            "hessian_eigenvalues": eig.eigenvalues,
            "eigen_converged": eig.converged,
            "hessian_trace": tr.trace,
            "hessian_trace_stderr": tr.stderr,
            "worst_case_sharpness": wc.sharpness,
        }
        if avg is not None:
            res["average_case_sharpness"] = avg.sharpness
            res["average_case_stderr"] = avg.stderr
        res["hessian_vector_products"] = op.n_matvecs
        res["hessian_product_path"] = products
        if args.ggn:
            ggn_op = sh.GGNOperator(model, F.cross_entropy, batches, **ops)
            ggn_eig = top_eigenvalues(ggn_op, tol=args.tol, seed=args.seed, progress=progress)
            res["ggn_product_path"] = product_info(ggn_op)
            ggn_op.release()
            ggn_tr = sh.ggn_trace(
                model, F.cross_entropy, batches, seed=args.seed + 3, progress=progress
            )
            res["ggn_top_eig"] = ggn_eig.eigenvalues[0]
            res["ggn_trace"] = ggn_tr.trace
            res["ggn_trace_stderr"] = ggn_tr.stderr
            res["ggn_vector_products"] = ggn_op.n_matvecs
        res["seconds"] = time.perf_counter() - t0
        if density is not None:
            from ..sharpness.plots import plot_density, save_grid

            png = Path(args.density)
            plot_density(
                png,
                density.grid.numpy(),
                density.density.numpy(),
                title=f"Hessian spectrum: {Path(path).name}",
            )
            save_grid(
                png.with_suffix(".npz"),
                meta=info,
                grid=density.grid.numpy(),
                density=density.density.numpy(),
                nodes=density.nodes[0],
                weights=density.weights[0],
            )
            res["density_png"] = str(png)
        results.append({**info, "results": res})
        row = {
            "checkpoint": info["label"] or safe_label(Path(path).stem),
            "loss": res["loss"],
            "top eig": res["hessian_top_eig"],
            "trace": f"{tr.trace:.4g} +- {tr.stderr:.2g}",
            "worst-case": wc.sharpness,
        }
        if args.average:
            row["average-case"] = res["average_case_sharpness"]
        if args.ggn:
            row["ggn top eig (proxy)"] = res["ggn_top_eig"]
            row["ggn trace (proxy)"] = f"{res['ggn_trace']:.4g} +- {res['ggn_trace_stderr']:.2g}"
        row["products"] = product_text(products)
        if args.ggn:
            row["ggn products"] = product_text(res["ggn_product_path"])
        rows.append(row)

    settings = {
        "top_k": args.top_k,
        "tol": args.tol,
        "trace_samples": args.trace_samples,
        "rho": args.rho,
        "adaptive": args.adaptive,
        "ascent_steps": args.ascent_steps,
        "ggn": args.ggn,
        "product": args.product,
        "memory_budget": budget,
        "seed": args.seed,
        "split": args.split,
        "samples": args.samples,
    }
    write_json_atomic(
        out, {"format": "samkit-sharpness", "version": 1, "settings": settings, "models": results}
    )
    _print_table(rows)
    print(f"wrote {out}")
    return 0


def _balls(sh: Any, model: Any, op: Any, args: argparse.Namespace, progress: bool) -> Any:
    """Worst-case (and with --average average-case) sharpness in the --rho ball."""
    import torch.nn.functional as F

    kw = {"rho": args.rho, "adaptive": args.adaptive, "seed": args.seed, "op": op}
    wc = sh.worst_case_sharpness(
        model, F.cross_entropy, None, steps=args.ascent_steps, progress=progress, **kw
    )
    avg = None
    if args.average:
        avg = sh.average_case_sharpness(model, F.cross_entropy, None, progress=progress, **kw)
    return wc, avg


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_table(rows: list[dict[str, Any]]) -> None:
    heads = list(rows[0])
    cells = [[_fmt(r.get(h, "")) for h in heads] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths))
        )
    )
    for c in cells:
        print(
            "  ".join(
                x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))
            )
        )
