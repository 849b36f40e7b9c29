"""The memory budget's bookkeeping, checked the same way for every operator on it.

``CurvatureOperator`` runs one budget loop for the Hessian and the Gauss-Newton
operators; :func:`check_budget_bookkeeping` holds what either must show under it.
"""

from __future__ import annotations

from typing import Any

import torch


def check_budget_bookkeeping(
    op: Any,
    budget: int,
    vs: torch.Tensor,
    ref_v: torch.Tensor,
    ref_m: torch.Tensor,
    monkeypatch,
    atol: float,
) -> None:
    """Products equal the kept graph's; the graphs kept and rebuilt stay within ``budget``;
    every later product rebuilds exactly the graphs not kept."""
    builds = []
    original = op._chunk_graph

    def counted(*args):
        builds.append(1)
        return original(*args)

    monkeypatch.setattr(op, "_chunk_graph", counted)
    # other chunks, so the sums are rounded differently: equal to float64 rounding
    torch.testing.assert_close(op.matvec(vs[0]), ref_v, rtol=1e-10, atol=atol)
    torch.testing.assert_close(op.matmat(vs), ref_m, rtol=1e-10, atol=atol)
    n = len(op.batches)
    assert n > 1  # cut into chunks whose graphs take at most about half the budget
    assert op.graphs_kept < n
    # half the budget holds a chunk's graph, so one is kept; or not even one sample's
    # (the weight-sized gradient kept with each graph is most of it on a model this
    # small): then chunks that fill the budget, none kept
    assert (op.graphs_kept >= 1) == (2 * max(op.graph_bytes) <= budget)
    # what is held at once (the kept graphs and the one rebuilt) stays within the budget
    assert op.peak_graph_bytes <= budget
    kept_bytes = sum(b for b, g in zip(op.graph_bytes, op._kept) if g is not None)
    assert kept_bytes <= budget
    assert kept_bytes + max(b for b, g in zip(op.graph_bytes, op._kept) if g is None) <= budget
    # every product rebuilds exactly the graphs not kept (plus one to measure, the first time)
    builds.clear()
    op.matvec(vs[1])
    assert len(builds) == n - op.graphs_kept
