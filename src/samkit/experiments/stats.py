"""The statistics every study reports: means over seeds and paired verdicts.

One set of helpers for ``samkit compare``, ``rl`` and ``gan`` (and their
reports): :func:`stats` (mean, sample standard deviation, standard error of
the finite values) and :func:`paired_verdicts` (the difference to the
baseline seed by seed, its standard error and whether ``|z|`` passes the
two-sided 95 % threshold of Student's t with n - 1 degrees of freedom).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["finite_number", "stats", "is_percent", "paired_verdicts", "t_threshold"]

#: Two-sided 95 % critical values of Student's t for 1 to 30 degrees of freedom.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_threshold(n: int) -> float:
    """How many standard errors a mean of ``n`` paired differences must be from 0 to pass a
    two-sided test at 95 % (Student's t, n - 1 degrees of freedom): 4.30 for 3 seeds, 2.78
    for 5, 2.26 for 10, towards 1.96. With few seeds "two standard errors" is far from 95 %
    (3 seeds: about 82 %)."""
    dof = n - 1
    if dof < 1:
        raise ValueError(f"Invalid n value: {n!r} (at least 2 paired differences)")
    if dof <= len(_T95):
        return _T95[dof - 1]
    z = 1.959964  # beyond 30: the Cornish-Fisher expansion, within 1e-3 of the exact value
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def finite_number(v: Any) -> bool:
    """A finite int or float (never a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stats(values: list[Any]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and standard error of the finite values (NaN if none;
    the spread NaN for one value)."""
    vals = [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    if not vals:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(vals)
    if len(vals) == 1:  # one value has no spread: undefined (NaN, written null), not 0
        return mean, math.nan, math.nan
    std = statistics.stdev(vals)
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
    says whether ``|z|`` exceeds :func:`t_threshold` (the paired t-test at 95 %:
    2.78 for 5 seeds). The same difference on every seed (a standard error of 0,
    common where accuracy moves in steps of one test sample) gives no verdict.
    ``unit``: the words after the difference in the sentence (default ``"test
    <metric>"``, or points of test accuracy).
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
        note = _diverged_note(label, baseline, diverged, records)
        v: dict[str, Any] = {"label": label, "baseline": baseline, "n": n, "metric": metric}
        if n == 0:
            v.update(mean=None, se=None, z=None, exceeds=False)
            ran = {r["seed"] for r in records if r["label"] == label and not r.get("diverged")}
            ran &= {r["seed"] for r in records if r["label"] == baseline and not r.get("diverged")}
            v["sentence"] = (
                f"{label}: no test {metric} to compare with {baseline} (both finished; the data "
                f"has no test split, or the runs recorded no test {metric}){note}."
                if ran
                else f"{label}: no seed on which both it and {baseline} finished, so no "
                f"comparison{note}."
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
            threshold = t_threshold(n)
            better = (mean > 0) == maximize
            head = f"{label}: {mean:+{fmt}} ± {se:{fmt}} {unit} against {baseline}, paired over {n} seeds"
            # the same difference on every seed up to float rounding (accuracies differing
            # by one sample each: 1e-16 of spread read as 1e15 standard errors) is no spread
            if se <= 1e-9 * max(abs(d) for d in diffs):
                se = 0.0
                head = f"{label}: {mean:+{fmt}} ± {se:{fmt}} {unit} against {baseline}, paired over {n} seeds"
                v.update(mean=mean, se=se, z=None, exceeds=False, better=better)
                v["sentence"] = (
                    f"{head}: no difference on any seed, so this study cannot tell them apart"
                    f"{note}."
                    if mean == 0
                    else f"{head}: the same difference on every seed, which leaves no spread "
                    "to judge seed noise by, so run more seeds before reading anything into it"
                    f"{note}."
                )
                out.append(v)
                continue
            z = mean / se
            exceeds = abs(z) > threshold
            if exceeds:
                tail = (
                    f"beyond {threshold:.2f} (the paired t-test at 95 % for {n} seeds), so the "
                    f"difference is unlikely to be seed noise ({label} is "
                    f"{'better' if better else 'worse'})"
                )
            else:
                tail = (
                    f"within {threshold:.2f} (the paired t-test at 95 % for {n} seeds), so this "
                    "study cannot tell them apart"
                )
            v.update(mean=mean, se=se, z=z, exceeds=exceeds, better=better, threshold=threshold)
            v["sentence"] = f"{head}: {abs(z):.1f} standard errors, {tail}{note}."
        out.append(v)
    return out


def _diverged_note(label: str, baseline: str, diverged: Any, records: list[dict[str, Any]]) -> str:
    """Who diverged, on how many of its seeds: a paired difference over the seeds both
    finished says nothing of that ("cannot tell them apart (2 diverged run(s) left out)"
    read as parity for a method that failed on half its seeds; a seed both lost counted
    twice)."""
    parts = []
    for name in (label, baseline):
        lost = diverged(name)
        if lost:
            runs = sum(1 for r in records if r["label"] == name)
            parts.append(f"{name} diverged on {lost} of its {runs} seed(s)")
    if not parts:
        return ""
    return (
        f" ({'; '.join(parts)}: left out of the paired difference, which says nothing of how "
        "often each diverges)"
    )
