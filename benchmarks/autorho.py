r"""Self-tuning rho (``SAM(base, rho="auto")``) against a tuned grid of fixed radii.

For eight settings, each trained with samkit's training loop
(:mod:`samkit.experiments`) for ``--seeds`` seeds, this trains SAM with each
radius of the 7-value grid ``GRID`` and with every automatic controller of
:mod:`samkit.optim.autorho` (``auto`` three times: with validation reports;
as ``gradient_agreement@plain``, in a loop that reports none; and as
``gradient_agreement@heldback``, in a loop that reports none but whose closure
holds back 10 % of the samples by id, ``opt.hold_back``), and reports per
setting:

* each controller's test accuracy against the **tuned grid**: the radius
  whose mean *validation* accuracy over the seeds is best (what a user gets
  from ``samkit tune``), and against the common default ``rho = 0.05``; the
  differences are paired by seed (same data split, label noise,
  initialisation and batch order), with their standard error;
* its training time relative to SAM with ``rho = 0.05``: the median over
  seeds of the ratio of the two runs' training times (evaluation excluded),
  and, measured interleaved step by step (``--timing``), the ratio of the
  time of one training step, which a shared machine disturbs far less.

The settings (test accuracy of the final model; 10 % of the training set held
out for validation; cosine learning rate; batch 100):

=====================  ========================================  =========  ======
setting                model / data                              base       epochs
=====================  ========================================  =========  ======
``cnn_clean``          MNIST-1D paper CNN, MNIST-1D              SGD 0.1    40
``cnn_noise40``        same, 40 % symmetric label noise          SGD 0.1    40
``gru``                MNIST-1D paper GRU, MNIST-1D              SGD 0.1    30
``mlp_digits_noise20`` MNIST-1D paper MLP, sklearn digits, 20 %  SGD 0.1    60
``resnet_bn``          small ResNet with BatchNorm, MNIST-1D     SGD 0.1    20
``cnn_adam``           MNIST-1D paper CNN, MNIST-1D              Adam 0.01  40
``mlp_digits_noise40`` same MLP, sklearn digits, 40 %            SGD 0.1    60
``gru_short``          MNIST-1D paper GRU, MNIST-1D              SGD 0.1    8
=====================  ========================================  =========  ======

SGD has momentum 0.9 and weight decay 5e-4; Adam betas (0.9, 0.999), no
weight decay. SAM is given ``model=`` (BatchNorm statistics from the first
pass). The validation loss is reported to the optimizer after every epoch
(``opt.observe_validation``), as samkit's trainer does, except in the
``@plain`` and ``@heldback`` runs. A ``@heldback`` run trains on the training
and validation splits together, the validation labels made as noisy as the
training labels (what a user without a validation split has), and holds back
10 % of it: as many samples trained on as the other runs, which hold back the
validation split. ``benchmarks/autorho_signals.py`` records what the gradients
of these settings say per step.

Run (resumable: rerun the same command to continue; ``--settings`` splits the
work between processes)::

    OMP_NUM_THREADS=1 python benchmarks/autorho.py --out samkit-runs/autorho

and ``--report-only`` tabulates the seeds finished so far. Results go to
``<out>/autorho.md``, ``<out>/autorho.json`` and ``<out>/rho_<setting>.png``
(each controller's rho over training).

Calls into samkit.experiments (its public pieces): ``datasets.load_dataset``,
``models.build_model``, ``methods.TrainSpec``, ``methods.make_base_optimizer``,
``methods.SAMMethod``, ``trainer.TrainConfig``, ``trainer.train`` (with
``state_path`` for resuming and a per-epoch callback),
``trainer.seed_everything``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, paired_ratio, time_interleaved, write_json  # noqa: E402

import samkit  # noqa: E402
from samkit._atomic import atomic_open  # noqa: E402
from samkit.experiments.datasets import Split, add_label_noise, load_dataset  # noqa: E402
from samkit.experiments.methods import SAMMethod, TrainSpec, make_base_optimizer  # noqa: E402
from samkit.experiments.models import build_model  # noqa: E402
from samkit.experiments.trainer import TrainConfig, seed_everything, train  # noqa: E402
from samkit.optim import autorho  # noqa: E402

SGD = {"base": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
ADAM = {"base": "adam", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}
SETTINGS: dict[str, dict[str, Any]] = {
    "cnn_clean": {"dataset": "mnist1d", "model": "cnn", "noise": 0.0, "epochs": 40, **SGD},
    "cnn_noise40": {"dataset": "mnist1d", "model": "cnn", "noise": 0.4, "epochs": 40, **SGD},
    "gru": {"dataset": "mnist1d", "model": "gru", "noise": 0.0, "epochs": 30, **SGD},
    "mlp_digits_noise20": {"dataset": "digits", "model": "mlp", "noise": 0.2, "epochs": 60, **SGD},
    "resnet_bn": {"dataset": "mnist1d", "model": "resnet", "noise": 0.0, "epochs": 20, **SGD},
    "cnn_adam": {"dataset": "mnist1d", "model": "cnn", "noise": 0.0, "epochs": 40, **ADAM},
    "mlp_digits_noise40": {"dataset": "digits", "model": "mlp", "noise": 0.4, "epochs": 60, **SGD},
    "gru_short": {"dataset": "mnist1d", "model": "gru", "noise": 0.0, "epochs": 8, **SGD},
}
GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_RHO = 0.05
#: The controllers compared in the full run: "auto" (the default) and LE-SAM. The third,
#: validation_search, fell below rho=0.05 in every setting of the pilot (``--controllers``).
CONTROLLERS = [
    "auto:gradient_agreement",
    "auto:gradient_agreement@plain",
    "auto:gradient_agreement@heldback",
    "auto:validation_plateau",
    "auto:loss_equated",
]
#: The suffix of a run with no validation reports (the plain loop).
PLAIN = "@plain"
#: The suffix of a plain-loop run whose closure holds back 10 % of the samples by id
#: (``opt.hold_back``): no validation reports, the held-back samples' losses instead.
HELD = "@heldback"
#: The share of samples ``@heldback`` runs hold back (``opt.hold_back``'s default).
HELD_FRACTION = 0.1


def _mode(candidate: float | str) -> str:
    """The suffix of a controller's run ("" for a run with validation reports)."""
    if isinstance(candidate, str):
        for suffix in (PLAIN, HELD):
            if candidate.endswith(suffix):
                return suffix
    return ""


