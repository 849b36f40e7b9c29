"""``samkit compare``: SGD vs Adam vs SAM and its variants on real data.

Trains every (optimizer x seed) run, prints a table and writes a run folder
(``results.json``, per-run metrics and checkpoints, ``report.html``).
Rerunning the same command resumes: finished runs are not trained again.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

EPILOG = """examples:
  samkit compare --quick                       # about 2 minutes: SGD, Adam, SAM, ASAM, 2 seeds
  samkit compare                               # the full study (about 10 minutes)
  samkit compare --optimizers sgd sam --rho 0.02,0.05,0.1 --seeds 5
  samkit compare --noise 0.4 --model gru --epochs 100
  samkit compare --optimizers sgd "sam:base=adam,lr=0.01,label=sam-adam" adam
  samkit compare --config examples/compare.toml
  samkit compare --list                        # datasets, models and optimizers
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare SGD, Adam, SAM and its variants on a real dataset (table + HTML report)",
        description=__doc__.replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    p.add_argument(
        "--optimizers",
        nargs="+",
        metavar="SPEC",
        help="methods to compare: names (comma or space separated) or 'name:key=value,...' "
        "(default: sgd adam sam asam and every registered variant but the slowest, msam and mesa; "
        "'all' for every one)",
    )
    p.add_argument(
        "--rho",
        metavar="R[,R...]",
        help="rho values on SAM's scale; each SAM-type method runs once per value",
    )
    p.add_argument(
        "--no-sharpness",
        dest="sharpness",
        action="store_false",
        default=None,
        help="skip the sharpness measures (Hessian top eigenvalue, trace, worst-case sharpness)",
    )
    p.add_argument(
        "--list", action="store_true", help="list datasets, models and optimizers, then exit"
    )
    p.set_defaults(func=run)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``compare`` and ``tune``."""
    p.add_argument("--config", metavar="FILE", help="TOML settings file (flags override it)")
    p.add_argument(
        "--quick", action="store_true", help="a short run (about 2 minutes on a laptop CPU)"
    )
    p.add_argument("--dataset", help="mnist1d (default), digits or synthetic")
    p.add_argument("--model", help="cnn (default), gru, mlp or resnet")
    p.add_argument(
        "--noise",
        type=float,
        help="fraction of training labels replaced by a wrong class (default 0)",
    )
    p.add_argument(
        "--seeds", metavar="N|S,S,...", help="number of seeds, or a comma-separated list"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--lr", type=float, help="learning rate for every method (default: per base optimizer)"
    )
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--val-fraction", type=float, help="validation split of the training set (default 0.1)"
    )
    p.add_argument("--train-size", type=int, help="use only this many training samples")
    p.add_argument(
        "--early-stopping",
        type=int,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without "
        "a better validation accuracy (keeps the best weights)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run folder (default: samkit-runs/<command>-<dataset>-<model>-<hash>)",
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress output, only the final table"
    )


def _floats(name: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.replace(" ", ",").split(",") if t]
    except ValueError as exc:
        raise UsageError(
            f"invalid --{name} value: {text!r} (expected numbers separated by commas)"
        ) from exc


def _seeds(text: str | None) -> int | list[int] | None:
    if text is None:
        return None
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError as exc:
        raise UsageError(
            f"invalid --seeds value: {text!r} (a count or comma-separated ints)"
        ) from exc


def settings_from_args(args: argparse.Namespace, quick_preset: dict[str, Any]) -> dict[str, Any]:
    """Merge defaults / quick preset / TOML / flags into one settings dict."""
    from ..experiments import config as cfg

    toml = cfg.load_toml(args.config) if args.config else {}
    flags = {
        "dataset": args.dataset,
        "model": args.model,
        "noise": args.noise,
        "seeds": _seeds(args.seeds),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "val_fraction": args.val_fraction,
        "train_size": args.train_size,
        "early_stopping": args.early_stopping,
        "out": args.out,
    }
    if getattr(args, "optimizers", None) is not None:
        flags["optimizers"] = args.optimizers
    if getattr(args, "rho", None) is not None:
        flags["rho"] = _floats("rho", args.rho)
    if getattr(args, "sharpness", None) is not None:
        flags["sharpness"] = args.sharpness
    return cfg.merge(quick_preset if args.quick else None, toml, flags)


def prepare_out_dir(path: Path) -> Path:
    """Create the run folder and check it is writable (UsageError otherwise)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".samkit-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"cannot write to output folder {str(path)!r} ({exc.strerror or exc})"
        ) from exc
    return path


