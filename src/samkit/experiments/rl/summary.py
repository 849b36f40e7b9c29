"""The summary of a ``samkit rl`` study: means over seeds per environment and method,
paired verdicts against the baseline, and the text tables."""

from __future__ import annotations

from typing import Any

from .. import grid
from ..report import fmt, mean_pm, text_table
from .config import RLConfig
from .envs import ENVS

__all__ = ["summarize", "table_rows", "axis_table", "format_axis_tables", "format_table"]


def summarize(config: RLConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per environment and method: means over seeds; paired verdicts against the baseline."""
    rows: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    for env in config.envs:
        mine = [r for r in records if r["env"] == env]
        base_time = grid.stats([r["train_time"] for r in mine if r["label"] == config.baseline])[0]
        for label in config.labels:
            every = [r for r in mine if r["label"] == label]
            if not every:
                continue
            runs = [r for r in every if not r.get("diverged")]
            nominal = grid.stats([r["robustness"]["nominal"] for r in runs])
            robust = grid.stats([r["robustness"]["robust"] for r in runs])
            time_mean = grid.stats([r["train_time"] for r in every])[0]
            row = {
                "env": env,
                **grid.summary_row(label, every),
                "nominal_mean": nominal[0],
                "nominal_std": nominal[1],
                "robust_mean": robust[0],
                "robust_std": robust[1],
                "train_return_mean": grid.stats([r["train_return_mean"] for r in runs])[0],
                "train_time": time_mean,
                "cost_time": grid.cost_ratio(time_mean, base_time),
                "passes_per_step": grid.stats([r["passes_per_step"] for r in every])[0],
                "axes": {
                    a.name: grid.stats([r["robustness"]["axis_means"][a.name] for r in runs])[0]
                    for a in ENVS[env].axes
                },
            }
            rows.append(row)
        _add_axis_differences(config, env, mine, [r for r in rows if r["env"] == env])
        for metric, unit in (("nominal", "return"), ("robust", "robust return")):
            verdicts += grid.paired_by_seed(
                mine,
                config.labels,
                config.baseline,
                lambda r, metric=metric: r["robustness"][metric],
                metric=metric,
                unit=unit,
                where=("env", env),
            )
    return {
        "format": "samkit-rl",
        "version": 1,
        "settings": config.to_dict(),
        "envs": {e: {"source": ENVS[e].source, "hyper": ENVS[e].hyper} for e in config.envs},
        "summary": rows,
        "verdicts": verdicts,
        "runs": records,
    }


def _add_axis_differences(
    config: RLConfig, env: str, records: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> None:
    """Each method's per-axis robustness minus the baseline's, paired by seed
    (``row["axes_vs_baseline"][axis] = {"mean", "se", "n"}``; none for the baseline)."""
    for axis in ENVS[env].axes:
        for v in grid.paired_by_seed(
            records,
            config.labels,
            config.baseline,
            lambda r, name=axis.name: r["robustness"]["axis_means"][name],
            metric=axis.name,
            unit="return",
        ):
            for row in rows:
                if row["label"] == v["label"]:
                    row.setdefault("axes_vs_baseline", {})[axis.name] = {
                        "mean": v["mean"],
                        "se": v["se"],
                        "n": v["n"],
                    }


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary table: headers and text cells."""
    headers = [
        "env",
        "method",
        "seeds",
        "return (mean +- std)",
        "robust return (mean +- std)",
        "train return",
        "train s",
        "cost (time)",
        "passes/step",
    ]
    cells = []
    for r in rows:
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        cells.append(
            [
                r["env"],
                r["label"],
                str(r["runs"]),
                mean_pm(r["nominal_mean"], r["nominal_std"]) + div,
                mean_pm(r["robust_mean"], r["robust_std"]),
                fmt(r["train_return_mean"]),
                fmt(r["train_time"], ".0f"),
                fmt(r["cost_time"], ".2f") + "x",
                fmt(r["passes_per_step"], ".2f"),
            ]
        )
    return headers, cells


def axis_table(rows: list[dict[str, Any]], env: str) -> tuple[list[str], list[list[str]]]:
    """Per-axis robustness of one environment: the mean return over the axis' non-nominal
    levels (mean over seeds), then the difference from the baseline paired by seed +- s.e."""
    mine = [r for r in rows if r["env"] == env]
    names = [a.name for a in ENVS[env].axes]

    def cell(row: dict[str, Any], name: str) -> str:
        text = fmt(row["axes"].get(name))
        diff = row.get("axes_vs_baseline", {}).get(name)
        if diff is not None and diff["mean"] is not None:
            text += f" ({diff['mean']:+.1f} +- {fmt(diff['se'])})"
        return text

    return ["method", *names], [[r["label"], *(cell(r, n) for n in names)] for r in mine]


def format_axis_tables(rows: list[dict[str, Any]]) -> str:
    """:func:`axis_table` of every environment, as text."""
    parts = []
    for env in dict.fromkeys(r["env"] for r in rows):
        headers, cells = axis_table(rows, env)
        parts.append(f"{env}: robustness per axis (paired difference from the baseline +- s.e.)")
        parts.append(text_table(headers, cells))
    return "\n".join(parts)


def format_table(rows: list[dict[str, Any]]) -> str:
    return text_table(*table_rows(rows))
