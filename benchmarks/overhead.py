r"""SAM's own per-step cost, side by side with a peer and a plain loop.

What is timed
-------------
SAM's *own* work per step: everything except the two forward/backward passes
and the base optimizer's update, i.e. ``first_step`` (gradient norm, weight
backup, ``w <- w + rho g / ||g||``, clearing ``.grad``) plus ``second_step``
(restoring ``w``). Gradients are made once (fixed random tensors) and put
back into ``.grad`` before every call, outside the timed region; between the
two calls each parameter gets a gradient as the second backward would give
it (a few attribute writes, the same for every candidate). The base
optimizer is :class:`NoOpOptimizer`, whose ``step`` does nothing; the cost of
calling it (torch's step hooks) is timed on its own and subtracted.

Candidates, each on its own copy of the model:

* ``samkit``: :class:`samkit.SAM` (foreach kernels, the default);
* ``samkit foreach=False``: samkit's per-tensor reference path;
* ``pytorch-optimizer``: ``pytorch_optimizer.SAM`` 4.x, default settings (on
  CPU its ``foreach=None`` means a per-parameter loop);
* ``pytorch-optimizer foreach=True``: the same with its foreach path forced;
* ``plain loop``: :class:`PaperLoopSAM`, SAM written from the paper
  (Foret et al., arXiv 2010.01412, Alg. 1) as a per-parameter loop.

Two models: one with many small tensors (a stack of transformer encoder
layers, 120 tensors), where per-tensor overhead dominates, and one with few
large tensors (10.5M parameters in 6 tensors), where memory traffic does.

The memory-traffic floor
------------------------
One *pass* is reading or writing every parameter once. An exact-restore SAM
built from torch's element-wise kernels needs at least 8 passes per step::

    ||g||              read g                      1
    backup <- w        read w, write backup        2
    w <- w + s g       read w, read g, write w     3
    w <- backup        read backup, write w        2
                                                  ---
                                                   8

The floor is the time of exactly these four kernels on three *flat*
buffers of the parameters' total size: the same memory traffic with no
per-tensor cost. (A fused "back up and add" kernel, which torch does not
have, could save one pass: 7.) For reference the output also gives the time
of one pass measured as a flat copy over 2.

Two "kernels only" rows give the per-tensor floors: the five foreach kernels
of an exact copy-restore step (what samkit does, as docs/architecture.md of
the project requires: weights copied into buffers allocated once), and, for
comparison only, the cheapest exact scheme there is, which samkit does *not*
use: ``w + s g`` into new tensors and each parameter's ``.data`` swapped to it
and back (no copies, but it breaks views of the weights, compiled graphs
that assume fixed addresses, FSDP).

Memory: bytes held between steps (samkit's weight backup) plus the peak of
what a step allocates (``torch.profiler`` allocation events), in units of
parameter bytes.

Full step: wall time of one training step of a small conv net with BatchNorm,
SAM (``step(closure)``) over SGD, both with momentum 0.9.

Run ``python benchmarks/overhead.py --help``. The candidates are timed
interleaved, so the ratios are measured under the same load even on a
shared machine; absolute times are for this machine only.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    environment,
    median,
    paired_ratio,
    peak_extra_bytes,
    print_table,
    time_interleaved,
    write_json,
)

import samkit  # noqa: E402

RHO = 0.05
FLOOR_PASSES = 8

TARGETS = {
    "overhead_vs_peer_many": 0.45,  # samkit / pytorch-optimizer, own cost, many tensors (issue 8)
    "overhead_vs_floor_large": 1.2,  # <= 1.2x the memory-traffic floor (large tensors)
    "sam_vs_sgd_step": 2.1,  # full training step, SAM over SGD
    "extra_param_copies": 1.0,  # extra memory, in copies of the parameters
}


class NoOpOptimizer(torch.optim.Optimizer):
    """A base optimizer whose step does nothing, so only SAM's own work is timed."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, {"lr": 0.0, **kwargs})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None


