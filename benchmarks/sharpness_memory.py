"""Peak memory of one loader-mode computation on the 10.7M transformer, alone in its process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/sharpness_memory.py ROW --cache DIR

ROW is one of ``samkit-eig``, ``pyhessian-eig``, ``curvlinops-eig`` (top eigenvalue, tol
1e-3), ``samkit-trace`` (standard error 5 %), ``pyhessian-trace`` (20 probes: its memory
does not grow with them), ``curvlinops-trace`` (Hutch++, 60 products). samkit runs the
``samkit budget`` rows' operator (``memory_budget`` = one loader batch's graph).
Run one row per process: ``benchmarks/sharpness.py`` measures its rows one after another
in one process, where each row's resident memory also depends on what the earlier rows
left in the allocator's heap. The measure is the same (``peak_memory``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sharpness as bench  # noqa: E402

ROWS = {
    "samkit-eig": lambda cfg: bench.samkit_eig(cfg, "loader", 1e-3, 0, path="budget"),
    "pyhessian-eig": lambda cfg: bench.PyHessianRun(cfg, "loader").eig(1e-3, 0),
    "curvlinops-eig": lambda cfg: bench.CurvlinopsRun(cfg, "loader").eig(1e-3, 0),
    "samkit-trace": lambda cfg: bench.samkit_trace(cfg, "loader", 0.05, 0, path="budget"),
    "pyhessian-trace": lambda cfg: bench.PyHessianRun(cfg, "loader").trace(20, 0)[:2],
    "curvlinops-trace": lambda cfg: bench.CurvlinopsRun(cfg, "loader").trace("hutch++", 60, 0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("row", choices=sorted(ROWS))
    ap.add_argument("--cache", type=Path, default=None, help="trained weights (sharpness.py's)")
    args = ap.parse_args()
    cfg = bench.setup("transformer", False, args.cache)
    bench.one_batch_graph_bytes(cfg)  # the budget, measured before the row
    out: dict = {}

    def run() -> None:
        t = time.perf_counter()
        out["result"] = ROWS[args.row](cfg)
        out["seconds"] = time.perf_counter() - t

    mib = bench.peak_memory(run)
    print(f"{args.row}: peak {mib:.0f} MiB, {out['seconds']:.0f} s, {out['result']}", flush=True)


if __name__ == "__main__":
    main()
