"""Tables, plots and the self-contained HTML report of a study.

* :func:`format_table` renders the summary (from
  :func:`samkit.experiments.study.summarize`) as plain text, and
  :func:`print_table` prints it with ``rich`` on a terminal.
* :func:`write_report` writes ``report.html`` with the plots embedded as
  base64 PNGs (matplotlib, Agg backend): learning curves, test accuracy with
  error bars (standard error over seeds), accuracy against cost, and the 1-D
  loss interpolation between the SGD and SAM solutions when it was measured.
  Without matplotlib (a core install) the report has the tables and a note
  saying how to get the plots (:data:`NO_PLOTS`).
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
from .._extras import available, install

__all__ = [
    "table_columns",
    "format_table",
    "fmt",
    "text_table",
    "study_sections",
    "print_table",
    "write_report",
    "write_page",
    "html_table",
    "html_figure",
    "html_list",
    "png_base64",
    "plot_pngs",
    "write_text_atomic",
    "plots_available",
    "NO_PLOTS",
]

#: the report's note (and the command line's warning) when matplotlib is missing
NO_PLOTS = f"matplotlib is not installed, so the report has no plots ({install('matplotlib')})"


def plots_available() -> bool:
    """True when matplotlib can be imported (the report's plots need it)."""
    return available("matplotlib")


def fmt(v: Any, spec: str = ".1f") -> str:
    """A number as ``format(v, spec)``; ``-`` for None, NaN, infinity or a non-number."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return format(v, spec)


def mean_pm(mean: Any, std: Any, spec: str = ".1f") -> str:
    """``"mean +- std"``; the mean alone where the spread is undefined (one seed)."""
    if fmt(std, spec) == "-":
        return fmt(mean, spec)
    return f"{fmt(mean, spec)} +- {fmt(std, spec)}"


def text_table(headers: list[str], cells: list[list[str]]) -> str:
    """Text cells as a plain table: left-aligned columns, a rule under the headers."""
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _metric(rows: list[dict[str, Any]]) -> str:
    return rows[0].get("metric", "acc") if rows else "acc"


def cost_reference(rows: list[dict[str, Any]]) -> str:
    """The method the costs are relative to: SGD, else the study's first (as its rows say)."""
    ref = rows[0].get("cost_reference", "sgd") if rows else "sgd"
    return "SGD" if ref in (None, "sgd") else str(ref)


def _score_cell(r: dict[str, Any], metric: str) -> str:
    pct = metric.lower() in ("acc", "accuracy")
    scale, spec = (100.0, ".2f") if pct else (1.0, ".4g")
    mean, std = r.get(f"test_{metric}_mean"), r.get(f"test_{metric}_std")
    div = r.get("diverged", 0) or 0
    if not r.get("n"):
        return f"diverged ({div}/{r.get('runs', div)})" if div else "-"
    cell = mean_pm(
        None if mean is None else scale * mean, None if std is None else scale * std, spec
    )
    return cell + (f" ({div} diverged)" if div else "")


def table_columns(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(header, cells) per column; sharpness columns only where measured."""
    metric = _metric(rows)
    head = (
        "test acc % (mean +- std)"
        if metric.lower() in ("acc", "accuracy")
        else (f"test {metric} (mean +- std)")
    )
    ref = cost_reference(rows)
    cols = [
        ("method", [r["label"] for r in rows]),
        ("seeds", [str(r.get("runs", r["n"])) for r in rows]),
        (head, [_score_cell(r, metric) for r in rows]),
        ("train loss", [fmt(r["train_loss_mean"], ".4f") for r in rows]),
        ("s/epoch", [fmt(r["time_per_epoch"], ".3f") for r in rows]),
        (f"cost vs {ref} (time)", [fmt(r["cost_time"], ".2f") + "x" for r in rows]),
        (f"cost vs {ref} (passes)", [fmt(r["cost_passes"], ".2f") + "x" for r in rows]),
    ]
    for key, name, spec in (
        ("hessian_top_eig", "top eig", ".3g"),
        ("hessian_trace", "trace", ".3g"),
        ("worst_case_sharpness", "worst-case", ".3g"),
    ):
        if any(key in r for r in rows):
            cols.append((name, [fmt(r.get(key), spec) for r in rows]))
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
            histories[r["key"]]
            for r in records
            if r["label"] == label and histories.get(r["key"]) and not r.get("diverged")
        ]
        if not hs:
            continue
        n = min(len(h) for h in hs)

        def value(rec: dict[str, Any]) -> float:
            v = rec.get(key)
            return float(v) if isinstance(v, (int, float)) else math.nan

        pts = [(i + 1, sum(value(h[i]) for h in hs) / len(hs)) for i in range(n)]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]  # epochs without evaluation
        out[label] = ([x for x, _ in pts], [y for _, y in pts])
    return out


def _nan(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _plain(text: Any) -> str:
    """A label as matplotlib text: ``$`` (math mode) escaped."""
    return str(text).replace("$", r"\$")


def plot_pngs(
    rows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    interpolation: dict[str, Any] | None = None,
    tune: dict[str, Any] | None = None,
    metric: str | None = None,
) -> dict[str, str]:
    """The report's figures as base64 PNGs, by name (diverged runs left out)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metric = metric or _metric(rows)
    pct = metric.lower() in ("acc", "accuracy")
    scale = 100.0 if pct else 1.0
    what = "test accuracy %" if pct else f"test {metric}"
    labels = [r["label"] for r in rows]
    reference = cost_reference(rows)
    figs: dict[str, str] = {}

    if histories:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        # one colour per method in both panels (the left has no legend: a curve left out
        # there shifted the colour cycle, and another method's curve took its colour)
        colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
        losses = _curves(records, histories, labels, "train_loss")
        # a loss that reaches 0 or below (a negative log-likelihood) cannot be drawn on a
        # log scale: then every curve is drawn on a linear one, none is left out
        positive = all(y > 0 for _, ys in losses.values() for y in ys)
        for label, (xs, ys) in losses.items():
            axes[0].plot(xs, ys, label=_plain(label), color=colour[label])
        for label, (xs, ys) in _curves(records, histories, labels, f"test_{metric}").items():
            axes[1].plot(xs, [scale * y for y in ys], label=_plain(label), color=colour[label])
        axes[0].set(
            xlabel="epoch",
            ylabel="train loss (mean over seeds)",
            yscale="log" if positive else "linear",
            title="Training loss",
        )
        axes[1].set(xlabel="epoch", ylabel=what, title=what.capitalize())
        if axes[1].lines:
            axes[1].legend(fontsize=8)
        figs["curves"] = _png(fig)

    shown = [r for r in rows if r.get("n")]
    if shown:
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(shown) + 2), 4))
        means = [scale * _nan(r[f"test_{metric}_mean"]) for r in shown]
        errs = [scale * _nan(r[f"test_{metric}_sem"]) for r in shown]
        errs = [e if math.isfinite(e) else 0.0 for e in errs]
        ax.bar(range(len(shown)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        for i, vals in enumerate(records_by(records, [r["label"] for r in shown], metric)):
            ax.scatter([i] * len(vals), [scale * v for v in vals], color="k", s=8, zorder=3)
        if pct:
            lo = min(means) - 3 * max(errs + [1.0]) - 2
            ax.set_ylim(max(0, lo), min(100, max(m + e for m, e in zip(means, errs)) + 2))
        ax.set_xticks(
            range(len(shown)), [_plain(r["label"]) for r in shown], rotation=30, ha="right"
        )
        ax.set(
            ylabel=what, title=f"{what.capitalize()} (mean, error bar = std. error, dots = seeds)"
        )
        figs["accuracy"] = _png(fig)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, key, cost in (
            (axes[0], "cost_time", "time per epoch"),
            (axes[1], "cost_passes", "passes per step"),
        ):
            for r in shown:
                y, e = scale * _nan(r[f"test_{metric}_mean"]), scale * _nan(r[f"test_{metric}_sem"])
                ax.errorbar(r[key], y, yerr=e if math.isfinite(e) else None, fmt="o", capsize=3)
                ax.annotate(
                    _plain(r["label"]),
                    (r[key], y),
                    fontsize=8,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            ax.set(
                xlabel=f"cost relative to {reference} ({cost})", title=f"{metric} vs cost ({cost})"
            )
        axes[0].set_ylabel(what)
        figs["cost"] = _png(fig)

    series, fixed = _rho_series(records, histories)
    if series:
        figs["rho"] = _png(rho_figure(series, fixed))

    if interpolation and interpolation.get("alphas"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(interpolation["alphas"], interpolation["losses"], marker=".")
        ax.set(
            xlabel=_plain(f"alpha  (0 = {interpolation['a']}, 1 = {interpolation['b']})"),
            ylabel="training loss",
            title="Loss along the straight line between the two solutions",
        )
        figs["interpolation"] = _png(fig)

    if tune and tune.get("trials"):
        fig, ax = plt.subplots(figsize=(6, 4))
        trials = [t for t in tune["trials"] if t.get("value") is not None]
        tmetric = tune.get("metric", "acc")
        tscale = 100.0 if tmetric in ("acc", "accuracy") else 1.0
        tlabel = "validation accuracy %" if tscale == 100.0 else f"validation {tmetric}"
        has_lr = any("lr" in t["params"] for t in trials)
        sc = ax.scatter(
            [t["params"]["rho"] for t in trials],
            [tscale * t["value"] for t in trials],
            c=[t["params"].get("lr", 0) for t in trials] if has_lr else None,
        )
        if has_lr:
            fig.colorbar(sc, label="lr")
        ax.axvline(
            tune["best"]["rho"],
            color="tab:red",
            ls="--",
            label=f"recommended rho = {tune['best']['rho']:.3g}",
        )
        for i, auto in enumerate(tune.get("auto") or []):
            if auto.get("value") is not None:
                ax.axhline(
                    tscale * auto["value"],
                    color=f"C{i + 1}",
                    ls=":",
                    label=f"rho = {auto['rho']} (final rho {auto.get('final_rho', math.nan):.3g})",
                )
        ax.set(xscale="log", xlabel="rho", ylabel=tlabel, title=f"{tlabel.capitalize()} vs rho")
        ax.legend(fontsize=8)
        figs["tune"] = _png(fig)
        auto_series = {
            f"rho = {a['rho']}": [h for h in a.get("rho_history", []) if h]
            for a in tune.get("auto") or []
        }
        auto_series = {k: v for k, v in auto_series.items() if v}
        if auto_series:
            grid = sorted({t["params"]["rho"] for t in trials})
            figs["rho"] = _png(rho_figure(auto_series, {f"{r:.3g}": r for r in grid}))
    return figs


def _rho_series(
    records: list[dict[str, Any]], histories: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, list[list[float]]], dict[str, float]]:
    """Per label, each run's rho per epoch, for the methods whose rho moves
    (a controller such as ``rho="auto"``); and the fixed radii beside them."""
    moving: dict[str, list[list[float]]] = {}
    fixed: dict[str, float] = {}
    for r in records:
        rhos = [_nan(h.get("rho")) for h in histories.get(r.get("key")) or []]
        rhos = [v for v in rhos if math.isfinite(v)]
        if not rhos:
            continue
        option = ((r.get("config") or {}).get("method") or {}).get("options", {}).get("rho")
        if isinstance(option, str) or max(rhos) != min(rhos):
            moving.setdefault(r.get("label", "?"), []).append(rhos)
        else:
            fixed.setdefault(r.get("label", "?"), rhos[0])
    return (moving, fixed) if moving else ({}, {})


def rho_figure(series: dict[str, list[list[float]]], fixed: dict[str, float]) -> Any:
    """Each run's rho over training (one line per run, a colour per label);
    the fixed radii as dotted horizontal lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, runs) in enumerate(series.items()):
        for j, rhos in enumerate(runs):
            ax.plot(
                range(1, len(rhos) + 1),
                rhos,
                color=f"C{i}",
                alpha=0.8,
                marker="." if len(rhos) < 30 else None,
                label=_plain(label) if j == 0 else None,
            )
    for label, rho in fixed.items():
        if rho > 0:
            ax.axhline(rho, color="grey", lw=0.8, ls=":")
            ax.annotate(
                _plain(label),
                (1, rho),
                fontsize=7,
                color="grey",
                xytext=(2, 2),
                textcoords="offset points",
            )
    if all(v > 0 for runs in series.values() for rhos in runs for v in rhos):
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="rho (end of epoch)", title="rho over training, each run")
    ax.legend(fontsize=8)
    return fig


def records_by(
    records: list[dict[str, Any]], labels: list[str], metric: str = "acc"
) -> list[list[float]]:
    """Per label, the finished (not diverged) runs' final test metric."""
    out = []
    for lab in labels:
        vals = [
            _nan(r["final"].get(f"test_{metric}"))
            for r in records
            if r["label"] == lab and not r.get("diverged")
        ]
        out.append([v for v in vals if math.isfinite(v)])
    return out


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}
"""


def html_table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table of text cells (escaped); the first column left-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_figure(caption: str, b64: str, name: str = "figure") -> str:
    """A heading and an embedded PNG (base64, as :func:`png_base64` returns it)."""
    return (
        f"<h2>{html.escape(caption)}</h2>"
        f"<img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
    )


def html_list(title: str, items: list[str]) -> str:
    """A heading and a bulleted list of sentences (nothing when there are none)."""
    if not items:
        return ""
    return (
        f"<h2>{html.escape(title)}</h2><ul>"
        + "".join(f"<li>{html.escape(v)}</li>" for v in items)
        + "</ul>"
    )


def png_base64(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG (the figure is closed)."""
    return _png(fig)


def write_page(
    path: str | os.PathLike[str], *, title: str, sections: list[str], settings: dict[str, Any]
) -> None:
    """Write a self-contained HTML page atomically: the title, the HTML
    ``sections`` in order, and a table of the settings. Every study's report
    (``compare``, ``tune``, ``rl``, ``gan``) is one of these."""
    settings_rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(str(v))}</code></td></tr>"
        for k, v in settings.items()
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *sections,
        f"<h2>Settings</h2><table>{settings_rows}</table></body></html>",
    ]
    write_text_atomic(path, "\n".join(parts))


