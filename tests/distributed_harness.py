"""Run named scenarios in N gloo worker processes and collect each rank's result.

One set of workers runs every scenario of a dict in turn (starting torch per
scenario would cost more than the scenarios themselves) and saves each rank's
result as soon as it finishes, so a hang or a crash fails only the scenarios it
reached. The workers run under a deadline and gloo's collectives under a
timeout: a hang is a test failure, not a blocked CI job.

Usage, in a test module::

    SCENARIOS = {"name": fn}            # fn(rank) -> picklable result
    @pytest.fixture(scope="module")
    def results(tmp_path_factory):
        return run_scenarios(__name__, "SCENARIOS", world=2, outdir=tmp_path_factory.mktemp("x"))

    load(results, "name")               # -> [result of rank 0, rank 1, ...]
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Results = tuple[Path, str, int]


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _worker(
    rank: int, world: int, port: int, outdir: str, module: str, attr: str, timeout_s: float
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    out = Path(outdir)
    try:
        scenarios = getattr(importlib.import_module(module), attr)
        for name, fn in scenarios.items():
            try:
                result = fn(rank)
            except BaseException:
                # The other ranks are now stuck in a collective until the timeout;
                # the parent reports this traceback for the scenarios not run.
                (out / f"error.rank{rank}.txt").write_text(
                    f"scenario {name!r}:\n{traceback.format_exc()}"
                )
                raise
            _save(result, out / f"{name}.rank{rank}.pt")
            dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenarios(
    module: str,
    attr: str,
    *,
    world: int,
    outdir: Path,
    deadline_s: float = 150.0,
    timeout_s: float = 30.0,
) -> Results:
    """Run ``module.attr`` (a dict of scenarios) on ``world`` processes; return what :func:`load` reads."""
    ctx = mp.start_processes(
        _worker,
        args=(world, _free_port(), str(outdir), module, attr, timeout_s),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + deadline_s
    failure = None
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                failure = f"workers still running after {deadline_s:.0f} s (hang?)"
                break
    except Exception as exc:  # a worker raised: its traceback is in error.rank*.txt
        failure = f"a worker failed: {exc}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
    errors = "\n".join(f.read_text() for f in sorted(outdir.glob("error.rank*.txt")))
    return outdir, (failure or "") + ("\n" + errors if errors else ""), world


def load(results: Results, name: str) -> list[Any]:
    """Each rank's result of scenario ``name`` (fails the test if a rank did not finish it)."""
    outdir, failure, world = results
    files = [outdir / f"{name}.rank{r}.pt" for r in range(world)]
    if not all(f.exists() for f in files):
        pytest.fail(f"scenario {name!r} did not complete on every rank. {failure}")
    return [torch.load(f, weights_only=False) for f in files]
