"""Tables, plots and the self-contained HTML report of a study.

* :func:`format_table` renders the summary (from
  :func:`samkit.experiments.study.summarize`) as plain text, and
  :func:`print_table` prints it with ``rich`` on a terminal.
* :func:`write_report` writes ``report.html`` with the plots embedded as
  base64 PNGs (matplotlib, Agg backend): learning curves, test accuracy with
  error bars (standard error over seeds), accuracy against cost, and the 1-D
  loss interpolation between the SGD and SAM solutions when it was measured.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import sys
from typing import Any

from .._atomic import write_text_atomic

__all__ = [
    "table_columns",
    "format_table",
    "print_table",
    "write_report",
    "plot_pngs",
    "write_text_atomic",
]


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def table_columns(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(header, cells) per column; sharpness columns only where measured."""
    cols = [
        ("method", [r["label"] for r in rows]),
        ("seeds", [str(r["n"]) for r in rows]),
        (
            "test acc % (mean +- std)",
            [
                f"{_fmt(100 * r['test_acc_mean'], '.2f')} +- {_fmt(100 * r['test_acc_std'], '.2f')}"
                for r in rows
            ],
        ),
        ("train loss", [_fmt(r["train_loss_mean"], ".4f") for r in rows]),
        ("s/epoch", [_fmt(r["time_per_epoch"], ".3f") for r in rows]),
        ("cost vs SGD (time)", [_fmt(r["cost_time"], ".2f") + "x" for r in rows]),
        ("cost vs SGD (passes)", [_fmt(r["cost_passes"], ".2f") + "x" for r in rows]),
    ]
    for key, head, spec in (
        ("hessian_top_eig", "top eig", ".3g"),
        ("hessian_trace", "trace", ".3g"),
        ("worst_case_sharpness", "worst-case", ".3g"),
    ):
        if any(key in r for r in rows):
            cols.append((head, [_fmt(r.get(key), spec) for r in rows]))
    return cols


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned plain-text table."""
    cols = table_columns(rows)
    widths = [max(len(h), *(len(c) for c in cells)) if cells else len(h) for h, cells in cols]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, ((h, _), w) in enumerate(zip(cols, widths))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for j in range(len(rows)):
        lines.append(
            "  ".join(
                c[j].ljust(w) if i == 0 else c[j].rjust(w)
                for i, ((_, c), w) in enumerate(zip(cols, widths))
            )
        )
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], *, title: str = "", file: Any = None) -> None:
    """Print with rich on a terminal, else as plain text."""
    file = file or sys.stdout
    if getattr(file, "isatty", lambda: False)():
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title or None)
            for i, (h, _) in enumerate(table_columns(rows)):
                table.add_column(h, justify="left" if i == 0 else "right")
            cols = table_columns(rows)
            for j in range(len(rows)):
                table.add_row(*(c[j] for _, c in cols))
            Console(file=file).print(table)
            return
        except ImportError:  # pragma: no cover
            pass
    if title:
        print(title, file=file)
    print(format_table(rows), file=file)


# ------------------------------------------------------------------- plots
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curves(
    records: list[dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    labels: list[str],
    key: str,
):
    """Per label: epochs and the mean of ``key`` over seeds (over the epochs all seeds reached)."""
    out = {}
    for label in labels:
        hs = [
            histories[r["key"]] for r in records if r["label"] == label and histories.get(r["key"])
        ]
        if not hs:
            continue
        n = min(len(h) for h in hs)
        pts = [(i + 1, sum(h[i].get(key, math.nan) for h in hs) / len(hs)) for i in range(n)]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]  # epochs without evaluation
        out[label] = ([x for x, _ in pts], [y for _, y in pts])
    return out


def plot_pngs(
    rows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    interpolation: dict[str, Any] | None = None,
    tune: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The report's figures as base64 PNGs, by name."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    figs: dict[str, str] = {}

    if histories:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, (xs, ys) in _curves(records, histories, labels, "train_loss").items():
            axes[0].plot(xs, ys, label=label)
        for label, (xs, ys) in _curves(records, histories, labels, "test_acc").items():
            axes[1].plot(xs, [100 * y for y in ys], label=label)
        axes[0].set(
            xlabel="epoch",
            ylabel="train loss (mean over seeds)",
            yscale="log",
            title="Training loss",
        )
        axes[1].set(xlabel="epoch", ylabel="test accuracy %", title="Test accuracy")
        axes[1].legend(fontsize=8)
        figs["curves"] = _png(fig)

    if rows:
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 4))
        means = [100 * r["test_acc_mean"] for r in rows]
        errs = [100 * (r["test_acc_sem"] if math.isfinite(r["test_acc_sem"]) else 0) for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        for i, r in enumerate(records_by(records, labels)):
            ax.scatter([i] * len(r), [100 * v for v in r], color="k", s=8, zorder=3)
        lo = min(means) - 3 * max(errs + [1.0]) - 2
        ax.set_ylim(max(0, lo), min(100, max(m + e for m, e in zip(means, errs)) + 2))
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        ax.set(
            ylabel="test accuracy %",
            title="Test accuracy (mean, error bar = std. error, dots = seeds)",
        )
        figs["accuracy"] = _png(fig)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, key, what in (
            (axes[0], "cost_time", "time per epoch"),
            (axes[1], "cost_passes", "passes per step"),
        ):
            for r in rows:
                ax.errorbar(
                    r[key],
                    100 * r["test_acc_mean"],
                    yerr=100 * r["test_acc_sem"],
                    fmt="o",
                    capsize=3,
                )
                ax.annotate(
                    r["label"],
                    (r[key], 100 * r["test_acc_mean"]),
                    fontsize=8,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            ax.set(xlabel=f"cost relative to SGD ({what})", title=f"Accuracy vs cost ({what})")
        axes[0].set_ylabel("test accuracy %")
        figs["cost"] = _png(fig)

    if interpolation and interpolation.get("alphas"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(interpolation["alphas"], interpolation["losses"], marker=".")
        ax.set(
            xlabel=f"alpha  (0 = {interpolation['a']}, 1 = {interpolation['b']})",
            ylabel="training loss",
            title="Loss along the straight line between the two solutions",
        )
        figs["interpolation"] = _png(fig)

    if tune and tune.get("trials"):
        fig, ax = plt.subplots(figsize=(6, 4))
        trials = [t for t in tune["trials"] if t.get("value") is not None]
        sc = ax.scatter(
            [t["params"]["rho"] for t in trials],
            [100 * t["value"] for t in trials],
            c=[t["params"].get("lr", 0) for t in trials]
            if any("lr" in t["params"] for t in trials)
            else None,
        )
        if any("lr" in t["params"] for t in trials):
            fig.colorbar(sc, label="lr")
        ax.axvline(
            tune["best"]["rho"],
            color="tab:red",
            ls="--",
            label=f"recommended rho = {tune['best']['rho']:.3g}",
        )
        ax.set(
            xscale="log",
            xlabel="rho",
            ylabel="validation accuracy %",
            title="Validation accuracy vs rho",
        )
        ax.legend()
        figs["tune"] = _png(fig)
    return figs


def records_by(records: list[dict[str, Any]], labels: list[str]) -> list[list[float]]:
    return [
        [r["final"].get("test_acc", float("nan")) for r in records if r["label"] == lab]
        for lab in labels
    ]


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}
"""


