r"""What each public constructor gives when built with its defaults.

A newcomer writes ``samkit.LookSAM(base)`` or ``samkit.SAM(base,
policy=samkit.EveryK())`` and gets the class defaults, not the radius or
weight a benchmark tuned. This trains, for every public constructor of
samkit (optimizers, perturbations, policies, mixes, rho controllers, and
the SAF / MESA loss terms), built with **only the base optimizer given**
(arguments without a default are filled with a documented value, listed in
:data:`ROWS`), and the base optimizer alone, on MNIST-1D with the built-in
CNN, GRU and ResNet (``samkit.experiments.models.build_model``), with two
base optimizers:

* SGD, lr 0.1, momentum 0.9, weight decay 5e-4 (the study's SGD);
* Adam, lr 1e-2, betas (0.9, 0.999), no weight decay (the study's Adam);

both with a cosine schedule to zero, batch 100, samkit's training loop
(:func:`samkit.experiments.trainer.train`). Each entry of the table is the
test accuracy of the constructor minus that of the base optimizer alone,
paired by seed (same data split, initialisation and batch order), in
points, +- the standard error of the paired differences over the seeds.

Pieces are built into :class:`samkit.SAM` (``SAM(base, perturbation=P())``,
``SAM(base, policy=Q())``, ``SAM(base, rho=C())``) with SAM's own defaults
for everything else. A piece that only takes effect together with another
(LookSAM's and vSAM's mixes) is covered by the class that assembles them,
whose defaults are the piece's. ``REFERENCE`` rows are not defaults: the
values that used to be (MomentumSAM rho 3.0, LookSAM alpha 0.7, EveryK's rho x k).

Run (resumable: every finished run is a JSON file under ``--out``; rerun the
same command to continue, ``--report-only`` to tabulate what is there)::

    OMP_NUM_THREADS=1 python benchmarks/defaults.py --out samkit-runs/defaults

The default size (``--quick``) is 2 seeds, 10 epochs, 2000 training samples:
about 45 minutes on a shared 2-core machine with one thread, long enough to
show a default that breaks training, too short to show SAM's gain.
``--full`` is 3 seeds, 30 epochs and the whole training set (3,600 samples);
``--seeds``, ``--epochs``, ``--train-size``, ``--models``, ``--bases`` and
``--rows`` set each.

``tests/test_defaults.py`` runs a small version of every column and checks
that no default leaves the model far below its base optimizer, and that
:data:`ROWS` plus :data:`EXCLUDED` name every public constructor of samkit.
A combination samkit refuses (``Momentum()`` under Adam, which has no
``momentum_buffer``) is a "refused" cell, with the error printed under the
table.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, write_json  # noqa: E402

import samkit  # noqa: E402
from samkit.experiments.datasets import load_dataset  # noqa: E402
from samkit.experiments.methods import (  # noqa: E402
    ESAMMethod,
    KSAMMethod,
    MESAMethod,
    MSAMMethod,
    OptimizerMethod,
    SAFMethod,
    SAMMethod,
    TrainSpec,
    make_base_optimizer,
)
from samkit.experiments.models import build_model  # noqa: E402
from samkit.experiments.trainer import TrainConfig, seed_everything, train  # noqa: E402

BASES: dict[str, dict[str, Any]] = {
    "sgd": {"base": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adam": {"base": "adam", "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0},
}
MODELS = ("cnn", "gru", "resnet")
#: the default size
QUICK = {"seeds": 2, "epochs": 10, "train_size": 2000}
#: vSAM's warm-up: the paper's 3 epochs (required argument)
VSAM_WARMUP_EPOCHS = 3
#: Momentum-SAM's radius (required): what its error advises, 0.25-0.5 with SGD, 0.05-0.1 with
#: Adam (0.5, the study's SGD value, costs Adam about 10 points on the CNN and the GRU)
MOMENTUM_SAM_RHO = {"sgd": 0.5, "adam": 0.1}
#: Late's fraction: the study's 0.2 (Late has no default; the paper's last 10-20 %)
LATE_FRACTION = 0.2


@dataclass
class Ctx:
    """What a row's builder may use: the model, a fresh base optimizer and the run's length."""

    model: torch.nn.Module
    base: torch.optim.Optimizer
    spec: TrainSpec
    num_samples: int
    num_classes: int


@dataclass(frozen=True)
class Row:
    """One row of the table: a constructor built with its defaults.

    ``covers``: the names in ``samkit.__all__`` whose defaults this row
    exercises. ``args``: what the row passes besides the base optimizer (the
    documented values of arguments that have no default). ``needs``: a model
    property the constructor requires (``"norm"``: normalisation layers).
    """

    name: str
    covers: tuple[str, ...]
    build: Callable[[Ctx], Any]
    args: str = ""
    needs: str | None = None
    reference: bool = False
    #: evaluate every epoch (the controllers that learn from the validation loss)
    every_epoch: bool = False


def _sam(ctx: Ctx, **kw: Any) -> SAMMethod:
    return SAMMethod(samkit.SAM(ctx.base, **kw), "sam")


def _has_norm(model: torch.nn.Module) -> bool:
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
    return any(isinstance(m, norms) for m in model.modules())


def _defaults_of(cls: type) -> dict[str, Any]:
    """The keyword defaults of ``cls``'s constructor (SAF's lam, tau, delay)."""
    return {
        k: p.default
        for k, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty and k != "device"
    }


def _warmup(ctx: Ctx) -> int:
    return VSAM_WARMUP_EPOCHS * ctx.spec.steps_per_epoch


def _required(cls: type, **documented: Any) -> dict[str, Any]:
    """The documented values of the arguments ``cls`` has no default for (None counts as
    none); an argument that has a default keeps it, so a default is what a row measures."""
    params = inspect.signature(cls).parameters
    return {
        k: v
        for k, v in documented.items()
        if params[k].default is inspect.Parameter.empty or params[k].default is None
    }


ROWS: list[Row] = [
    Row("SAM", ("SAM", "L2", "Always", "Perturbation", "Mix"), lambda c: _sam(c)),
    Row("Adaptive (ASAM)", ("Adaptive",), lambda c: _sam(c, perturbation=samkit.Adaptive())),
    Row("Fisher", ("Fisher",), lambda c: _sam(c, perturbation=samkit.Fisher())),
    Row(
        "Masked",
        ("Masked",),
        lambda c: _sam(
            c, perturbation=samkit.Masked([p for p in c.model.parameters() if p.dim() > 1])
        ),
        args="params = the weight matrices/kernels (dim > 1)",
    ),
    Row(
        "NormOnly (SAM-ON)",
        ("NormOnly",),
        lambda c: _sam(c, perturbation=samkit.NormOnly(c.model)),
        args="model",
        needs="norm",
    ),
    Row("RandomSubset", ("RandomSubset",), lambda c: _sam(c, perturbation=samkit.RandomSubset())),
    Row("Momentum", ("Momentum",), lambda c: _sam(c, perturbation=samkit.Momentum())),
    Row("EveryK", ("EveryK",), lambda c: _sam(c, policy=samkit.EveryK())),
    Row("RandomPolicy (RST)", ("RandomPolicy",), lambda c: _sam(c, policy=samkit.RandomPolicy())),
    Row(
        "GradNormTrigger (AE-SAM)",
        ("GradNormTrigger", "AdaptivePolicy"),
        lambda c: _sam(c, policy=samkit.GradNormTrigger(c.spec.total_steps)),
        args="total_steps",
    ),
    Row(
        "Late",
        ("Late",),
        lambda c: _sam(
            c, policy=samkit.Late(total_steps=c.spec.total_steps, fraction=LATE_FRACTION)
        ),
        args=f"total_steps, fraction={LATE_FRACTION}",
    ),
    Row("FollowLR", ("FollowLR",), lambda c: _sam(c, rho=samkit.FollowLR())),
    Row("LossEquated", ("LossEquated",), lambda c: _sam(c, rho=samkit.LossEquated())),
    Row(
        "GradientAgreement",
        ("GradientAgreement",),
        lambda c: _sam(c, rho=samkit.GradientAgreement()),
        every_epoch=True,
    ),
    Row(
        "ValidationPlateau",
        ("ValidationPlateau",),
        lambda c: _sam(c, rho=samkit.ValidationPlateau()),
        every_epoch=True,
    ),
    Row(
        "ValidationSearch",
        ("ValidationSearch",),
        lambda c: _sam(c, rho=samkit.ValidationSearch()),
        every_epoch=True,
    ),
    Row("GSAM", ("GSAM", "SurrogateGap"), lambda c: SAMMethod(samkit.GSAM(c.base), "gsam")),
    Row(
        "LookSAM",
        ("LookSAM", "ReuseOrthogonal"),
        lambda c: SAMMethod(samkit.LookSAM(c.base), "looksam"),
    ),
    Row(
        "ESAM",
        ("ESAM",),
        lambda c: ESAMMethod(samkit.ESAM(c.base, **_required(samkit.ESAM, gamma=0.5))),
        args="gamma=0.5 (required; the paper's)",
    ),
    Row("MicroBatchSAM", ("MicroBatchSAM",), lambda c: MSAMMethod(samkit.MicroBatchSAM(c.base))),
    Row(
        "KSAM",
        ("KSAM",),
        lambda c: KSAMMethod(samkit.KSAM(c.base, **_required(samkit.KSAM, fraction=1 / 3))),
        args="fraction=1/3 (required; the paper's)",
    ),
    Row(
        "MomentumSAM",
        ("MomentumSAM",),
        lambda c: SAMMethod(
            samkit.MomentumSAM(
                c.base, **_required(samkit.MomentumSAM, rho=MOMENTUM_SAM_RHO[c.spec.base])
            ),
            "momentum_sam",
        ),
        args="rho=0.5 with SGD, 0.1 with Adam (required; its error's advice)",
    ),
    Row(
        "VSAM",
        ("VSAM", "PSFVariation", "ReusePSF"),
        lambda c: SAMMethod(
            samkit.VSAM(c.base, **_required(samkit.VSAM, warmup_steps=_warmup(c))), "vsam"
        ),
        args=f"warmup_steps = {VSAM_WARMUP_EPOCHS} epochs",
    ),
    Row(
        "SAF",
        ("SAF",),
        lambda c: SAFMethod(c.base, c.spec, **_defaults_of(samkit.SAF)),
        args="num_samples, num_classes",
    ),
    Row("MESA", ("MESA",), lambda c: MESAMethod(c.base, samkit.MESA(c.model)), args="model"),
    # not defaults: the published values that were the defaults before samkit 0.3
    Row(
        "MomentumSAM(rho=3.0), paper",
        (),
        lambda c: SAMMethod(samkit.MomentumSAM(c.base, rho=3.0), "momentum_sam"),
        args="rho=3.0",
        reference=True,
    ),
    Row(
        "EveryK(scale_rho=True), Composer",
        (),
        lambda c: _sam(c, policy=samkit.EveryK(10, scale_rho=True)),
        args="scale_rho=True",
        reference=True,
    ),
    Row(
        "LookSAM(alpha=0.7), paper",
        (),
        lambda c: SAMMethod(samkit.LookSAM(c.base, alpha=0.7), "looksam"),
        args="alpha=0.7",
        reference=True,
    ),
]

#: names in ``samkit.__all__`` that no row builds, and why
EXCLUDED: dict[str, str] = {
    "Policy": "abstract base class (should_ascend raises)",
    "RhoController": "base class of the rho controllers (the concrete ones are rows)",
    "ProportionalRho": "a schedule the user steps after the LR scheduler; with its defaults "
    "(rho_max = the group's rho, rho_min 0, lr_max = the group's lr, lr_min 0) it is GSAM's "
    "rule, the FollowLR row",
    "LambdaRho": "no defaults: fn is required",
    "StepView": "made by SAM for its pieces, not by users",
    "NoValidationWarning": "a warning class",
    "freeze_bn_stats": "a function (context manager), no hyper-parameters",
}


# ------------------------------------------------------------------ one run
def applies(row: Row, model_name: str) -> bool:
    if row.needs == "norm":
        return _has_norm(build_model(model_name))
    return True


def run_one(
    row: Row | None,
    model_name: str,
    base: str,
    seed: int,
    *,
    epochs: int,
    train_size: int | None,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Train one model; ``row=None`` is the base optimizer alone. Returns the final record."""
    data = load_dataset("mnist1d", seed=seed, train_size=train_size)
    seed_everything(seed)
    model = build_model(model_name, in_len=data.in_len, num_classes=data.num_classes)
    n = len(data.train)
    per_epoch = n // batch_size
    spec = TrainSpec(
        **BASES[base], total_steps=per_epoch * epochs, steps_per_epoch=per_epoch, epochs=epochs
    )
    opt = make_base_optimizer(model.parameters(), spec)
    if row is None:
        method = OptimizerMethod(opt, base)
    else:
        method = row.build(Ctx(model, opt, spec, n, data.num_classes))
    t0 = time.perf_counter()
    try:
        result = train(
            model,
            method,
            data,
            TrainConfig(
                epochs=epochs,
                batch_size=batch_size,
                schedule="cosine",
                eval_train=False,
                # evaluation does not touch training: only what learns from it needs it every epoch
                eval_every=1 if row is not None and row.every_epoch else epochs,
            ),
            seed=seed,
            progress=False,
            epoch_steps=per_epoch,
        )
    except ValueError as err:
        # samkit refuses a combination that would do nothing (Momentum() under Adam, whose
        # state has no "momentum_buffer"): a cell of its own, with the message, not a crash
        return {"refused": str(err), "seconds": time.perf_counter() - t0}
    acc = result.final.get("test_acc", math.nan)
    return {
        "test_acc": acc if math.isfinite(acc) else 1.0 / data.num_classes,
        "diverged": bool(result.diverged or not math.isfinite(acc)),
        "passes_per_step": result.passes / max(1, result.steps),
        "seconds": time.perf_counter() - t0,
    }