class PaperLoopSAM:
    r"""SAM as the paper writes it, one parameter at a time (arXiv 2010.01412, Alg. 1).

    ``e = rho * g / ||g||_2`` with the norm over all parameters; the weights
    are cloned before ``w <- w + e`` and copied back afterwards (exact, like
    the other candidates). This is the baseline every per-tensor
    implementation pays: a few kernel launches and allocations per tensor.
    """

    def __init__(self, params: list[Tensor], base: torch.optim.Optimizer, rho: float) -> None:
        self.params = list(params)
        self.base = base
        self.rho = rho
        self.old: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.old[p] = p.clone()
            p.add_(p.grad * scale)
            p.grad = None

    @torch.no_grad()
    def second_step(self) -> None:
        for p, old in self.old.items():
            p.copy_(old)
        self.old = {}
        self.base.step()


class KernelsOnlySAM:
    """The five foreach kernels of an exact copy-restore SAM step and nothing else
    (not a usable optimizer).

    Per-tensor norms, one global norm, the backup copy, ``w += s g``, the
    restore copy: what an implementation that restores exactly by copying
    into a buffer allocated once (samkit, by its architecture) must launch
    per step, with no checks, no grouping by device, no state. Its time is the
    floor of such per-tensor implementations, which the flat floor (no
    per-tensor cost at all) is not.
    """

    def __init__(self, params: list[Tensor], base: torch.optim.Optimizer, rho: float) -> None:
        self.params = list(params)
        self.base = base
        self.rho = rho
        self.old = {p: torch.empty_like(p) for p in self.params}
        self._backups = list(self.old.values())

    @torch.no_grad()
    def first_step(self) -> None:
        grads = [p.grad for p in self.params]
        norm = torch.stack(torch._foreach_norm(grads)).square().sum().sqrt()
        torch._foreach_copy_(self._backups, self.params)
        torch._foreach_add_(self.params, grads, alpha=float(self.rho / (norm + 1e-12)))
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def second_step(self) -> None:
        torch._foreach_copy_(self.params, self._backups)
        self.base.step()


class KernelsOnlySwapSAM(KernelsOnlySAM):
    """For comparison only, not what samkit does: exact SAM by swapping ``p.data``.

    Per-tensor norms, one global norm, ``w + s g`` into new tensors, each
    parameter's ``.data`` pointed at its new tensor and back: no copies at
    all, the cheapest exact per-tensor scheme. samkit does not use it (the
    project's architecture forbids swapping ``p.data``: views of a weight, CUDA
    graphs and FSDP would not see ``w + e``); the row shows how far below the
    copy-restore floor any exact per-tensor SAM can go on this machine.
    """

    def __init__(self, params: list[Tensor], base: torch.optim.Optimizer, rho: float) -> None:
        self.params = list(params)
        self.base = base
        self.rho = rho
        self.old = {}
        self._held: list[Tensor] = []

    @torch.no_grad()
    def first_step(self) -> None:
        grads = [p.grad for p in self.params]
        norm = torch.stack(torch._foreach_norm(grads)).square().sum().sqrt()
        moved = torch._foreach_add(self.params, grads, alpha=float(self.rho / (norm + 1e-12)))
        self._held = [p.data for p in self.params]
        for p, t in zip(self.params, moved):
            p.data = t
            p.grad = None

    @torch.no_grad()
    def second_step(self) -> None:
        for p, w in zip(self.params, self._held):
            p.data = w
        self._held = []
        self.base.step()


# ----------------------------------------------------------------- models
def many_tensor_model(tiny: bool) -> nn.Module:
    """A stack of transformer encoder layers: 12 tensors each, mixed sizes."""
    d, layers = (16, 2) if tiny else (64, 10)
    return nn.Sequential(
        *[
            nn.TransformerEncoderLayer(
                d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True
            )
            for _ in range(layers)
        ]
    )


def large_model(tiny: bool) -> nn.Module:
    """Few large tensors: three Linear layers, 6 tensors, 10.5M parameters."""
    d = 64 if tiny else 2048
    return nn.Sequential(
        nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d // 2)
    )


def conv_net(tiny: bool) -> nn.Module:
    """A small CNN with BatchNorm for 32x32 RGB inputs, 10 classes."""
    c = 8 if tiny else 32

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, c, 1),
        *block(c, 2 * c, 2),
        *block(2 * c, 4 * c, 2),
        *block(4 * c, 4 * c, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * c, 10),
    )


