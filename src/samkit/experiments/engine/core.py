"""Cells, the in-process executor and the one run loop (:func:`run_cells`)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Cell",
    "CellSource",
    "Executor",
    "InProcess",
    "Outcome",
    "RunContext",
    "StudyProgress",
    "failures",
    "fault_point",
    "finished",
    "normalise",
    "read_record",
    "run_cells",
    "state_saved",
    "warn_failed",
]

#: test hook: ``"<file name>@<epoch>@<marker file>"`` kills the process that saves
#: that training state at that epoch with SIGKILL, once (the marker remembers it)
FAULT_ENV = "SAMKIT_FAULT_KILL"
#: test hook: ``"<file>"`` holds every process that saves a training state there,
#: after each epoch, until that file exists (at most 10 minutes): a study that is
#: surely mid-run when a test interrupts it, however fast the machine
HOLD_ENV = "SAMKIT_FAULT_HOLD"


def normalise(obj: Any) -> Any:
    """``obj`` as it reads back from the JSON files (tuples as lists, NaN as null)."""
    from ..._atomic import finite

    return json.loads(json.dumps(finite(obj)))


def read_record(path: Path) -> dict[str, Any] | None:
    """The run record (a JSON object) in ``path``; None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def sort_finished(
    cells: Sequence[Cell],
) -> tuple[list[int], list[int], list[int], list[tuple[str, Any, Any]]]:
    """What a rerun does with each cell's finished record, by index: kept (made with the
    cell's identity), retrained (made with other settings), new (none); and the settings
    that differ, each once. The studies' resume plans say it from these."""
    from ..folder import differences

    kept: list[int] = []
    changed: list[int] = []
    new: list[int] = []
    changes: list[tuple[str, Any, Any]] = []
    for i, cell in enumerate(cells):
        done = read_record(cell.result_path)
        if done is None:
            new.append(i)
            continue
        diffs = differences(done.get(cell.identity_field), cell.identity)
        (changed if diffs else kept).append(i)
        changes += [d for d in diffs if d not in changes]
    return kept, changed, new, changes


def finished(path: Path, identity: Any, field: str = "config") -> dict[str, Any] | None:
    """The record in ``path`` if it exists, parses and was made with ``identity``
    (its ``field``); else None."""
    record = read_record(path)
    if record is not None and record.get(field) == normalise(identity):
        return record
    return None


#: per process: who hears that a run saved its training state (a Ray task ships the
#: run's files to the driver); None: nobody (in-process and local workers share
#: the driver's file system)
_state_listener: Callable[[Path], None] | None = None


def listen_for_states(listener: Callable[[Path], None] | None) -> None:
    """In a worker: call ``listener(path)`` each time a run saves its training state."""
    global _state_listener
    _state_listener = listener


def state_saved(path: Path, epoch: int) -> None:
    """A run saved its training state at ``path`` after ``epoch``: its executor hears
    it (a Ray task sends the run's files to the driver, so a lost node loses at most
    the progress since), then a test may kill or hold the process here."""
    if _state_listener is not None:
        _state_listener(Path(path))
    fault_point(Path(path).name, epoch)


def fault_point(file_name: str, epoch: int) -> None:
    """Where a test kills or holds a worker mid-run (:data:`FAULT_ENV`, :data:`HOLD_ENV`);
    nothing otherwise."""
    hold = os.environ.get(HOLD_ENV)
    if hold:
        deadline = time.monotonic() + 600
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, at, marker = spec.split("@", 2)
    if name != file_name or int(at) != epoch or os.path.exists(marker):
        return
    Path(marker).write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RunContext:
    """What a cell's task gets besides its folder.

    ``cache``: per process, what the runs may share (a study's problem and
    data); ``log``: lines about the run (a worker sends them to the driver,
    which prefixes the run's name); ``threads``/``devices``: where it runs.
    """

    progress: bool = False
    log: Callable[[str], None] | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    devices: str | None = None


