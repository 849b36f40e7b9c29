"""``report.html`` of a ``samkit rl`` study: the tables, the paired verdicts, and per
environment the learning curves and the returns under each perturbation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import RLConfig
from .envs import ENVS
from .summary import axis_table, table_rows

__all__ = ["write_report"]


def _figures(config: RLConfig, summary: dict[str, Any], env: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..report import png_base64

    runs = [r for r in summary["runs"] if r["env"] == env and not r.get("diverged")]
    figures = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in config.labels:
        curves = [r for r in runs if r["label"] == label]
        if not curves:
            continue
        xs = curves[0]["curve_timesteps"]
        ys = np.array(
            [[np.nan if y is None else y for y in r["curve_return"]] for r in curves], dtype=float
        )
        with np.errstate(all="ignore"), _quiet_nan_warnings():
            mean = np.nanmean(ys, axis=0)
            n = np.sum(np.isfinite(ys), axis=0)
            # the sample standard deviation (ddof 1, as the other plots): a point with one
            # seed gets no band, not a zero-width one read as certainty
            se = np.nanstd(ys, axis=0, ddof=1) / np.sqrt(np.maximum(1, n))
            se = np.where(n > 1, se, np.nan)
        (line,) = ax.plot(xs, mean, label=label.replace("$", r"\$"))
        ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    ax.set(
        xlabel="timesteps", ylabel="training episode return", title=f"{env}: return over training"
    )
    if ax.lines:
        ax.legend(fontsize=8)
    figures.append(
        (
            f"{env}: return of the training episodes (mean over seeds, band: standard error)",
            png_base64(fig),
        )
    )

    axes = ENVS[env].axes
    fig, panels = plt.subplots(1, len(axes), figsize=(3.3 * len(axes), 3.4), sharey=True)
    for panel, axis in zip(np.atleast_1d(panels), axes):
        for label in config.labels:
            mine = [r for r in runs if r["label"] == label]
            if not mine:
                continue
            levels = mine[0]["robustness"]["axes"][axis.name]["levels"]
            values = np.array([r["robustness"]["axes"][axis.name]["mean"] for r in mine])
            se = values.std(axis=0, ddof=1) / np.sqrt(len(mine)) if len(mine) > 1 else None
            panel.errorbar(
                range(len(levels)),
                values.mean(axis=0),
                yerr=se,
                marker="o",
                ms=3,
                capsize=2,
                label=label.replace("$", r"\$"),
            )
            panel.set_xticks(range(len(levels)), [f"{lv:g}" for lv in levels])
        panel.set(
            title=axis.name, xlabel=axis.description if len(axis.description) < 30 else "level"
        )
        panel.axvline(
            list(axis.grid_levels(config.grid)).index(axis.nominal), color="0.7", lw=0.8, ls="--"
        )
    np.atleast_1d(panels)[0].set_ylabel("evaluation return")
    np.atleast_1d(panels)[0].legend(fontsize=7)
    fig.tight_layout()
    figures.append(
        (
            f"{env}: return of the final policies under perturbations (deterministic policy, "
            f"{config.eval_episodes} episodes per point; mean over seeds, error bar: standard error; "
            "dashed: nominal)",
            png_base64(fig),
        )
    )
    return figures


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def write_report(path: Path, config: RLConfig, summary: dict[str, Any]) -> None:
    """``report.html``: the table, the paired verdicts, the per-axis table and the figures per environment."""
    import html

    from ..report import html_figure, html_table, study_sections, write_page

    rows = summary["summary"]
    sections, plots = study_sections(
        table_rows(rows),
        summary["verdicts"],
        "Return: the deterministic final policy on the nominal environment, mean over "
        f"{config.eval_episodes} episodes, then mean +- sample standard deviation over seeds "
        "(diverged runs left out). Robust return: for each perturbation axis the mean return "
        "over its non-nominal levels, then the mean over axes. Train return: mean return of "
        "all training episodes, each weighing the same (not the area under the learning "
        "curve: short early episodes weigh more). Cost: training time "
        f"relative to {config.baseline}; passes/step: forward-backward passes per PPO "
        "gradient step.",
    )
    for env in config.envs:
        sections.append(f"<h2>{html.escape(env)}</h2>")
        sections.append(f"<p>Hyper-parameters: {html.escape(ENVS[env].source)}.</p>")
        h, c = axis_table(rows, env)
        sections.append(html_table(h, c))
        if plots and any(r["env"] == env and not r.get("diverged") for r in summary["runs"]):
            for caption, b64 in _figures(config, summary, env):
                sections.append(html_figure(caption, b64))
    write_page(
        path,
        title="samkit rl: PPO and PPO with SAM, return and robustness",
        sections=sections,
        settings={k: v for k, v in summary["settings"].items()},
    )
