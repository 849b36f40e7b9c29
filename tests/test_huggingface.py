"""samkit.integrations.huggingface.SAMTrainer against samkit's plain-loop SAM.

A 2-layer BERT classifier built from a config (nothing downloaded, dropout
off) is trained by ``SAMTrainer`` and, from the same initial weights on the
same batches, by ``SAM.step(closure)`` in a plain loop that computes the loss
as the Trainer does (``num_items_in_batch`` over the accumulated batch,
``max_grad_norm`` clipping of the gradient the base step uses). Same
operations in the same order: the weights must be equal bit for bit.

CPU accelerate has no fp16 (it silently trains in fp32 there): the fp16
tests give the Trainer's accelerator the GradScaler and autocast it makes on
a GPU. benchmarks/gpu_checks.py runs the real CUDA path.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import samkit
from samkit.integrations.huggingface import SAMTrainer

transformers.logging.set_verbosity_error()
logging.getLogger("accelerate").setLevel(logging.ERROR)

N, BATCH, SEQ = 24, 4, 8  # 6 micro-batches per epoch


def make_model() -> nn.Module:
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def make_dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (N, SEQ), generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]


def args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def train(tmp_path, *, force_fp16_scale: float | None = None, resume=None, model=None, **kw):
    sam_kwargs = {
        k: kw.pop(k) for k in ("sam_rho", "sam_adaptive", "sam_class", "sam_kwargs") if k in kw
    }
    model = model or make_model()
    trainer = SAMTrainer(
        model=model, args=args(tmp_path, **kw), train_dataset=make_dataset(), **sam_kwargs
    )
    if force_fp16_scale is not None:
        # What accelerate sets up for fp16 on a GPU (on CPU it leaves both off).
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=force_fp16_scale)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def plain_loop(
    trainer: SAMTrainer,
    *,
    accumulate: int = 1,
    epochs: int = 1,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float = 1.0,
    schedule=None,
):
    """samkit's plain-loop SAM on a copy of the initial model, with the trainer's optimizer settings.

    The closure form (``opt.step(closure)``) where the clip can sit in the
    closure's second call; under a GradScaler the clip needs unscaled
    gradients, so there the two-step form (``first_step`` / ``second_step``).
    """
    model = make_model()
    model.train()
    # The base optimizer the Trainer built, param group for param group.
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    params = dict(model.named_parameters())
    sam = trainer.sam
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "lr": g.get("initial_lr", g["lr"]),
            "params": [params[names[id(p)]] for p in g["params"]],
        }
        for g in sam.param_groups
    ]
    base = type(sam.base_optimizer)(groups)
    settings = dict(trainer.sam_settings)
    opt = trainer.sam_class(base, model=model, **settings)
    sched = schedule(opt) if schedule is not None else None

    data = make_dataset()
    micro = [data[i : i + BATCH] for i in range(0, N, BATCH)]
    windows = [micro[i : i + accumulate] for i in range(0, len(micro), accumulate)]
    for _ in range(epochs):
        for window in windows:
            batches = [{k: torch.stack([row[k] for row in m]) for k in m[0]} for m in window]
            num_items = (
                sum(b["labels"].ne(-100).sum() for b in batches) / 1
            )  # as the Trainer counts

            def backward_all(batches=batches, num_items=num_items):
                for b in batches:
                    with torch.autocast(
                        "cpu", dtype=dtype or torch.float32, enabled=dtype is not None
                    ):
                        loss = model(**b, num_items_in_batch=num_items).loss
                    (scaler.scale(loss) if scaler is not None else loss).backward()

            if scaler is None:

                def closure():
                    backward_all()
                    if opt.perturbed:  # the Trainer clips the gradient the base step uses
                        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                    return torch.zeros(())

                opt.step(closure)
                skipped = False
            else:
                backward_all()
                if opt.first_step(zero_grad=True, scaler=scaler):
                    backward_all()
                    scaler.unscale_(opt)
                if max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                skipped = scaler.get_scale() < before
            if sched is not None and not skipped:
                sched.step()
            opt.zero_grad()
    return model, opt


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_drop_in_trainer_equals_plain_loop(tmp_path):
    trainer = train(tmp_path, sam_rho=0.1)
    model, opt = plain_loop(trainer)
    steps = N // BATCH
    # The Trainer's own optimizer choice (fused AdamW here), wrapped.
    assert isinstance(trainer.sam.base_optimizer, torch.optim.AdamW)
    assert trainer.sam.model is trainer.model
    assert_same_weights(trainer.model, model)
    assert (trainer.sam.steps, trainer.sam.ascents, trainer.state.global_step) == (
        steps,
        steps,
        steps,
    )


@pytest.mark.parametrize("accumulate", [2, 4])  # 4: the last window holds 2 micro-batches
def test_gradient_accumulation_is_sam_over_the_accumulated_batch(tmp_path, accumulate):
    trainer = train(tmp_path, sam_rho=0.1, gradient_accumulation_steps=accumulate)
    model, _ = plain_loop(trainer, accumulate=accumulate)
    assert_same_weights(trainer.model, model)
    steps = -(-N // BATCH // accumulate)
    assert trainer.sam.steps == trainer.state.global_step == steps


def test_asam_and_max_grad_norm(tmp_path):
    trainer = train(tmp_path, sam_rho=0.5, sam_adaptive=True, max_grad_norm=0.05)
    model, _ = plain_loop(trainer, max_grad_norm=0.05)
    assert_same_weights(trainer.model, model)


def test_bf16(tmp_path):
    trainer = train(tmp_path, sam_rho=0.1, bf16=True, gradient_accumulation_steps=2)
    assert trainer.accelerator.native_amp and trainer.accelerator.scaler is None
    model, _ = plain_loop(trainer, accumulate=2, dtype=torch.bfloat16)
    assert_same_weights(trainer.model, model)


def test_fp16_grad_scaler_path(tmp_path):
    trainer = train(
        tmp_path, sam_rho=0.1, fp16=True, gradient_accumulation_steps=2, force_fp16_scale=2.0**16
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model, _ = plain_loop(trainer, accumulate=2, dtype=torch.float16, scaler=scaler)
    assert_same_weights(trainer.model, model)
    assert trainer.sam.ascents == 3
    assert trainer.accelerator.scaler.get_scale() == scaler.get_scale()


def test_fp16_overflow_is_reported_skipped_and_the_scheduler_waits(tmp_path):
    def linear(opt):
        return transformers.get_linear_schedule_with_warmup(opt, 0, N // BATCH)

    trainer = train(
        tmp_path, sam_rho=0.1, fp16=True, lr_scheduler_type="linear", force_fp16_scale=2.0**100
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    model, opt = plain_loop(trainer, dtype=torch.float16, scaler=scaler, schedule=linear)
    assert_same_weights(trainer.model, model)
    # Every step overflowed: no update, no scheduler step, the scale halved each time.
    assert trainer.accelerator.optimizer_step_was_skipped
    assert trainer.lr_scheduler.last_epoch == 0
    assert trainer.sam.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 1e-2
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** (100 - N // BATCH)
    initial = make_model()
    assert_same_weights(trainer.model, initial)


def test_fp16_step_without_ascent_is_not_unscaled_twice(tmp_path):
    # LookSAM ascends every second step; on the others first_step unscales the
    # gradient it keeps, and the Trainer's clipping must not unscale it again.
    trainer = train(
        tmp_path,
        sam_class=samkit.LookSAM,
        sam_rho=0.1,
        sam_kwargs={"k": 2, "alpha": 0.5},
        fp16=True,
        max_grad_norm=0.5,
        force_fp16_scale=2.0**16,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model, _ = plain_loop(trainer, dtype=torch.float16, scaler=scaler, max_grad_norm=0.5)
    assert_same_weights(trainer.model, model)
    assert (trainer.sam.steps, trainer.sam.ascents) == (6, 3)


def test_resume_from_trainer_checkpoint_continues_bit_for_bit(tmp_path):
    policy = {"policy": samkit.EveryK(2)}  # state that a resume must carry
    straight = train(tmp_path / "a", sam_rho=0.1, sam_kwargs=dict(policy), num_train_epochs=2,
                     lr_scheduler_type="linear")  # fmt: skip
    # A run that saves after the first epoch (and goes on: the schedule spans both epochs).
    train(tmp_path / "b", sam_rho=0.1, sam_kwargs={"policy": samkit.EveryK(2)}, num_train_epochs=2,
          lr_scheduler_type="linear", save_strategy="epoch")  # fmt: skip
    checkpoint = tmp_path / "b" / "out" / f"checkpoint-{N // BATCH}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["samkit"]["steps"] == N // BATCH
    resumed = train(tmp_path / "c", sam_rho=0.1, sam_kwargs={"policy": samkit.EveryK(2)},
                    num_train_epochs=2, lr_scheduler_type="linear", resume=str(checkpoint))  # fmt: skip
    assert_same_weights(resumed.model, straight.model)
    assert (resumed.sam.steps, resumed.sam.ascents) == (straight.sam.steps, straight.sam.ascents)
    assert resumed.sam.steps == 2 * N // BATCH and resumed.sam.ascents == N // BATCH
    assert resumed.state.global_step == straight.state.global_step


def test_an_optimizer_passed_in_is_wrapped(tmp_path):
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = SAMTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=make_dataset(),
                         optimizers=(base, None), sam_rho=0.2)  # fmt: skip
    trainer.train()
    assert trainer.sam.base_optimizer is base and trainer.sam.steps == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sam_rho": -1.0}, "Invalid sam_rho value: -1.0"),
        ({"sam_adaptive": "yes"}, "Invalid sam_adaptive value"),
        ({"sam_class": samkit.ESAM}, "use samkit.SAM, GSAM or LookSAM"),
        ({"sam_class": torch.optim.SGD}, "Invalid sam_class value"),
        ({"sam_kwargs": {"model": None}}, "'model' is set by SAMTrainer"),
        ({"sam_kwargs": {"max_grad_norm": 1.0}}, "use TrainingArguments.max_grad_norm"),
    ],
)
def test_bad_sam_settings_are_refused_before_training(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAMTrainer(model=make_model(), args=args(tmp_path), train_dataset=make_dataset(), **kwargs)


def test_a_bad_setting_inside_sam_kwargs_fails_when_the_optimizer_is_built(tmp_path):
    trainer = SAMTrainer(model=make_model(), args=args(tmp_path), train_dataset=make_dataset(),
                         sam_kwargs={"eta": -1.0})  # fmt: skip
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(ValueError, match="Invalid eta value"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_an_optimizer_with_train_eval_modes_is_refused(tmp_path):
    class ScheduleFreeLike(torch.optim.SGD):
        def train(self):
            pass

        def eval(self):
            pass

    model = make_model()
    base = ScheduleFreeLike(model.parameters(), lr=0.1)
    trainer = SAMTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=make_dataset(),
                         optimizers=(base, None))  # fmt: skip
    with pytest.raises(ValueError, match="has train\\(\\)/eval\\(\\) modes"):
        trainer.train()


@pytest.mark.parametrize("rho", ["auto", "auto:validation_plateau"])
def test_a_self_tuning_rho_hears_every_evaluation_loss(tmp_path, rho):
    """The default (GradientAgreement) counts plateaus as ValidationPlateau does; the radius is
    compared for the latter only (the former also moves it from the gradients)."""
    from samkit.optim.autorho import ValidationPlateau

    trainer = SAMTrainer(
        model=make_model(),
        args=args(tmp_path, num_train_epochs=4, eval_strategy="epoch"),
        train_dataset=make_dataset(),
        eval_dataset=make_dataset()[:8],
        sam_rho=rho,
    )
    trainer.train()
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(losses) == 4
    controller = trainer.sam.rho_controller
    # the first three reached the controller at the next steps; the last one waits
    expected = ValidationPlateau()
    expected.rho_max = 0.4
    for loss in losses[:-1]:
        expected.on_validation(loss)
    assert (controller.best, controller.bad) == (pytest.approx(expected.best), expected.bad)
    if rho == "auto:validation_plateau":
        assert controller.rho == expected.rho
    assert controller._pending[:2] == [pytest.approx(losses[-1]), 1.0]


def test_bad_self_tuning_rho_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Invalid sam_rho value: 'auto:nope'"):
        SAMTrainer(model=make_model(), args=args(tmp_path), sam_rho="auto:nope")


def test_an_eval_dataset_dict_reports_each_sets_loss(tmp_path):
    """With eval_dataset={"a": ..., "b": ...} the losses are eval_a_loss and eval_b_loss:
    nothing reached the radius."""
    trainer = SAMTrainer(
        model=make_model(),
        args=args(tmp_path, num_train_epochs=2, eval_strategy="epoch"),
        train_dataset=make_dataset(),
        eval_dataset={"a": make_dataset()[:8], "b": make_dataset()[8:16]},
        sam_rho="auto:validation_plateau",
    )
    trainer.train()
    history = trainer.state.log_history
    last = [h[k] for h in history for k in ("eval_a_loss", "eval_b_loss") if k in h][-2:]
    controller = trainer.sam.rho_controller
    assert controller.best is not None  # the first epoch's reports were applied
    assert controller._pending[:2] == [pytest.approx(sum(last)), 2.0]  # the last evaluation's two


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sam_kwargs": {"rho": 0.7}}, "'rho' has its own argument; pass sam_rho="),
        ({"sam_kwargs": {"adaptive": True}}, "pass sam_adaptive="),
        ({"sam_kwargs": "abc"}, "Invalid sam_kwargs value: 'abc'"),
    ],
)
def test_sam_kwargs_cannot_override_the_trainers_own_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAMTrainer(model=make_model(), args=args(tmp_path), sam_rho=0.05, **kwargs)
