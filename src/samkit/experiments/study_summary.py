"""The summary of a comparative study: one row per method (:func:`summarize`), and
``results.json`` and ``report.html`` with the paired verdicts and the SGD-to-SAM
interpolation (:func:`finish`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._atomic import finite
from .configs import StudyConfig
from .folder import study_folder
from .problem import Problem
from .runfiles import RunResult, write_json_atomic
from .stats import finite_number as _finite
from .stats import paired_verdicts
from .stats import stats as _stats
from .study_sharpness import SHARPNESS_KEYS, interpolation

__all__ = ["summarize", "finish"]


def summarize(
    records: list[dict[str, Any]], labels: list[str] | None = None, *, metric: str = "acc"
) -> list[dict[str, Any]]:
    """One row per label (in ``labels`` order): means over seeds and costs relative to SGD.

    Diverged runs are counted (``diverged``) but left out of every mean
    (``n`` counts the runs that are in). The reference for the cost columns is
    the label ``"sgd"`` if present, else the first label. ``cost_time`` is the
    ratio of training time per epoch, ``cost_passes`` the ratio of
    forward/backward passes per step.
    """
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    order = labels if labels is not None else list(by_label)
    rows = []
    for label in order:
        every = by_label.get(label, [])
        if not every:
            continue
        rs = [r for r in every if not r.get("diverged")]
        acc = _stats([r["final"].get(f"test_{metric}") for r in rs])
        row: dict[str, Any] = {
            "label": label,
            "method": every[0]["method"],
            "metric": metric,
            "n": len(rs),
            "runs": len(every),
            "diverged": len(every) - len(rs),
            f"test_{metric}_mean": acc[0],
            f"test_{metric}_std": acc[1],
            f"test_{metric}_sem": acc[2],
            f"val_{metric}_mean": _stats([r["final"].get(f"val_{metric}") for r in rs])[0],
            "train_loss_mean": _stats([r["final"].get("train_loss") for r in rs])[0],
            f"train_{metric}_mean": _stats([r["final"].get(f"train_{metric}") for r in rs])[0],
            "time_per_epoch": _stats([r["time_per_epoch"] for r in every])[0],
            "passes_per_step": _stats([r["passes_per_step"] for r in every])[0],
        }
        for k in SHARPNESS_KEYS:
            vals = [r["sharpness"][k] for r in rs if k in (r.get("sharpness") or {})]
            if vals:
                row[k] = _stats(vals)[0]
        rows.append(row)
    ref = next((r for r in rows if r["label"] == "sgd"), rows[0] if rows else None)
    for row in rows:
        row["cost_reference"] = ref["label"] if ref else None
        row["cost_time"] = (
            row["time_per_epoch"] / ref["time_per_epoch"]
            if ref and _finite(ref["time_per_epoch"]) and ref["time_per_epoch"] > 0
            else float("nan")
        )
        row["cost_passes"] = (
            row["passes_per_step"] / ref["passes_per_step"]
            if ref and _finite(ref["passes_per_step"]) and ref["passes_per_step"] > 0
            else float("nan")
        )
    return rows


def finish(
    config: StudyConfig,
    results: list[RunResult],
    out: str | os.PathLike[str],
    *,
    log: Callable[[str], None] | None = None,
    problem: Problem | None = None,
    failed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Aggregate the runs into results.json and write report.html; returns the summary.
    ``failed``: the runs that failed on every retry (``results.json``'s ``failed``, and a
    note in the report)."""
    from .report import cost_reference, write_report

    out = Path(out)
    problem = problem or config.problem()
    metric, maximize = problem.primary, problem.maximize
    records = [r.record for r in results]
    labels = [m.label for m in config.methods]
    rows = summarize(records, labels, metric=metric)
    verdicts = paired_verdicts(
        records, labels, config.baseline_label, metric=metric, maximize=maximize
    )
    histories: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        path = out / "runs" / r["metrics"]
        try:
            histories[r["key"]] = [
                json.loads(line) for line in path.read_text().splitlines() if line.strip()
            ]
        except (OSError, ValueError):
            histories[r["key"]] = []
    interp = interpolation(config, problem, records, out, log) if config.sharpness else None
    summary = {
        "format": "samkit-compare",
        "version": 2,
        "settings": config.to_dict(),
        "problem": problem.describe(),
        "summary": rows,
        "verdicts": verdicts,
        "runs": records,
        "interpolation": interp,
        "executed_runs": sum(r.executed for r in results),
        "failed": list(failed or []),
    }
    with study_folder(out, clean=False):
        write_json_atomic(out / "results.json", summary)
        title = f"samkit compare: {config.dataset} / {config.model}" + (
            f", {config.noise:.0%} label noise" if config.noise else ""
        )
        write_report(
            out / "report.html",
            title=title,
            rows=rows,
            records=records,
            histories=histories,
            settings={k: v for k, v in config.to_dict().items() if k != "methods"}
            | {"methods": labels},
            interpolation=interp,
            verdicts=[v["sentence"] for v in verdicts],
            notes=[
                f"Test {metric}: mean +- sample standard deviation over seeds (diverged runs left "
                "out); error bars: standard error. Cost: time per training epoch, and "
                f"forward/backward passes per step, relative to {cost_reference(rows)}."
            ]
            + [
                f"FAILED after every retry, left out of the table and the verdicts: "
                f"{f['run']} ({f['reason']})"
                for f in failed or []
            ]
            + _others_note(out, records, failed),
            metric=metric,
        )
    return finite(summary)


def _others_note(out: Path, records: list[dict[str, Any]], failed: Any) -> list[str]:
    """A note for finished runs in the folder that this study does not hold (other seeds or
    methods, from an earlier command): the report was that study's alone, without a word
    (`--seeds 2,` after `--seeds 0,1` reported one seed beside two seeds' runs)."""
    runs = out / "runs"
    mine = {r.get("key") for r in records} | {f.get("key") for f in failed or []}
    others = (
        sorted(p.stem for p in runs.glob("*.json") if p.stem not in mine) if runs.is_dir() else []
    )
    if not others:
        return []
    shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    return [
        f"{len(others)} other finished run(s) in this folder are not part of this study "
        f"({shown}): rerun with their seeds and methods as well to include them."
    ]