def study_sections(
    table: tuple[list[str], list[list[str]]], verdicts: list[dict[str, Any]], note: str
) -> tuple[list[str], bool]:
    """The opening of a ``samkit rl`` / ``samkit gan`` report, and whether plots can be made:
    the table (headers, cells), the paired verdicts, the note on how to read them, and
    :data:`NO_PLOTS` without matplotlib."""
    sections = [html_table(*table)]
    sections.append(html_list("Paired verdicts", [v["sentence"] for v in verdicts]))
    sections.append("<p>" + html.escape(note) + "</p>")
    plots = plots_available()
    if not plots:
        sections.append(f"<p><b>{html.escape(NO_PLOTS)}.</b></p>")
    return sections, plots


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
    verdicts: list[str] | None = None,
    metric: str | None = None,
) -> None:
    """Write a self-contained HTML report (atomically): the table, the paired
    verdicts (one sentence per method), the notes, the figures, the settings."""
    cols = table_columns(rows) if rows else []
    plots = plots_available()
    figs = plot_pngs(rows, records, histories, interpolation, tune, metric) if plots else {}
    metric_name = metric or _metric(rows)
    what = "accuracy" if metric_name.lower() in ("acc", "accuracy") else metric_name
    captions = {
        "curves": "Learning curves (mean over seeds).",
        "accuracy": f"Final test {what} per method.",
        "cost": f"Test {what} against cost relative to {cost_reference(rows)}: wall time per "
        "epoch, and forward/backward passes per step.",
        "interpolation": "1-D linear interpolation of the training loss between two trained models "
        "(Goodfellow et al., arXiv 1412.6544).",
        "tune": "Validation accuracy of each Optuna trial against rho "
        "(dotted: the self-tuning rho runs, whose radius moves during training).",
        "rho": "rho over training, one line per run, for the methods that choose their own "
        "radius (rho='auto'); dotted: the fixed radii beside them.",
    }
    sections = []
    if rows:
        sections.append(
            html_table([h for h, _ in cols], [[c[j] for _, c in cols] for j in range(len(rows))])
        )
    sections.append(html_list("Paired verdicts", verdicts or []))
    sections.extend(f"<p>{html.escape(note)}</p>" for note in notes or [])
    if not plots:
        sections.append(f"<p><b>{html.escape(NO_PLOTS)}.</b></p>")
    sections.extend(html_figure(captions.get(name, name), b64, name) for name, b64 in figs.items())
    write_page(path, title=title, sections=sections, settings=settings)
