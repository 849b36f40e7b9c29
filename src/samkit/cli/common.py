"""What the study commands (compare, tune, rl, gan) share: the executor's flags."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_execution_arguments", "execution_flags"]


def add_execution_arguments(p: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--threads``, ``--ray``: how many runs at once, and where."""
    g = p.add_argument_group("execution (where the runs train; never what they compute)")
    g.add_argument(
        "--jobs",
        metavar="N",
        help="runs trained at once: 1 (default, in this process), N worker processes, or "
        "'auto' (one per GPU, else one per physical core)",
    )
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads per run (default: not pinned with --jobs 1, an even share of the "
        "cores with more); recorded in each run's config",
    )
    g.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the runs as tasks of the Ray cluster at ADDRESS (host:port of `ray start "
        "--head`; needs samkit[distributed])",
    )


def execution_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as settings (None: not given)."""
    jobs = getattr(args, "jobs", None)
    if isinstance(jobs, str) and jobs.strip().isdigit():
        jobs = int(jobs)
    return {
        "jobs": jobs,
        "threads": getattr(args, "threads", None),
        "ray": getattr(args, "ray", None),
    }
