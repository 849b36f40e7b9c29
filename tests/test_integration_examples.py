"""The framework examples (examples/lightning_sam.py, huggingface_sam.py) run, learn and count right."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, *argv: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"samkit_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.main(list(argv))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_lightning_example_with_accumulation_and_bf16():
    out = run("lightning_sam", "--epochs", "2", "--samples", "512", "--accumulate", "2",
              "--precision", "bf16-mixed")  # fmt: skip
    batches = out["batches"]  # 8 per epoch
    assert out["global_step"] == out["sam_steps"] == out["ascents"] == math.ceil(batches / 2)
    assert out["bn_updates"] == batches  # the pass at w only, once per micro-batch
    assert math.isfinite(out["loss"]) and out["accuracy"] > 0.3  # 10 classes: chance is 0.1


def test_huggingface_example_learns():
    out = run("huggingface_sam", "--epochs", "3", "--samples", "256", "--accumulate", "2")
    assert out["global_step"] == out["sam_steps"] == 3 * 256 // (16 * 2)
    assert out["losses"][-1] < 0.85 * out["losses"][0], out["losses"]
    assert out["accuracy"] > 0.6  # 3 classes: chance is 1/3
