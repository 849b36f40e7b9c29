"""Training one ``samkit gan`` run: both players with Adam, or SAM on the generator, the
discriminator or both; its training state saved and resumed with the same numbers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..._atomic import atomic_open
from .. import grid
from ..engine.core import state_saved
from ..grid import Variant
from ..trainstate import read_state
from .config import GANConfig
from .data import MIXTURES, Mixture
from .evaluation import mixture_metrics

__all__ = ["build_players", "load_state", "train_gan"]


def _mlp(
    n_in: int, n_out: int, hidden: int, depth: int, activation: Callable[[], nn.Module]
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), activation()]
    return nn.Sequential(*layers, nn.Linear(hidden, n_out))


def build_players(config: GANConfig, seed: int) -> tuple[nn.Module, nn.Module]:
    """The generator (ReLU MLP, latent -> 2-D) and discriminator (LeakyReLU MLP, 2-D -> logit),
    initialised from ``seed`` alone (every method of a seed starts from the same weights).
    ``config``: resolved for one data set (:meth:`GANConfig.resolved`)."""
    if config.hidden is None:
        raise ValueError("Invalid hidden value: None (resolve the config for a data set first)")
    torch.manual_seed(seed)
    generator = _mlp(config.z_dim, 2, config.hidden, config.depth, nn.ReLU)
    discriminator = _mlp(2, 1, config.hidden, config.depth, lambda: nn.LeakyReLU(0.2))
    return generator, discriminator


def _optimizer(params: Any, config: GANConfig, rho: float | None) -> torch.optim.Optimizer:
    from ...optim.sam import SAM

    adam = torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999))
    return adam if rho is None else SAM(adam, rho=rho)


def _rhos(variant: Variant) -> tuple[float | None, float | None]:
    """(generator's rho, discriminator's rho); None: plain Adam."""
    rho = variant.options.get("rho")
    return {
        "adam": (None, None),
        "sam_g": (rho, None),
        "sam_d": (None, rho),
        "sam_both": (rho, rho),
    }[variant.method]


def _step(optimizer: torch.optim.Optimizer, closure: Callable[[], Tensor]) -> Tensor:
    from ...optim.sam import SAM

    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, SAM):
        loss = optimizer.step(closure)
    else:
        loss = closure()
        optimizer.step()
    return loss.detach()


def _finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


_STATE_KEYS = ("identity", "iteration", "generator", "discriminator", "opt_g", "opt_d", "rng")


def load_state(path: Path) -> dict[str, Any]:
    """Read and check a GAN training state; ValueError if it cannot be resumed."""
    hint = "delete it to restart this run from its first iteration"
    state = read_state(path, hint)  # a ResumeError (a ValueError) if unreadable
    if (
        not isinstance(state, dict)
        or any(k not in state for k in _STATE_KEYS)
        or not isinstance(state["iteration"], int)
        or not isinstance(state.get("history"), list)
        or not isinstance(state.get("snapshots"), dict)
        or not isinstance(state["rng"], dict)
        or any(k not in state["rng"] for k in ("data", "noise"))
    ):
        raise ValueError(f"Invalid training state: {str(path)!r} is incomplete; {hint}")
    return state


def train_gan(
    config: GANConfig,
    mixture: Mixture,
    variant: Variant,
    seed: int,
    *,
    state_path: Path | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = False,
    desc: str = "",
    on_iteration: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one GAN run and return its record (history, final metrics, snapshots, time).

    With ``state_path``, the training state is saved there every
    ``checkpoint_every`` iterations, and a state with the same ``identity``
    found there is resumed: the run then ends with the same numbers as one
    that never stopped. ``on_iteration(i)`` is called after each iteration.
    """
    config = config.resolved(mixture.name) if mixture.name in MIXTURES else config
    device = torch.device(config.device if config.device != "auto" else "cpu")
    generator, discriminator = build_players(config, seed)
    generator.to(device)
    discriminator.to(device)
    rho_g, rho_d = _rhos(variant)
    opt_g = _optimizer(generator.parameters(), config, rho_g)
    opt_d = _optimizer(discriminator.parameters(), config, rho_d)
    data_rng = torch.Generator().manual_seed(seed * 2 + 1)
    noise_rng = torch.Generator().manual_seed(seed * 2 + 2)
    # evaluation: the same latent codes and true samples at every evaluation, for every method
    eval_rng = torch.Generator().manual_seed(10_000 + seed)
    eval_z = torch.randn(config.eval_samples, config.z_dim, generator=eval_rng).to(device)
    reference = mixture.sample(config.eval_samples, eval_rng)
    history: list[dict[str, Any]] = []
    snapshots: dict[str, list[list[float]]] = {}
    start, elapsed = 0, 0.0
    diverged = False
    if state_path is not None and state_path.is_file():
        saved = load_state(state_path)
        if identity is not None and saved["identity"] == grid.normalise(identity):
            generator.load_state_dict(saved["generator"])
            discriminator.load_state_dict(saved["discriminator"])
            opt_g.load_state_dict(saved["opt_g"])
            opt_d.load_state_dict(saved["opt_d"])
            data_rng.set_state(saved["rng"]["data"])
            noise_rng.set_state(saved["rng"]["noise"])
            start, elapsed = saved["iteration"], float(saved.get("elapsed", 0.0))
            history, snapshots = list(saved["history"]), dict(saved["snapshots"])
    evals = set(config.eval_iterations())
    shots = set(config.snapshot_iterations())
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=config.iterations,
                initial=start,
                desc=desc,
                unit="it",
                leave=False,
                mininterval=0.5,
            )
        except ImportError:  # pragma: no cover
            bar = None
    t0 = time.perf_counter()
    d_loss = g_loss = torch.zeros(())
    ran = start  # iterations trained (a diverged run stops early)
    try:
        for iteration in range(start + 1, config.iterations + 1):
            ran = iteration
            real = mixture.sample(config.batch_size, data_rng).to(device)
            z_d = torch.randn(config.batch_size, config.z_dim, generator=noise_rng).to(device)
            z_g = torch.randn(config.batch_size, config.z_dim, generator=noise_rng).to(device)
            with torch.no_grad():
                fake = generator(z_d)

            def d_closure(real: Tensor = real, fake: Tensor = fake) -> Tensor:
                loss = (
                    F.softplus(-discriminator(real)).mean() + F.softplus(discriminator(fake)).mean()
                )
                loss.backward()
                return loss

            d_loss = _step(opt_d, d_closure)
            discriminator.requires_grad_(False)  # the generator's step holds D fixed

            def g_closure(z_g: Tensor = z_g) -> Tensor:
                loss = F.softplus(-discriminator(generator(z_g))).mean()
                loss.backward()
                return loss

            try:
                g_loss = _step(opt_g, g_closure)
            finally:
                discriminator.requires_grad_(True)
            if not (bool(torch.isfinite(d_loss)) and bool(torch.isfinite(g_loss))) or not _finite(
                generator, discriminator
            ):
                diverged = True
                break
            if iteration in evals:
                with torch.no_grad():
                    samples = generator(eval_z).cpu()
                history.append(
                    {
                        "iteration": iteration,
                        "d_loss": float(d_loss),
                        "g_loss": float(g_loss),
                        **mixture_metrics(samples, mixture, reference),
                    }
                )
                if iteration in shots:
                    snapshots[str(iteration)] = [
                        [round(float(a), 4), round(float(b), 4)] for a, b in samples[:512].tolist()
                    ]
            if bar is not None:
                bar.update(1)
            if on_iteration is not None:
                on_iteration(iteration)
            if (
                state_path is not None
                and iteration % config.checkpoint_every == 0
                and iteration < config.iterations
            ):
                _save_state(
                    state_path,
                    identity,
                    iteration,
                    generator,
                    discriminator,
                    opt_g,
                    opt_d,
                    data_rng,
                    noise_rng,
                    history,
                    snapshots,
                    elapsed + time.perf_counter() - t0,
                )
                state_saved(state_path, iteration)
    finally:
        if bar is not None:
            bar.close()
    train_time = elapsed + time.perf_counter() - t0
    final = dict(history[-1]) if history and not diverged else {}
    passes = {
        "g": 1.0 + (rho_g is not None and rho_g > 0),
        "d": 1.0 + (rho_d is not None and rho_d > 0),
    }
    return {
        "history": history,
        "final": final,
        "snapshots": snapshots,
        "diverged": diverged,
        "train_time": train_time,
        # per iteration trained: a run that diverged early is not cheaper per iteration
        "time_per_iteration": train_time / max(1, ran),
        "passes": passes,
        "g_ascents": int(getattr(opt_g, "ascents", 0)),
        "d_ascents": int(getattr(opt_d, "ascents", 0)),
        "weights": {
            "generator": [p.detach().cpu().clone() for p in generator.parameters()],
            "discriminator": [p.detach().cpu().clone() for p in discriminator.parameters()],
        },
    }


def _save_state(
    path: Path,
    identity: dict[str, Any] | None,
    iteration: int,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    data_rng: torch.Generator,
    noise_rng: torch.Generator,
    history: list[dict[str, Any]],
    snapshots: dict[str, Any],
    elapsed: float,
) -> None:
    state = {
        "identity": grid.normalise(identity or {}),
        "iteration": iteration,
        "generator": generator.state_dict(),
        "discriminator": discriminator.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "rng": {"data": data_rng.get_state(), "noise": noise_rng.get_state()},
        "history": history,
        "snapshots": snapshots,
        "elapsed": elapsed,
    }
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