@dataclass
class Cell:
    """One run of a study.

    ``task(folder, context) -> record`` trains it (picklable for the process
    and Ray executors: a module-level function or a small dataclass); its
    files are ``<folder>/<stem>.*`` and its result ``<folder>/<stem>.json``,
    finished when that file's ``config`` equals ``identity``. ``cleanup``:
    files in ``folder`` removed once the result is written (what the run kept
    to resume). ``gpus``: the GPUs the run declares (Ray). ``stored`` False:
    its record is its source's to keep (a tune trial's is Optuna's journal),
    so no result file is written or read back.
    """

    name: str
    folder: Path
    stem: str
    identity: dict[str, Any]
    task: Callable[[Path, RunContext], dict[str, Any]]
    cleanup: tuple[str, ...] = ()
    gpus: float = 0.0
    identity_field: str = "config"  # the record's field that holds the identity
    stored: bool = True
    #: what else a finished record must satisfy to be reused (its key, types, ranges: a
    #: file is checked, not trusted); one that fails is trained again. Picklable.
    valid: Callable[[dict[str, Any]], bool] | None = None

    @property
    def result_path(self) -> Path:
        return self.folder / f"{self.stem}.json"


@dataclass
class Outcome:
    """A cell's result: its record as it reads back (None if it failed)."""

    cell: Cell
    record: dict[str, Any] | None
    executed: bool
    error: str | None = None
    attempts: int = 0


