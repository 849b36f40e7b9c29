"""Checks that need a GPU, for whoever has one: samkit's core on CUDA, and each framework's real CUDA path against samkit's plain loop.

    python benchmarks/gpu_checks.py                      # every check, on cuda
    python benchmarks/gpu_checks.py --only lightning_16_mixed --json out.json
    python benchmarks/gpu_checks.py --device cpu         # the same code on CPU (GradScaler forced)

Each check is one function in ``CHECKS`` returning a dict with ``ok`` and its
measurements; add a section as another function and register it there. The
run is deterministic (``torch.use_deterministic_algorithms``; the cuBLAS
workspace variable is set before CUDA starts), so the framework and the
plain loop must give the same bits; the largest weight difference is
reported either way. Exit code 1 if a check fails.

Sections:

* ``lightning_16_mixed``: ``precision="16-mixed"`` with the GradScaler
  Lightning makes on CUDA, ``accumulate_grad_batches=2``, against
  ``SAM.step(closure, scaler=...)``; then a run whose scale overflows fp16
  (every step skipped, the scale halved each time, the weights untouched).
* ``huggingface_fp16``: ``SAMTrainer`` with ``fp16=True`` (accelerate's
  CUDA GradScaler and autocast), ``gradient_accumulation_steps=2``, against
  the plain loop; then an overflowing run: every step reported skipped and
  the linear LR schedule not advanced.

Core sections (samkit's optimizer itself):

* ``core_foreach``: SAM's foreach kernels on the device equal its per-tensor
  path bit for bit, for fp32, bf16 and fp16 parameters;
* ``core_no_host_sync``: the ascent and the restore make no host
  synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises on any);
* ``core_fp16_scaler``: fp16 autocast + GradScaler: an overflow injected in the
  first pass, then in the second, skips the step (weights and optimizer state
  untouched, scale halved) and training goes on;
* ``core_bf16``: bf16 autocast trains and matches fp32 within bf16's precision;
* ``core_mixes_scaler``: GSAM and LookSAM under fp16 + GradScaler equal their
  fp32 runs to rounding (both passes unscaled before mixing);
* ``core_overhead``: ``benchmarks/overhead.py`` on the GPU.

With ``--device cpu`` the core sections that only mean something on CUDA
(host syncs, the overhead benchmark) report themselves skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA initialises

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import samkit  # noqa: E402
from samkit._atomic import finite, write_json_atomic  # noqa: E402

DEVICE = "cuda"


def _max_difference(a: nn.Module, b: nn.Module, *, parameters_only: bool = False) -> float:
    pairs = (
        zip(a.parameters(), b.parameters())
        if parameters_only
        else zip(a.state_dict().values(), b.state_dict().values())
    )
    return max(
        (x.detach().cpu().double() - y.detach().cpu().double()).abs().max().item() for x, y in pairs
    )


# ------------------------------------------------------------ Lightning


def _lightning_run(init_scale: float) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.nn import functional as F

    def make_net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g)
    batches = list(zip(x.split(32), y.split(32)))

    def make_opt(params, **kw):
        return samkit.SAM(torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.1, **kw)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return make_opt(self.parameters())

    module = Net()
    plugin = MixedPrecision(
        "16-mixed", DEVICE, scaler=torch.amp.GradScaler(DEVICE, init_scale=init_scale)
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        plugins=[plugin],
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer.fit(module, loader)

    net = make_net().to(DEVICE)
    opt = make_opt(net.parameters(), model=net)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=init_scale)
    for i in range(0, len(batches), 2):
        window = batches[i : i + 2]

        def closure(window=window):
            for xb, yb in window:
                with torch.autocast(DEVICE, dtype=torch.float16, cache_enabled=False):
                    loss = F.cross_entropy(net(xb.to(DEVICE)), yb.to(DEVICE)) / 2
                scaler.scale(loss).backward()
            return loss

        opt.step(closure, scaler=scaler)
        scaler.update()
        opt.zero_grad()
    sam = trainer.optimizers[0]
    return {
        "max_weight_difference": _max_difference(module.net, net),
        "scale": plugin.scaler.get_scale(),
        "plain_loop_scale": scaler.get_scale(),
        "steps": sam.steps,
        "ascents": sam.ascents,
        "global_step": trainer.global_step,
        "changed_from_init": _max_difference(
            module.net, make_net().to(DEVICE), parameters_only=True
        ),
    }


def check_lightning_16_mixed() -> dict:
    """Lightning ``16-mixed`` + CUDA GradScaler + accumulation == plain-loop SAM; overflow skips."""
    normal = _lightning_run(2.0**16)
    overflow = _lightning_run(2.0**100)
    ok = (
        normal["max_weight_difference"] == 0.0
        and normal["scale"] == normal["plain_loop_scale"]
        and normal["steps"] == normal["global_step"] == 4
        and normal["ascents"] == 4
        and overflow["max_weight_difference"] == 0.0
        and overflow["changed_from_init"] == 0.0  # every step skipped
        and overflow["scale"] == 2.0 ** (100 - 4)
    )
    return {"ok": ok, "normal": normal, "overflow": overflow}


# ---------------------------------------------------------- Hugging Face


def _huggingface_run(init_scale: float | None, tmp: str) -> dict:
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from samkit.integrations.huggingface import SAMTrainer

    transformers.logging.set_verbosity_error()

    def make_model() -> nn.Module:
        config = BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=16, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        torch.manual_seed(0)
        return BertForSequenceClassification(config)

    g = torch.Generator().manual_seed(1)
    ids, labels = (
        torch.randint(0, 64, (64, 16), generator=g),
        torch.randint(0, 3, (64,), generator=g),
    )
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(64)]
    args = TrainingArguments(
        output_dir=tmp, use_cpu=DEVICE == "cpu", fp16=True, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=1e-3,
        lr_scheduler_type="linear", train_sampling_strategy="sequential", report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = SAMTrainer(model=make_model(), args=args, train_dataset=data, sam_rho=0.1)
    if init_scale is not None or DEVICE == "cpu":
        trainer.accelerator.native_amp = True  # what accelerate does on CUDA (CPU: nothing)
        trainer.accelerator.scaler = torch.amp.GradScaler(DEVICE, init_scale=init_scale or 2.0**16)
    trainer.train()

    # Plain loop: the trainer's optimizer settings, the Trainer's loss scaling.
    model = make_model().to(DEVICE)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    params = dict(model.named_parameters())
    groups = [
        {**{k: v for k, v in grp.items() if k != "params"}, "lr": grp["initial_lr"],
         "params": [params[names[id(p)]] for p in grp["params"]]}
        for grp in trainer.sam.param_groups
    ]  # fmt: skip
    opt = samkit.SAM(type(trainer.sam.base_optimizer)(groups), rho=0.1, model=model)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, 4)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=init_scale or 2.0**16)
    skipped = 0
    for start in range(0, 64, 16):
        micro = [
            {"input_ids": ids[i : i + 8].to(DEVICE), "labels": labels[i : i + 8].to(DEVICE)}
            for i in (start, start + 8)
        ]
        items = sum(b["labels"].ne(-100).sum() for b in micro) / 1

        def backward_all(micro=micro, items=items):
            for b in micro:
                with torch.autocast(DEVICE, dtype=torch.float16):
                    loss = model(**b, num_items_in_batch=items).loss
                scaler.scale(loss.float()).backward()

        backward_all()
        if opt.first_step(zero_grad=True, scaler=scaler):
            backward_all()
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < before:
            skipped += 1
        else:
            sched.step()
        opt.zero_grad()
    return {
        "max_weight_difference": _max_difference(trainer.model, model),
        "scale": trainer.accelerator.scaler.get_scale(),
        "plain_loop_scale": scaler.get_scale(),
        "skipped_in_plain_loop": skipped,
        "scheduler_steps": trainer.lr_scheduler.last_epoch,
        "plain_loop_scheduler_steps": sched.last_epoch,
        "sam_steps": trainer.sam.steps,
        "global_step": trainer.state.global_step,
    }


def check_huggingface_fp16() -> dict:
    """SAMTrainer ``fp16=True`` (CUDA GradScaler) + accumulation == plain loop; overflow reported skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        normal = _huggingface_run(None, tmp)
        overflow = _huggingface_run(2.0**100, tmp)
    ok = (
        normal["max_weight_difference"] == 0.0
        and normal["scale"] == normal["plain_loop_scale"]
        and normal["sam_steps"] == normal["global_step"] == 4
        and normal["scheduler_steps"] == normal["plain_loop_scheduler_steps"] == 4
        and overflow["max_weight_difference"] == 0.0
        and overflow["skipped_in_plain_loop"] == 4
        and overflow["scheduler_steps"] == 0  # skipped steps do not advance the schedule
    )
    return {"ok": ok, "normal": normal, "overflow": overflow}


