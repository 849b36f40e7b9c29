"""The statistics every study reports: means over seeds and paired verdicts.

One set of helpers for ``samkit compare``, ``rl`` and ``gan`` (and their
reports): :func:`stats` (mean, sample standard deviation, standard error of
the finite values) and :func:`paired_verdicts` (the difference to the
baseline seed by seed, its standard error and whether ``|z| > 2``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["finite_number", "stats", "is_percent", "paired_verdicts"]


def finite_number(v: Any) -> bool:
    """A finite int or float (never a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stats(values: list[Any]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and standard error of the finite values (NaN if none)."""
    vals = [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    if not vals:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std, std / math.sqrt(len(vals))


def is_percent(metric: str) -> bool:
    return metric.lower() in ("acc", "accuracy")


def paired_verdicts(
    records: list[dict[str, Any]],
    labels: list[str],
    baseline: str,
    *,
    metric: str = "acc",
    maximize: bool = True,
    unit: str | None = None,
) -> list[dict[str, Any]]:
    """For each label but the baseline: the paired test difference and one sentence.

    Differences are taken seed by seed (same data, initial weights and batches),
    over the seeds where both runs finished without diverging; their mean and
    standard error (sample std / sqrt(n)) give ``z = mean / se``. The verdict
    says whether ``|z| > 2``. ``unit``: the words after the difference in the
    sentence (default ``"test <metric>"``, or points of test accuracy).
    """

    def values(label: str) -> dict[int, float]:
        return {
            r["seed"]: r["final"].get(f"test_{metric}")
            for r in records
            if r["label"] == label
            and not r.get("diverged")
            and finite_number(r["final"].get(f"test_{metric}"))
        }

    def diverged(label: str) -> int:
        return sum(1 for r in records if r["label"] == label and r.get("diverged"))

    scale = 100.0 if is_percent(metric) else 1.0
    if unit is None:
        unit = "points of test accuracy" if is_percent(metric) else f"test {metric}"
    fmt = ".2f" if is_percent(metric) else ".4g"
    base = values(baseline)
    out = []
    for label in labels:
        if label == baseline:
            continue
        mine = values(label)
        seeds = sorted(set(mine) & set(base))
        diffs = [scale * (mine[s] - base[s]) for s in seeds]
        n = len(diffs)
        left = diverged(label) + diverged(baseline)
        note = f" ({left} diverged run(s) left out)" if left else ""
        v: dict[str, Any] = {"label": label, "baseline": baseline, "n": n, "metric": metric}
        if n == 0:
            v.update(mean=None, se=None, z=None, exceeds=False)
            v["sentence"] = (
                f"{label}: no seed on which both it and {baseline} finished, so no comparison{note}."
            )
        elif n == 1:
            v.update(mean=diffs[0], se=None, z=None, exceeds=False)
            v["sentence"] = (
                f"{label}: {diffs[0]:+{fmt}} {unit} against {baseline} on one seed; "
                f"one seed gives no standard error, so run more seeds before reading anything "
                f"into it{note}."
            )
        else:
            mean = statistics.fmean(diffs)
            se = statistics.stdev(diffs) / math.sqrt(n)
            z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
            exceeds = abs(z) > 2
            better = (mean > 0) == maximize
            if exceeds:
                tail = (
                    f"beyond two, so the difference is unlikely to be seed noise "
                    f"({label} is {'better' if better else 'worse'})"
                )
            else:
                tail = "within two, so this study cannot tell them apart"
            z_txt = "infinitely many" if math.isinf(z) else f"{abs(z):.1f}"
            v.update(mean=mean, se=se, z=z, exceeds=exceeds, better=better)
            v["sentence"] = (
                f"{label}: {mean:+{fmt}} ± {se:{fmt}} {unit} against {baseline}, paired over {n} "
                f"seeds: {z_txt} standard errors, {tail}{note}."
            )
        out.append(v)
    return out
