"""The sharpness instruments of a comparative study: the measures of each finished run
(:func:`measure_sharpness`) and the loss along the line from the SGD model to the
best SAM model (:func:`interpolation`), both through :mod:`samkit.sharpness`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .batches import eval_batches, train_batches
from .configs import StudyConfig
from .problem import Data, Problem
from .runfiles import first_line
from .trainer import resolve_device

__all__ = [
    "SHARPNESS_KEYS",
    "CHEAP_SHARPNESS",
    "sharpness_available",
    "sharpness_batches",
    "measure_sharpness",
    "interpolation",
]

SHARPNESS_KEYS = ("hessian_top_eig", "hessian_trace", "worst_case_sharpness")


def sharpness_available() -> bool:
    """True when :mod:`samkit.sharpness` provides ``summary``."""
    try:
        import samkit.sharpness as sh
    except ImportError:
        return False
    return callable(getattr(sh, "summary", None))


def mean_loss_fn(problem: Problem) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The problem's loss as a batch mean (what the instruments take)."""

    def mean_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return problem.loss_fn(output, target).mean()

    return mean_loss


def sharpness_batches(
    data: Any, samples: int, batch_size: int = 250, device: torch.device | None = None
) -> list[tuple[Any, torch.Tensor]]:
    """The first ``samples`` training samples (the labels trained on), in fixed batches."""
    out: list[tuple[Any, torch.Tensor]] = []
    n = 0
    source = data.train
    if isinstance(source, (torch.utils.data.Dataset, torch.utils.data.IterableDataset)):
        batches: Any = eval_batches(source, batch_size)
    else:
        batches = ((x, y) for x, y, _ in train_batches(source, batch_size, 0, 0))
    for x, y in batches:
        take = min(int(y.shape[0]), samples - n)
        x, y = x[:take], y[:take]
        if device is not None:
            x, y = x.to(device), y.to(device)
        out.append((x, y))
        n += take
        if n >= samples:
            break
    return out


#: settings of samkit.sharpness.summary under ``sharpness_cheap`` (passed when it takes them)
CHEAP_SHARPNESS = {"trace_samples": 4, "max_iter": 30, "ascent_steps": 3}


def measure_sharpness(
    model: torch.nn.Module,
    problem: Problem,
    data: Data,
    samples: int,
    seed: int,
    cheap: bool = False,
) -> dict[str, float]:
    """:func:`samkit.sharpness.summary` of a trained model on its first ``samples``
    training samples (``cheap``: :data:`CHEAP_SHARPNESS`)."""
    import inspect

    import samkit.sharpness as sh

    model.eval()
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {}
    if cheap:
        params = inspect.signature(sh.summary).parameters
        kwargs = {k: v for k, v in CHEAP_SHARPNESS.items() if k in params}
    batches = sharpness_batches(data, samples, device=device)
    out = sh.summary(model, mean_loss_fn(problem), batches, seed=seed, **kwargs)
    return {k: float(v) for k, v in out.items()}


def load_weights(problem: Problem, data: Data, path: Path) -> torch.nn.Module:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    state = ck.get("state_dict")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"Invalid checkpoint {str(path)!r}: no state dict")
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise ValueError(f"Invalid checkpoint {str(path)!r}: non-finite weights")
    model = problem.build_model(data)
    model.load_state_dict(state)
    model.eval()
    return model


def interpolation(
    config: StudyConfig,
    problem: Problem,
    records: list[dict[str, Any]],
    out: Path,
    log: Callable[[str], None] | None,
) -> dict[str, Any] | None:
    """Loss along the line from the SGD model to the best SAM model (first seed, finished runs)."""
    try:
        from ..sharpness import landscape
    except ImportError:
        return None
    if not callable(getattr(landscape, "interpolate", None)):
        return None
    seed = config.seeds[0]
    ok = [r for r in records if r["seed"] == seed and not r.get("diverged") and r.get("checkpoint")]
    a = next((r for r in ok if r["label"] == "sgd"), None)
    metric, sign = problem.primary, (1.0 if problem.maximize else -1.0)
    sam_like = [r for r in ok if r["method"] == "sam"]
    b = (
        max(sam_like, key=lambda r: sign * (r["final"].get(f"test_{metric}") or -math.inf))
        if sam_like
        else None
    )
    if a is None or b is None:
        return None
    try:
        data = problem.load(seed)
        device = resolve_device(config.device)
        models = [
            load_weights(problem, data, out / "runs" / r["checkpoint"]).to(device) for r in (a, b)
        ]
        alphas, losses = landscape.interpolate(
            models[0],
            models[1],
            mean_loss_fn(problem),
            sharpness_batches(data, config.sharpness_samples, device=device),
            n_points=config.interpolation_points,
        )
    except Exception as exc:  # noqa: BLE001 - an instrument failure must not lose the study
        if log:
            log(f"samkit compare: interpolation failed: {first_line(exc)}")
        return None
    return {
        "a": a["label"],
        "b": b["label"],
        "seed": seed,
        "alphas": [float(x) for x in alphas],
        "losses": [float(x) for x in losses],
    }
