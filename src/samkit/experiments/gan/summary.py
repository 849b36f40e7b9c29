"""The summary of a ``samkit gan`` study: final metrics per data set and method, means
over seeds, paired verdicts against the baseline, and the text table."""

from __future__ import annotations

from typing import Any

from .. import grid
from ..report import fmt, mean_pm, text_table
from .config import GANConfig
from .data import MIXTURES

__all__ = ["METRICS", "summarize", "table_rows", "format_table"]


METRICS = (
    ("modes", "modes covered", True),
    ("hq", "high-quality share", True),
    ("mmd", "MMD", False),
    ("mode_kl", "mode KL", False),
)


def summarize(config: GANConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per data set and method: final metrics, mean and std over seeds; paired verdicts."""
    rows: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    for dataset in config.datasets:
        mine = [r for r in records if r["dataset"] == dataset]
        base_time = grid.stats(
            [r["time_per_iteration"] for r in mine if r["label"] == config.baseline]
        )[0]
        for label in config.labels:
            every = [r for r in mine if r["label"] == label]
            if not every:
                continue
            ok = [r for r in every if not r.get("diverged")]
            row: dict[str, Any] = {"dataset": dataset, **grid.summary_row(label, every)}
            for key, _, _ in METRICS:
                mean, std, _se = grid.stats([r["final"].get(key) for r in ok])
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            t = grid.stats([r["time_per_iteration"] for r in every])[0]
            row["time_per_iteration"] = t
            row["cost_time"] = grid.cost_ratio(t, base_time)
            rows.append(row)
        for key, unit, maximize in METRICS[:3]:
            verdicts += grid.paired_by_seed(
                mine,
                config.labels,
                config.baseline,
                lambda r, key=key: r["final"].get(key),
                metric=key,
                unit=unit,
                maximize=maximize,
                where=("dataset", dataset),
            )
    return {
        "format": "samkit-gan",
        "version": 1,
        "settings": config.to_dict(),
        "mixtures": {
            d: {
                "std": MIXTURES[d].std,
                "modes": len(MIXTURES[d].centers),
                "source": MIXTURES[d].source,
            }
            for d in config.datasets
        },
        "summary": rows,
        "verdicts": verdicts,
        "runs": records,
    }


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction  # None: every seed diverged


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "data",
        "method",
        "seeds",
        "modes covered",
        "high quality %",
        "MMD",
        "mode KL",
        "s/iteration",
        "cost (time)",
    ]
    cells = []
    for r in rows:
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        hq_m, hq_s = r["hq_mean"], r["hq_std"]
        cells.append(
            [
                r["dataset"],
                r["label"],
                str(r["runs"]),
                mean_pm(r["modes_mean"], r["modes_std"], ".1f") + div,
                mean_pm(_percent(hq_m), _percent(hq_s), ".1f"),
                mean_pm(r["mmd_mean"], r["mmd_std"], ".4f"),
                mean_pm(r["mode_kl_mean"], r["mode_kl_std"], ".3f"),
                fmt(r["time_per_iteration"], ".4f"),
                fmt(r["cost_time"], ".2f") + "x",
            ]
        )
    return headers, cells


def format_table(rows: list[dict[str, Any]]) -> str:
    return text_table(*table_rows(rows))
