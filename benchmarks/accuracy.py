"""Accuracy benchmark: SGD vs SAM on MNIST-1D with the paper's CNN, clean and noisy labels.

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py            # 5 seeds, both settings
    python benchmarks/accuracy.py --seeds 10 --epochs 150 --out samkit-runs/accuracy

Protocol (docs/compare.md): the MNIST-1D paper's CNN (5,210 parameters),
SGD with momentum 0.9, lr 0.1, weight decay 5e-4, batch 100, cosine decay
over 150 epochs (5,400 steps, the paper trains 6,000-8,000), 10 % of the
training set held out for validation, clean test set. SAM wraps the same
SGD. The clean setting compares SGD with SAM at rho 0.05 (the SAM paper's
default); the noisy setting (40 % symmetric label noise on the training
labels) with rho 0.1 (the SAM paper's choice at 40 % noise).
``--rho-clean`` / ``--rho-noise`` take other lists; the final model is evaluated (every 10 epochs in between). Runs are resumable (rerun the command to continue); the table
(markdown) is printed and written to ``<out>/accuracy.md``.

"SAM's best setting" is chosen by *validation* accuracy, not test accuracy,
and the gap to SGD is reported with its standard error (paired by seed:
both methods see the same data, noise and initialisation).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from samkit.experiments.report import write_text_atomic
from samkit.experiments.study import MethodSpec, StudyConfig, run_study
from samkit.experiments.trainer import TrainConfig

SETTINGS = {
    "clean": {"noise": 0.0, "rhos": (0.05,)},
    "noise40": {"noise": 0.4, "rhos": (0.1,)},
}


def study_for(
    noise: float, rhos: tuple[float, ...], seeds: list[int], epochs: int, lr: float
) -> StudyConfig:
    methods = [MethodSpec("sgd", lr=lr)] + [
        MethodSpec("sam", label=f"sam(rho={r:g})", lr=lr, options={"rho": r}) for r in rhos
    ]
    return StudyConfig(
        methods=methods,
        seeds=seeds,
        dataset="mnist1d",
        model="cnn",
        noise=noise,
        val_fraction=0.1,
        train=TrainConfig(epochs=epochs, batch_size=100, schedule="cosine", eval_every=10),
        sharpness=False,
    )


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(name: str, study: StudyConfig, records: list[dict]) -> tuple[str, dict]:
    by: dict[str, dict[int, dict]] = {}
    for r in records:
        by.setdefault(r["label"], {})[r["seed"]] = r
    sgd = by["sgd"]
    sams = [m.label for m in study.methods if m.method == "sam"]
    best = max(
        sams, key=lambda lab: statistics.fmean(r["final"]["val_acc"] for r in by[lab].values())
    )
    lines = [
        f"**{name}** (label noise {study.noise:.0%}, {len(study.seeds)} seeds, {study.train.epochs} epochs)",
        "",
        "| method | test acc % (mean +- std) | val acc % | SAM - SGD (points, +- s.e., paired) | s/epoch |",
        "|---|---|---|---|---|",
    ]
    verdict = {}
    for m in study.methods:
        rs = by[m.label]
        acc = [100 * rs[s]["final"]["test_acc"] for s in study.seeds]
        val = [100 * rs[s]["final"]["val_acc"] for s in study.seeds]
        mean, sd = _mean_sd(acc)
        gap = ""
        if m.label != "sgd":
            d = [
                100 * (rs[s]["final"]["test_acc"] - sgd[s]["final"]["test_acc"])
                for s in study.seeds
            ]
            dm, dsd = _mean_sd(d)
            se = dsd / math.sqrt(len(d))
            gap = f"{dm:+.2f} +- {se:.2f}"
            if m.label == best:
                # unpaired s.e. of the difference of means too, the stricter reading
                sgd_acc = [100 * sgd[s]["final"]["test_acc"] for s in study.seeds]
                se_unpaired = math.sqrt(sd**2 / len(acc) + _mean_sd(sgd_acc)[1] ** 2 / len(sgd_acc))
                verdict = {
                    "best": m.label,
                    "mean": mean,
                    "gap": dm,
                    "se_paired": se,
                    "se_unpaired": se_unpaired,
                }
        tpe = statistics.fmean(rs[s]["time_per_epoch"] for s in study.seeds)
        mark = " (best by val)" if m.label == best else ""
        lines.append(
            f"| {m.label}{mark} | {mean:.2f} +- {sd:.2f} | {statistics.fmean(val):.2f} | {gap} | {tpe:.2f} |"
        )
    return "\n".join(lines), verdict


def finished(study: StudyConfig, folder: Path) -> list[dict]:
    """Records of the study's runs that finished with the study's settings."""
    import json

    from samkit.experiments.study import _normalise, _run_config, run_key

    out = []
    for m in study.methods:
        for seed in study.seeds:
            path = folder / "runs" / f"{run_key(m.label, seed)}.json"
            if path.is_file():
                rec = json.loads(path.read_text())
                if rec.get("config") == _normalise(_run_config(study, m, seed)):
                    out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--settings", default="clean,noise40", help="which of: clean, noise40")
    p.add_argument(
        "--rho-clean", default="0.05", help="SAM rho values, clean labels (comma-separated)"
    )
    p.add_argument(
        "--rho-noise", default="0.1", help="SAM rho values, 40 %% noise (comma-separated)"
    )
    p.add_argument("--out", default="samkit-runs/accuracy")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing; tabulate the seeds whose runs have all finished",
    )
    args = p.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    for s in names:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r} (choose from {', '.join(SETTINGS)})")
    seeds = list(range(args.seeds))
    rhos = {"clean": args.rho_clean, "noise40": args.rho_noise}
    rhos = {k: tuple(float(x) for x in v.split(",") if x) for k, v in rhos.items()}
    studies = {
        s: study_for(SETTINGS[s]["noise"], rhos[s], seeds, args.epochs, args.lr) for s in names
    }
    out = Path(args.out)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    # seed by seed, both settings, so partial results cover both early on
    for seed in seeds if not args.report_only else ():
        for s, st in studies.items():
            sub = StudyConfig(**{**st.__dict__, "seeds": [seed]})
            run_study(sub, out / s, progress=False, log=log)
    parts = [
        "Command: `OMP_NUM_THREADS=1 python benchmarks/accuracy.py "
        f"--seeds {args.seeds} --epochs {args.epochs} --lr {args.lr:g} "
        f"--rho-clean {args.rho_clean} --rho-noise {args.rho_noise}`",
        "",
        "Seeds tabulated: those whose runs have all finished.",
        "",
    ]
    for s, st in studies.items():
        records = finished(st, out / s)
        done = sorted({r["seed"] for r in records})
        done = [
            d
            for d in done
            if all(
                any(r["seed"] == d and r["label"] == m.label for r in records) for m in st.methods
            )
        ]
        if not done:
            continue
        st = StudyConfig(**{**st.__dict__, "seeds": done})
        md, v = table(s, st, [r for r in records if r["seed"] in done])
        parts += [md, ""]
        if v:
            z = v["gap"] / v["se_unpaired"] if v["se_unpaired"] > 0 else math.inf
            parts.append(
                f"Best SAM by validation: {v['best']}, {v['mean']:.2f} % mean test accuracy, "
                f"{v['gap']:+.2f} points over SGD (paired s.e. {v['se_paired']:.2f}, "
                f"unpaired s.e. {v['se_unpaired']:.2f}, {z:.1f} unpaired s.e.)."
            )
            parts.append("")
    text = "\n".join(parts)
    write_text_atomic(out / "accuracy.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
