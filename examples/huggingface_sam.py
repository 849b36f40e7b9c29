"""SAM in the Hugging Face Trainer: SAMTrainer, a drop-in transformers.Trainer.

    python examples/huggingface_sam.py --epochs 4 --accumulate 2

``SAMTrainer`` takes the Trainer's arguments plus ``sam_rho``,
``sam_adaptive``, ``sam_class`` (SAM, GSAM, LookSAM) and ``sam_kwargs`` (any
other samkit keyword). The optimizer the Trainer builds from
``TrainingArguments`` (``optim``, ``learning_rate``, ``weight_decay``) is
wrapped in SAM; gradient accumulation, ``max_grad_norm`` (clips the gradient
the base step uses), bf16 and fp16 (GradScaler; an overflowed step is
reported skipped, so the LR scheduler waits) and ``resume_from_checkpoint``
work as with the plain Trainer. The model here is a 2-layer BERT built from a
config (nothing is downloaded) on a synthetic task: the label is the first
token's id modulo 3.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from samkit.integrations.huggingface import SAMTrainer


def make_dataset(n: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row[0] % 3} for row in ids]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None, help="checkpoints (default: a temporary folder)")
    args = ap.parse_args(argv)

    transformers.set_seed(args.seed)
    config = BertConfig(
        vocab_size=30,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    train_set = make_dataset(args.samples, 12, config.vocab_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulate,
            learning_rate=args.lr,
            warmup_steps=5,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            logging_steps=4,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=args.seed,
        )
        trainer = SAMTrainer(
            model=model, args=training_args, train_dataset=train_set, sam_rho=args.rho
        )
        result = trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    ids = torch.stack([row["input_ids"] for row in train_set]).to(model.device)
    labels = torch.stack([row["labels"] for row in train_set]).to(model.device)
    with torch.no_grad():
        accuracy = (model(input_ids=ids).logits.argmax(1) == labels).float().mean().item()
    print(
        f"{trainer.state.global_step} steps ({trainer.sam.steps} SAM steps); logged loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}; train accuracy {accuracy:.3f}"
    )
    return {
        "global_step": trainer.state.global_step,
        "sam_steps": trainer.sam.steps,
        "losses": losses,
        "train_loss": result.training_loss,
        "accuracy": accuracy,
    }


if __name__ == "__main__":
    main()
