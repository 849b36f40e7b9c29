"""Timing and reporting helpers shared by the benchmarks.

Habits (after nanoGPT's bench.py): warm up first, synchronise the device
around every timed region, repeat, report the median. The machines these run
on are often shared, so candidates are timed *interleaved* (round-robin, one
trial of each per round): a burst of outside load then hits every candidate
alike and the ratios measured in one run stay meaningful even when the
absolute times drift.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from samkit._atomic import atomic_open

__all__ = [
    "sync",
    "time_interleaved",
    "median",
    "paired_ratio",
    "peak_extra_bytes",
    "print_table",
    "write_json",
    "environment",
]


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work; a no-op on CPU."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(
    candidates: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]],
    *,
    trials: int,
    number: int,
    warmup: int,
    device: torch.device | str | None = None,
    rotate: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate's ``fn``, one sample per trial.

    ``candidates`` maps a name to ``(fn, setup)``. ``setup`` (may be None) runs
    before every call of ``fn`` and is *not* timed: it restores whatever
    ``fn`` consumed (gradients, for instance). One trial is ``number`` timed
    calls; its value is their mean. The candidates take turns trial by trial,
    so sample ``i`` of every candidate was taken in the same round: compare
    candidates with :func:`paired_ratio`, summarise one with :func:`median`.
    With ``rotate`` the order moves by one place each round, so every
    candidate runs at every position equally often (in overhead.py the first
    of a round ran 5-13 % slower on 10M parameters than the same code timed
    in alternation: memory left in cache by whatever ran before).
    """
    if trials < 1 or number < 1 or warmup < 0:
        raise ValueError(
            f"Invalid timing settings: trials={trials}, number={number}, warmup={warmup}"
        )
    for fn, setup in candidates.values():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        sync(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    clock = time.perf_counter
    names = list(candidates)
    for trial in range(trials):
        shift = trial % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn, setup = candidates[name]
            total = 0.0
            for _ in range(number):
                if setup is not None:
                    setup()
                sync(device)
                t0 = clock()
                fn()
                sync(device)
                total += clock() - t0
            samples[name].append(total / number)
    return samples


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``.

    Samples of one round were taken seconds apart, so a change of outside
    load between rounds cancels in each ratio; the median then drops the
    rounds where it struck only one of the two.
    """
    if len(num) != len(den) or not num:
        raise ValueError(
            f"paired_ratio needs two equal, non-empty sample lists (got {len(num)} and {len(den)})"
        )
    return statistics.median(a / b for a, b in zip(num, den))


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by ``fn`` above what was live when it started.

    Python-level tools (tracemalloc, getrusage) do not see torch's CPU
    allocator, and RSS misses short-lived ``mmap`` blocks, so this replays
    the allocation events recorded by ``torch.profiler(profile_memory=True)``
    in time order. Memory that ``fn`` allocates and keeps counts too.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each event's *self* memory is what it allocated minus what it freed
    # itself; a free of a tensor outside any op shows up as a "[memory]" event.
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = file or sys.stdout

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    print(line(cells[0]), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in cells[1:]:
        print(line(r), file=out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same folder, then rename)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def environment() -> dict[str, Any]:
    """What the numbers depend on, recorded next to them."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # Other work on the machine: absolute times scale with it, ratios much less.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
