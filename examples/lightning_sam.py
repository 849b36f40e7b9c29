"""SAM in PyTorch Lightning: return samkit.SAM from configure_optimizers.

    python examples/lightning_sam.py --epochs 3 --accumulate 2 --precision bf16-mixed

That is the whole integration: samkit registers a Lightning callback
(``samkit.integrations.lightning.SAMCallback``, through Lightning's
``callbacks_factory`` entry point) that makes each optimizer step one SAM
step, whatever the precision (``32-true``, ``bf16-mixed``, ``16-mixed`` with
its GradScaler on a GPU), with ``accumulate_grad_batches`` (the ascent and
the second pass use the whole accumulated batch) and gradient clipping (of the
gradient the base step uses). It also gives SAM the module as ``model=`` so
BatchNorm statistics move once per step, and drops ``self.log`` calls made
while ``training_step`` runs again at ``w + e``: the logged loss is the loss
at ``w``. Checkpoints hold samkit's state; ``fit(ckpt_path=...)`` continues
bit for bit.

``training_step`` runs twice per step (at ``w``, then at ``w + e``). Side
effects other than ``self.log`` (a metric's ``update``) can be skipped on the
second run with ``samkit.integrations.lightning.perturbed(self)``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

import samkit
from samkit.integrations.lightning import perturbed


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class problem labelled by a random 'teacher' network."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(20, 64, generator=g) / 20**0.5
    w2 = torch.randn(64, 10, generator=g)
    x = torch.randn(n, 20, generator=g)
    return x, torch.tanh(x @ w1).matmul(w2).argmax(1)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float, rho: float, epochs: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(20, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)
        )
        self.correct = self.seen = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)  # the loss at w
        if not perturbed(self):  # count accuracy on the pass at w only
            self.correct += int((logits.argmax(1) == y).sum())
            self.seen += len(y)
        return loss

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True)
        opt = samkit.SAM(base, rho=self.hparams.rho)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    ap.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed (GPU)")
    ap.add_argument("--clip", type=float, default=0.0, help="gradient_clip_val (by norm)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    x, y = make_data(args.samples, args.seed)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch, shuffle=True
    )
    module = Classifier(args.lr, args.rho, args.epochs)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        precision=args.precision,
        gradient_clip_val=args.clip or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)

    sam = trainer.optimizers[0]
    bn = module.net[1]
    module.eval()
    with torch.no_grad():
        accuracy = (module.net(x).argmax(1) == y).float().mean().item()
    loss = float(trainer.callback_metrics["train_loss_epoch"])
    print(
        f"{trainer.global_step} steps ({sam.steps} SAM steps, {sam.ascents} ascents); "
        f"last epoch's mean loss at w {loss:.4f}; train accuracy at w "
        f"{module.correct / max(module.seen, 1):.3f}; eval accuracy {accuracy:.3f}; "
        f"BatchNorm updates {int(bn.num_batches_tracked)}"
    )
    return {
        "global_step": trainer.global_step,
        "sam_steps": sam.steps,
        "ascents": sam.ascents,
        "bn_updates": int(bn.num_batches_tracked),
        "batches": args.epochs * len(data),
        "loss": loss,
        "accuracy": accuracy,
    }


if __name__ == "__main__":
    main()
