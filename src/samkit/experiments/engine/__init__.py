"""The one study engine of ``samkit compare``, ``tune``, ``rl`` and ``gan``.

A study is a list of :class:`Cell` (condition x method x seed), or a
:class:`CellSource` that makes them as slots free up (``tune``'s trials, asked
from Optuna one at a time). :func:`run_cells` plans them (a cell whose result
file holds the same identity is finished and read back: resume by identity),
executes the rest through an executor and collects the results in the cells'
order. The driver alone writes each result (atomically), whatever the executor:

* :class:`InProcess` (``jobs=1``, the default): the runs one after another in
  this process, with no new dependency;
* :class:`LocalPool` (``jobs=N`` or ``"auto"``): N worker processes on this
  machine (``spawn``), each pinned to ``threads`` torch threads and, with
  ``auto`` on a GPU machine, to one GPU;
* :class:`~samkit.experiments.engine.raycluster.RayExecutor` (``ray=ADDRESS``):
  Ray tasks on an existing cluster; the run's files travel with the task, so
  the workers need no shared file system.

A run's numbers never depend on the executor: its thread count is part of its
identity (``threads`` in its config), and a worker killed mid-run is replaced
and the run retried from its last epoch checkpoint (``retries`` times, then
the run is marked failed with the reason).
"""

from .core import (
    Cell,
    CellSource,
    Executor,
    InProcess,
    Outcome,
    RunContext,
    StudyProgress,
    failures,
    fault_point,
    finished,
    normalise,
    run_cells,
    warn_failed,
)
from .executors import LocalPool, auto_plan, check_jobs, make_executor, physical_cores

__all__ = [
    "Cell",
    "CellSource",
    "Executor",
    "InProcess",
    "LocalPool",
    "Outcome",
    "RunContext",
    "StudyProgress",
    "auto_plan",
    "check_jobs",
    "failures",
    "fault_point",
    "finished",
    "make_executor",
    "normalise",
    "physical_cores",
    "run_cells",
    "warn_failed",
]
