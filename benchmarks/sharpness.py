"""Hessian top eigenvalue and trace: samkit against PyHessian and curvlinops, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharpness.py [--reps 3]
        [--models cnn resnet transformer] [--json out.json] [--cache DIR]
        [--groups eig_tol eig_acc trace ggn ggn_trace] [--paths eager compiled budget]
    .venv/bin/python benchmarks/sharpness.py --table run1.json run2.json ...   # README table

``--cache DIR`` keeps the trained weights (the ResNet's training takes ~5 minutes)
and the reference values (~12 minutes for the ResNet), keyed by a SHA-256 of the
weights and samples, for later runs. Every row and repetition is printed as it
finishes, and with ``--json`` the rows so far are written after each one
(``"partial": true``), so a run stopped early keeps what it measured.

Models (all briefly trained on MNIST-1D, evaluated in eval mode, CPU):

- ``cnn``: the MNIST-1D paper's CNN (5,210 parameters), 1000 training samples;
- ``resnet``: the study's ResNet widened to 100 channels (1,068,710 parameters,
  BatchNorm), 128 training samples;
- ``transformer``: a pre-norm transformer encoder built here from
  :class:`TransformerConfig` (the 40-sample signal cut into 10 patches of 4,
  6 layers of width 384, 6 heads, MLP 1536: 10,657,162 parameters, no
  download), 64 training samples, loader batches of 16.

Product paths: the ``samkit`` rows run the default ``product="auto"`` (eager
until the products have taken ``COMPILE_AFTER_S`` seconds); ``samkit compiled``
rows ask for ``product="compiled"`` (their time includes the first call's
compile, shown on the row's line), ``samkit budget`` rows (loader mode) give
``memory_budget`` the bytes of one loader batch's gradient graph (the tensors it
saves and the gradient kept with it), which is what PyHessian holds at once
(``--memory-budget`` to change it).

Each library is used the way its documentation shows:

- PyHessian 0.1: ``hessian(model, criterion, data=(x, y) | dataloader=batches,
  cuda=False)``; ``.eigenvalues(tol=...)`` (power iteration, its stopping rule:
  relative change between two iterations) and ``.trace(maxIter=m, tol=0)``
  (Hutchinson, m Rademacher probes);
- curvlinops 3.0.1: ``HessianLinearOperator(model, loss, params, batches)``
  (``check_deterministic=False``: its safety check is not part of the
  computation, and leaving it out favours curvlinops), ``.to_scipy()`` with
  ``scipy.sparse.linalg.eigsh(k=1, which="LA", tol=...)`` (ARPACK Lanczos),
  and its ``hutchpp_trace`` / ``xtrace`` on the operator;
- samkit: ``HessianOperator`` with ``top_eigenvalues(eigenvectors=False)``
  (Lanczos, stops on a Ritz-value error bound; eigenvalues only, as eigsh is
  asked) and ``hessian_trace(tol=...)`` (Hutchinson deflated by a Lanczos
  basis that grows with the probes, stops on its standard error). Under the
  ``samkit budget`` rows' memory budget both keep only the rows it holds (the
  lean path: no Krylov basis, the deflation basis cut; ``method`` and ``rows``
  on the row's line).

Two modes: one batch (every sample in one ``(x, y)``) and data loader (the same
samples in batches of 100 for the CNN, 32 for the ResNet). PyHessian keeps the
gradient graph in one-batch mode and recomputes it per batch in loader mode;
curvlinops recomputes per batch in both; samkit regroups a loader's batches
into one chunk and keeps the graph.

Rows:

- ``eig, tol 1e-3``: each library at relative tolerance 1e-3 under its own rule;
  the error against the reference is shown.
- ``eig, error <= A``: each library at the loosest tolerance of a ladder
  (1e-2, 3e-3, 1e-3, ... 1e-9) whose relative error is at most A
  (``--eig-accuracy``) for every repetition's seed (calibrated first in
  one-batch mode; the loader mode computes the same iterates).
- ``trace, stderr <= A``: samkit with ``tol=A`` (``--trace-accuracy``: 0.02 for
  the CNN, 0.05 for the ResNet, where 0.02 would take PyHessian ~3500 probes), a
  standard error of at most A times the trace, estimated from its own probes
  (unbiased); PyHessian with the number of Hutchinson probes whose standard
  error is A times the trace, from the spread of its probes in a pilot run;
  curvlinops's Hutch++ and XTrace with at least as many products as samkit's
  median. All are unbiased: their error over the repetitions against the
  reference is shown (root mean square), so the accuracy is compared as
  measured, not assumed.
- GGN rows: the generalised Gauss-Newton matrix, a positive semi-definite
  *proxy* of the Hessian (not the Hessian): samkit ``GGNOperator`` + Lanczos
  against curvlinops ``GGNLinearOperator`` + eigsh at tol 1e-3, and samkit's
  ``ggn_trace`` (one per-sample backward pass, unbiased for tr G).

References: the top eigenvalues (Hessian and GGN) by samkit's Lanczos to tol
1e-9 on a float64 copy of the model, the trace by samkit's estimator to a standard error of a
quarter of the accuracy asked (0.5 % of the trace by default; at most 1000
probes, its standard error is printed). PyHessian's trace
on the ResNet runs at most ``--max-pyhessian-probes`` (default 50) probes
and its time is scaled to the number needed (each probe is one product of
the same cost); the table says so. Times are wall-clock for the whole call, building each
library's operator included; repetitions are interleaved (repetition 1 of every
row, then repetition 2, ...) and reported as the median and (min-max) spread;
speed-ups are ratios of medians, with the spread of the per-repetition ratios.
Peak memory: the highest resident set size above the level before the call,
sampled every 5 ms in the first repetition (a sampling thread in every row
alike). Blocks below glibc's mmap threshold come from its heap, whose freed
pages an earlier row may leave for a later one to reuse without raising its RSS:
the rows' order then moves their peaks by a few hundred MB on the 10.7M
transformer. ``--mmap-threshold 1048576`` makes every block of 1 MiB or more its
own mapping, freed at once, so each row's peak is what it holds itself.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import hashlib
import json
import math
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samkit.experiments.datasets import load_dataset
from samkit.experiments.models import build_model, count_parameters
from samkit.sharpness import (
    GGNOperator,
    HessianOperator,
    ggn_trace,
    hessian_trace,
    top_eigenvalues,
)
from samkit.sharpness._products import available_bytes

LADDER = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7, 1e-8, 1e-9]


# ------------------------------------------------------------------ models
@dataclass(frozen=True)
class TransformerConfig:
    """A pre-norm transformer encoder over patches of a 1-D signal (about 10.7M parameters)."""

    in_len: int = 40
    num_classes: int = 10
    patch: int = 4
    width: int = 384
    heads: int = 6
    layers: int = 6
    mlp: int = 1536


class _Block(nn.Module):
    """Pre-norm attention + MLP. Attention written out (softmax(QK^T/sqrt d)V): every op
    is twice differentiable, which the fused attention kernels are not."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp), nn.GELU(), nn.Linear(cfg.mlp, cfg.width)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (n, heads, t, d_head)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return h + self.mlp(self.norm2(h))


class PatchTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        tokens = cfg.in_len // cfg.patch
        self.embed = nn.Linear(cfg.patch, cfg.width)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, cfg.width))
        self.blocks = nn.Sequential(*[_Block(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.embed(x.reshape(n, -1, self.cfg.patch)) + self.pos
        return self.head(self.norm(self.blocks(h)).mean(1))


def _train(model: nn.Module, data: Any, steps: int, lr: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.train)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (100,))
        opt.zero_grad()
        F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def setup(name: str, quick: bool, cache: Path | None = None) -> dict[str, Any]:
    """The model, briefly trained (or its trained weights from ``cache``), and its data."""
    data = load_dataset("mnist1d", seed=0)
    torch.manual_seed(0)
    if name == "cnn":
        model = build_model("cnn", in_len=data.in_len, num_classes=data.num_classes)
        steps, lr = (300 if quick else 1500), 1e-2
        samples, loader_batch, trace_accuracy = 1000, 100, 0.02
    elif name == "resnet":
        model = build_model("resnet", in_len=data.in_len, num_classes=data.num_classes, width=100)
        steps, lr = (50 if quick else 300), 1e-3
        samples, loader_batch = (64 if quick else 128), (16 if quick else 32)
        trace_accuracy = 0.05
    elif name == "transformer":
        model = PatchTransformer(
            TransformerConfig(in_len=data.in_len, num_classes=data.num_classes)
        )
        steps, lr = (5 if quick else 150), 3e-4
        samples, loader_batch = (16 if quick else 64), (8 if quick else 16)
        # the quick (5-step) model's trace is ~1 % of its probes' spread: 5 % would take
        # thousands of products, too many for a smoke test
        trace_accuracy = 0.3 if quick else 0.05
    else:
        raise SystemExit(f"unknown model {name!r} (choose cnn, resnet or transformer)")
    # the ResNet's 300 Adam steps take ~5 minutes on one thread: a cache keeps them
    state_file = (
        cache / f"{name}{'-quick' if quick else ''}_steps{steps}_state.pt" if cache else None
    )
    if state_file is not None and state_file.exists():
        model.load_state_dict(torch.load(state_file, weights_only=True))
        model.eval()
        print(f"{name}: trained weights from {state_file}", flush=True)
    else:
        model = _train(model, data, steps, lr)
        if state_file is not None:
            from samkit._atomic import atomic_write_via

            atomic_write_via(state_file, lambda tmp: torch.save(model.state_dict(), tmp))
    x, y = data.train.x[:samples], data.train.y[:samples]
    return {
        "name": name,
        "model": model,
        "x": x,
        "y": y,
        "loader": list(zip(x.split(loader_batch), y.split(loader_batch))),
        "params": count_parameters(model),
        "trace_accuracy": trace_accuracy,
        "quick": quick,
    }


def batches_of(cfg: dict[str, Any], mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(cfg["x"], cfg["y"])] if mode == "batch" else cfg["loader"]


# ------------------------------------------------------------------ memory
_PAGE = 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline is just higher
        pass


def peak_memory(fn: Callable[[], Any]) -> float:
    """Peak resident memory above the level before ``fn`` (MiB), sampled every 5 ms."""
    # garbage of earlier rows first: freed by a collection during ``fn``, it would hide
    # that much of ``fn``'s own memory under a level it was counted in
    gc.collect()
    _trim()
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss())
    return (peak[0] - base) / 2**20


# ------------------------------------------------------------------ peers
def _pyhessian_module() -> Any:
    import pyhessian  # noqa: F401  (registers the module)

    return sys.modules["pyhessian.hessian"]


class PyHessianRun:
    """One PyHessian computation on a fresh copy of the model, products counted."""

    def __init__(self, cfg: dict[str, Any], mode: str) -> None:
        self.model = copy.deepcopy(cfg["model"])  # it leaves graphs in .grad: a copy per run
        self.cfg, self.mode = cfg, mode
        self.count = 0

    def _build(self) -> Any:
        mod = _pyhessian_module()
        if self.mode == "batch":
            h = mod.hessian(
                self.model, nn.CrossEntropyLoss(), data=(self.cfg["x"], self.cfg["y"]), cuda=False
            )
        else:
            h = mod.hessian(
                self.model, nn.CrossEntropyLoss(), dataloader=self.cfg["loader"], cuda=False
            )
            inner = h.dataloader_hv_product

            def counted(v: Any) -> Any:
                self.count += 1
                return inner(v)

            h.dataloader_hv_product = counted
        return h

    def eig(self, tol: float, seed: int, max_iter: int = 1000) -> tuple[float, int]:
        mod = _pyhessian_module()
        inner = mod.hessian_vector_product

        def counted(*a: Any) -> Any:
            self.count += 1
            return inner(*a)

        mod.hessian_vector_product = counted
        try:
            torch.manual_seed(seed)
            vals, _ = self._build().eigenvalues(maxIter=max_iter, tol=tol)
        finally:
            mod.hessian_vector_product = inner
        return float(vals[0]), self.count

    def trace(self, probes: int, seed: int, tol: float = 0.0) -> tuple[float, int, list[float]]:
        mod = _pyhessian_module()
        inner = mod.hessian_vector_product

        def counted(*a: Any) -> Any:
            self.count += 1
            return inner(*a)

        mod.hessian_vector_product = counted
        try:
            torch.manual_seed(seed)
            samples = self._build().trace(maxIter=probes, tol=tol)
        finally:
            mod.hessian_vector_product = inner
        return float(np.mean(samples)), self.count, [float(s) for s in samples]


class CurvlinopsRun:
    """A curvlinops operator (Hessian or GGN) with its products counted."""

    def __init__(self, cfg: dict[str, Any], mode: str, kind: str = "hessian") -> None:
        import curvlinops

        cls = (
            curvlinops.HessianLinearOperator if kind == "hessian" else curvlinops.GGNLinearOperator
        )
        model = cfg["model"]
        params = [p for p in model.parameters() if p.requires_grad]
        self.op = cls(
            model, nn.CrossEntropyLoss(), params, batches_of(cfg, mode), check_deterministic=False
        )
        self.count = 0
        inner = self.op._matmat

        def counted(m: list[torch.Tensor]) -> list[torch.Tensor]:
            self.count += m[0].shape[-1]
            return inner(m)

        self.op._matmat = counted
        self.dim = sum(p.numel() for p in params)

    def eig(self, tol: float, seed: int) -> tuple[float, int]:
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).standard_normal(self.dim)
        vals = eigsh(self.op.to_scipy(), k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        return float(vals[0]), self.count

    def trace(self, method: str, matvecs: int, seed: int) -> tuple[float, int]:
        import curvlinops

        torch.manual_seed(seed)
        fn = curvlinops.hutchpp_trace if method == "hutch++" else curvlinops.xtrace
        return float(fn(self.op, matvecs)), self.count


PATHS = ("auto", "compiled", "budget")
PATH_LIB = {"auto": "samkit", "compiled": "samkit compiled", "budget": "samkit budget"}


def samkit_op(cfg: dict[str, Any], mode: str, ggn: bool = False, path: str = "auto") -> Any:
    """samkit's operator: the default (``product="auto"``), compiled, or with the memory budget."""
    kwargs: dict[str, Any] = {}
    if path == "compiled":
        kwargs["product"] = "compiled"
    elif path == "budget":
        kwargs["memory_budget"] = one_batch_graph_bytes(cfg)
    cls = GGNOperator if ggn else HessianOperator
    return cls(cfg["model"], F.cross_entropy, batches_of(cfg, mode), **kwargs)


def one_batch_graph_bytes(cfg: dict[str, Any]) -> int:
    """What PyHessian holds at once in loader mode: the gradient graph of one loader batch
    (the bytes of the tensors it saves and of the gradient kept with it), measured once
    (or ``--memory-budget``)."""
    if "budget" not in cfg:
        op = HessianOperator(cfg["model"], F.cross_entropy, cfg["loader"][:1], memory_budget=2**62)
        op.matvec(torch.zeros(op.dim))
        cfg["budget"] = op.graph_bytes[0]
    return cfg["budget"]


def path_note(op: Any) -> dict[str, Any]:
    """What the operator's products ran on (the row's line shows it)."""
    info = op.product_info or {}
    note = {"path": info.get("path"), "compile_s": info.get("compile_seconds")}
    if getattr(op, "memory_budget", None) is not None:
        note.update(
            budget_mib=op.memory_budget / 2**20,
            graphs_kept=f"{op.graphs_kept}/{len(op.batches)}",
            peak_graph_mib=op.peak_graph_bytes / 2**20,
        )
    return note


def samkit_eig(
    cfg: dict[str, Any], mode: str, tol: float, seed: int, ggn: bool = False, path: str = "auto"
):
    op = samkit_op(cfg, mode, ggn, path)
    # eigenvalues only, as curvlinops's eigsh is asked (return_eigenvectors=False): under a
    # memory budget that does not hold the Krylov basis the eigenvector costs a second pass
    r = top_eigenvalues(op, tol=tol, max_iter=300, seed=seed, eigenvectors=False)
    return r.eigenvalues[0], op.n_matvecs, {**path_note(op), "method": r.path, "rows": r.rows}


def samkit_trace(
    cfg: dict[str, Any],
    mode: str,
    tol: float,
    seed: int,
    method: str = "deflated",
    path: str = "auto",
):
    op = samkit_op(cfg, mode, False, path)
    r = hessian_trace(op, method=method, tol=tol, max_probes=5000, seed=seed)
    return r.trace, op.n_matvecs, {**path_note(op), "method": r.path, "rows": r.rows}


# ------------------------------------------------------------------ harness
class Table:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, key: str, seconds: float, value: float, hvps: int | None, **extra: Any) -> None:
        row = self.rows.setdefault(key, {"seconds": [], "values": [], "hvps": [], **extra})
        row["seconds"].append(seconds)
        row["values"].append(value)
        row["hvps"].append(hvps)
        row.update(extra)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def calibrate_eig(
    name: str, run: Callable[[float, int], tuple[float, int]], ref: float, target: float, seeds
) -> tuple[float, float]:
    """Loosest tolerance of the ladder whose error is <= target for every seed."""
    for tol in LADDER:
        errs = [abs(run(tol, s)[0] - ref) / abs(ref) for s in seeds]
        if max(errs) <= target:
            return tol, max(errs)
    raise SystemExit(f"{name}: no tolerance down to 1e-9 reaches a relative error of {target}")


