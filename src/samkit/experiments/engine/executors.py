"""Local worker processes (``jobs=N`` / ``"auto"``) and the choice of an executor."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import time
import traceback
import warnings
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .core import (
    Cell,
    Event,
    Executor,
    InProcess,
    RunContext,
    import_user_modules,
    user_modules,
    worker_signals,
)

__all__ = ["LocalPool", "auto_plan", "check_jobs", "check_threads", "make_executor"]

MAX_JOBS = 1024


def physical_cores() -> int:
    """Physical cores this process may use (logical ones when that is unknown)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        logical = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(logical, physical))


def visible_gpus() -> list[str]:
    """The GPUs a run may use: CUDA_VISIBLE_DEVICES' entries, else torch's devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def auto_plan() -> tuple[int, int | None, list[str | None]]:
    """``jobs="auto"``: (runs at once, threads per run, each worker's CUDA_VISIBLE_DEVICES).

    One run per GPU when there are GPUs, else one per physical core with one
    torch thread each.
    """
    gpus = visible_gpus()
    if gpus:
        return len(gpus), max(1, physical_cores() // len(gpus)), list(gpus)
    n = physical_cores()
    return n, 1, [None] * n


def check_jobs(jobs: Any) -> int | str:
    """``jobs``: a number of runs at once (1 to 1024) or ``"auto"``; ValueError otherwise."""
    if jobs == "auto":
        return "auto"
    if isinstance(jobs, str) and jobs.strip().isascii() and jobs.strip().isdigit():
        jobs = int(jobs)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise ValueError(f"Invalid jobs value: {jobs!r} (an int in [1, {MAX_JOBS}] or 'auto')")
    return jobs


def check_threads(threads: Any) -> int | None:
    """``threads``: torch threads per run (1 to 1024) or None (not pinned)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_JOBS:
        raise ValueError(
            f"Invalid threads value: {threads!r} (an int in [1, {MAX_JOBS}], or none: not pinned)"
        )
    return threads


def make_executor(
    jobs: Any = 1,
    threads: int | None = None,
    *,
    ray: str | None = None,
    gpus_per_run: float | None = None,
    progress: bool = False,
    log: Any = None,
    loaders: int = 0,
) -> Executor:
    """The executor for ``jobs`` runs at once (``"auto"``: see :func:`auto_plan`).

    ``threads`` (torch threads per run) defaults to: not pinned with one job
    in this process (as before), an even share of the physical cores with
    several, one on Ray. ``ray``: the address of a Ray cluster. ``loaders``: the
    DataLoader worker processes each run starts (``num_workers``), which the local
    pool's worker processes cannot (refused, before any run).
    """
    jobs = check_jobs(jobs)
    threads = check_threads(threads)
    if threads is not None and ray is None and threads > (os.cpu_count() or 1):
        warnings.warn(
            f"threads={threads} torch threads per run on {os.cpu_count() or 1} CPU core(s): "
            "more threads than cores make each run slower, not faster",
            RuntimeWarning,
            stacklevel=2,
        )
    if ray is not None:
        from .raycluster import RayExecutor

        return RayExecutor(
            ray, None if jobs == "auto" else jobs, threads or 1, gpus_per_run=gpus_per_run
        )
    if gpus_per_run is not None:
        raise ValueError("Invalid gpus_per_run value: it is for Ray clusters (give ray=ADDRESS)")
    devices: list[str | None]
    if jobs == "auto":
        jobs, auto_threads, devices = auto_plan()
        threads = threads or auto_threads
    else:
        devices = [None] * jobs
    if jobs == 1 and devices[0] is None:
        return InProcess(threads, progress=progress, log=log)
    if loaders:
        raise ValueError(
            f"Invalid jobs value: {jobs} with num_workers={loaders} (the runs' worker "
            "processes cannot start DataLoader worker processes of their own: use jobs=1 "
            "with num_workers, or num_workers=0 with jobs, or a Ray cluster)"
        )
    cores = os.cpu_count() or 1
    if jobs > cores and all(d is None for d in devices):
        warnings.warn(
            f"jobs={jobs} worker processes on {cores} CPU core(s): the runs share the cores "
            "(none is faster) and each process holds its own memory; jobs='auto' picks one "
            "per physical core",
            RuntimeWarning,
            stacklevel=2,
        )
    return LocalPool(jobs, threads or max(1, physical_cores() // jobs), devices)


def _worker(conn: Connection, threads: int) -> None:
    """A worker process: train the cells it is sent, one at a time, until told to stop."""
    worker_signals()
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only before any parallel work
        torch.set_num_interop_threads(threads)
    cache: dict[str, Any] = {}
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        mods, payload, folder = msg
        lines: list[str] = []
        try:
            import_user_modules(mods)
            task = pickle.loads(payload)
        except BaseException as exc:  # noqa: BLE001 - the driver raises it
            conn.send(
                (
                    "error",
                    RuntimeError(f"cannot read the run: {type(exc).__name__}: {exc}"),
                    lines,
                    0.0,
                )
            )
            continue
        ctx = RunContext(False, lines.append, cache, threads, devices)
        t0 = time.perf_counter()
        try:
            record = task(Path(folder), ctx)
        except BaseException as exc:  # noqa: BLE001 - the driver raises it
            lines.extend(traceback.format_exc().splitlines()[-1:])
            from ..userdata import frames_for_travel

            frames_for_travel(exc)  # (the driver names the user's line from them)
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that cannot travel
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            conn.send(("error", exc, lines, time.perf_counter() - t0))
            continue
        conn.send(("ok", record, lines, time.perf_counter() - t0))


@contextlib.contextmanager
def _environ(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"its worker process was killed ({name})"
    return f"its worker process ended (exit code {exitcode})"


class LocalPool(Executor):
    """``jobs`` worker processes on this machine (``spawn``; started as runs need them).

    Each worker trains one run at a time on ``threads`` torch threads;
    ``devices[k]`` (when given) is worker k's CUDA_VISIBLE_DEVICES. A worker
    that dies is replaced; Ctrl-C in the driver kills them all.
    """

    name = "local"

    def __init__(self, jobs: int, threads: int, devices: list[str | None] | None = None) -> None:
        import multiprocessing

        self.slots, self.threads = jobs, threads
        self.devices = list(devices) if devices else [None] * jobs
        self._mp = multiprocessing.get_context("spawn")
        self._procs: list[Any] = [None] * jobs
        self._conns: list[Connection | None] = [None] * jobs
        self._cells: list[int | None] = [None] * jobs
        self._t0 = [0.0] * jobs

    def describe(self) -> str:
        dev = f", GPUs {','.join(d for d in self.devices if d)}" if any(self.devices) else ""
        return f"{self.slots} worker processes, {self.threads} thread(s) each{dev}"

    def check(self, cell: Cell) -> None:
        try:
            payload = pickle.dumps(cell.task)
        except Exception as exc:  # noqa: BLE001 - a lambda, a local function, an open file
            raise ValueError(
                f"Invalid jobs value: {self.slots} (the runs cannot be sent to worker processes: "
                f"{type(exc).__name__}: {exc}; define the model and data in an importable module, "
                "or use jobs=1)"
            ) from exc
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if b"__main__" in payload and not (main_file and os.path.isfile(main_file)):
            # a function of a script read from stdin, `python -c` or a notebook pickles by
            # name, and a worker process cannot import that __main__ (it failed there)
            raise ValueError(
                f"Invalid jobs value: {self.slots} (the model or data is defined in a script "
                "without a file (stdin, python -c, a notebook), which worker processes cannot "
                "import: put it in a module file, or use jobs=1)"
            )

    def free(self) -> bool:
        return any(c is None for c in self._cells)

    def running(self) -> int:
        return sum(c is not None for c in self._cells)

    def _spawn(self, k: int) -> None:
        parent, child = self._mp.Pipe()
        dev = self.devices[k]
        env: dict[str, str | None] = {"OMP_NUM_THREADS": str(self.threads)}
        if dev is not None:
            env["CUDA_VISIBLE_DEVICES"] = dev
        with _environ(**env):
            proc = self._mp.Process(target=_worker, args=(child, self.threads), daemon=True)
            proc.start()
        child.close()
        self._procs[k], self._conns[k] = proc, parent

    def submit(self, index: int, cell: Cell) -> None:
        k = self._cells.index(None)
        if self._procs[k] is None or not self._procs[k].is_alive():
            self._spawn(k)
        conn = self._conns[k]
        assert conn is not None
        self._cells[k], self._t0[k] = index, time.perf_counter()
        with contextlib.suppress(BrokenPipeError, OSError):  # it died already: wait() says so
            conn.send((user_modules(), pickle.dumps(cell.task), str(cell.folder)))

    def wait(self) -> list[Event]:
        busy = [k for k, c in enumerate(self._cells) if c is not None]
        handles: list[Any] = [self._conns[k] for k in busy] + [
            self._procs[k].sentinel for k in busy
        ]
        ready = set(wait(handles))
        events = []
        for k in busy:
            conn, proc, index = self._conns[k], self._procs[k], self._cells[k]
            assert conn is not None and index is not None
            if conn not in ready and proc.sentinel not in ready:
                continue
            msg = None
            with contextlib.suppress(EOFError, OSError):
                if conn.poll():
                    msg = conn.recv()
            self._cells[k] = None
            if msg is None:
                proc.join(5)
                events.append(Event(index, "died", reason=_death(proc.exitcode)))
                conn.close()
                self._procs[k] = self._conns[k] = None
                continue
            kind, payload, lines, seconds = msg
            if kind == "ok" and self.devices[k] is not None:  # the one GPU it was given
                payload = {**payload, "placement": {"cuda_visible_devices": self.devices[k]}}
            if kind == "ok":
                events.append(Event(index, "ok", payload, lines, seconds=seconds))
            else:
                events.append(Event(index, "error", None, lines, error=payload))
        return events

    def stop(self) -> None:
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.kill()
        for k, proc in enumerate(self._procs):
            if proc is not None:
                proc.join(10)
            self._procs[k] = None
            self._cells[k] = None

    def close(self) -> None:
        for k, proc in enumerate(self._procs):
            conn = self._conns[k]
            if proc is not None and conn is not None:
                with contextlib.suppress(OSError, BrokenPipeError):
                    conn.send(None)
        for k, proc in enumerate(self._procs):
            if proc is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            conn = self._conns[k]
            if conn is not None:
                conn.close()
            self._procs[k] = self._conns[k] = None
