"""Runs as Ray tasks on an existing cluster (``ray=ADDRESS``, ``samkit[distributed]``).

Each run is one task declaring ``num_cpus=threads`` and ``num_gpus`` (one
GPU per run when the cluster has GPUs, unless ``gpus_per_run`` says
otherwise): Ray gives the task exactly that many devices
(``CUDA_VISIBLE_DEVICES``, recorded in the run's ``placement``). The
user's ``--model``/``--data`` files go with Ray's runtime environment
(``py_modules``). A task trains in a scratch folder on its node with the
files the run already has (its training state), and returns its record and
files: the driver writes them into the one run folder, so the nodes need no
shared file system. Each time a run saves its training state, the task
sends the run's changed files to the driver too (a Ray generator task),
which writes them into the run folder: a task whose node or worker dies is
retried by the engine from that state (``max_retries=0``: the engine's
retries are the only ones), and a driver stopped by Ctrl-C resumes from it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

from .core import Cell, Event, Executor, RunContext, import_user_modules, user_modules

__all__ = ["RayExecutor"]

_CACHE: dict[str, Any] = {}  # per Ray worker process: what the runs may share


def _ray_run(mods: list[tuple[str, str]], payload: bytes, files: dict[str, bytes], threads: int):
    """The task: train one run in a scratch folder; a generator of what the driver writes.

    It yields ``("saved", files)`` each time the run saves its training state (the
    run's files changed since the last such item: a node lost later costs at most the
    progress since), then ``("done", record, lines, files, seconds, devices)``.
    The run trains in a thread of this task so that the task can yield meanwhile.
    """
    import queue
    import threading

    import torch

    from . import core

    torch.set_num_threads(threads)
    import_user_modules(mods)
    task = pickle.loads(payload)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    lines: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="samkit-run-") as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        sent = dict(files)

        def changed() -> dict[str, bytes]:
            out = {}
            for p in sorted(folder.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    data = p.read_bytes()
                    if sent.get(p.name) != data:
                        out[p.name] = data
            sent.update(out)
            return out

        items: queue.Queue[tuple[str, Any]] = queue.Queue()

        def train() -> None:
            torch.set_num_threads(threads)
            try:
                ctx = RunContext(False, lines.append, _CACHE, threads, devices)
                items.put(("done", task(folder, ctx)))
            except BaseException as exc:  # noqa: BLE001 - raised by the task, for the driver
                from ..userdata import frames_for_travel

                frames_for_travel(exc)  # (the driver names the user's line from them)
                items.put(("error", exc))

        # the run's thread reads its files right after it saved them, before it goes on
        core.listen_for_states(lambda _path: items.put(("saved", changed())))
        try:
            thread = threading.Thread(target=train, name="samkit-run", daemon=True)
            thread.start()
            while True:
                kind, value = items.get()
                if kind == "saved":
                    if value:
                        yield ("saved", value)
                    continue
                thread.join()
                if kind == "error":
                    raise value
                out = changed()
                yield ("done", value, lines, out, time.perf_counter() - t0, devices)
                return
        finally:
            core.listen_for_states(None)


def _resolved(address: str) -> str:
    """``host:port`` with the host as an IP address where it resolves (a cluster named by
    its host name and by its IP is one cluster)."""
    import socket

    host, sep, port = address.rpartition(":")
    try:
        return f"{socket.gethostbyname(host.strip('[]'))}{sep}{port}" if sep else address
    except OSError:
        return address


def _reachable(address: str, timeout: float = 10.0) -> None:
    """Refuse a ``host:port`` where nothing answers (``ray.init`` would retry for minutes,
    printing Ray's own warnings); ``auto`` and ``ray://`` addresses are Ray's to resolve."""
    import socket

    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # (Ray's own message names what is wrong with it)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(
            f"Invalid ray value: {address!r} (nothing answers there: "
            f"{exc.strerror or type(exc).__name__}; start the cluster with `ray start --head`, "
            "or give its address)"
        ) from None


class RayExecutor(Executor):
    """Runs as tasks of the Ray cluster at ``address`` (``"auto"``: the local one)."""

    name = "ray"
    remote = True

    def __init__(
        self,
        address: str,
        jobs: int | None,
        threads: int,
        *,
        gpus_per_run: float | None = None,
    ) -> None:
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"Invalid ray value: {address!r} (a cluster address, host:port)")
        if gpus_per_run is not None and (
            isinstance(gpus_per_run, bool)
            or not isinstance(gpus_per_run, (int, float))
            or not 0 <= gpus_per_run <= 64
        ):
            raise ValueError(f"Invalid gpus_per_run value: {gpus_per_run!r} (a number in [0, 64])")
        self.address, self.jobs, self.threads = address, jobs, threads
        self.gpus_per_run = gpus_per_run
        self.slots = jobs or 1
        self._pending: dict[Any, tuple[int, Cell]] = {}
        self._ray: Any = None
        self._own = False  # whether start() opened the Ray session (close() ends it)

    def start(self) -> None:
        try:
            import ray
        except ImportError as exc:
            from ..._extras import install

            raise ValueError(
                f"Invalid ray value: {self.address!r} (running on a Ray cluster needs ray: "
                f"{install('ray')})"
            ) from exc
        files = sorted({path for _, path in user_modules()})
        env = {"py_modules": files} if files else None
        if ray.is_initialized():
            # the caller's own Ray session: used as it is (never shut down here), and only
            # if it is the cluster asked for
            here = ray.get_runtime_context().gcs_address
            if self.address != "auto" and _resolved(self.address) != _resolved(here):
                raise ValueError(
                    f"Invalid ray value: {self.address!r} (this process is connected to the "
                    f"Ray cluster at {here} already: give that address, or ray.shutdown() first)"
                )
        else:
            _reachable(self.address)
            try:
                ray.init(
                    address=self.address,
                    runtime_env=env,
                    logging_level="ERROR",
                    log_to_driver=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ValueError(
                    f"Invalid ray value: {self.address!r} (cannot connect: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                ) from exc
            self._own = True
        self._ray = ray
        widest = max(
            (n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")),
            default=0,
        )
        if 0 < widest < self.threads:  # (no CPU yet: an autoscaler may add nodes; it waits)
            self.close()
            raise ValueError(
                f"Invalid threads value: {self.threads} CPUs per run, and the Ray cluster's "
                f"largest node has {widest:g} (a run would wait for ever): give --threads "
                f"{max(1, int(widest))} or less"
            )
        res = ray.cluster_resources()
        gpus = self.gpus_per_run
        if gpus is None:
            gpus = 1 if res.get("GPU", 0) >= 1 else 0
        self.gpus = gpus
        cpu_slots = max(1, int(res.get("CPU", 1) // self.threads))
        gpu_slots = int(res.get("GPU", 0) // gpus) if gpus else cpu_slots
        self.slots = self.jobs or max(1, min(cpu_slots, gpu_slots))
        self._remote = ray.remote(_ray_run).options(
            num_cpus=self.threads, num_gpus=gpus, max_retries=0
        )

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU(s)" if getattr(self, "gpus", 0) else ""
        return f"Ray cluster {self.address}: {self.slots} runs at once, {self.threads} CPU(s){gpu} each"

    def check(self, cell: Cell) -> None:
        try:
            pickle.dumps(cell.task)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"Invalid ray value: {self.address!r} (the runs cannot be sent to the cluster: "
                f"{type(exc).__name__}: {exc}; define the model and data in a module file)"
            ) from exc

    def free(self) -> bool:
        return len(self._pending) < self.slots

    def running(self) -> int:
        return len(self._pending)

    def submit(self, index: int, cell: Cell) -> None:
        files = {
            p.name: p.read_bytes()
            for p in sorted(cell.folder.glob(f"{cell.stem}.*"))
            if p.is_file() and p.name != f"{cell.stem}.json"
        }
        gen = self._remote.remote(user_modules(), pickle.dumps(cell.task), files, self.threads)
        self._pending[gen] = (index, cell)

    def wait(self) -> list[Event]:
        ray = self._ray
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        events = []
        for gen in ready:
            index, cell = self._pending[gen]
            try:
                item = ray.get(next(gen))
            except ray.exceptions.RayTaskError as exc:
                del self._pending[gen]
                cause = exc.as_instanceof_cause()
                err = getattr(exc, "cause", None) or cause
                events.append(Event(index, "error", error=err))
                continue
            except (ray.exceptions.RayError, StopIteration) as exc:  # a worker or node lost
                del self._pending[gen]
                # its first sentence: "Task failed because the node it was running on is dead"
                reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
                events.append(Event(index, "died", reason=f"its Ray task was lost: {reason[:200]}"))
                continue
            if item[0] == "saved":
                events.append(Event(index, "saved", files=item[1]))
                continue
            del self._pending[gen]
            _, record, lines, files, seconds, devices = item
            if self.gpus and devices is not None:
                record = {**record, "placement": {"cuda_visible_devices": devices}}
            events.append(Event(index, "ok", record, lines, files, seconds=seconds))
        return events

    def stop(self) -> None:
        if self._ray is None:
            return
        for gen in list(self._pending):
            try:
                self._ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001, S110 - already over
                pass
        self._pending.clear()

    def close(self) -> None:
        if self._ray is not None:
            if self._own:  # (a session the caller opened stays open)
                self._ray.shutdown()
            self._ray = None