class ReferenceCache:
    """Reference values of one model, kept in a JSON file under ``--cache`` (or nowhere).

    The key is a SHA-256 of the weights and the samples, so a cached value is only
    ever used for the very model and data it was computed on; the references are
    the same computations either way (a cache saves the ResNet's ~20 minutes).
    """

    def __init__(self, path: Path | None, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        stored = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.values: dict[str, Any] = stored.get(fingerprint, {})
        self.stored = stored

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value
        if self.path is not None:
            from samkit._atomic import finite, write_json_atomic

            write_json_atomic(self.path, finite({**self.stored, self.fingerprint: self.values}))


def references_cache(cfg: dict[str, Any], cache: Path | None) -> ReferenceCache:
    digest = hashlib.sha256()
    for tensor in [*cfg["model"].state_dict().values(), cfg["x"], cfg["y"]]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path = cache / f"{cfg['name']}_references.json" if cache is not None else None
    return ReferenceCache(path, digest.hexdigest())


GROUPS = ("eig_tol", "eig_acc", "trace", "ggn", "ggn_trace")


def bench_model(
    cfg: dict[str, Any],
    args: argparse.Namespace,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    name = cfg["name"]
    model = cfg["model"]
    seeds = list(range(args.reps))
    groups = set(args.groups)
    trace_accuracy = args.trace_accuracy or cfg["trace_accuracy"]
    if args.memory_budget is not None:
        cfg["budget"] = args.memory_budget
    elif "budget" in args.paths:
        # measured here, untimed: inside the first budget row it was part of its peak
        one_batch_graph_bytes(cfg)
    print(
        f"\n== {name}: {cfg['params']:,} parameters, {len(cfg['x'])} samples, "
        f"loader batches of {len(cfg['loader'][0][0])}",
        flush=True,
    )

    # references (cached by the weights' and data's fingerprint: they are the model's, not a run's)
    t0 = time.perf_counter()
    refs_cache = references_cache(cfg, args.cache)
    # the Lanczos basis of a reference holds one float64 vector per step: at most ~4 GiB of
    # them (400 steps up to the ResNet, 50 for the 10.7M transformer)
    ref_steps = max(50, min(400, int(4 * 2**30 / (8 * cfg["params"]))))
    eig_ref = refs_cache.get("eig")
    if eig_ref is None and groups & {"eig_tol", "eig_acc"}:
        ref_model = copy.deepcopy(model).double()
        ref_op = HessianOperator(ref_model, F.cross_entropy, [(cfg["x"].double(), cfg["y"])])
        ref_res = top_eigenvalues(ref_op, tol=1e-9, max_iter=ref_steps, seed=123)
        eig_ref = float(ref_res.eigenvalues[0])
        if not ref_res.converged:
            print(
                f"reference top eigenvalue: not within 1e-9 after {ref_steps} steps "
                f"(residual bound {ref_res.residuals[0]:.2g})",
                flush=True,
            )
        del ref_op, ref_model, ref_res
        refs_cache.put("eig", eig_ref)
    tr_key = f"trace se {trace_accuracy / 4:g}"
    tr_cached = refs_cache.get(tr_key)
    if tr_cached is None and "trace" in groups:
        tr_ref_res = hessian_trace(
            HessianOperator(model, F.cross_entropy, [(cfg["x"], cfg["y"])]),
            tol=trace_accuracy / 4,
            max_probes=200 if cfg["quick"] else 1000,
            # a growing basis keeps two vectors per probe: a fixed one above ~1M parameters
            deflation_steps="auto" if cfg["params"] < 2_000_000 else 20,
            seed=123,
        )
        tr_cached = {
            "trace": float(tr_ref_res.trace),
            "stderr": float(tr_ref_res.stderr),
            "products": tr_ref_res.n_matvecs,
        }
        refs_cache.put(tr_key, tr_cached)
    tr_ref = tr_cached["trace"] if tr_cached else None
    ggn_ref = refs_cache.get("ggn float64")
    if ggn_ref is None and "ggn" in groups:
        ref_model = copy.deepcopy(model).double()
        ref_op = GGNOperator(ref_model, F.cross_entropy, [(cfg["x"].double(), cfg["y"])])
        ggn_ref = float(
            top_eigenvalues(ref_op, tol=1e-9, max_iter=min(300, ref_steps), seed=123).eigenvalues[0]
        )
        del ref_op, ref_model
        refs_cache.put("ggn float64", ggn_ref)
    print(
        f"reference top eigenvalue {eig_ref}; trace "
        + (
            f"{tr_ref:.5g} +- {tr_cached['stderr']:.2g} ({tr_cached['products']} products)"
            if tr_cached
            else "-"
        )
        + f"; GGN top eigenvalue {ggn_ref} [{time.perf_counter() - t0:.0f} s"
        + (f", cache {refs_cache.path}]" if refs_cache.path else "]"),
        flush=True,
    )

    # calibrations (one-batch mode; untimed)
    t0 = time.perf_counter()
    acc = args.eig_accuracy
    tols: dict[str, tuple[float, float]] = {}
    if "eig_acc" in groups:
        tols = {
            "pyhessian": calibrate_eig(
                "PyHessian",
                lambda tol, s: PyHessianRun(cfg, "batch").eig(tol, s),
                eig_ref,
                acc,
                seeds,
            ),
            "curvlinops": calibrate_eig(
                "curvlinops",
                lambda tol, s: CurvlinopsRun(cfg, "batch").eig(tol, s),
                eig_ref,
                acc,
                seeds,
            ),
            "samkit": calibrate_eig(
                "samkit", lambda tol, s: samkit_eig(cfg, "batch", tol, s), eig_ref, acc, seeds
            ),
        }
    ph_probes = ph_probes_run = 1  # placeholders where the trace rows are not asked for
    peer_matvecs = {"hutch++": 0, "xtrace": 0}
    if "trace" in groups:
        pilot = PyHessianRun(cfg, "batch").trace(args.pilot_probes, 999)[2]
        sd = statistics.stdev(pilot)
        ph_probes = max(2, math.ceil((sd / (trace_accuracy * abs(tr_ref))) ** 2))
        cap = args.max_pyhessian_probes or (50 if name in ("resnet", "transformer") else 10**9)
        ph_probes_run = min(ph_probes, cap)
        sk_products = [samkit_trace(cfg, "batch", trace_accuracy, s)[1] for s in seeds]
        m = statistics.median(sk_products)
        peer_matvecs = {"hutch++": 3 * math.ceil(m / 3), "xtrace": 2 * math.ceil(m / 2)}
        # curvlinops's XTrace keeps its sketch and several dense copies of it: 2.76 GB for 78
        # products of the 1.07M ResNet, ~33 bytes a product and parameter; on the 10.7M
        # transformer (114 products, ~40 GB) it was killed for memory. Not run where it
        # would not fit.
        xtrace_bytes = 34 * peer_matvecs["xtrace"] * cfg["params"]
        if xtrace_bytes > available_bytes(torch.device("cpu")):
            print(
                f"curvlinops xtrace: not run (about {xtrace_bytes / 2**30:.0f} GiB for "
                f"{peer_matvecs['xtrace']} products of {cfg['params']:,} parameters)",
                flush=True,
            )
            peer_matvecs.pop("xtrace")
    print(
        "equal-accuracy settings: eig tol "
        + (", ".join(f"{k} {v[0]:g} (max error {v[1]:.1e})" for k, v in tols.items()) or "-")
        + (
            f"; PyHessian Hutchinson probe SD {sd:.4g} -> {ph_probes} probes"
            + (f" (run with {ph_probes_run}, time scaled)" if ph_probes_run < ph_probes else "")
            + f"; samkit products {sk_products}; curvlinops matvecs {peer_matvecs}"
            if "trace" in groups
            else ""
        )
        + f" [{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )

    scaled = (
        f", time x{ph_probes / ph_probes_run:.2g} of {ph_probes_run}"
        if ph_probes_run < ph_probes
        else ""
    )
    # the rows: (key, group, library, mode, callable(seed) -> (value, hvps))
    rows: list[tuple[str, str, str, str, Callable[[int], tuple[float, int | None]]]] = []
    for mode in ("batch", "loader"):
        tag = "one batch" if mode == "batch" else "loader"
        rows += [
            (
                f"eig tol 1e-3 | pyhessian | {tag}",
                "eig_tol",
                "pyhessian",
                mode,
                lambda s, mode=mode: PyHessianRun(cfg, mode).eig(1e-3, s),
            ),
            (
                f"eig tol 1e-3 | curvlinops | {tag}",
                "eig_tol",
                "curvlinops",
                mode,
                lambda s, mode=mode: CurvlinopsRun(cfg, mode).eig(1e-3, s),
            ),
            (
                f"eig tol 1e-3 | samkit | {tag}",
                "eig_tol",
                "samkit",
                mode,
                lambda s, mode=mode: samkit_eig(cfg, mode, 1e-3, s),
            ),
        ]
        for lib, fn in (
            ("pyhessian", lambda t, s, mode=mode: PyHessianRun(cfg, mode).eig(t, s)),
            ("curvlinops", lambda t, s, mode=mode: CurvlinopsRun(cfg, mode).eig(t, s)),
            ("samkit", lambda t, s, mode=mode: samkit_eig(cfg, mode, t, s)),
        ):
            if lib not in tols:  # eig_acc not asked for
                continue
            tol = tols[lib][0]
            rows.append(
                (
                    f"eig err<={acc:g} | {lib} (tol {tol:g}) | {tag}",
                    "eig_acc",
                    lib,
                    mode,
                    lambda s, fn=fn, tol=tol: fn(tol, s),
                )
            )
        rows += [
            (
                f"trace se<={trace_accuracy:g} | pyhessian ({ph_probes} probes{scaled}) | {tag}",
                "trace",
                "pyhessian",
                mode,
                lambda s, mode=mode: PyHessianRun(cfg, mode).trace(ph_probes_run, s)[:2],
            ),
            (
                f"trace | curvlinops hutch++ ({peer_matvecs['hutch++']}) | {tag}",
                "trace",
                "curvlinops hutch++",
                mode,
                lambda s, mode=mode: CurvlinopsRun(cfg, mode).trace(
                    "hutch++", peer_matvecs["hutch++"], s
                ),
            ),
            (
                f"trace | curvlinops xtrace ({peer_matvecs.get('xtrace', 0)}) | {tag}",
                "trace",
                "curvlinops xtrace",
                mode,
                lambda s, mode=mode: CurvlinopsRun(cfg, mode).trace(
                    "xtrace", peer_matvecs["xtrace"], s
                ),
            ),
            (
                f"trace se<={trace_accuracy:g} | samkit | {tag}",
                "trace",
                "samkit",
                mode,
                lambda s, mode=mode: samkit_trace(cfg, mode, trace_accuracy, s),
            ),
            (
                f"GGN eig tol 1e-3 | curvlinops | {tag}",
                "ggn",
                "curvlinops",
                mode,
                lambda s, mode=mode: CurvlinopsRun(cfg, mode, "ggn").eig(1e-3, s),
            ),
            (
                f"GGN eig tol 1e-3 | samkit | {tag}",
                "ggn",
                "samkit",
                mode,
                lambda s, mode=mode: samkit_eig(cfg, mode, 1e-3, s, ggn=True),
            ),
        ]
    rows.append(
        (
            "GGN trace (per-sample, unbiased) | samkit | one batch",
            "ggn_trace",
            "samkit",
            "batch",
            lambda s: (
                ggn_trace(model, F.cross_entropy, [(cfg["x"], cfg["y"])], seed=s).trace,
                None,
            ),
        )
    )

    rows = [r for r in rows if r[2] != "curvlinops xtrace" or "xtrace" in peer_matvecs]
    rows += path_rows(cfg, args, tols, acc, trace_accuracy)
    rows = [row for row in rows if row[1] in groups]
    table = Table()
    scale = ph_probes / ph_probes_run
    refs = {
        "eig_tol": eig_ref,
        "eig_acc": eig_ref,
        "trace": tr_ref,
        "ggn": ggn_ref,
        "ggn_trace": None,
    }
    info = {
        "model": name,
        "parameters": cfg["params"],
        "samples": len(cfg["x"]),
        "eig_reference": eig_ref,
        "trace_reference": tr_ref,
        "ggn_eig_reference": ggn_ref,
        "eig_tolerances": tols,
        "pyhessian_trace_probes": ph_probes,
    }
    warnings.simplefilter("ignore")
    for rep in seeds:
        for key, group, lib, mode, fn in rows:
            if rep == 0:  # memory sampled in the first repetition (every row alike)
                box: list[Any] = []
                peak = peak_memory(lambda fn=fn, box=box: box.append(timed(lambda: fn(0))))
                sec, res = box[0]
                table.rows.setdefault(key, {"seconds": [], "values": [], "hvps": []})
                table.rows[key]["peak_mib"] = peak
            else:
                sec, res = timed(lambda fn=fn, rep=rep: fn(rep))
            val, hv = res[0], res[1]
            note = res[2] if len(res) > 2 else {}
            if key.startswith("trace se") and lib == "pyhessian" and scale > 1:
                sec, hv = sec * scale, ph_probes  # extrapolated: probes cost the same each
            table.add(key, sec, val, hv, group=group, lib=lib, mode=mode, **note)
            # one line per row and repetition, and the rows so far on disk: a long run
            # stopped early still leaves what it measured
            extra = "".join(
                f", {k} {v:.3g}" if isinstance(v, float) else f", {k} {v}"
                for k, v in note.items()
                if v is not None
            )
            print(f"    {key}: {sec:.3f} s, {val:.6g}, {hv} products{extra}", flush=True)
            if progress is not None:
                progress({**info, "partial": True, **summarize(table, refs, verbose=False)})
        print(f"  repetition {rep + 1}/{args.reps} done", flush=True)
    return {**info, **summarize(table, refs, verbose=True)}


def path_rows(
    cfg: dict[str, Any],
    args: argparse.Namespace,
    tols: dict[str, tuple[float, float]],
    acc: float,
    trace_accuracy: float,
) -> list[tuple[str, str, str, str, Callable[[int], Any]]]:
    """samkit's rows on its other product paths: compiled (both modes), budget (loader)."""
    rows: list[tuple[str, str, str, str, Callable[[int], Any]]] = []
    for path in args.paths:
        if path == "auto":  # the default rows, already there
            continue
        lib = PATH_LIB[path]
        for mode in ("batch", "loader") if path == "compiled" else ("loader",):
            tag = "one batch" if mode == "batch" else "loader"
            rows.append(
                (
                    f"eig tol 1e-3 | {lib} | {tag}",
                    "eig_tol",
                    lib,
                    mode,
                    lambda s, mode=mode, path=path: samkit_eig(cfg, mode, 1e-3, s, path=path),
                )
            )
            if "samkit" in tols:
                tol = tols["samkit"][0]  # the same operator: the same calibrated tolerance
                rows.append(
                    (
                        f"eig err<={acc:g} | {lib} (tol {tol:g}) | {tag}",
                        "eig_acc",
                        lib,
                        mode,
                        lambda s, mode=mode, path=path, tol=tol: samkit_eig(
                            cfg, mode, tol, s, path=path
                        ),
                    )
                )
            rows.append(
                (
                    f"trace se<={trace_accuracy:g} | {lib} | {tag}",
                    "trace",
                    lib,
                    mode,
                    lambda s, mode=mode, path=path: samkit_trace(
                        cfg, mode, trace_accuracy, s, path=path
                    ),
                )
            )
            if path == "compiled":
                rows.append(
                    (
                        f"GGN eig tol 1e-3 | {lib} | {tag}",
                        "ggn",
                        lib,
                        mode,
                        lambda s, mode=mode: samkit_eig(
                            cfg, mode, 1e-3, s, ggn=True, path="compiled"
                        ),
                    )
                )
    return rows


def summarize(table: Table, refs: dict[str, float | None], verbose: bool) -> dict[str, Any]:
    """Median time, spread, error per row; speed-ups wherever samkit and a peer both have a row."""
    if verbose:
        print(
            f"{'row':62s} {'median s':>9s} {'(min-max)':>15s} {'HVPs':>6s} {'value':>10s} "
            f"{'error':>8s} {'peak MiB':>9s}"
        )
    out_rows = {}
    for key, row in table.rows.items():
        ref = refs[row["group"]]
        med = statistics.median(row["seconds"])
        vals = row["values"]
        if ref is None:
            err = ""
        elif row["group"].startswith("trace"):
            rms = math.sqrt(statistics.mean(((v - ref) / ref) ** 2 for v in vals))
            err = f"{rms:8.1e}"  # root mean square over the repetitions
        else:
            err = f"{max(abs(v - ref) / abs(ref) for v in vals):8.1e}"  # worst repetition
        hv = (
            statistics.median(h for h in row["hvps"] if h is not None)
            if any(h is not None for h in row["hvps"])
            else None
        )
        spread = f"({min(row['seconds']):.3g}-{max(row['seconds']):.3g})"
        if verbose:
            print(
                f"{key:62s} {med:9.3f} {spread:>15s} {'-' if hv is None else f'{hv:g}':>6s} "
                f"{statistics.median(vals):10.5g} {err:>8s} {row['peak_mib']:9.1f}"
            )
        out_rows[key] = {**row, "median_seconds": med, "error": err.strip()}

    if verbose:
        print("speed-up = peer time / samkit time (median; per-repetition min-max):")
    ratios = {}
    for group, peers in (
        ("eig_tol", ("pyhessian", "curvlinops")),
        ("eig_acc", ("pyhessian", "curvlinops")),
        ("trace", ("pyhessian", "curvlinops hutch++", "curvlinops xtrace")),
        ("ggn", ("curvlinops",)),
    ):
        for mode, lib in [(m, lib) for lib in PATH_LIB.values() for m in ("batch", "loader")]:
            ours = next(
                (
                    r
                    for r in table.rows.values()
                    if r["group"] == group and r["lib"] == lib and r["mode"] == mode
                ),
                None,
            )
            for peer in peers:
                theirs = next(
                    (
                        r
                        for r in table.rows.values()
                        if r["group"] == group and r["lib"] == peer and r["mode"] == mode
                    ),
                    None,
                )
                if ours is None or theirs is None:  # not measured (yet)
                    continue
                per = [a / b for a, b in zip(theirs["seconds"], ours["seconds"])]
                med = statistics.median(theirs["seconds"]) / statistics.median(ours["seconds"])
                # the default path's keys as before (the README table reads them)
                label = f"{group} {mode}: {peer}" + ("" if lib == "samkit" else f" / {lib}")
                ratios[label] = {"median": med, "min": min(per), "max": max(per)}
                if verbose:
                    print(f"  {label:40s} {med:6.2f}x  ({min(per):.2f}-{max(per):.2f})")
    return {"rows": out_rows, "speedups": ratios}


def bench_products(cfg: dict[str, Any], reps: int) -> dict[str, Any]:
    """Seconds per Hessian-vector product, by back-end and by library (one batch)."""
    model = cfg["model"]
    batch = [(cfg["x"], cfg["y"])]
    dim = cfg["params"]
    gen = torch.Generator().manual_seed(0)
    many = 16 if dim < 5_000_000 else 4  # vmap holds one graph per vector: fewer on a large model
    vecs = {k: torch.randn(k, dim, generator=gen) for k in sorted({1, 4, many})}
    cached = HessianOperator(model, F.cross_entropy, batch, product="eager")
    uncached = HessianOperator(model, F.cross_entropy, batch, cache_graph=False, product="eager")
    func = HessianOperator(model, F.cross_entropy, batch, backend="func", product="eager")
    ggn = GGNOperator(model, F.cross_entropy, batch, product="eager")
    compiled = HessianOperator(model, F.cross_entropy, batch, product="compiled")
    ggn_compiled = GGNOperator(model, F.cross_entropy, batch, product="compiled")
    cached.matvec(vecs[1][0])  # build the cached graphs outside the timing
    ggn.matvec(vecs[1][0])
    # the compiled products' first calls (compiling) outside the timing, reported apart
    first_calls = {}
    for label, op, k in (
        ("samkit compiled, 1 vector", compiled, 1),
        (f"samkit compiled vmap, {many} vectors", compiled, many),
        ("samkit GGN compiled, 1 vector", ggn_compiled, 1),
    ):
        before = (op.product_info or {}).get("compile_seconds") or 0.0
        t = timed(lambda op=op, k=k: op.matvec(vecs[1][0]) if k == 1 else op.matmat(vecs[k]))[0]
        info = op.product_info or {}
        first_calls[label] = {
            "first_call_s": t,
            "compile_s": (info.get("compile_seconds") or 0.0) - before,
            "path": info.get("path"),
        }
    ph = PyHessianRun(cfg, "batch")._build()
    mod = _pyhessian_module()
    ph_v = [
        t.view_as(p) for t, p in zip(vecs[1][0].split([p.numel() for p in ph.params]), ph.params)
    ]
    cvl = CurvlinopsRun(cfg, "batch").op
    cases: dict[str, tuple[int, Callable[[], Any]]] = {
        "samkit cached graph, 1 vector": (1, lambda: cached.matvec(vecs[1][0])),
        "samkit cached graph, 4 vectors batched": (4, lambda: cached.matmat(vecs[4])),
        f"samkit cached graph, {many} vectors batched": (many, lambda: cached.matmat(vecs[many])),
        "samkit forward+double backward, 1 vector": (1, lambda: uncached.matvec(vecs[1][0])),
        "samkit torch.func jvp(grad), 1 vector": (1, lambda: func.matvec(vecs[1][0])),
        f"samkit torch.func vmap, {many} vectors": (many, lambda: func.matmat(vecs[many])),
        "samkit GGN (cached), 1 vector": (1, lambda: ggn.matvec(vecs[1][0])),
        "samkit compiled, 1 vector": (1, lambda: compiled.matvec(vecs[1][0])),
        f"samkit compiled vmap, {many} vectors": (many, lambda: compiled.matmat(vecs[many])),
        "samkit GGN compiled, 1 vector": (1, lambda: ggn_compiled.matvec(vecs[1][0])),
        "PyHessian one batch, 1 vector": (
            1,
            lambda: mod.hessian_vector_product(ph.gradsH, ph.params, ph_v),
        ),
        "curvlinops, 1 vector": (1, lambda: cvl @ vecs[1][0]),
        f"curvlinops, {many} vectors (vmap)": (many, lambda: cvl @ vecs[many].T),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for key, (k, fn) in cases.items():
            times[key].append(timed(fn)[0] / k)
    print(
        f"\n== {cfg['name']}: seconds per product (one batch of {len(cfg['x'])}; median of {reps})"
    )
    out: dict[str, Any] = {}
    for key, ts in times.items():
        out[key] = statistics.median(ts)
        print(f"  {key:45s} {1e3 * out[key]:8.1f} ms  ({1e3 * min(ts):.1f}-{1e3 * max(ts):.1f})")
    eager, fast = out["samkit cached graph, 1 vector"], out["samkit compiled, 1 vector"]
    print(f"  compiled / eager (cached graph), 1 vector: {eager / fast:.2f}x faster")
    for label, first in first_calls.items():
        print(
            f"  first call of {label}: {first['first_call_s']:.1f} s "
            f"(compile {first['compile_s']:.1f} s; runs {first['path']})"
        )
    out["first_calls"] = first_calls
    out["model"], out["parameters"] = cfg["name"], dim
    return out


def bench_estimators(cfg: dict[str, Any], seeds: int) -> dict[str, Any]:
    """Root-mean-square error of the trace estimators at equal products, on the exact Hessian.

    The Hessian is formed column by column (``op.dense()``: one product per
    parameter, CNN only), then every estimator runs on it as a dense matrix over
    ``seeds`` seeds: samkit's growing deflation, fixed deflation, XTrace and
    Hutchinson, and curvlinops's Hutch++ and XTrace.
    """
    import curvlinops

    from samkit.sharpness import DenseOperator

    t0 = time.perf_counter()
    op = HessianOperator(cfg["model"], F.cross_entropy, [(cfg["x"], cfg["y"])])
    h = op.dense().double()
    h = (h + h.T) / 2
    exact = float(h.trace())
    evals = torch.linalg.eigvalsh(h)
    print(
        f"\n== {cfg['name']}: exact Hessian ({op.dim} products, {time.perf_counter() - t0:.0f} s): "
        f"trace {exact:.5g}, top eigenvalues {[round(float(e), 3) for e in evals.flip(0)[:5]]}, "
        f"Frobenius norm {float(h.norm()):.4g}"
    )
    dense = DenseOperator(h)

    def rms(fn: Callable[[int], float]) -> float:
        return math.sqrt(statistics.mean(((fn(s) - exact) / exact) ** 2 for s in range(seeds)))

    def peer(fn: Callable[..., Any], m: int) -> Callable[[int], float]:
        def run(seed: int) -> float:
            torch.manual_seed(seed)
            return float(fn(h, m))

        return run

    out: dict[str, dict[int, float]] = {}
    for m in (24, 48, 96):
        row = {
            "samkit Hutchinson": rms(
                lambda s, m=m: hessian_trace(dense, method="hutchinson", n_probes=m, seed=s).trace
            ),
            "samkit XTrace": rms(
                lambda s, m=m: hessian_trace(dense, method="xtrace", n_probes=m // 2, seed=s).trace
            ),
            "samkit deflated, 20 fixed steps": rms(
                lambda s, m=m: (
                    hessian_trace(dense, n_probes=m - 20, deflation_steps=20, seed=s).trace
                )
            ),
            "samkit deflated, growing (default)": rms(
                lambda s, m=m: hessian_trace(dense, n_probes=m // 3, seed=s).trace
            ),
            "curvlinops Hutch++": rms(peer(curvlinops.hutchpp_trace, m)),
            "curvlinops XTrace": rms(peer(curvlinops.xtrace, m)),
        }
        out[m] = row
        print(
            f"  {m:3d} products: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True
        )
    return {"model": cfg["name"], "trace": exact, "rms_relative_error": out}


GROUP_LABELS = {
    "eig_tol": "top eigenvalue, same tol 1e-3",
    "eig_acc": "top eigenvalue, equal accuracy",
    "trace": "trace, equal accuracy",
    "ggn": "GGN top eigenvalue (proxy), tol 1e-3",
}


def markdown(paths: list[Path]) -> str:
    """The speed-up table of several runs' JSON files: per model, one entry per run that has it.

    Runs may hold different models (``--models cnn`` in one, ``resnet`` in another);
    a run stopped early (``"partial"``) contributes the rows it finished.
    """
    runs = [json.loads(Path(p).read_text()) for p in paths]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for result in run["results"]:
            by_model.setdefault(result["model"], []).append(result)
    lines = [
        "| model | measure | mode | vs PyHessian | vs curvlinops |",
        "|---|---|---|---|---|",
    ]
    for results in by_model.values():
        first = results[0]
        name = (
            f"{first['model']} ({first['parameters'] / 1e6:.2g}M)"
            if first["parameters"] > 1e6
            else f"{first['model']} ({first['parameters']:,})"
        )
        for group, label in GROUP_LABELS.items():
            for mode in ("batch", "loader"):
                cells = []
                for peers in (
                    ("pyhessian",),
                    ("curvlinops", "curvlinops xtrace", "curvlinops hutch++"),
                ):
                    vals = []
                    for result in results:
                        speed = result["speedups"]
                        got = [
                            speed[f"{group} {mode}: {peer}"]
                            for peer in peers
                            if f"{group} {mode}: {peer}" in speed
                        ]
                        if got:  # against curvlinops: its fastest estimator
                            best = min(got, key=lambda r: r["median"])
                            vals.append(
                                f"{best['median']:.2f}x ({best['min']:.2f}-{best['max']:.2f})"
                            )
                    cells.append(", ".join(vals) if vals else "-")
                if cells == ["-", "-"]:
                    continue
                tag = "one batch" if mode == "batch" else "data loader"
                lines.append(f"| {name} | {label} | {tag} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n\n" + rows_markdown(by_model)


def rows_markdown(by_model: dict[str, list[dict[str, Any]]]) -> str:
    """Per row: median s, products, error, memory, from the last run given that has the row."""
    lines = []
    for model, results in by_model.items():
        rows: dict[str, dict[str, Any]] = {}
        for result in results:
            rows.update(result["rows"])
        lines += [
            f"| {model}: row | repetitions | median s | products | error | peak MiB |",
            "|---|---|---|---|---|---|",
        ]
        for key, row in rows.items():
            hvps = [h for h in row["hvps"] if h is not None]
            products = f"{statistics.median(hvps):g}" if hvps else "-"
            label = key.replace(" | ", ", ")  # a "|" would split the markdown cell
            lines.append(
                f"| {label} | {len(row['seconds'])} | {row['median_seconds']:.3g} | {products} "
                f"| {row['error'] or '-'} | {row['peak_mib']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=["cnn", "resnet"], choices=["cnn", "resnet", "transformer"]
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eig-accuracy", type=float, default=1e-4)
    ap.add_argument(
        "--trace-accuracy",
        type=float,
        default=None,
        help="relative standard error of the trace rows (default 0.02 for the CNN, 0.05 for the "
        "ResNet, where PyHessian would need thousands of probes for 0.02)",
    )
    ap.add_argument("--pilot-probes", type=int, default=30)
    ap.add_argument(
        "--max-pyhessian-probes",
        type=int,
        default=None,
        help="run PyHessian's trace with at most this many probes and scale its time "
        "(default: no limit for the CNN, 50 for the ResNet and the transformer)",
    )
    ap.add_argument(
        "--groups",
        nargs="+",
        default=list(GROUPS),
        choices=GROUPS,
        help="which rows to measure (default all): eig_tol, eig_acc (top eigenvalue at the same "
        "tolerance, at equal accuracy), trace, ggn, ggn_trace",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        help="keep the trained weights and the reference values here, reused by later runs on "
        "the same weights and data",
    )
    ap.add_argument(
        "--paths",
        nargs="+",
        default=list(PATHS),
        choices=PATHS,
        help="samkit's product paths to measure (default all): auto (the default operator), "
        "compiled (product='compiled'), budget (loader mode, memory_budget=--memory-budget)",
    )
    ap.add_argument(
        "--memory-budget",
        type=int,
        default=None,
        help="bytes for the budget rows (default: the bytes of one loader batch's "
        "gradient graph, what PyHessian holds at once)",
    )
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="glibc's M_MMAP_THRESHOLD in bytes for the whole run (e.g. 1048576): every block "
        "at least this large is its own mapping, handed back when freed, so a row's peak RSS "
        "is what it holds, not what earlier rows left in the heap (slower allocations)",
    )
    ap.add_argument("--quick", action="store_true", help="smaller models and data (a smoke test)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--products", action="store_true", help="only time one product per back-end and library"
    )
    ap.add_argument(
        "--estimators",
        action="store_true",
        help="only the trace estimators' error at equal products, on the exact Hessian (CNN)",
    )
    ap.add_argument("--seeds", type=int, default=40, help="seeds for --estimators")
    ap.add_argument(
        "--table", nargs="+", type=Path, metavar="JSON", help="print the speed-up table of runs"
    )
    args = ap.parse_args()
    if args.table:
        print(markdown(args.table))
        return
    if args.mmap_threshold is not None:
        if args.mmap_threshold < 1:
            print("--mmap-threshold: expected bytes >= 1", file=sys.stderr)
            raise SystemExit(2)
        try:  # M_MMAP_THRESHOLD is -3; a fixed value also stops glibc raising it
            ok = ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)
        except OSError:
            ok = 0
        print(f"M_MMAP_THRESHOLD {args.mmap_threshold}: {'set' if ok else 'not set'}", flush=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"{args.reps} interleaved repetitions",
        flush=True,
    )
    if args.estimators:
        results = [bench_estimators(setup("cnn", args.quick, args.cache), args.seeds)]
    elif args.products:
        results = [
            bench_products(setup(name, args.quick, args.cache), max(args.reps, 3))
            for name in args.models
        ]
    else:
        results = []
        for name in args.models:
            results.append(
                bench_model(
                    setup(name, args.quick, args.cache),
                    args,
                    lambda partial: save(args, [*results, partial]),
                )
            )
    save(args, results)


def save(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    if args.json:
        from samkit._atomic import finite, write_json_atomic

        write_json_atomic(  # strict JSON: a non-finite estimate is null
            args.json,
            finite(
                {
                    "args": vars(args)
                    | {"json": str(args.json), "cache": args.cache and str(args.cache)},
                    "results": results,
                }
            ),
        )


if __name__ == "__main__":
    main()
