"""What the study commands (compare, tune, rl, gan) share: the executor's flags, the
number lists of ``--rho`` and ``--seeds``, the log, the closing lines; and the whole
shape of ``samkit rl`` and ``samkit gan`` (:func:`add_grid_arguments`,
:func:`run_grid_study`), which differ only in their own options."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UsageError, warn_if_no_plots

__all__ = [
    "add_execution_arguments",
    "execution_flags",
    "floats",
    "seeds",
    "stderr_log",
    "print_outcome",
    "refusals_before_training",
    "add_grid_arguments",
    "print_methods",
    "run_grid_study",
]


def add_execution_arguments(p: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--threads``, ``--ray``: how many runs at once, and where."""
    g = p.add_argument_group(
        "execution (where the runs train; the numbers are the same on every executor, but a "
        "run's thread count is part of its identity: a rerun with another one trains it again)"
    )
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
        "--head`; needs samkit[distributed]); without --jobs, as many at once as it holds",
    )


def execution_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as settings (None: not given)."""
    jobs = getattr(args, "jobs", None)
    if isinstance(jobs, str) and jobs.strip().isascii() and jobs.strip().isdigit():
        jobs = int(jobs)
    return {
        "jobs": jobs,
        "threads": getattr(args, "threads", None),
        "ray": getattr(args, "ray", None),
    }


def floats(name: str, text: str | None) -> list[float] | None:
    """``--rho 0.05,0.1`` as a list of numbers (None: not given)."""
    if text is None:
        return None
    try:
        return [float(t) for t in text.replace(" ", ",").split(",") if t]
    except ValueError as exc:
        raise UsageError(
            f"invalid --{name} value: {text!r} (expected numbers separated by commas)"
        ) from exc


def seeds(text: str | None) -> int | list[int] | None:
    """``--seeds 5`` (a count) or ``--seeds 0,3,7`` (a list); None: not given."""
    if text is None:
        return None
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError as exc:
        raise UsageError(
            f"invalid --seeds value: {text!r} (a count or comma-separated ints)"
        ) from exc


def stderr_log(quiet: bool) -> Any:
    """The progress log: one line on stderr per message (None with ``--quiet``)."""
    return None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


@contextlib.contextmanager
def refusals_before_training() -> Iterator[None]:
    """The executor's refusals (jobs, threads, a Ray address, GPUs), made before any run
    trains, and a training state that cannot be resumed (its message names the file):
    one line, exit 2. Any other ValueError goes on."""
    try:
        yield
    except ValueError as exc:
        prefixes = (
            "Invalid jobs",
            "Invalid threads",
            "Invalid ray",
            "Invalid gpus",
            "Invalid training state",
        )
        if not str(exc).startswith(prefixes):
            raise
        raise UsageError(str(exc)) from exc


def print_outcome(result: Any) -> int:
    """A study's closing lines: its paired verdicts, then where its files are; the exit
    code (1 where runs failed on every retry: the table lacks them; 1 where every run
    diverged: it compares nothing)."""
    if result.verdicts:
        print()
        for sentence in result.verdicts:
            print(sentence)
    print(f"results: {result.results_path}\nreport:  {result.report_path}")
    runs = result.summary.get("runs") or []
    if runs and all(r.get("diverged") for r in runs):
        # (a study of nothing: its exit said success; --lr 1e30 left every run diverged)
        print(
            f"samkit: every run diverged ({len(runs)}): the table compares nothing; "
            "a learning rate or radius too large?",
            file=sys.stderr,
        )
        return 1
    return 1 if result.failed else 0


# ------------------------------------------------------------- samkit rl / gan
def add_grid_arguments(
    p: argparse.ArgumentParser,
    *,
    conditions: tuple[str, str, str],
    methods_help: str,
    rho_help: str,
    baseline: str,
    out: str,
    own: Callable[[argparse.ArgumentParser], None],
    list_help: str,
) -> None:
    """The flags of a grid study: ``--config``, ``--quick``, the conditions (``conditions``:
    flag, metavar, help), ``--methods``, ``--rho``, ``--seeds``, the study's ``own``
    options, then ``--baseline``, ``--device``, ``--out``, ``--quiet``, the executor's
    flags and ``--list``."""
    p.add_argument("--config", metavar="FILE", help="TOML settings file (flags override it)")
    p.add_argument("--quick", action="store_true", help="a short run (about 2 minutes on a CPU)")
    flag, metavar, help_ = conditions
    p.add_argument(flag, nargs="+", metavar=metavar, help=help_)
    p.add_argument("--methods", nargs="+", metavar="SPEC", help=methods_help)
    p.add_argument("--rho", metavar="R[,R...]", help=rho_help)
    p.add_argument(
        "--seeds", metavar="N|S,S,...", help="number of seeds, or a comma-separated list"
    )
    own(p)
    p.add_argument(
        "--baseline", metavar="LABEL", help=f"the method verdicts compare against ({baseline})"
    )
    p.add_argument("--device", help="cpu (default), cuda, cuda:N, mps, auto")
    p.add_argument("--out", metavar="DIR", help=f"run folder (default: {out})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_execution_arguments(p)
    p.add_argument("--list", action="store_true", help=list_help)


def print_methods(methods: dict[str, Any], width: int) -> None:
    """``--list``'s methods: name, description, options with their defaults."""
    print("methods:")
    for name, info in methods.items():
        opts = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        print(f"  {name:<{width}} {info.description}" + (f" [{opts}]" if opts else ""))


def run_grid_study(
    args: argparse.Namespace,
    name: str,
    study: Any,
    own: dict[str, Any],
    *,
    headline: Callable[[Any], str],
    tables: Callable[[Any], list[str]],
) -> int:
    """``samkit rl`` / ``samkit gan`` once the flags are parsed: merge the preset, the
    TOML file and the flags (``own``: the study's own, as settings), check everything
    (one line and exit 2 on bad input), run or resume the study, print ``tables(result)``,
    the verdicts and the paths. ``headline(config)``: the log's first line after
    ``samkit <name>: ``. A method given by an old name gets one note naming the new one."""
    from ..experiments import settings as st

    with warnings.catch_warnings(record=True) as renamed:
        warnings.simplefilter("always", FutureWarning)
        try:
            toml = st.load_toml(args.config, keys=study.KEYS) if args.config else {}
            flags = {
                **own,
                "methods": args.methods,
                "rho": floats("rho", args.rho),
                "seeds": seeds(args.seeds),
                "baseline": args.baseline,
                "device": args.device,
                "out": args.out,
            }
            preset = study.QUICK if args.quick else None
            merged = st.merge(preset, toml, flags, defaults=study.DEFAULTS)
            config = study.build_config(merged)
            how = st.execution(execution_flags(args))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    for w in renamed:
        if issubclass(w.category, FutureWarning):
            print(f"samkit {name}: note: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out = Path(merged["out"]) if merged["out"] else study.default_out(config)
    log = stderr_log(args.quiet)
    with contextlib.ExitStack() as stack:
        try:  # the folder's lock and every check, before any training: one line, exit 2
            folder = stack.enter_context(study.open_study(config, out))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        warn_if_no_plots(name)
        if log:
            log(f"samkit {name}: {headline(config)} -> {folder}")
        with refusals_before_training():
            result = study.run_checked(
                config, folder, progress=None if not args.quiet else False, log=log, **how
            )
    print("\n\n".join(tables(result)))
    return print_outcome(result)