def _print_list() -> int:
    from ..experiments.datasets import list_datasets
    from ..experiments.methods import list_methods
    from ..experiments.models import list_models

    for title, items in (
        ("datasets", list_datasets()),
        ("models", list_models()),
        ("optimizers", list_methods()),
    ):
        print(f"{title}:")
        for k, v in items.items():
            print(f"  {k:<12} {v}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_list()
    from ..experiments import config as cfg
    from ..experiments.study import run_study, sharpness_available

    try:
        settings = settings_from_args(args, cfg.QUICK)
        study = cfg.build_study(settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = prepare_out_dir(Path(settings["out"]) if settings["out"] else cfg.default_out_dir(study))
    quiet = args.quiet
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if log:
        labels = ", ".join(m.label for m in study.methods)
        log(
            f"samkit compare: {study.dataset} / {study.model}, noise {study.noise:g}, "
            f"{len(study.seeds)} seed(s) x [{labels}], {study.train.epochs} epochs -> {out}"
        )
        if study.skipped:
            log(
                f"samkit compare: left out (cannot run on {study.model}): {', '.join(study.skipped)}"
            )
        if study.sharpness and not sharpness_available():
            log("samkit compare: samkit.sharpness is not available; sharpness columns skipped")
    results = run_study(study, out, progress=None if not quiet else False, log=log)
    summary = finish(study, results, out, log=log)
    from ..experiments.report import print_table

    title = f"{study.dataset} / {study.model}" + (
        f", {study.noise:.0%} label noise" if study.noise else ""
    )
    print_table(summary["summary"], title=title)
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.html'}")
    return 0


def finish(study: Any, results: list[Any], out: Path, *, log: Any = None) -> dict[str, Any]:
    """Aggregate the runs into results.json and write report.html."""
    import json

    from ..experiments.report import write_report
    from ..experiments.study import summarize, write_json_atomic

    records = [r.record for r in results]
    labels = [m.label for m in study.methods]
    rows = summarize(records, labels)
    histories: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        path = out / "runs" / r["metrics"]
        try:
            histories[r["key"]] = [
                json.loads(line) for line in path.read_text().splitlines() if line.strip()
            ]
        except (OSError, ValueError):
            histories[r["key"]] = []
    interp = _interpolation(study, records, out, log) if study.sharpness else None
    summary = {
        "format": "samkit-compare",
        "version": 1,
        "settings": study.to_dict(),
        "summary": rows,
        "runs": records,
        "interpolation": interp,
        "executed_runs": sum(r.executed for r in results),
    }
    write_json_atomic(out / "results.json", summary)
    write_report(
        out / "report.html",
        title=f"samkit compare: {study.dataset} / {study.model}"
        + (f", {study.noise:.0%} label noise" if study.noise else ""),
        rows=rows,
        records=records,
        histories=histories,
        settings={k: v for k, v in study.to_dict().items() if k != "methods"} | {"methods": labels},
        interpolation=interp,
        notes=[
            "Test accuracy: mean +- sample standard deviation over seeds; error bars: standard error. "
            "Cost: time per training epoch, and forward/backward passes per step, relative to SGD."
        ],
    )
    return summary


def _interpolation(
    study: Any, records: list[dict[str, Any]], out: Path, log: Any
) -> dict[str, Any] | None:
    """Loss along the line from the SGD model to the SAM model (first seed)."""
    try:
        from ..sharpness import landscape
    except ImportError:
        return None
    if not callable(getattr(landscape, "interpolate", None)):
        return None
    seed = study.seeds[0]
    by_label = {r["label"]: r for r in records if r["seed"] == seed}
    a = by_label.get("sgd")
    sam_like = [r for r in records if r["seed"] == seed and r["method"] == "sam"]
    b = max(sam_like, key=lambda r: r["final"].get("test_acc", -math.inf)) if sam_like else None
    if a is None or b is None:
        return None
    import torch.nn.functional as F

    from ..experiments.checkpoint import load_checkpoint
    from ..experiments.models import build_model
    from ..experiments.study import sharpness_batches

    try:
        models = []
        for r in (a, b):
            ck = load_checkpoint(out / "runs" / r["checkpoint"])
            m = build_model(ck["model"]["name"], **ck["model"]["kwargs"])
            m.load_state_dict(ck["state_dict"])
            m.eval()
            models.append(m)
        data = study.load(seed)
        alphas, losses = landscape.interpolate(
            models[0],
            models[1],
            F.cross_entropy,
            sharpness_batches(data, study.sharpness_samples),
            n_points=study.interpolation_points,
        )
    except Exception as exc:  # noqa: BLE001 - an instrument failure must not lose the study
        if log:
            log(f"samkit compare: interpolation failed: {type(exc).__name__}: {exc}")
        return None
    return {
        "a": a["label"],
        "b": b["label"],
        "seed": seed,
        "alphas": [float(x) for x in alphas],
        "losses": [float(x) for x in losses],
    }