def label_of(candidate: float | str) -> str:
    return f"rho={candidate:g}" if isinstance(candidate, float) else candidate


#: Keyword arguments for every controller of the run (``--controller-options``).
OPTIONS: dict[str, Any] = {}


def run_config(setting: str, candidate: float | str, seed: int, epochs: int | None) -> dict:
    s = SETTINGS[setting]
    mode = _mode(candidate)
    cfg = {
        **s,
        "epochs": epochs or s["epochs"],
        "setting": setting,
        "rho": candidate.removesuffix(mode) if mode else candidate,
        "seed": seed,
        "batch_size": 100,
        "val_fraction": 0.1,
    }
    if mode:
        cfg["reports"] = False  # the plain loop: nothing calls observe_validation
    if mode == HELD:
        cfg["held_back"] = HELD_FRACTION
        cfg["train_on"] = "train+val"  # (see _all_labelled)
    if OPTIONS and isinstance(candidate, str):
        cfg["controller_options"] = dict(OPTIONS)
    return cfg


def label_cfg(cfg: dict) -> str:
    options = cfg.get("controller_options")
    tag = "".join(f"[{k}={v}]" for k, v in sorted(options.items())) if options else ""
    mode = (HELD if "held_back" in cfg else PLAIN) if cfg.get("reports") is False else ""
    return label_of(cfg["rho"]) + tag + mode


def make_rho(cfg: dict) -> float | str | autorho.AutoRho:
    """The run's ``rho``: a number, a controller's name, or the controller built with options."""
    options = cfg.get("controller_options")
    if not options:
        return cfg["rho"]
    return autorho.CONTROLLERS[cfg["rho"].split(":")[1]](**options)