def _param_bytes(params: list[Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# --------------------------------------------------------- SAM overhead
class _Candidate:
    """One implementation on its own copy of the model, with fixed gradients."""

    def __init__(self, name: str, template: nn.Module, grads: list[Tensor], kind: str) -> None:
        self.name = name
        self.model = copy.deepcopy(template)
        self.params = [p for p in self.model.parameters()]
        self.saved = grads
        self.bufs = [torch.empty_like(g) for g in grads]
        self.second_bufs = [torch.zeros_like(g) for g in grads]
        base_kw = {}
        if kind == "samkit":
            self.opt = samkit.SAM(NoOpOptimizer(self.params), rho=RHO)
        elif kind == "samkit-baseline":
            self.opt = BASELINE.SAM(NoOpOptimizer(self.params), rho=RHO)
        elif kind == "samkit-loop":
            self.opt = samkit.SAM(NoOpOptimizer(self.params), rho=RHO, foreach=False)
        elif kind in ("peer", "peer-foreach"):
            from pytorch_optimizer import SAM as PeerSAM

            if kind == "peer-foreach":
                base_kw["foreach"] = True
            self.opt = PeerSAM(self.params, NoOpOptimizer, rho=RHO, **base_kw)
        elif kind == "loop":
            self.opt = PaperLoopSAM(self.params, NoOpOptimizer(self.params), rho=RHO)
        elif kind == "kernels":
            self.opt = KernelsOnlySAM(self.params, NoOpOptimizer(self.params), rho=RHO)
        elif kind == "kernels-swap":
            self.opt = KernelsOnlySwapSAM(self.params, NoOpOptimizer(self.params), rho=RHO)
        else:
            raise ValueError(f"Invalid kind value: {kind!r}")
        self.kind = kind

    def fill_grads(self) -> None:
        # Every candidate consumes .grad (as scratch, or by clearing it), so
        # the same gradients are put back before each timed call, untimed.
        for p, b, g in zip(self.params, self.bufs, self.saved):
            b.copy_(g)
            p.grad = b

    def first_step(self) -> None:
        if self.kind in ("loop", "kernels", "kernels-swap"):
            self.opt.first_step()
        else:
            self.opt.first_step(zero_grad=True)

    def second_pass(self) -> None:
        # What the backward at w + e leaves behind: a gradient on every parameter
        # (its values do not matter to the no-op base step). Inside the timed
        # region, the same few attribute writes for every candidate.
        for p, b in zip(self.params, self.second_bufs):
            p.grad = b

    def step(self) -> None:
        self.first_step()
        self.second_pass()
        self.opt.second_step()

    def held_bytes(self) -> int:
        """Bytes the optimizer keeps between steps beyond the base optimizer's."""
        if self.kind.startswith("samkit"):
            # the weight backup (named _backup in samkit 0.1)
            backups = getattr(self.opt, "_backups", None) or getattr(self.opt, "_backup", {})
            return sum(b.numel() * b.element_size() for b in backups.values())
        if self.kind.startswith("peer"):
            return sum(
                v.numel() * v.element_size()
                for s in self.opt.state.values()
                for v in s.values()
                if isinstance(v, Tensor)
            )
        return sum(v.numel() * v.element_size() for v in self.opt.old.values())

    def check(self) -> tuple[float, bool]:
        """Relative error of ``w + e`` against float64 maths, and whether restore is exact."""
        w = [p.detach().clone() for p in self.params]
        g64 = [g.double() for g in self.saved]
        norm = math.sqrt(sum(float((g * g).sum()) for g in g64))
        self.fill_grads()
        self.first_step()
        err = 0.0
        for p, w0, g in zip(self.params, w, g64):
            want = w0.double() + RHO * g / norm
            err = max(
                err, float((p.detach().double() - want).abs().max() / (want.abs().max() + 1e-30))
            )
        self.second_pass()
        self.opt.second_step()
        exact = all(torch.equal(p, w0) for p, w0 in zip(self.params, w))
        return err, exact


#: another samkit (an older checkout, --baseline) timed side by side in the same run
BASELINE: Any = None


def load_baseline(package_dir: str) -> Any:
    """Import the samkit package at ``package_dir`` under another name, beside this one."""
    import importlib
    import shutil
    import tempfile

    if not os.path.isfile(os.path.join(package_dir, "__init__.py")):
        raise SystemExit(
            f"overhead.py: --baseline {package_dir!r} is not a package directory (no __init__.py)"
        )
    root = tempfile.mkdtemp(prefix="samkit-baseline-")
    shutil.copytree(package_dir, os.path.join(root, "samkit_baseline"))
    sys.path.insert(0, root)
    return importlib.import_module("samkit_baseline")


CANDIDATES = [
    ("samkit", "samkit"),
    ("samkit foreach=False", "samkit-loop"),
    ("pytorch-optimizer", "peer"),
    ("pytorch-optimizer foreach=True", "peer-foreach"),
    ("plain loop (paper)", "loop"),
    ("kernels only (floor)", "kernels"),
    ("kernels only, p.data swap (not used)", "kernels-swap"),
]


def bench_overhead(
    label: str,
    template: nn.Module,
    *,
    trials: int,
    number: int,
    warmup: int,
    reverse: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(1)
    params = list(template.parameters())
    grads = [torch.randn_like(p) for p in params]
    n_params = sum(p.numel() for p in params)
    pbytes = _param_bytes(params)
    candidates = CANDIDATES + ([("samkit (baseline)", "samkit-baseline")] if BASELINE else [])
    # Where a candidate's tensors land in memory depends on when they are
    # allocated, and on 10M parameters that alone moved a candidate's time by up
    # to 15 % here; --reverse allocates them in the opposite order to show it.
    order = candidates[::-1] if reverse else candidates
    built = {name: _Candidate(name, template, grads, kind) for name, kind in order}
    cands = [built[name] for name, _ in candidates]

    # The floor: the same 8 passes as 4 kernels on flat buffers of the same
    # size, i.e. with no per-tensor cost at all.
    flat_w, flat_g, flat_b = torch.randn(n_params), torch.randn(n_params), torch.empty(n_params)

    def floor_step() -> None:
        torch.linalg.vector_norm(flat_g)  # 1 pass
        flat_b.copy_(flat_w)  # 2
        flat_w.add_(flat_g, alpha=1e-30)  # 3 (alpha keeps the weights as they are)
        flat_w.copy_(flat_b)  # 2

    noop = NoOpOptimizer(copy.deepcopy(template).parameters())
    timed: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
        c.name: (c.step, c.fill_grads) for c in cands
    }
    timed["_floor"] = (floor_step, None)
    timed["_copy"] = (lambda: flat_b.copy_(flat_w), None)
    timed["_base_step"] = (noop.step, None)
    t = time_interleaved(timed, trials=trials, number=number, warmup=warmup, rotate=True)
    base = t.pop("_base_step")
    t_pass = median(t.pop("_copy")) / 2
    floor = t.pop("_floor")
    # SAM's own cost: each sample less the no-op base step of the same round.
    own = {name: [max(a - b, 1e-12) for a, b in zip(v, base)] for name, v in t.items()}

    rows = []
    for c in cands:
        err, exact = c.check()
        c.fill_grads()
        peak = peak_extra_bytes(c.step)
        held = c.held_bytes()
        rows.append(
            {
                "method": c.name,
                "seconds": median(own[c.name]),
                "vs_samkit": paired_ratio(own[c.name], own["samkit"]),
                "samkit_ratio": paired_ratio(own["samkit"], own[c.name]),
                "vs_floor": paired_ratio(own[c.name], floor),
                "passes_equiv": median(own[c.name]) / t_pass,
                "extra_memory_x": (held + peak) / pbytes,
                "extra_bytes": held + peak,
                "held_memory_x": held / pbytes,
                "rel_error": err,
                "exact_restore": exact,
            }
        )
    return {
        "label": label,
        "model": type(template[0]).__name__
        if isinstance(template, nn.Sequential)
        else type(template).__name__,
        "n_tensors": len(params),
        "n_params": n_params,
        "param_bytes": pbytes,
        "base_step_seconds": median(base),
        "pass_seconds": t_pass,
        "floor_passes": FLOOR_PASSES,
        "floor_seconds": median(floor),
        "rows": rows,
    }


# ------------------------------------------------------------- full step
def bench_full_step(tiny: bool, *, trials: int, number: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    template = conv_net(tiny)
    batch, size = (8, 16) if tiny else (64, 32)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def make_closure(model: nn.Module) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        return closure

    m_sgd = copy.deepcopy(template)
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.01, momentum=0.9)
    c_sgd = make_closure(m_sgd)

    def sgd_step() -> None:
        sgd.zero_grad()
        c_sgd()
        sgd.step()

    m_sam = copy.deepcopy(template)
    sam = samkit.SAM(
        torch.optim.SGD(m_sam.parameters(), lr=0.01, momentum=0.9), rho=RHO, model=m_sam
    )
    c_sam = make_closure(m_sam)

    def sam_step() -> None:
        sam.zero_grad()
        sam.step(c_sam)

    from pytorch_optimizer import SAM as PeerSAM

    m_peer = copy.deepcopy(template)
    peer = PeerSAM(m_peer.parameters(), torch.optim.SGD, rho=RHO, lr=0.01, momentum=0.9)
    c_peer = make_closure(m_peer)

    def peer_step() -> None:
        # The peer's documented loop: first pass outside, step(closure) does the rest.
        peer.zero_grad()
        c_peer()
        peer.step(c_peer)

    t = time_interleaved(
        {
            "SGD": (sgd_step, None),
            "samkit SAM": (sam_step, None),
            "pytorch-optimizer SAM": (peer_step, None),
        },
        trials=trials,
        number=number,
        warmup=warmup,
        rotate=True,
    )
    rows = [
        {"method": name, "seconds": median(v), "vs_sgd": paired_ratio(v, t["SGD"])}
        for name, v in t.items()
    ]
    return {
        "model": f"conv net, 4 x (Conv2d + BatchNorm2d + ReLU), {sum(p.numel() for p in template.parameters())} params",
        "batch": batch,
        "input": [3, size, size],
        "rows": rows,
    }


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SAM's own per-step cost vs pytorch-optimizer's SAM and a plain loop; SAM/SGD step time.",
        epilog="example: OMP_NUM_THREADS=1 python benchmarks/overhead.py --json bench.json",
    )
    p.add_argument(
        "--size", choices=["full", "tiny"], default="full", help="tiny: seconds-long smoke run"
    )
    p.add_argument(
        "--trials", type=int, default=None, help="interleaved trials per candidate (median taken)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: leave as is)"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="DIR",
        help="also time the samkit package in DIR (e.g. an older checkout's src/samkit) side by side",
    )
    p.add_argument(
        "--reverse",
        action="store_true",
        help="allocate the candidates' tensors in reverse order (memory placement moves "
        "large-tensor timings by up to 15 %% on some machines)",
    )
    args = p.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        p.error(f"argument --trials: must be >= 1, got {args.trials}")
    if args.threads is not None and args.threads < 1:
        p.error(f"argument --threads: must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        import pytorch_optimizer  # noqa: F401  (the peer)
    except ImportError:
        print("overhead.py needs pytorch-optimizer: pip install 'samkit[bench]'", file=sys.stderr)
        raise SystemExit(2) from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global BASELINE
    BASELINE = load_baseline(args.baseline) if args.baseline else None
    env_start = environment()
    tiny = args.size == "tiny"
    # Short trials, many rounds: the paired ratios then see the same load.
    trials = args.trials or (3 if tiny else 21)
    warm = 1 if tiny else 3

    many = bench_overhead(
        "many tensors",
        many_tensor_model(tiny),
        trials=trials,
        number=2 if tiny else 10,
        warmup=warm,
        reverse=args.reverse,
    )
    large = bench_overhead(
        "large tensors",
        large_model(tiny),
        trials=trials,
        number=1 if tiny else 2,
        warmup=warm,
        reverse=args.reverse,
    )
    full = bench_full_step(tiny, trials=trials, number=1, warmup=warm)

    def row(section: dict[str, Any], method: str) -> dict[str, Any]:
        return next(r for r in section["rows"] if r["method"] == method)

    ratios = {
        "overhead_vs_peer_many": row(many, "pytorch-optimizer")["samkit_ratio"],
        "overhead_vs_peer_foreach_many": row(many, "pytorch-optimizer foreach=True")[
            "samkit_ratio"
        ],
        "overhead_vs_loop_many": row(many, "plain loop (paper)")["samkit_ratio"],
        # what the five kernels alone cost against the peer: no exact SAM can be below it
        "kernels_only_vs_peer_many": row(many, "pytorch-optimizer")["samkit_ratio"]
        * row(many, "kernels only (floor)")["vs_samkit"],
        "samkit_vs_kernels_only_many": row(many, "kernels only (floor)")["samkit_ratio"],
        # the cheapest exact per-tensor scheme, which samkit's architecture rules out
        "swap_kernels_only_vs_peer_many": row(many, "pytorch-optimizer")["samkit_ratio"]
        * row(many, "kernels only, p.data swap (not used)")["vs_samkit"],
        "overhead_vs_peer_large": row(large, "pytorch-optimizer")["samkit_ratio"],
        "overhead_vs_floor_large": row(large, "samkit")["vs_floor"],
        "sam_vs_sgd_step": row(full, "samkit SAM")["vs_sgd"],
        "peer_vs_sgd_step": row(full, "pytorch-optimizer SAM")["vs_sgd"],
        "extra_param_copies": max(
            row(many, "samkit")["extra_memory_x"], row(large, "samkit")["extra_memory_x"]
        ),
    }
    if BASELINE is not None:
        # the baseline's overhead over the peer's, through samkit's paired ratios
        ratios["baseline_vs_samkit_many"] = row(many, "samkit (baseline)")["vs_samkit"]
        ratios["baseline_overhead_vs_peer_many"] = (
            ratios["overhead_vs_peer_many"] * ratios["baseline_vs_samkit_many"]
        )
    # Scalars a step allocates (the per-tensor norms: 4 bytes a tensor) are
    # not a copy of the parameters; 1 % of slack keeps them from failing it.
    slack = {"extra_param_copies": 0.01}
    targets = {
        k: {"target": v, "value": ratios[k], "met": ratios[k] <= v + slack.get(k, 0.0)}
        for k, v in TARGETS.items()
    }
    env_end = environment()
    env_start["load_average_1min_end"] = env_end["load_average_1min"]
    result = {
        "environment": env_start,
        "settings": {"size": args.size, "trials": trials, "rho": RHO, "reverse": args.reverse},
        "overhead": {"many": many, "large": large},
        "full_step": full,
        "ratios": ratios,
        "targets": targets,
    }
    report(result)
    if args.json:
        write_json(args.json, result)
    return result


def report(res: dict[str, Any]) -> None:
    env = res["environment"]
    print(
        f"torch {env['torch']}, {env['torch_threads']} thread(s), {env['cpu_count']} CPUs; "
        f"load average {env['load_average_1min']:.1f} -> {env['load_average_1min_end']:.1f}; "
        f"medians of {res['settings']['trials']} interleaved rounds (ratios: paired per round)\n"
    )
    for sec in res["overhead"].values():
        print(
            f"SAM's own cost per step, {sec['label']}: {sec['model']} x {sec['n_tensors']} tensors, "
            f"{sec['n_params'] / 1e6:.2f}M params; one pass over parameter memory = "
            f"{sec['pass_seconds'] * 1e6:.0f} us; floor ({sec['floor_passes']} passes, flat) = "
            f"{sec['floor_seconds'] * 1e6:.0f} us"
        )
        print_table(
            [
                "implementation",
                "us/step",
                "x samkit",
                "x floor",
                "extra mem (x params)",
                "exact restore",
            ],
            [
                [
                    r["method"],
                    r["seconds"] * 1e6,
                    r["vs_samkit"],
                    r["vs_floor"],
                    f"{r['extra_memory_x']:.3f}",
                    "yes" if r["exact_restore"] else "no",
                ]
                for r in sec["rows"]
            ],
        )
        print()
    full = res["full_step"]
    print(f"Full training step, {full['model']}, batch {full['batch']} x {full['input']}")
    print_table(
        ["optimizer", "ms/step", "x SGD"],
        [[r["method"], r["seconds"] * 1e3, r["vs_sgd"]] for r in full["rows"]],
    )
    print()
    print_table(
        ["target", "value", "limit", "met"],
        [
            [k, f"{v['value']:.3f}", v["target"], "yes" if v["met"] else "NO"]
            for k, v in res["targets"].items()
        ],
    )


if __name__ == "__main__":
    main()
