"""Are the trace estimators' standard errors honest? Coverage on a matrix with a known trace.

Each estimator of :func:`samkit.sharpness.hessian_trace` reports a standard error
with its estimate. On a 60 x 60 symmetric positive definite matrix with a known
trace (eigenvalues spread quadratically over 0.001 to 10, a fixed random basis),
this draws ``--seeds`` estimates per method at ``--probes`` probes and reports
the bias, the root-mean-square error, the root-mean-square reported standard
error, and the coverage of the interval estimate +- 1.96 standard errors (95 %
if the standard error is right)::

    OMP_NUM_THREADS=1 python benchmarks/trace_coverage.py            # ~1 minute

Results (table and JSON) go to ``--out`` (default ``samkit-runs/trace-coverage``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, write_json  # noqa: E402

import samkit.sharpness as sh  # noqa: E402

METHODS = ("deflated", "xtrace", "hutchinson")


def test_matrix(dim: int = 60) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigs = torch.linspace(0.1, 10.0, dim, dtype=torch.float64) ** 2 / 10
    return q @ torch.diag(eigs) @ q.T


def coverage(a: torch.Tensor, method: str, probes: int, seeds: int) -> dict[str, float]:
    exact = float(a.trace())
    errors, stderrs, inside = [], [], 0
    for seed in range(seeds):
        r = sh.hessian_trace(sh.DenseOperator(a), method=method, n_probes=probes, seed=seed)
        errors.append(r.trace - exact)
        stderrs.append(r.stderr)
        inside += abs(r.trace - exact) <= 1.96 * r.stderr
    n = len(errors)
    return {
        "bias": sum(errors) / n,
        "bias_se": math.sqrt(sum(e * e for e in errors) / n / n),
        "rms_error": math.sqrt(sum(e * e for e in errors) / n),
        "rms_stderr": math.sqrt(sum(s * s for s in stderrs) / n),
        "coverage": inside / n,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, default=1500)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--out", default="samkit-runs/trace-coverage")
    args = ap.parse_args(argv)
    if args.seeds < 2 or args.probes < 2:
        ap.error("--seeds and --probes must be >= 2")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    a = test_matrix()
    results = {m: coverage(a, m, args.probes, args.seeds) for m in METHODS}
    print_table(
        ["method", "bias", "rms error", "rms reported s.e.", "coverage of +-1.96 s.e."],
        [
            [
                m,
                f"{r['bias']:+.3f} +- {r['bias_se']:.3f}",
                f"{r['rms_error']:.3f}",
                f"{r['rms_stderr']:.3f}",
                f"{100 * r['coverage']:.1f} %",
            ]
            for m, r in results.items()
        ],
    )
    print(f"exact trace {float(a.trace()):.3f}; {args.seeds} seeds, {args.probes} probes each")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(
        str(Path(args.out) / "trace_coverage.json"),
        {"seeds": args.seeds, "probes": args.probes, "results": results, "env": environment()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
