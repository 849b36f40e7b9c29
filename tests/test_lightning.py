"""samkit.SAM under PyTorch Lightning, against samkit's plain-loop SAM.

Every test trains the same tiny model (Linear, BatchNorm, Tanh, Linear) on
the same batches twice: with a Lightning ``Trainer`` (``configure_optimizers``
returning ``samkit.SAM``, nothing else samkit-specific) and with
``SAM.step(closure)`` in a plain loop. The two see the same floating-point
operations in the same order, so the weights must be equal bit for bit
(``torch.equal``), BatchNorm buffers included; the only tolerance is on the
epoch mean of the logged loss, which Lightning sums in its own order.
"""

from __future__ import annotations

import copy
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.nn import functional as F

import samkit
from samkit.integrations.lightning import SAMCallback, perturbed

N, BATCH = 48, 8  # 6 batches per epoch
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data()
    return list(zip(x.split(BATCH), y.split(BATCH)))


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*make_data()), batch_size=BATCH, shuffle=False
    )


def sgd_sam(params, **sam_kwargs) -> samkit.SAM:
    return samkit.SAM(torch.optim.SGD(params, lr=0.2, momentum=0.9), rho=0.1, **sam_kwargs)


class Net(pl.LightningModule):
    def __init__(self, make_opt=sgd_sam, *, manual: str | None = None) -> None:
        super().__init__()
        self.net = make_net()
        self.make_opt = make_opt
        self.manual = manual
        self.automatic_optimization = manual is None
        self.outputs: list[torch.Tensor] = []
        self.passes = {"w": 0, "w+e": 0}
        self.hook_calls = 0

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        self.passes["w+e" if perturbed(self) else "w"] += 1
        if self.manual is None:
            loss = self.loss(batch)
            self.log(
                "train_loss", loss, on_step=True, on_epoch=True
            )  # no guard: samkit drops w+e logs
            return loss
        opt = self.optimizers()

        def closure():
            loss = self.loss(batch)
            self.manual_backward(loss)
            return loss

        if self.manual == "closure":
            loss = opt.step(closure)
            opt.zero_grad()
        else:
            loss = closure()
            if opt.first_step(zero_grad=True):
                closure()
            opt.second_step(zero_grad=True)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if outputs:  # manual optimization returns nothing
            self.outputs.append(outputs["loss"].detach().clone())

    def on_before_optimizer_step(self, optimizer):
        self.hook_calls += 1

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


