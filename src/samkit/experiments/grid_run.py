"""How ``samkit rl`` and ``samkit gan`` run: the run folder (locked and checked before any
training), every cell run or read back on the study engine, the summary and the report
written (:func:`run_study`, each study's ``run_checked``), and the Python entry point
(:func:`call_study`). A run written under a method's old name is reused
(:func:`accept_renamed`). The pieces they run with are in :mod:`.grid`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._checks import is_number
from .engine import normalise
from .grid import RENAMED, Variant
from .settings import execution, merge

__all__ = ["accept_renamed", "open_study", "run_study", "call_study"]


def accept_renamed(path: Path, identity: Any) -> None:
    """Reuse a run written under a method's old name: when the record in ``path``
    was made with ``identity`` but for the old name (``everyk`` for ``sam_every_k``),
    its identity and method are rewritten to the new name, so that the run counts
    as finished (:func:`finished`) instead of training again."""
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    stored = record.get("config") if isinstance(record, dict) else None
    method = stored.get("method") if isinstance(stored, dict) else None
    if not isinstance(method, dict) or method.get("method") not in RENAMED:
        return
    renamed = {**stored, "method": {**method, "method": RENAMED[method["method"]]}}
    if renamed != normalise(identity):
        return
    record["config"] = renamed
    if record.get("method") in RENAMED:
        record["method"] = RENAMED[record["method"]]
    from .study import write_json_atomic

    write_json_atomic(path, record)


@contextlib.contextmanager
def open_study(
    out: str | os.PathLike[str] | None,
    default: Callable[[], Path],
    check: Callable[[Path], None],
    kind: str,
) -> Iterator[Path]:
    """Lock the run folder (``out``, else ``default()``), refuse one of another kind of
    study and run ``check(folder)`` (a ValueError before any training), then yield it."""
    from .folder import refuse_other_kind, run_folder, study_folder

    with study_folder(run_folder(out, default)) as locked:
        refuse_other_kind(locked, kind)
        check(locked)
        yield locked


def run_study(
    folder: Path,
    settings: dict[str, Any],
    cells: Sequence[tuple[str, Variant, int]],
    *,
    identity: Callable[[str, Variant, int], dict[str, Any]],
    task: Callable[[str, Variant, int, str, dict[str, Any]], Callable[..., dict[str, Any]]],
    describe: Callable[[dict[str, Any]], str],
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    progress: bool | None,
    log: Callable[[str], None] | None,
    jobs: int | str,
    threads: int | None,
    ray: str | None,
    cleanup: Callable[[str], tuple[str, ...]] | None = None,
    kind: str = "rl",
) -> tuple[dict[str, Any], int]:
    """A study's ``run_checked``, holding the folder's lock: run, or read back, every
    ``(condition, variant, seed)`` cell on the executor of ``jobs``/``threads``/``ray``
    (the study engine, :func:`~samkit.experiments.engine.run_cells`), then write
    ``summarize(records)`` to ``results.json`` and call ``report(summary)``.

    ``settings`` go to ``config.json``; a cell's result is
    ``runs/<condition>/<run key>.json``, reused when it holds
    ``identity(condition, variant, seed)`` (with ``threads`` when the executor
    pins them: one per run by default with several runs at once); otherwise ``task(condition, variant, seed, run key, identity)``
    (called with the runs folder and a run context) makes the record, which the
    driver writes atomically before it removes the files ``cleanup(run key)``
    names. Returns the summary as it reads back and how many cells ran.
    """
    from .engine import Cell, failures, make_executor, warn_failed
    from .engine import run_cells as engine_run
    from .folder import study_folder
    from .study import run_key, write_json_atomic

    show = sys.stderr.isatty() if progress is None else progress
    if threads is None and (jobs != 1 or ray is not None):
        threads = 1  # SB3's and the GAN's small networks: one torch thread per run
    executor = make_executor(jobs, threads, ray=ray, progress=show, log=log)
    with study_folder(folder):
        write_json_atomic(folder / "config.json", settings)
        engine_cells = []
        for condition, variant, seed in cells:
            key = run_key(variant.label, seed)
            wanted = identity(condition, variant, seed)
            if executor.threads is not None:
                wanted = {**wanted, "threads": executor.threads}
            wanted = normalise(wanted)
            accept_renamed(folder / "runs" / condition / f"{key}.json", wanted)
            engine_cells.append(
                Cell(
                    f"{condition} {variant.label} seed {seed}",
                    folder / "runs" / condition,
                    key,
                    wanted,
                    task(condition, variant, seed, key, wanted),
                    cleanup=cleanup(key) if cleanup is not None else (),
                )
            )
        if log is not None:
            for line in resume_plan(kind, folder, engine_cells):
                log(line)
        outcomes = engine_run(
            engine_cells, executor=executor, log=log, describe=describe, write=write_json_atomic
        )
        records = [o.record for o in outcomes if o.record is not None]
        summary = summarize(records)
        summary["failed"] = failures(outcomes)
        write_json_atomic(folder / "results.json", summary)
        report(summary)
    warn_failed(summary["failed"])
    return normalise(summary), sum(o.executed and o.record is not None for o in outcomes)


def resume_plan(kind: str, folder: Path, cells: Sequence[Any]) -> list[str]:
    """What rerunning into ``folder`` does with its finished runs, as ``samkit compare``
    says it: which are kept, which train again because their settings changed (and which
    settings), which are new. Empty for a folder without finished runs. (Without it a
    changed --timesteps or --iterations retrained a finished study over itself, silently.)"""
    from .engine.core import sort_finished
    from .folder import describe_differences

    kept_at, changed_at, new_at, changes = sort_finished(cells)
    kept, changed = [cells[i].name for i in kept_at], [cells[i].name for i in changed_at]
    new = [cells[i].name for i in new_at]
    if not kept and not changed:
        return []

    def some(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    lines = [
        f"samkit {kind}: {folder} holds finished runs: {len(kept)} kept, "
        f"{len(changed)} retrained with other settings, {len(new)} new"
    ]
    if changed:
        lines.append(f"  retrained ({describe_differences(changes, 3)}): {some(changed)}")
    return lines


def call_study(
    given: dict[str, Any],
    *,
    keys: frozenset[str],
    defaults: dict[str, Any],
    preset: dict[str, Any],
    build: Callable[[dict[str, Any]], Any],
    run: Callable[..., Any],
    out: str | os.PathLike[str] | None,
    quick: bool,
    progress: bool | None,
    quiet: bool,
    jobs: int | str | None,
    threads: int | None,
    ray: str | None,
) -> Any:
    """A study from Python (``rl_study``, ``gan_study``): the ``given`` settings (None:
    not given; a single ``rho`` is a list of one) over the ``preset`` when ``quick``,
    over ``defaults``; ``build(merged)`` is the config, ``run(config, out, ...)`` runs it."""
    from .api import check_flags

    if is_number(given.get("rho")):
        given = {**given, "rho": [given["rho"]]}
    check_flags(quick=quick, progress=progress, quiet=quiet)
    unknown = sorted(set(given) - keys)
    if unknown or "out" in given:
        raise ValueError(f"Invalid setting: {', '.join(unknown or ['out'])}")
    config = build(merge(preset if quick else None, given, defaults=defaults))
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    how = execution({"jobs": jobs, "threads": threads, "ray": ray})
    return run(config, out, progress=progress, log=log, **how)
