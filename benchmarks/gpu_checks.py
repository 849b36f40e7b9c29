"""Checks that need a GPU, for whoever has one: each compares a framework's real CUDA path with samkit's plain loop.

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
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA initialises

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import samkit  # noqa: E402
from samkit._atomic import write_json_atomic  # noqa: E402

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


CHECKS: dict[str, Callable[[], dict]] = {
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
        write_json_atomic(args.json, results, indent=2)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
