r"""The checks that need a CUDA GPU, as one script any GPU owner can rerun.

    python benchmarks/gpu_checks.py                 # every check, a table, exit 1 on any failure
    python benchmarks/gpu_checks.py --only sync fp16 --json gpu.json

Checks (each prints PASS / FAIL with the measured numbers):

* ``foreach``  -- SAM's foreach kernels on CUDA equal its per-tensor path bit for
  bit, for fp32, bf16 and fp16 parameters, and the restore is exact;
* ``sync``     -- the ascent and the restore make no host synchronisation
  (``torch.cuda.set_sync_debug_mode("error")`` raises on any);
* ``fp16``     -- fp16 autocast + ``torch.amp.GradScaler("cuda")``: an overflow
  injected in the first pass, then in the second, skips the step (weights and
  optimizer state untouched, scale halved) and training goes on; without
  overflow the scaled run equals the fp32 run to rounding;
* ``bf16``     -- bf16 autocast trains (loss falls) and matches fp32 within
  bf16's precision;
* ``mixes``    -- GSAM and LookSAM under fp16 + GradScaler equal their fp32 runs
  to rounding (both passes unscaled before mixing);
* ``overhead`` -- ``benchmarks/overhead.py`` on the GPU (SAM's own cost per
  step vs pytorch-optimizer's, SAM/SGD step time).

Nothing here runs on CPU-only machines: without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import samkit

CHECKS: dict[str, Callable[[], dict[str, Any]]] = {}


def check(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    def register(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        CHECKS[name] = fn
        return fn

    return register


def _model(dtype: torch.dtype = torch.float32, width: int = 256, depth: int = 24) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers).to("cuda", dtype)


def _data(n: int = 256, width: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(1)
    return torch.randn(n, width, device="cuda", generator=g), torch.randint(
        0, 10, (n,), device="cuda", generator=g
    )


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@check("foreach")
def foreach_equals_per_tensor() -> dict[str, Any]:
    out: dict[str, Any] = {"ok": True}
    x, y = _data()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        runs = []
        for foreach in (True, False):
            model = _model(dtype)
            opt = samkit.SAM(
                torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                rho=0.05,
                foreach=foreach,
            )
            xd = x.to(dtype)
            for _ in range(3):
                opt.step(lambda m=model, xd=xd: _loss(m, xd, y))
                opt.zero_grad()
            runs.append(_params(model))
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        out[str(dtype)] = same
        out["ok"] &= same
    return out


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scaler: Any = None) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x).float(), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss


@check("sync")
def no_host_sync_in_the_ascent() -> dict[str, Any]:
    model = _model()
    x, y = _data()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.01), rho=0.05)
    _loss(model, x, y)
    torch.cuda.synchronize()
    errors = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        try:
            opt.first_step(zero_grad=True)
        except RuntimeError as exc:
            errors.append(f"first_step: {exc}")
        torch.cuda.set_sync_debug_mode("default")
        _loss(model, x, y)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.second_step(zero_grad=True)
        except RuntimeError as exc:
            errors.append(f"second_step: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"ok": not errors, "errors": errors}


@check("fp16")
def fp16_grad_scaler() -> dict[str, Any]:
    x, y = _data()
    out: dict[str, Any] = {"ok": True}
    for bad_call in (1, 2):
        model = _model()
        opt = samkit.SAM(torch.optim.Adam(model.parameters(), lr=1e-3), rho=0.05)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)

        def closure(
            poison: int | None = None,
            calls: list[int] | None = None,
            model: nn.Module = model,
            scaler: Any = scaler,
        ) -> torch.Tensor:
            calls = calls if calls is not None else []
            calls.append(1)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            bad = loss * float("inf") if poison == len(calls) else loss
            scaler.scale(bad).backward()
            return loss

        opt.step(closure, scaler=scaler)
        scaler.update()
        opt.zero_grad()
        w, state, scale = (
            _params(model),
            copy.deepcopy(opt.base_optimizer.state_dict()),
            scaler.get_scale(),
        )
        calls: list[int] = []
        opt.step(lambda b=bad_call, c=calls: closure(b, c), scaler=scaler)
        scaler.update()
        untouched = all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
        state_same = str(opt.base_optimizer.state_dict()["state"].keys()) == str(
            state["state"].keys()
        )
        halved = scaler.get_scale() == scale / 2
        opt.zero_grad()
        opt.step(closure, scaler=scaler)
        moved = not all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
        ok = untouched and state_same and halved and moved
        out[f"overflow_pass_{bad_call}"] = {
            "untouched": untouched,
            "scale_halved": halved,
            "trains_on": moved,
        }
        out["ok"] &= ok
    return out


@check("bf16")
def bf16_autocast() -> dict[str, Any]:
    x, y = _data()
    losses: dict[str, list[float]] = {}
    for mode in ("fp32", "bf16"):
        model = _model()
        opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rho=0.05)
        losses[mode] = []
        for _ in range(20):

            def closure(model: nn.Module = model, bf16: bool = mode == "bf16") -> torch.Tensor:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    loss = nn.functional.cross_entropy(model(x).float(), y)
                loss.backward()
                return loss

            losses[mode].append(float(opt.step(closure)))
            opt.zero_grad()
    falls = losses["bf16"][-1] < 0.8 * losses["bf16"][0]
    close = abs(losses["bf16"][-1] - losses["fp32"][-1]) < 0.05 * losses["fp32"][0]
    return {
        "ok": falls and close,
        "fp32_final": losses["fp32"][-1],
        "bf16_final": losses["bf16"][-1],
    }


@check("mixes")
def mixes_under_the_scaler() -> dict[str, Any]:
    x, y = _data()
    out: dict[str, Any] = {"ok": True}
    builders = {
        "gsam": lambda ps: samkit.GSAM(torch.optim.SGD(ps, lr=0.01), rho=0.05, alpha=0.2),
        "looksam": lambda ps: samkit.LookSAM(
            torch.optim.SGD(ps, lr=0.01), rho=0.05, k=2, alpha=0.3
        ),
    }
    for name, build in builders.items():
        runs = []
        for scaled in (False, True):
            model = _model()
            opt = build(model.parameters())
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if scaled else None
            for _ in range(4):
                opt.step(lambda m=model, s=scaler: _loss(m, x, y, s), scaler=scaler)
                if scaler is not None:
                    scaler.update()
                opt.zero_grad()
            runs.append(_params(model))
        err = max(float((a - b).abs().max()) for a, b in zip(*runs))
        out[name] = err
        out["ok"] &= err < 1e-5
    return out


@check("overhead")
def overhead_benchmark() -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import overhead

    result = overhead.main(["--trials", "11"])
    return {"ok": True, "ratios": result.get("ratios", {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_checks.py: no CUDA device here; run it on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    failed = []
    for name in args.only or list(CHECKS):
        start = time.perf_counter()
        try:
            res = CHECKS[name]()
        except (
            Exception
        ) as exc:  # a check that crashes is a failure, reported, not a traceback dump
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = res
        print(
            f"{'PASS' if res['ok'] else 'FAIL'}  {name:10s} {json.dumps({k: v for k, v in res.items() if k != 'ok'}, default=str)}"
        )
        if not res["ok"]:
            failed.append(name)
    if args.json:
        from samkit._atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
