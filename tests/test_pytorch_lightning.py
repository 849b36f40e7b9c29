"""The standalone ``pytorch_lightning`` package gets the same SAM steps as ``lightning``.

Its Trainer loads samkit's callback from the ``pytorch_lightning.callbacks_factory``
entry point; the logic is shared with ``samkit.integrations.lightning``
(tests/test_lightning.py tests it in full). Here: the one-line way with
accumulation and BatchNorm, against the plain loop, bit for bit.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from test_lightning import BATCH, N, assert_same_weights, loader, make_net, plain_loop, sgd_sam
from torch.nn import functional as F

from samkit.integrations.pytorch_lightning import SAMCallback, perturbed

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.second_passes = 0

    def training_step(self, batch, batch_idx):
        self.second_passes += perturbed(self)
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return sgd_sam(self.parameters())


def test_one_line_with_accumulation_equals_plain_loop():
    module = Net()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader())
    net, _, losses = plain_loop(accumulate=2)
    assert sum(isinstance(cb, SAMCallback) for cb in trainer.callbacks) == 1
    assert_same_weights(module.net, net)
    assert trainer.optimizers[0].steps == trainer.global_step == N // BATCH // 2
    assert int(module.net[1].num_batches_tracked) == N // BATCH  # the passes at w only
    assert module.second_passes == N // BATCH
    assert torch.equal(trainer.callback_metrics["train_loss"], losses[-1])