def fit(module: Net, *, epochs: int = 1, ckpt_path=None, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def plain_loop(
    make_opt=sgd_sam,
    *,
    epochs: int = 1,
    accumulate: int = 1,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_value: float | None = None,
):
    """samkit's plain-loop SAM: ``opt.step(closure)``, accumulation inside the closure."""
    net = make_net()
    opt = make_opt(net.parameters(), model=net)
    data = batches()
    windows = [data[i : i + accumulate] for i in range(0, len(data), accumulate)]
    losses = []
    for _ in range(epochs):
        for window in windows:

            def closure(window=window):
                total = 0.0
                for x, y in window:
                    with torch.autocast(
                        "cpu", dtype=dtype or torch.float32, enabled=dtype is not None
                    ):
                        loss = F.cross_entropy(net(x), y) / accumulate  # Lightning's normalisation
                    if not opt.perturbed:
                        losses.append(loss.detach() * accumulate)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    total = total + loss.detach()
                if clip_value is not None and opt.perturbed:
                    nn.utils.clip_grad_value_(net.parameters(), clip_value)
                return total

            opt.step(closure, scaler=scaler)
            if scaler is not None:
                scaler.update()
            opt.zero_grad()
    return net, opt, losses


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_one_line_equals_plain_loop_with_bn_hooks_and_logs():
    module = Net()
    trainer = fit(module)
    net, opt, losses = plain_loop()
    steps = N // BATCH

    # The callback came from samkit's entry point, not from the user.
    assert sum(isinstance(cb, SAMCallback) for cb in trainer.callbacks) == 1
    assert_same_weights(module.net, net)
    sam = trainer.optimizers[0]
    assert (sam.steps, sam.ascents, trainer.global_step) == (steps, steps, steps)
    # BatchNorm moved once per step (model= found by the callback), as in the plain loop.
    assert int(module.net[1].num_batches_tracked) == steps
    assert sam.model is module
    # training_step ran at w and at w + e; hooks once per step.
    assert module.passes == {"w": steps, "w+e": steps}
    assert module.hook_calls == steps
    # self.log and the step outputs hold the loss at w only.
    assert torch.equal(trainer.callback_metrics["train_loss_step"], losses[-1])
    torch.testing.assert_close(
        trainer.callback_metrics["train_loss_epoch"], torch.stack(losses).mean()
    )
    assert all(torch.equal(a, b) for a, b in zip(module.outputs, losses))
    # The precision plugin is given back as it was.
    assert type(trainer.precision_plugin).__mro__[1] is not object
    assert "samkit" not in type(trainer.precision_plugin).__module__
    assert not hasattr(trainer.precision_plugin, "_samkit")


@pytest.mark.parametrize("accumulate", [2, 4])  # 4 leaves a short last window (6 = 4 + 2)
def test_accumulate_grad_batches_is_sam_over_the_accumulated_batch(accumulate):
    module = Net()
    trainer = fit(module, accumulate_grad_batches=accumulate)
    net, _, losses = plain_loop(accumulate=accumulate)
    steps = -(-N // BATCH // accumulate)
    assert_same_weights(module.net, net)  # running stats too: one update per micro-batch at w
    sam = trainer.optimizers[0]
    assert (sam.steps, trainer.global_step) == (steps, steps)
    assert int(module.net[1].num_batches_tracked) == N // BATCH
    assert module.passes == {"w": N // BATCH, "w+e": N // BATCH}
    torch.testing.assert_close(
        trainer.callback_metrics["train_loss_epoch"], torch.stack(losses).mean()
    )


def forced_fp16() -> MixedPrecision:
    # Lightning makes this GradScaler itself on CUDA; on CPU it must be given.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_16_mixed_with_grad_scaler_does_real_sam_steps():
    module = Net()
    trainer = fit(module, plugins=[forced_fp16()], accumulate_grad_batches=2)
    scaler = torch.amp.GradScaler("cpu")
    net, _, _ = plain_loop(accumulate=2, dtype=torch.float16, scaler=scaler)
    assert_same_weights(module.net, net)
    sam = trainer.optimizers[0]
    assert sam.ascents == sam.steps == trainer.global_step == 3
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()


def test_16_mixed_overflow_skips_and_backs_off():
    module = Net()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1e30))
    fit(module, plugins=[plugin])
    scaler = torch.amp.GradScaler("cpu", init_scale=1e30)
    net, _, _ = plain_loop(dtype=torch.float16, scaler=scaler)
    assert_same_weights(module.net, net)
    # 1e30 overflows fp16: the scale halves on every skipped step, like the plain loop's.
    assert plugin.scaler.get_scale() == scaler.get_scale() < 1e30 / 2**5


def test_bf16_mixed():
    module = Net()
    fit(module, precision="bf16-mixed")
    net, _, _ = plain_loop(dtype=torch.bfloat16)
    assert_same_weights(module.net, net)


def test_clip_by_norm_clips_the_final_gradient():
    module = Net()
    fit(module, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    net, _, _ = plain_loop(lambda params, **kw: sgd_sam(params, max_grad_norm=0.05, **kw))
    assert_same_weights(module.net, net)
    unclipped, _, _ = plain_loop()
    assert not torch.equal(net[0].weight, unclipped[0].weight)  # the clip was active


def test_clip_by_value_clips_the_final_gradient_not_the_ascent():
    module = Net()
    fit(module, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    net, _, _ = plain_loop(clip_value=0.01)
    assert_same_weights(module.net, net)


def test_checkpoint_resume_continues_bit_for_bit(tmp_path):
    def make_opt(params, **kw):  # a policy with state: ascend every second step
        return sgd_sam(params, policy=samkit.EveryK(2), **kw)

    straight = Net(make_opt)
    trainer = fit(straight, epochs=2)

    first = Net(make_opt)
    fit(first, epochs=1).save_checkpoint(tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["samkit"]["steps"] == N // BATCH
    resumed = Net(make_opt)
    resumed_trainer = fit(resumed, epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")

    assert_same_weights(resumed.net, straight.net)
    a, b = resumed_trainer.optimizers[0], trainer.optimizers[0]
    assert (a.steps, a.ascents) == (b.steps, b.ascents) == (2 * N // BATCH, N // BATCH)
    assert resumed_trainer.global_step == trainer.global_step
    net, _, _ = plain_loop(make_opt, epochs=2)
    assert_same_weights(straight.net, net)


@pytest.mark.parametrize("form", ["closure", "two_step"])
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_manual_optimization(form, fp16):
    module = Net(manual=form)
    trainer = fit(module, plugins=[forced_fp16()] if fp16 else None)
    scaler = torch.amp.GradScaler("cpu") if fp16 else None
    net, _, losses = plain_loop(dtype=torch.float16 if fp16 else None, scaler=scaler)
    steps = N // BATCH
    assert_same_weights(module.net, net)
    sam = trainer.optimizers[0]
    # Counted on the SAM itself (not on Lightning's wrapper) and by the trainer.
    assert (sam.steps, sam.ascents, trainer.global_step) == (steps, steps, steps)
    wrapper_state = (
        vars(trainer.strategy._lightning_optimizers[0])
        if trainer.strategy._lightning_optimizers
        else {}
    )
    assert "steps" not in wrapper_state and "_pending" not in wrapper_state
    assert int(module.net[1].num_batches_tracked) == steps
    assert torch.equal(trainer.callback_metrics["train_loss_step"], losses[-1])


def test_manual_two_step_checkpoint_holds_samkit_counters(tmp_path):
    module = Net(manual="two_step")
    trainer = fit(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["samkit"]["steps"] == N // BATCH
    assert saved["global_step"] == N // BATCH


def test_user_callback_takes_over_and_can_keep_perturbed_logs():
    module = Net()
    mine = SAMCallback(drop_perturbed_logs=False)
    trainer = fit(module, callbacks=[mine])
    _, _, losses = plain_loop()
    assert sum(isinstance(cb, SAMCallback) for cb in trainer.callbacks) == 2
    # Both passes logged: the last on_step value is the loss at w + e.
    assert not torch.equal(trainer.callback_metrics["train_loss_step"], losses[-1])


def test_without_sam_nothing_changes():
    class Plain(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    module = Plain()
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(type(trainer.precision_plugin).__module__)

    fit(module, callbacks=[Spy()])
    assert all(name.startswith("lightning.") for name in seen)
    assert module.passes == {"w": N // BATCH, "w+e": 0}


def test_esam_is_refused_with_the_supported_way():
    def make_opt(params, **kw):
        return samkit.ESAM(torch.optim.SGD(params, lr=0.1), rho=0.1, gamma=0.5, **kw)

    with pytest.raises(ValueError, match="use samkit.SAM, GSAM or LookSAM under Lightning"):
        fit(Net(make_opt))


def test_gsam_and_looksam_under_lightning_match_the_plain_loop():
    for make in (
        lambda params, **kw: samkit.GSAM(torch.optim.SGD(params, lr=0.2), rho=0.1, alpha=0.3, **kw),
        lambda params, **kw: samkit.LookSAM(
            torch.optim.SGD(params, lr=0.2), rho=0.1, k=2, alpha=0.5, **kw
        ),
    ):
        module = Net(make)
        fit(module, accumulate_grad_batches=2)
        net, _, _ = plain_loop(make, accumulate=2)
        assert_same_weights(module.net, net)


def test_a_failing_second_pass_restores_the_weights():
    class Failing(Net):
        def training_step(self, batch, batch_idx):
            if perturbed(self):
                raise RuntimeError("boom at w + e")
            return super().training_step(batch, batch_idx)

    module = Failing()
    before = copy.deepcopy(dict(module.net.named_parameters()))
    with pytest.raises(RuntimeError, match="boom at w"):
        fit(module)
    for name, value in module.net.named_parameters():  # back at w exactly, no step taken
        assert torch.equal(value, before[name]), name


def test_sharding_strategies_are_refused_with_the_supported_way():
    from lightning.pytorch.strategies import FSDPStrategy

    from samkit.integrations._lightning_common import _check_supported

    sam = sgd_sam(make_net().parameters())
    trainer = type("FakeTrainer", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(
        ValueError, match="Invalid strategy value: FSDPStrategy .* use a single-device or DDP"
    ):
        _check_supported(trainer, [sam])


def test_bad_callback_setting():
    with pytest.raises(ValueError, match="Invalid drop_perturbed_logs value"):
        SAMCallback(drop_perturbed_logs="no")


def test_manual_step_without_closure_is_refused():
    class NoClosure(Net):
        def training_step(self, batch, batch_idx):
            self.manual_backward(self.loss(batch))
            self.optimizers().step()  # a plain optimizer's habit: SAM cannot do its second pass

    module = NoClosure(manual="closure")
    before = copy.deepcopy(dict(module.net.named_parameters()))
    with pytest.raises(
        RuntimeError, match=r"opt.step\(\) without a closure cannot run the pass at w \+ e"
    ):
        fit(module)
    for name, value in module.net.named_parameters():
        assert torch.equal(value, before[name]), name


class ScriptedValidation(Net):
    """Logs a scripted validation loss per epoch; the sanity check logs one lower than all."""

    LOSSES = (1.0, 0.9, 0.95, 0.92, 0.93)

    def validation_step(self, batch, batch_idx):
        value = 0.5 if self.trainer.sanity_checking else self.LOSSES[self.current_epoch]
        self.log("val_loss", torch.tensor(value))


def test_the_logged_val_loss_reaches_a_self_tuning_rho():
    module = ScriptedValidation(
        lambda p: samkit.SAM(torch.optim.SGD(p, lr=0.2, momentum=0.9), rho="auto")
    )
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, loader(), loader())
    controller = trainer.optimizers[0].rho_controller
    # reports 1.0, 0.9, 0.95, 0.92 applied (two without improvement: 0.05 -> 0.075);
    # the last epoch's 0.93 waits for a next step; the sanity check's 0.5 was not reported
    # (it would have made every report a non-improvement: 0.05 * 1.5**2)
    assert controller.rho == pytest.approx(0.075)
    assert controller.best == pytest.approx(0.9)
    assert controller._pending[:2] == [pytest.approx(0.93), 1.0]
    assert trainer.optimizers[0].param_groups[0]["rho"] == pytest.approx(0.075)


class TwoValidationSets(Net):
    """Two validation dataloaders: Lightning logs val_loss/dataloader_idx_0 and _1."""

    LOSSES = ((1.0, 3.0), (0.9, 2.9))

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if self.trainer.sanity_checking:
            return
        self.log("val_loss", torch.tensor(self.LOSSES[self.current_epoch][dataloader_idx]))


def test_several_validation_dataloaders_report_their_mean():
    """With two validation dataloaders nothing reached the radius (no "val_loss" key)."""
    module = TwoValidationSets(
        lambda p: samkit.SAM(torch.optim.SGD(p, lr=0.2), rho="auto:validation_plateau")
    )
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, loader(), [loader(), loader()])
    controller = trainer.optimizers[0].rho_controller
    assert controller.best == pytest.approx(2.0)  # epoch 1: (1.0 + 3.0) / 2, applied
    assert controller._pending[:2] == [pytest.approx(1.9), 1.0]  # epoch 2's mean waits