class _Reporter:
    """Reports each epoch's validation loss to the optimizer, once per step count.

    samkit's trainer may call ``observe_validation`` itself; whichever comes
    first is kept, so a loss is never counted twice.
    """

    def __init__(self, opt: samkit.SAM) -> None:
        self.opt = opt
        self.last_step = -1
        self.observe = opt.observe_validation
        opt.observe_validation = self  # type: ignore[method-assign]

    def __call__(self, loss: float) -> None:
        if self.opt.steps != self.last_step:
            self.last_step = self.opt.steps
            self.observe(loss)

    def callback(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            self(record["val_loss"])
        # the record is the history entry the trainer keeps (and saves for resuming)
        record["rho"] = float(self.opt.param_groups[0][self.opt.rho_key])


class _HeldBackSAM(SAMMethod):
    """samkit's SAM step with a closure that holds back a share of the samples by id."""

    def __init__(self, opt: samkit.SAM, fraction: float) -> None:
        super().__init__(opt, "sam")
        self.fraction = fraction

    def step(self, model, x, y, idx, loss_fn):
        opt: samkit.SAM = self.optimizer  # type: ignore[assignment]

        def closure() -> torch.Tensor:
            loss = opt.hold_back(loss_fn(self.forward(model, x), y), idx, self.fraction)
            self.backward(loss)
            self.passes += 1.0
            return loss

        loss = opt.step(closure)
        opt.zero_grad(set_to_none=True)
        return loss.detach()


def build(cfg: dict) -> tuple[torch.nn.Module, samkit.SAM, Any]:
    data = load_dataset(cfg["dataset"], seed=cfg["seed"], noise=cfg["noise"], val_fraction=0.1)
    seed_everything(cfg["seed"])
    model = build_model(cfg["model"], in_len=data.in_len, num_classes=data.num_classes)
    spec = TrainSpec(
        base=cfg["base"], lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    opt = samkit.SAM(make_base_optimizer(model.parameters(), spec), rho=make_rho(cfg), model=model)
    return model, opt, data


def _all_labelled(data: Any, noise: float, seed: int) -> Any:
    """The data a user without a validation split trains on: the training and validation
    splits together (the validation labels as noisy as the training labels), so that a
    ``@heldback`` run, which holds back 10 % of it, trains on as many samples as the grid's
    runs, which hold back the validation split."""
    val_y = add_label_noise(data.val.y, noise, data.num_classes, seed=seed + 7919)
    union = Split(torch.cat([data.train.x, data.val.x]), torch.cat([data.train.y, val_y]))
    return dataclasses.replace(data, train=union)


def train_one(cfg: dict, folder: Path) -> dict:
    key = f"{label_cfg(cfg)}-seed{cfg['seed']}".replace(":", "_")
    result_path = folder / f"{key}.json"
    if result_path.is_file():
        rec = json.loads(result_path.read_text())
        if rec.get("config") == cfg:
            return rec
    folder.mkdir(parents=True, exist_ok=True)
    model, opt, data = build(cfg)
    reporter = _Reporter(opt)
    if cfg.get("reports") is False:
        reporter.observe = lambda loss: None  # the trainer's own reports go nowhere too
    held = cfg.get("held_back")
    if held is not None:
        data = _all_labelled(data, cfg["noise"], cfg["seed"])
    result = train(
        model,
        SAMMethod(opt, "sam") if held is None else _HeldBackSAM(opt, held),
        data,
        TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"], schedule="cosine"),
        seed=cfg["seed"],
        state_path=folder / f"{key}.state.pt",
        state_tag=cfg,  # a state left by this run under other settings is not resumed
        callbacks=[reporter.callback],
        progress=False,
    )
    rec = {
        "config": cfg,
        "final": {k: result.final.get(k) for k in ("test_acc", "val_acc", "val_loss", "train_acc")},
        "train_time": result.train_time,
        "diverged": result.diverged,
        "rho": [h.get("rho") for h in result.history],
        "val_loss": [h.get("val_loss") for h in result.history],
    }
    with atomic_open(result_path, "w") as fh:
        json.dump(rec, fh)
    (folder / f"{key}.state.pt").unlink(missing_ok=True)
    return rec


# ------------------------------------------------------------------ timing
#: The timing's second reference, for the held-back loop: SAM at rho=0.05 whose closure takes
#: the mean of per-sample losses (``reduction="none"``), as the held-back loop computes them.
PER_SAMPLE = "rho=0.05, per-sample losses"


def time_steps(setting: str, candidates: list[str], trials: int, steps: int) -> dict[str, float]:
    """Median over rounds of (step time of a candidate) / (step time of SAM rho=0.05); for a
    held-back candidate also ``<name> / per-sample``: against SAM at 0.05 whose closure takes
    the mean of the same per-sample losses (what ``hold_back`` and the controller add to a
    loop that computes them)."""
    cfg0 = run_config(setting, DEFAULT_RHO, 0, None)
    data = load_dataset(cfg0["dataset"], seed=0, noise=cfg0["noise"], val_fraction=0.1)
    loss_fn = torch.nn.functional.cross_entropy
    runs = {}
    held_any = any(_mode(c) == HELD for c in candidates)
    for candidate in [DEFAULT_RHO, *([PER_SAMPLE] if held_any else []), *candidates]:
        held = _mode(candidate) == HELD
        per_sample = held or candidate == PER_SAMPLE
        rho = (
            DEFAULT_RHO
            if candidate == PER_SAMPLE
            else run_config(setting, candidate, 0, None)["rho"]
        )
        model, opt, _ = build({**cfg0, "rho": rho})
        state = {"i": 0}

        def step(model=model, opt=opt, state=state, held=held, per_sample=per_sample) -> None:
            n = len(data.train)
            start = (state["i"] * 100) % (n - 100)
            state["i"] += 1
            x, y = data.train.x[start : start + 100], data.train.y[start : start + 100]
            ids = torch.arange(start, start + 100)

            def closure() -> torch.Tensor:
                if held:  # one loss per sample, 10 % held back by id
                    loss = opt.hold_back(loss_fn(model(x), y, reduction="none"), ids)
                elif per_sample:
                    loss = loss_fn(model(x), y, reduction="none").mean()
                else:
                    loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()
            if state["i"] % 36 == 0:  # an epoch's worth: a validation report, as in training
                opt.observe_validation(1.0 / state["i"])

        runs[label_of(candidate)] = (step, None)
    samples = time_interleaved(runs, trials=trials, number=steps, warmup=60)
    base = samples[label_of(DEFAULT_RHO)]
    ratios = {name: paired_ratio(s, base) for name, s in samples.items() if name != "rho=0.05"}
    for name in [c for c in samples if _mode(c) == HELD]:
        ratios[f"{name} / per-sample"] = paired_ratio(samples[name], samples[PER_SAMPLE])
    return ratios


# ------------------------------------------------------------------ report
def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(setting: str, records: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    def acc(label: str, split: str = "test_acc") -> list[float]:
        return [100 * records[label][s]["final"][split] for s in seeds]

    grid = [label_of(r) for r in GRID]
    tuned = max(grid, key=lambda lab: statistics.fmean(acc(lab, "val_acc")))
    out: dict[str, Any] = {"setting": setting, "seeds": seeds, "tuned": tuned, "methods": {}}
    for label in grid + [c for c in CONTROLLERS if c in records]:
        test = acc(label)
        m, sd = _mean_sd(test)
        entry = {"test": m, "test_sd": sd, "val": statistics.fmean(acc(label, "val_acc"))}
        for ref_name, ref in (("vs_tuned", tuned), ("vs_default", "rho=0.05")):
            d = [a - b for a, b in zip(test, acc(ref))]
            dm, dsd = _mean_sd(d)
            entry[ref_name] = dm
            entry[ref_name + "_se"] = dsd / math.sqrt(len(d))
        ratios = [
            records[label][s]["train_time"] / records["rho=0.05"][s]["train_time"] for s in seeds
        ]
        entry["time_ratio"] = statistics.median(ratios)
        entry["time_ratio_range"] = (min(ratios), max(ratios))
        rhos = [records[label][s]["rho"] for s in seeds]
        entry["final_rho"] = statistics.median(r[-1] for r in rhos if r and r[-1] is not None)
        out["methods"][label] = entry
    return out


def markdown(summaries: list[dict], step_ratios: dict[str, dict[str, float]], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    lines += [
        "Test accuracy % (mean over seeds); differences in points, paired by seed, +- standard error.",
        "Tuned = the grid radius with the best mean validation accuracy.",
        "",
        "| setting | seeds | tuned grid (rho) | rho=0.05 | "
        + " | ".join(f"{c} (vs tuned)" for c in CONTROLLERS)
        + " |",
        "|---|---|---|---|" + "---|" * len(CONTROLLERS),
    ]
    for s in summaries:
        ms = s["methods"]
        t = ms[s["tuned"]]
        cells = [
            s["setting"],
            str(len(s["seeds"])),
            f"{t['test']:.2f} ({s['tuned'][4:]})",
            f"{ms['rho=0.05']['test']:.2f}",
        ]
        for c in CONTROLLERS:
            if c in ms:
                cells.append(
                    f"{ms[c]['test']:.2f} ({ms[c]['vs_tuned']:+.2f} +- {ms[c]['vs_tuned_se']:.2f})"
                )
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Time relative to SAM with rho=0.05 (median over seeds of the run-time ratio, "
        "its range over seeds in parentheses; interleaved per-step ratio in brackets "
        "where measured; for the held-back loop also against SAM at 0.05 taking the mean of "
        "the same per-sample losses):",
        "",
    ]
    lines += ["| setting | " + " | ".join(CONTROLLERS) + " |", "|---|" + "---|" * len(CONTROLLERS)]
    for s in summaries:
        cells = [s["setting"]]
        for c in CONTROLLERS:
            m = s["methods"].get(c)
            if m is None:
                cells.append("-")
                continue
            ratios = step_ratios.get(s["setting"], {})
            step = ratios.get(c.removesuffix(PLAIN))
            lo, hi = m["time_ratio_range"]
            per_sample = ratios.get(f"{c} / per-sample")  # (held back: vs the same losses)
            cells.append(
                f"{m['time_ratio']:.2f} ({lo:.2f}-{hi:.2f})"
                + (f" [{step:.3f}" if step else "")
                + (f"; {per_sample:.3f} vs per-sample" if step and per_sample else "")
                + ("]" if step else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every radius, per setting (test % mean +- sd; val %; final rho of the controllers):",
        "",
    ]
    for s in summaries:
        lines.append(
            f"**{s['setting']}**: "
            + "; ".join(
                f"{lab} {m['test']:.2f}+-{m['test_sd']:.2f} (val {m['val']:.2f}"
                + (f", rho_T {m['final_rho']:.3g}" if lab.startswith("auto") else "")
                + ")"
                for lab, m in s["methods"].items()
            )
        )
        lines.append("")
    return "\n".join(lines)


def plot_rho(setting: str, records: dict[str, dict[int, dict]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, c in enumerate(CONTROLLERS):
        for j, rec in enumerate(records.get(c, {}).values()):
            r = [v for v in rec["rho"] if v is not None]
            ax.plot(range(1, len(r) + 1), r, color=f"C{i}", alpha=0.6, label=c if j == 0 else None)
    for r in GRID:
        ax.axhline(r, color="grey", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("rho at the end of the epoch")
    ax.set_title(setting)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out / f".rho_{setting}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out / f"rho_{setting}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS)
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="override every setting's epochs (quick runs)"
    )
    p.add_argument("--out", default="samkit-runs/autorho")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing; tabulate finished seeds"
    )
    p.add_argument(
        "--controllers",
        default=",".join(c.split(":")[1] for c in CONTROLLERS),
        help="comma-separated, of: "
        + ", ".join(autorho.CONTROLLERS)
        + f"; NAME{PLAIN} trains it in a loop that reports no validation loss, NAME{HELD} in "
        "one whose closure holds back 10 %% of the samples by id (opt.hold_back)",
    )
    p.add_argument(
        "--only-controllers",
        action="store_true",
        help="train the controllers' runs only (to add one to a finished grid, in a process of its own)",
    )
    p.add_argument(
        "--controller-options",
        default="",
        metavar="JSON",
        help='keyword arguments for the controllers, e.g. \'{"warmup": 20, "rate": 0.03}\' '
        "(their runs are kept apart from the defaults'; the grid is shared)",
    )
    p.add_argument("--timing", action="store_true", help="also time training steps interleaved")
    p.add_argument("--timing-trials", type=int, default=15)
    args = p.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    for s in names:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r} (choose from {', '.join(SETTINGS)})")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    chosen = [c for c in args.controllers.split(",") if c]
    for c in chosen:
        if c.removesuffix(_mode(c)) not in autorho.CONTROLLERS:
            p.error(f"unknown controller {c!r} (choose from {', '.join(autorho.CONTROLLERS)})")
    CONTROLLERS[:] = [f"auto:{c}" for c in chosen]
    if args.controller_options:
        try:
            options = json.loads(args.controller_options)
            if not isinstance(options, dict):
                raise ValueError("not a JSON object")
            for c in chosen:
                autorho.CONTROLLERS[c.removesuffix(_mode(c))](**options)
        except (ValueError, TypeError) as exc:
            p.error(f"--controller-options: {exc}")
        OPTIONS.update(options)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    seeds = list(range(args.seeds))
    candidates: list[float | str] = [*GRID, *CONTROLLERS]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    trained = CONTROLLERS if args.only_controllers else candidates
    jobs = [(seed, s, c) for seed in seeds for s in names for c in trained]
    if not args.report_only:
        from tqdm.auto import tqdm

        bar = tqdm(jobs, desc="autorho runs", unit="run", mininterval=30, file=sys.stderr)
        for seed, s, c in bar:
            t0 = time.perf_counter()
            rec = train_one(run_config(s, c, seed, args.epochs), out / s)
            bar.set_postfix_str(f"{s} {label_of(c)} seed {seed}")
            if time.perf_counter() - t0 > 1:
                log(
                    f"{s} {label_of(c)} seed {seed}: test {100 * rec['final']['test_acc']:.2f} % "
                    f"rho_T {rec['rho'][-1]:.3g} ({rec['train_time']:.0f} s)"
                )

    summaries, records_all = [], {}
    for s in names:
        records: dict[str, dict[int, dict]] = {}
        for c in candidates:
            for seed in seeds:
                cfg = run_config(s, c, seed, args.epochs)
                path = out / s / f"{label_cfg(cfg)}-seed{seed}.json".replace(":", "_")
                if path.is_file():
                    rec = json.loads(path.read_text())
                    if rec.get("config") == cfg:
                        records.setdefault(label_of(c), {})[seed] = rec
        done = [sd for sd in seeds if all(sd in records.get(label_of(c), {}) for c in candidates)]
        if not done:
            continue
        summaries.append(summarise(s, records, done))
        records_all[s] = records
        plot_rho(s, records, out)
    step_ratios: dict[str, dict[str, float]] = {}
    if args.timing:
        for s in names:
            log(f"timing {s} ...")
            timed = list(dict.fromkeys(c.removesuffix(PLAIN) for c in CONTROLLERS))
            step_ratios[s] = time_steps(s, timed, args.timing_trials, 12)
    command = "OMP_NUM_THREADS=1 python benchmarks/autorho.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    text = markdown(summaries, step_ratios, command.strip())
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "autorho.md", "w") as fh:
        fh.write(text + "\n")
    write_json(
        str(out / "autorho.json"),
        {"summaries": summaries, "step_ratios": step_ratios, "environment": environment()},
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