def failures(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """The runs that failed (their worker died on every try): name, file stem, why and how
    many tries, for ``results.json``'s ``failed`` (a study must not drop them silently)."""
    return [
        {"run": o.cell.name, "key": o.cell.stem, "reason": o.error, "attempts": o.attempts}
        for o in outcomes
        if o.record is None
    ]


def warn_failed(failed: list[dict[str, Any]]) -> None:
    """One RuntimeWarning naming the failed runs (none: nothing)."""
    if not failed:
        return
    import warnings

    names = "; ".join(f"{f['run']} ({f['reason']})" for f in failed[:3])
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    warnings.warn(
        f"{len(failed)} run(s) failed after every retry and are left out of the table and "
        f"the verdicts: {names}{more}; rerun into the same folder to try them again",
        RuntimeWarning,
        stacklevel=3,
    )


class CellSource:
    """A study's cells made one at a time, as slots free up: :func:`run_cells` takes
    one in place of a list when the next run depends on the results so far (an
    Optuna search asks a trial only when it can start, and tells it each result).

    ``total``: the runs it will give (the study line's count); ``redo``: what the
    log says of a run tried again after its worker died.
    """

    total = 0
    redo = "retrying (from its last epoch's checkpoint, if it saved one)"

    def next_cell(self) -> Cell | None:
        """The next cell; None when there is none to give now. While cells run, the
        loop asks again once one is over; with none running, the study is over."""
        raise NotImplementedError

    def again(self, cell: Cell, why: str) -> Cell:
        """The cell to run when ``cell``'s worker died (``why``) and it is tried again:
        by default the same one, which resumes from its last training state."""
        return cell

    def done(self, outcome: Outcome) -> None:
        """``outcome.cell`` is over: its record, or why it failed (``outcome.error``;
        called before a run's exception propagates)."""


class _CellList(CellSource):
    """A list of cells, in its order."""

    def __init__(self, cells: Sequence[Cell]) -> None:
        self.cells, self.total, self._next = cells, len(cells), 0

    def next_cell(self) -> Cell | None:
        if self._next == self.total:
            return None
        self._next += 1
        return self.cells[self._next - 1]


@dataclass
class Event:
    """What an executor reports about a cell it ran: ``kind`` ok, error or died (the
    run is over), or saved (it runs on; ``files``: what it saved, for the driver to
    write into the run folder)."""

    index: int
    kind: str
    record: dict[str, Any] | None = None
    lines: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    error: BaseException | None = None
    reason: str = ""
    seconds: float = 0.0


class Executor:
    """Runs cells. ``slots``: runs at once; ``threads``: torch threads per run (None: unpinned)."""

    name = "executor"
    slots = 1
    threads: int | None = None
    remote = False  # the run's files travel with it (no shared file system)

    def start(self) -> None:
        """Before the first cell."""

    def check(self, cell: Cell) -> None:
        """ValueError if ``cell`` cannot be run here (before any work)."""

    def free(self) -> bool:
        raise NotImplementedError

    def running(self) -> int:
        raise NotImplementedError

    def submit(self, index: int, cell: Cell) -> None:
        raise NotImplementedError

    def wait(self) -> list[Event]:
        """Block until at least one submitted cell is over."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every run now (Ctrl-C, an error): what they saved lets them resume."""

    def close(self) -> None:
        """After the last cell."""

    def describe(self) -> str:
        return self.name


class InProcess(Executor):
    """The runs one after another in this process (``jobs=1``): today's loop.

    A run's exception (and Ctrl-C) propagates as it is. With ``threads`` the
    run trains on that many torch threads (restored afterwards).
    """

    name = "in-process"

    def __init__(self, threads: int | None = None, *, progress: bool = False, log: Any = None):
        self.threads, self.progress, self.log = threads, progress, log
        self.cache: dict[str, Any] = {}
        self._events: list[Event] = []

    def free(self) -> bool:
        return not self._events

    def running(self) -> int:
        return len(self._events)

    def submit(self, index: int, cell: Cell) -> None:
        import torch

        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        ctx = RunContext(self.progress, self.log, self.cache, self.threads)
        t0 = time.perf_counter()
        try:
            record = cell.task(cell.folder, ctx)
        finally:
            if self.threads is not None:
                torch.set_num_threads(before)
        self._events.append(Event(index, "ok", record, seconds=time.perf_counter() - t0))

    def wait(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def describe(self) -> str:
        return "1 run at a time in this process"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class StudyProgress:
    """The study's line: runs done / running / left, elapsed, estimated time left, failures."""

    def __init__(self, total: int, slots: int) -> None:
        self.total, self.slots = total, max(1, slots)
        self.done = self.failed = self.running = 0
        self.t0 = time.perf_counter()
        self.run_times: list[float] = []

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.done - self.failed - self.running
        if self.run_times:
            per_run = sum(self.run_times) / len(self.run_times)
            eta = f"about {_clock(per_run * (left + 0.5 * self.running) / self.slots)} left"
        else:
            eta = "time left not known yet"
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"study: {self.done}/{self.total} done, {self.running} running, {left} left"
            f"{failed}; {_clock(elapsed)} elapsed, {eta}"
        )


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    from ..._atomic import atomic_open

    for name, data in files.items():
        with atomic_open(folder / name, "wb") as fh:
            fh.write(data)


def run_cells(
    cells: Sequence[Cell] | CellSource,
    *,
    executor: Executor | None = None,
    log: Callable[[str], None] | None = None,
    describe: Callable[[dict[str, Any]], str] | None = None,
    write: Callable[[Path, Any], None] | None = None,
    retries: int = 2,
) -> list[Outcome]:
    """Run, or read back, every cell; the outcomes in the order the cells came.

    ``cells``: a list, or a :class:`CellSource` asked for a cell each time a
    slot is free (and told each outcome). A cell whose result file holds its
    identity is read back (``done before, skipped``); the others go to
    ``executor`` (default :class:`InProcess`) as slots free up. The driver
    writes each result with ``write(path, record)`` (atomic JSON), then
    removes the cell's ``cleanup`` files. A worker that dies mid-run (killed,
    out of memory, a lost node) is replaced and its run retried, from its
    last training state, up to ``retries`` times; then the run is failed with
    the reason and the study goes on. An exception in a run, or Ctrl-C, stops
    every worker and propagates: the folder resumes.
    """
    if write is None:
        from ..._atomic import write_json_atomic

        def write(path: Path, obj: Any) -> None:
            from ..._atomic import finite

            write_json_atomic(path, finite(obj))

    source = cells if isinstance(cells, CellSource) else _CellList(cells)
    executor = executor or InProcess(log=log)
    n = source.total
    given: list[Cell] = []  # by index, in the order they came (a retry may replace one)
    outcomes: dict[int, Outcome] = {}
    attempts: list[int] = []
    again: deque[tuple[int, str]] = deque()  # runs to try again, and why
    executor.start()
    parallel = executor.slots > 1 or executor.remote
    progress = StudyProgress(n, executor.slots)
    checked = False

    def over(outcome: Outcome, i: int) -> None:
        outcomes[i] = outcome
        source.done(outcome)

    def study_line() -> None:
        if parallel and log:
            log(progress.line())

    if parallel and log:
        log(f"study: {n} runs, {executor.describe()}")
    try:
        while True:
            while executor.free():
                if again:
                    i, why = again.popleft()
                    cell = given[i] = source.again(given[i], why)
                else:
                    next_cell = source.next_cell()
                    if next_cell is None:
                        break
                    i, cell = len(given), next_cell
                    given.append(cell)
                    attempts.append(0)
                    done = (
                        finished(cell.result_path, cell.identity, cell.identity_field)
                        if cell.stored
                        else None
                    )
                    if done is not None and cell.valid is not None and not cell.valid(done):
                        if log:
                            log(
                                f"[{i + 1}/{n}] {cell.name}: its record is malformed "
                                "(or its files damaged), retrained"
                            )
                        done = None
                    if done is not None:
                        progress.done += 1
                        if log:
                            log(f"[{i + 1}/{n}] {cell.name}: done before, skipped")
                        over(Outcome(cell, done, executed=False), i)
                        continue
                if not checked:
                    executor.check(cell)
                    checked = True
                cell.folder.mkdir(parents=True, exist_ok=True)
                attempts[i] += 1
                progress.running += 1
                executor.submit(i, cell)
            if not executor.running():
                break
            for ev in executor.wait():
                i, cell = ev.index, given[ev.index]
                if ev.kind == "saved":  # a remote run's training state, as it goes
                    _write_files(cell.folder, ev.files)
                    continue
                progress.running -= 1
                if log:
                    for line in ev.lines:
                        log(f"  {cell.name}: {line.strip()}")
                if ev.kind == "error":
                    assert ev.error is not None
                    why = f"{type(ev.error).__name__}: {ev.error}"
                    over(Outcome(cell, None, True, why, attempts[i]), i)
                    raise ev.error
                if ev.kind == "died":
                    why = f"{ev.reason} ({attempts[i]} tries)"
                    if attempts[i] <= retries:
                        if log:
                            log(
                                f"  {cell.name}: {ev.reason}; {source.redo} "
                                f"(try {attempts[i] + 1} of {retries + 1})"
                            )
                        again.appendleft((i, why))
                        continue
                    progress.failed += 1
                    if log:
                        log(f"[{i + 1}/{n}] {cell.name}: FAILED: {why}")
                    over(Outcome(cell, None, True, why, attempts[i]), i)
                    study_line()
                    continue
                record = ev.record
                assert record is not None
                if ev.files:
                    _write_files(cell.folder, ev.files)
                if cell.stored:
                    write(cell.result_path, record)
                    for name in cell.cleanup:
                        (cell.folder / name).unlink(missing_ok=True)
                progress.done += 1
                progress.run_times.append(ev.seconds)
                if log:
                    what = describe(record) if describe else "done"
                    log(f"[{i + 1}/{n}] {cell.name}: {what}")
                over(Outcome(cell, normalise(record), True, attempts=attempts[i]), i)
                study_line()
    except BaseException:
        executor.stop()
        raise
    finally:
        executor.close()
    return [outcomes[i] for i in sorted(outcomes)]


def worker_signals() -> None:
    """In a worker: Ctrl-C is the driver's to handle (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # and it ends with its driver, even on kill -9
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def user_modules() -> list[tuple[str, str]]:
    """The user's modules loaded from a file or the current folder: (module name, file).

    A worker imports them (under the same names) before it reads a task, so
    the task's functions resolve there as they do here.
    """
    from ..userdata import _USER_FILES

    out = []
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if isinstance(file, str) and os.path.realpath(file) in _USER_FILES:
            out.append((name, os.path.realpath(file)))
    return out


def import_user_modules(mods: list[tuple[str, str]]) -> None:
    """In a worker: import the driver's user modules under their names.

    A file that exists here is loaded from its path; one that does not (a Ray
    node without the driver's files) is imported by its file name, as Ray's
    ``py_modules`` ships it.
    """
    import importlib
    import importlib.util

    for name, path in mods:
        if name in sys.modules:
            continue
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                continue
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        else:
            sys.modules[name] = importlib.import_module(Path(path).stem)