def write_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    rows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    settings: dict[str, Any],
    interpolation: dict[str, Any] | None = None,
    tune: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> None:
    """Write a self-contained HTML report (atomically)."""
    cols = table_columns(rows) if rows else []
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c[j])}</td>" for _, c in cols) + "</tr>"
        for j in range(len(rows))
    )
    figs = plot_pngs(rows, records, histories, interpolation, tune)
    captions = {
        "curves": "Learning curves (mean over seeds).",
        "accuracy": "Final test accuracy per method.",
        "cost": "Accuracy against cost relative to SGD: wall time per epoch, and forward/backward passes per step.",
        "interpolation": "1-D linear interpolation of the training loss between two trained models "
        "(Goodfellow et al., arXiv 1412.6544).",
        "tune": "Validation accuracy of each Optuna trial against rho.",
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if rows:
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    for note in notes or []:
        parts.append(f"<p>{html.escape(note)}</p>")
    for name, b64 in figs.items():
        parts.append(
            f"<h2>{html.escape(captions.get(name, name))}</h2><img alt='{name}' src='data:image/png;base64,{b64}'>"
        )
    settings_rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(str(v))}</code></td></tr>"
        for k, v in settings.items()
    )
    parts.append(f"<h2>Settings</h2><table>{settings_rows}</table></body></html>")
    write_text_atomic(path, "\n".join(parts))