# ------------------------------------------------------------ the core


def _model(dtype: torch.dtype = torch.float32, width: int = 256, depth: int = 24) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers).to(DEVICE, dtype)


def _data(n: int = 256, width: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return torch.randn(n, width, device=DEVICE, generator=g), torch.randint(
        0, 10, (n,), device=DEVICE, generator=g
    )


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def check_core_foreach() -> dict[str, Any]:
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


def check_core_no_host_sync() -> dict[str, Any]:
    if DEVICE != "cuda":
        return {"ok": True, "skipped": "host syncs exist on CUDA only"}
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


def check_core_fp16_scaler() -> dict[str, Any]:
    x, y = _data()
    out: dict[str, Any] = {"ok": True}
    for bad_call in (1, 2):
        model = _model()
        opt = samkit.SAM(torch.optim.Adam(model.parameters(), lr=1e-3), rho=0.05)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12)

        def closure(
            poison: int | None = None,
            calls: list[int] | None = None,
            model: nn.Module = model,
            scaler: Any = scaler,
        ) -> torch.Tensor:
            calls = calls if calls is not None else []
            calls.append(1)
            with torch.autocast(DEVICE, dtype=torch.float16):
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


def check_core_bf16() -> dict[str, Any]:
    x, y = _data()
    losses: dict[str, list[float]] = {}
    for mode in ("fp32", "bf16"):
        model = _model(depth=3)
        opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
        losses[mode] = []
        for _ in range(40):

            def closure(model: nn.Module = model, bf16: bool = mode == "bf16") -> torch.Tensor:
                with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
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


