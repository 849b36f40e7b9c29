"""``report.html`` of a ``samkit gan`` study: the table, the paired verdicts, and per data
set the metrics over training and scatter plots of the generated points."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .config import GANConfig
from .data import MIXTURES
from .summary import METRICS, table_rows

__all__ = ["write_report"]


def _figures(
    config: GANConfig, summary: dict[str, Any], dataset: str, folder: Path
) -> list[tuple[str, str]]:
    import json

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    from ..report import png_base64

    mixture = MIXTURES[dataset]
    runs = [r for r in summary["runs"] if r["dataset"] == dataset]
    figures = []
    fig, panels = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for panel, (key, name, _) in zip(panels, METRICS):
        for label in config.labels:
            mine = [
                r for r in runs if r["label"] == label and not r.get("diverged") and r["history"]
            ]
            if not mine:
                continue
            n = min(len(r["history"]) for r in mine)
            xs = [h["iteration"] for h in mine[0]["history"][:n]]
            ys = np.array(
                [
                    [np.nan if h.get(key) is None else h[key] for h in r["history"][:n]]
                    for r in mine
                ],
                dtype=float,
            )
            panel.plot(xs, np.nanmean(ys, axis=0), label=label.replace("$", r"\$"))
        panel.set(xlabel="iteration", title=name)
        if key == "mmd":
            panel.set_yscale("symlog", linthresh=1e-3)
    if panels[0].get_legend_handles_labels()[0]:  # (none when every run diverged)
        panels[0].legend(fontsize=7)
    fig.tight_layout()
    figures.append((f"{dataset}: metrics over training (mean over seeds)", png_base64(fig)))

    seed = config.seeds[0]
    shots = [str(i) for i in config.resolved(dataset).snapshot_iterations()]
    centers = mixture.centers_tensor().numpy()
    fig, grid_axes = plt.subplots(
        len(config.labels),
        len(shots),
        figsize=(2.4 * len(shots), 2.4 * len(config.labels)),
        squeeze=False,
    )
    lim = float(np.abs(centers).max()) + 1.0
    for row, label in enumerate(config.labels):
        record = next((r for r in runs if r["label"] == label and r["seed"] == seed), None)
        points: dict[str, Any] = {}
        if record is not None:
            with contextlib.suppress(OSError, ValueError):
                points = json.loads((folder / "runs" / dataset / record["samples"]).read_text())[
                    "snapshots"
                ]
        for col, it in enumerate(shots):
            ax = grid_axes[row][col]
            pts = np.array(points.get(it, []), dtype=float).reshape(-1, 2)
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, c="tab:blue")
            ax.scatter(
                centers[:, 0], centers[:, 1], s=14, c="tab:red", marker="x", lw=0.8, zorder=3
            )
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
            if row == 0:
                ax.set_title(f"iteration {it}", fontsize=9)
            if col == 0:
                ax.set_ylabel(label.replace("$", r"\$"), fontsize=9)
    fig.tight_layout()
    figures.append(
        (
            f"{dataset}: generated samples over training (seed {seed}, 512 points; x: the modes)",
            png_base64(fig),
        )
    )
    return figures


def write_report(path: Path, config: GANConfig, summary: dict[str, Any], folder: Path) -> None:
    """``report.html``: the table, the paired verdicts, the metric curves and the scatter plots."""
    import html

    from ..report import html_figure, study_sections, write_page

    sections, plots = study_sections(
        table_rows(summary["summary"]),
        summary["verdicts"],
        "Final metrics at the end of training ("
        + ", ".join(
            f"{d}: {config.resolved(d).iterations} iterations, batch "
            f"{config.resolved(d).batch_size}, width {config.resolved(d).hidden}"
            for d in config.datasets
        )
        + f") on {config.eval_samples} generated "
        "points, mean +- sample standard deviation over seeds (diverged runs left out). A "
        "sample is high quality within 3 standard deviations of a mode; a mode is covered with "
        f"at least {20 * config.eval_samples / 2500:g} high-quality samples. MMD: unbiased "
        "MMD^2, Gaussian kernels of bandwidth 0.1, 0.5 and 2 (lower is better). Mode KL: KL "
        "divergence of the generated mode shares from uniform (lower is better). Cost: time "
        f"per iteration relative to {config.baseline}.",
    )
    for dataset in config.datasets:
        sections.append(
            f"<h2>{html.escape(dataset)} ({html.escape(MIXTURES[dataset].source)})</h2>"
        )
        if plots and any(r["dataset"] == dataset for r in summary["runs"]):
            for caption, b64 in _figures(config, summary, dataset, folder):
                sections.append(html_figure(caption, b64))
    write_page(
        path,
        title="samkit gan: Adam and SAM on 2-D Gaussian mixtures",
        sections=sections,
        settings=dict(summary["settings"]),
    )