def fingerprint(row: Row) -> str:
    """A digest of the signatures (hence the defaults) of SAM and of the classes the row
    covers, and of the values the row passes: a finished run is reused only while what it
    measured is unchanged."""
    names = ("SAM", *row.covers)
    text = ";".join(f"{n}{inspect.signature(getattr(samkit, n))}" for n in names) + row.args
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _key(row: Row | None, model_name: str, base: str, seed: int, args) -> str:
    label = "base" if row is None else row.name
    safe = "".join(ch if ch.isalnum() else "_" for ch in label)
    key = f"{model_name}-{base}-{safe}-s{seed}-e{args.epochs}-n{args.train_size}"
    return key if row is None else f"{key}-{fingerprint(row)}"


def cached_run(row: Row | None, model_name: str, base: str, seed: int, args, out: Path) -> dict:
    path = out / "runs" / f"{_key(row, model_name, base, seed, args)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if args.report_only:
        return {}
    rec = run_one(row, model_name, base, seed, epochs=args.epochs, train_size=args.train_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(str(path), rec)
    if not args.quiet:
        acc = f"acc {100 * rec['test_acc']:5.1f}" if "test_acc" in rec else "refused  "
        print(
            f"{model_name:6s} {base:4s} seed {seed} {row.name if row else 'base':32s} "
            f"{acc}  {rec['seconds']:5.1f} s",
            flush=True,
        )
    return rec


def paired(diffs: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return mean, se


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 seeds, 10 epochs, 2000 samples")
    size.add_argument("--full", action="store_true", help="3 seeds, 30 epochs, all 3600 samples")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    ap.add_argument("--rows", nargs="+", default=None, help="row names (default: all)")
    ap.add_argument("--out", default="samkit-runs/defaults")
    ap.add_argument("--report-only", action="store_true", help="tabulate finished runs only")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    preset = {"seeds": 3, "epochs": 30, "train_size": 3600} if args.full else QUICK
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.epochs < 1 or args.train_size < 200:
        ap.error("--seeds and --epochs must be >= 1, --train-size >= 200")
    rows = ROWS
    if args.rows:
        known = {r.name for r in ROWS}
        bad = [r for r in args.rows if r not in known]
        if bad:
            ap.error(f"unknown rows {bad} (choose from {sorted(known)})")
        rows = [r for r in ROWS if r.name in args.rows]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    seeds = list(range(args.seeds))
    columns = [(m, b) for m in args.models for b in args.bases]

    t0 = time.perf_counter()
    base_acc: dict[tuple[str, str], list[dict]] = {}
    for m, b in columns:
        base_acc[(m, b)] = [cached_run(None, m, b, s, args, out) for s in seeds]
    results: dict[str, dict[str, Any]] = {}
    refused: dict[str, list[str]] = {}
    table_rows = []
    for row in rows:
        cells = [row.name + (" *" if row.reference else ""), row.args]
        results[row.name] = {}
        for m, b in columns:
            if not applies(row, m):
                cells.append("n/a")
                continue
            recs = [cached_run(row, m, b, s, args, out) for s in seeds]
            refusals = [r["refused"] for r in recs if r and "refused" in r]
            if refusals:
                cells.append("refused")
                results[row.name][f"{m}/{b}"] = {"refused": refusals[0]}
                refused.setdefault(refusals[0], []).append(f"{row.name}: {m} / {b}")
                continue
            pairs = [
                (r["test_acc"], base["test_acc"])
                for r, base in zip(recs, base_acc[(m, b)])
                if r and base
            ]
            if not pairs:
                cells.append("")
                continue
            mean, se = paired([100 * (a - c) for a, c in pairs])
            flag = " †" if any(r.get("diverged") for r in recs if r) else ""
            cells.append(f"{mean:+.1f} ± {se:.1f}{flag}" if len(pairs) > 1 else f"{mean:+.1f}")
            results[row.name][f"{m}/{b}"] = {
                "diff_points": mean,
                "se": se,
                "n": len(pairs),
                "acc": [a for a, _ in pairs],
                "base_acc": [c for _, c in pairs],
                "passes_per_step": statistics.fmean(r["passes_per_step"] for r in recs if r),
            }
        table_rows.append(cells)
    base_cells = ["(base alone: test acc %)", ""]
    for m, b in columns:
        accs = [r["test_acc"] for r in base_acc[(m, b)] if r]
        base_cells.append(f"{100 * statistics.fmean(accs):.1f}" if accs else "")
    headers = ["constructor", "arguments given"] + [f"{m} / {b}" for m, b in columns]
    print()
    print_table(headers, [base_cells, *table_rows])
    print()
    print(
        f"{args.seeds} seeds, {args.epochs} epochs, {args.train_size} training samples; "
        "difference in test accuracy points vs the base optimizer alone, paired by seed, "
        "± its standard error; * not a default (the published value that was the default before "
        "0.3); † a run diverged"
    )
    for message, where in refused.items():
        print(f"refused ({', '.join(where)}): {message}")
    write_json(
        str(out / "defaults.json"),
        {
            "command": " ".join(
                ["python", "benchmarks/defaults.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "seeds": seeds,
            "epochs": args.epochs,
            "train_size": args.train_size,
            "bases": {b: BASES[b] for b in args.bases},
            "base_acc": {
                f"{m}/{b}": [r.get("test_acc") for r in v] for (m, b), v in base_acc.items()
            },
            "results": results,
            "seconds": time.perf_counter() - t0,
            "environment": environment(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