def check_core_mixes_scaler() -> dict[str, Any]:
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
            scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10) if scaled else None
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


def check_core_overhead() -> dict[str, Any]:
    if DEVICE != "cuda":
        return {"ok": True, "skipped": "on CPU run benchmarks/overhead.py itself"}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import overhead

    result = overhead.main(["--trials", "11"])
    return {"ok": True, "ratios": result.get("ratios", {})}


CHECKS: dict[str, Callable[[], dict]] = {
    "core_foreach": check_core_foreach,
    "core_no_host_sync": check_core_no_host_sync,
    "core_fp16_scaler": check_core_fp16_scaler,
    "core_bf16": check_core_bf16,
    "core_mixes_scaler": check_core_mixes_scaler,
    "core_overhead": check_core_overhead,
    "lightning_16_mixed": check_lightning_16_mixed,
    "huggingface_fp16": check_huggingface_fp16,
}


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_checks.py: no CUDA device (use --device cpu to run the same code on CPU)",
            file=sys.stderr,
        )
        return 2
    DEVICE = args.device
    torch.use_deterministic_algorithms(True)
    results = {}
    for name in args.only or CHECKS:
        try:
            results[name] = CHECKS[name]()
        except Exception as exc:  # report every section, then fail
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(
            f"{name:24s} {'ok' if results[name]['ok'] else 'FAILED'}  {json.dumps(results[name])}"
        )
    if args.json:
        write_json_atomic(args.json, finite(results), indent=2)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
