r"""What a training loop's gradients say about the radius it needs: three per-step signals.

``rho="auto"`` without validation reports learns from gradients alone. Its
no-report misses in ``benchmarks/autorho.py`` (the noisy digits MLPs, whose
tuned radius is 0.5, and the 8-epoch GRU, 0.01) ask whether any signal every
SAM step has for free separates the problems that want a large radius from
those that want a small one. This records three, per step, for SAM at fixed
radii on the settings of ``benchmarks/autorho.py`` (one seed; the same data,
split, schedule and initialisation):

* ``agree``: :math:`\cos(g_t, g_{t+1})`, two successive batches' gradients at
  their own weights: the signal ``GradientAgreement`` integrates;
* ``transfer``: :math:`\cos(g^+_t, g_{t+1}) - \cos(g_t, g_{t+1})`, whether
  SAM's direction (the gradient at :math:`w + e`) serves the next batch better
  than the plain gradient (a one-step, next-batch stand-in for a validation
  hypergradient);
* ``ratio``: :math:`\|g^+_t - g_t\| / \|g_t\|`, how far the ascent moves the
  gradient (:math:`\approx \rho \|H \hat g\| / \|g\|`: the radius against the
  curvature along the gradient; a trust-region ratio).

Each is averaged over windows of training (fractions of the steps) and
tabulated, one row per run; a plot shows each over training. Full gradients
are read (exact, not the controller's sketch), so the models are small.

Run (about 8 minutes, one process on this 2-core CPU; resumable, each run is saved when done)::

    OMP_NUM_THREADS=1 python benchmarks/autorho_signals.py --out samkit-runs/autorho-signals

``--runs SETTING@RHO,...`` picks the runs (default: each setting at 0.05 and
at its tuned radius, plus a radius where it loses). Results go to
``<out>/signals.md``, ``<out>/signals.json`` and ``<out>/signals.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import autorho as bench  # noqa: E402
from _common import write_json  # noqa: E402

from samkit._atomic import atomic_open  # noqa: E402
from samkit.experiments.methods import SAMMethod  # noqa: E402
from samkit.experiments.trainer import TrainConfig, train  # noqa: E402

#: Each setting at 0.05, at its tuned radius (benchmarks/autorho.py, 5 seeds) and at one
#: where it loses at least 2 points.
RUNS = (
    "cnn_clean@0.05,cnn_clean@0.5,"
    "cnn_noise40@0.05,cnn_noise40@0.2,"
    "gru@0.05,gru@0.2,"
    "gru_short@0.01,gru_short@0.05,"
    "mlp_digits_noise20@0.05,mlp_digits_noise20@0.5,"
    "mlp_digits_noise40@0.05,mlp_digits_noise40@0.5,"
    "resnet_bn@0.1,resnet_bn@1,"
    "cnn_adam@0.05,cnn_adam@0.5"
)
#: Window edges, as fractions of the run's steps.
WINDOWS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0)
SIGNALS = ("agree", "transfer", "ratio")


def parse_runs(text: str) -> list[tuple[str, float]]:
    """``SETTING@RHO,...`` -> [(setting, rho)]; ValueError naming what is wrong."""
    runs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        setting, sep, rho_text = item.partition("@")
        if setting not in bench.SETTINGS:
            raise ValueError(
                f"unknown setting {setting!r} (choose from {', '.join(bench.SETTINGS)})"
            )
        try:
            rho = float(rho_text) if sep else math.nan
        except ValueError:
            rho = math.nan
        if not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"{item!r}: need SETTING@RHO with a radius > 0")
        runs.append((setting, rho))
    if not runs:
        raise ValueError("no run given")
    return runs


def record(setting: str, rho: float, seed: int, epochs: int | None) -> dict[str, Any]:
    """Train SAM at a fixed ``rho`` and record the three signals at every step."""
    cfg = bench.run_config(setting, rho, seed, epochs)
    model, opt, data = bench.build(cfg)
    params = list(model.parameters())
    out: dict[str, list[float]] = {"agree": [], "sam_agree": [], "ratio": []}
    held: dict[str, torch.Tensor] = {}

    def flat() -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).double()

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        den = float(a.norm() * b.norm())
        return float(a @ b) / den if den > 0 else 0.0

    first_step, second_step = opt.first_step, opt.second_step

    def first(*args: Any, **kwargs: Any) -> Any:
        g = flat()  # the first pass's gradient at w_t
        if "g" in held:
            out["agree"].append(cos(held["g"], g))
            out["sam_agree"].append(cos(held["g_plus"], g))
        held["g"] = g
        return first_step(*args, **kwargs)

    def second(*args: Any, **kwargs: Any) -> Any:
        g_plus = flat()  # the gradient at w_t + e, before the weights are restored
        out["ratio"].append(float((g_plus - held["g"]).norm() / held["g"].norm().clamp_min(1e-30)))
        held["g_plus"] = g_plus
        return second_step(*args, **kwargs)

    # SAM.step calls first_step and second_step: wrapping them on the instance sees every step
    opt.first_step, opt.second_step = first, second  # type: ignore[method-assign]
    result = train(
        model,
        SAMMethod(opt, "sam"),
        data,
        TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"], schedule="cosine"),
        seed=seed,
        progress=False,
    )
    transfer = [s - a for s, a in zip(out["sam_agree"], out["agree"])]
    return {
        "config": cfg,
        "test_acc": result.final.get("test_acc"),
        "steps": len(out["ratio"]),
        "agree": out["agree"],
        "transfer": transfer,
        "ratio": out["ratio"],
    }


def windows(values: list[float]) -> list[float | None]:
    n = len(values)
    means: list[float | None] = []
    for lo, hi in zip(WINDOWS, WINDOWS[1:]):
        part = values[int(lo * n) : max(int(hi * n), int(lo * n) + 1)]
        means.append(sum(part) / len(part) if part else None)
    return means


def markdown(records: dict[str, dict[str, Any]], command: str) -> str:
    edges = [f"{100 * lo:g}-{100 * hi:g} %" for lo, hi in zip(WINDOWS, WINDOWS[1:])]
    lines = [f"Command: `{command}`", ""]
    for signal, title, scale in (
        ("agree", "agree: cos(g_t, g_t+1), successive batches", 1.0),
        ("transfer", "transfer: cos(g+_t, g_t+1) - cos(g_t, g_t+1), x 100", 100.0),
        ("ratio", "ratio: ||g+_t - g_t|| / ||g_t||", 1.0),
    ):
        lines += [f"**{title}** (means over windows of training)", ""]
        lines += ["| run | test % | " + " | ".join(edges) + " |", "|---|---|" + "---|" * len(edges)]
        for key, rec in records.items():
            cells = [f"{v * scale:+.2f}" if v is not None else "-" for v in windows(rec[signal])]
            lines.append(f"| {key} | {100 * rec['test_acc']:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(records: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    settings = sorted({rec["config"]["setting"] for rec in records.values()})
    for key, rec in records.items():
        colour = f"C{settings.index(rec['config']['setting']) % 10}"
        style = "-" if rec["config"]["rho"] == 0.05 else "--"
        for ax, signal in zip(axes, SIGNALS):
            values = rec[signal]
            width = max(1, len(values) // 40)  # a moving average over 2.5 % of the run
            smooth = [
                sum(values[i : i + width]) / width for i in range(0, len(values) - width + 1, width)
            ]
            x = [(i + 0.5) / len(smooth) for i in range(len(smooth))]
            ax.plot(x, smooth, style, color=colour, lw=1, label=key)
    for ax, signal in zip(axes, SIGNALS):
        ax.set_title(signal)
        ax.set_xlabel("fraction of training")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--runs", default=RUNS, help="comma-separated SETTING@RHO (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the settings' epochs")
    p.add_argument("--out", default="samkit-runs/autorho-signals")
    args = p.parse_args(argv)
    try:
        runs = parse_runs(args.runs)
    except ValueError as exc:
        p.error(f"--runs: {exc}")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    for i, (setting, rho) in enumerate(runs):
        key = f"{setting}@{rho:g}"
        path = out / f"{key}-seed{args.seed}.json"
        cfg = bench.run_config(setting, rho, args.seed, args.epochs)
        rec = json.loads(path.read_text()) if path.is_file() else None
        if rec is None or rec.get("config") != cfg:
            rec = record(setting, rho, args.seed, args.epochs)
            with atomic_open(path, "w") as fh:
                json.dump(rec, fh)
        print(
            f"[{i + 1}/{len(runs)}] {key}: test {100 * rec['test_acc']:.1f} %, {rec['steps']} steps",
            file=sys.stderr,
            flush=True,
        )
        records[key] = rec
    command = "python benchmarks/autorho_signals.py " + " ".join(argv or sys.argv[1:])
    text = markdown(records, command.strip())
    with atomic_open(out / "signals.md", "w") as fh:
        fh.write(text + "\n")
    summary = {k: {s: windows(r[s]) for s in SIGNALS} for k, r in records.items()}
    write_json(str(out / "signals.json"), {"windows": WINDOWS, "runs": summary})
    plot(records, out / "signals.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
