r"""``samkit gan``: a GAN on 2-D Gaussian mixtures, Adam against SAM on the generator, the discriminator or both.

The question: does sharpness-aware minimization (Foret et al., arXiv
2010.01412) help or hurt adversarial training? The mixtures are the standard
mode-collapse tests: **Ring-8** (8 Gaussians on a circle of radius 2, standard
deviation 0.02; Metz et al., arXiv 1611.02163) and **Grid-25** (a 5 x 5 grid
at :math:`\{-4, -2, 0, 2, 4\}^2`, standard deviation 0.05; Srivastava et al.,
arXiv 1705.07761; Lin et al., arXiv 1712.04086).

Training, per iteration: one discriminator step, then one generator step,
each with Adam (:math:`\beta = (0.5, 0.999)`), the non-saturating losses

.. math::

    L_D = \mathbb{E}_x[\operatorname{softplus}(-D(x))] + \mathbb{E}_z[\operatorname{softplus}(D(G(z)))],
    \qquad L_G = \mathbb{E}_z[\operatorname{softplus}(-D(G(z)))].

A player "with SAM" takes :class:`samkit.SAM` steps (its base optimizer the
same Adam) on its own loss, the other player's weights held fixed: the
gradient at :math:`w + \rho\, g / \lVert g \rVert` on the same batch.

Metrics, on ``eval_samples`` generated points (the same latent codes at every
evaluation):

* **modes covered**: a sample is *high quality* if it lies within 3 standard
  deviations (Euclidean distance) of its nearest mode centre; a mode is covered
  when at least 20 high-quality samples per 2500 generated fall on it (Lin et
  al.'s rule, scaled with the number of samples);
* **high-quality share**: the fraction of high-quality samples (for the true
  distribution: :math:`1 - e^{-9/2} \approx 0.989`);
* **MMD**: the unbiased estimate of :math:`\mathrm{MMD}^2` (Gretton et al.,
  JMLR 2012) between the generated points and as many true samples, with the
  sum of Gaussian kernels :math:`\exp(-\lVert x - y \rVert^2 / 2\sigma^2)`,
  :math:`\sigma \in \{0.1, 0.5, 2\}` (lower is better; about 0 for the true
  distribution);
* **mode KL**: the reverse KL divergence :math:`\sum_k q_k \log(K q_k)` between
  the share :math:`q_k` of generated samples whose nearest mode is :math:`k`
  and the true uniform weights (0 when balanced, :math:`\log K` when all
  samples sit on one mode).

Protocol (paired): for a seed, every method starts from the same generator
and discriminator weights and sees the same real batches and latent codes in
the same order (two generators of their own, seeded by the seed), so per-seed
differences are paired. A run whose loss or weights become non-finite is
marked diverged and left out of the means and verdicts.

The run folder::

    config.json                       the study's settings
    runs/<data>/<label>-seed<k>.json  the run's result (metrics over training, final), atomically
    runs/<data>/<label>-seed<k>.samples.json  generated points at the snapshot iterations
    runs/<data>/<label>-seed<k>.state.pt      the training state while it runs (every
                                      ``checkpoint_every`` iterations): an interrupted run
                                      continues from it with the same numbers
    results.json, report.html         the summary and the report
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._atomic import atomic_open
from .._checks import is_number
from . import grid
from . import settings as st
from .folder import run_folder, study_folder
from .grid import MethodDef, Variant
from .study import run_key, write_json_atomic

__all__ = [
    "GAN_METHODS",
    "MIXTURES",
    "DEFAULTS",
    "QUICK",
    "KEYS",
    "Mixture",
    "GANConfig",
    "GANResult",
    "build_config",
    "mixture_metrics",
    "nearest_modes",
    "mmd2",
    "mode_kl",
    "train_gan",
    "open_study",
    "run",
    "run_checked",
    "gan_study",
]

PROTOCOL = 1
KERNEL_BANDWIDTHS = (0.1, 0.5, 2.0)

GAN_METHODS: dict[str, MethodDef] = {
    "adam": MethodDef("Adam on both players"),
    "sam_g": MethodDef(
        "SAM (base Adam) on the generator, Adam on the discriminator", {"rho": 0.05}
    ),
    "sam_d": MethodDef(
        "SAM (base Adam) on the discriminator, Adam on the generator", {"rho": 0.05}
    ),
    "sam_both": MethodDef("SAM (base Adam) on both players, the same rho", {"rho": 0.05}),
}


# ------------------------------------------------------------------- the data
@dataclass(frozen=True)
class Mixture:
    """An equal-weight mixture of isotropic 2-D Gaussians."""

    name: str
    centers: tuple[tuple[float, float], ...]
    std: float
    source: str
    #: the training size a study uses when it sets none: iterations, batch size, hidden width
    sizes: tuple[int, int, int] = (5000, 128, 64)

    def centers_tensor(self) -> Tensor:
        return torch.tensor(self.centers, dtype=torch.float32)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points: a uniformly drawn mode each, plus Gaussian noise."""
        c = self.centers_tensor()
        idx = torch.randint(len(c), (n,), generator=generator)
        return c[idx] + self.std * torch.randn(n, 2, generator=generator)


def _ring(k: int, radius: float) -> tuple[tuple[float, float], ...]:
    return tuple(
        (radius * math.cos(2 * math.pi * i / k), radius * math.sin(2 * math.pi * i / k))
        for i in range(k)
    )


MIXTURES: dict[str, Mixture] = {
    "ring8": Mixture("ring8", _ring(8, 2.0), 0.02, "Metz et al., arXiv 1611.02163"),
    "grid25": Mixture(
        "grid25",
        tuple((float(x), float(y)) for x in range(-4, 5, 2) for y in range(-4, 5, 2)),
        0.05,
        "Srivastava et al., arXiv 1705.07761; Lin et al., arXiv 1712.04086",
        # 25 modes need wider networks and longer training than 8 (Adam covers
        # about 1 of them after 5000 iterations of the Ring-8 size)
        (8000, 256, 128),
    ),
}


# ------------------------------------------------------------------ metrics
def _sq_distances(x: Tensor, y: Tensor) -> Tensor:
    return ((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min_(0.0)


def mmd2(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = KERNEL_BANDWIDTHS) -> float:
    r"""Unbiased :math:`\mathrm{MMD}^2` between samples ``x`` (n, d) and ``y`` (m, d).

    .. math:: \frac{1}{n(n-1)} \sum_{i \ne j} k(x_i, x_j) + \frac{1}{m(m-1)} \sum_{i \ne j} k(y_i, y_j)
              - \frac{2}{nm} \sum_{i, j} k(x_i, y_j)

    with :math:`k = \sum_\sigma \exp(-\lVert a - b \rVert^2 / 2 \sigma^2)`
    (Gretton et al., JMLR 2012), computed in float64.
    """
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"Invalid samples value: {n} and {m} points (at least 2 each)")
    dxx, dyy, dxy = _sq_distances(x, x), _sq_distances(y, y), _sq_distances(x, y)
    total = 0.0
    for sigma in bandwidths:
        g = -1.0 / (2.0 * sigma * sigma)
        kxx, kyy, kxy = (dxx * g).exp_(), (dyy * g).exp_(), (dxy * g).exp_()
        total += float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)))
        total += float((kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)))
        total -= 2.0 * float(kxy.mean())
    return total


def mode_kl(nearest: Tensor, k: int) -> float:
    r""":math:`\sum_j q_j \log(k\, q_j)`: the KL divergence from the share :math:`q_j` of
    samples whose nearest mode is ``j`` (``nearest``: mode indices) to uniform weights."""
    q = torch.bincount(nearest, minlength=k).double() / max(1, nearest.numel())
    nz = q > 0
    return float((q[nz] * (q[nz] * k).log()).sum())


def nearest_modes(samples: Tensor, mixture: Mixture) -> tuple[Tensor, Tensor]:
    """For each sample: the index of its nearest mode centre, and whether it is
    of high quality (within 3 standard deviations of that centre)."""
    centers = mixture.centers_tensor().double()
    distance = _sq_distances(samples.double(), centers).sqrt()
    nearest_distance, nearest = distance.min(1)
    return nearest, nearest_distance <= 3.0 * mixture.std


def mixture_metrics(samples: Tensor, mixture: Mixture, reference: Tensor) -> dict[str, float]:
    """Modes covered, high-quality share, MMD and mode KL of ``samples`` (see the module docstring).

    ``reference``: true samples for the MMD (as many as ``samples``, or any number >= 2).
    """
    samples = samples.detach().float()
    if not bool(torch.isfinite(samples).all()):
        return {"modes": 0.0, "hq": 0.0, "mmd": math.nan, "mode_kl": math.nan}
    k = len(mixture.centers)
    nearest, hq = nearest_modes(samples, mixture)
    counts = torch.bincount(nearest[hq], minlength=k)
    need = 20.0 * samples.shape[0] / 2500.0
    return {
        "modes": float((counts >= need).sum()),
        "hq": float(hq.double().mean()),
        "mmd": mmd2(samples, reference),
        "mode_kl": mode_kl(nearest, k),
    }


# ------------------------------------------------------------------- settings
DEFAULTS: dict[str, Any] = {
    "datasets": ["ring8", "grid25"],
    "methods": ["adam", "sam_g", "sam_d", "sam_both"],
    "rho": None,  # a list: each SAM method once per value
    "seeds": 5,
    "iterations": None,  # None: the data set's own (Ring-8 5000, Grid-25 8000)
    "batch_size": None,  # None: the data set's own (Ring-8 128, Grid-25 256)
    "lr": 1e-3,
    "beta1": 0.5,
    "z_dim": 16,
    "hidden": None,  # None: the data set's own (Ring-8 64, Grid-25 128)
    "depth": 3,
    "eval_every": 500,
    "eval_samples": 2500,
    "snapshots": 4,  # scatter plots: generated points at this many evenly spaced iterations
    "checkpoint_every": 1000,
    "baseline": None,  # default: adam, else the first method
    "device": "cpu",
    "out": None,
}

#: ``--quick``: Ring-8 only, two seeds, a short run.
QUICK: dict[str, Any] = {
    "datasets": ["ring8"],
    "seeds": 2,
    "iterations": 2000,
    "batch_size": 128,
    "hidden": 64,
    "eval_every": 250,
    "eval_samples": 1000,
}

KEYS = frozenset(DEFAULTS)


@dataclass
class GANConfig:
    """A validated GAN study (see :func:`build_config`)."""

    datasets: list[str]
    variants: list[Variant]
    seeds: list[int]
    iterations: int | None  # None: each data set's own (see :meth:`resolved`)
    batch_size: int | None
    lr: float
    beta1: float
    z_dim: int
    hidden: int | None
    depth: int
    eval_every: int
    eval_samples: int
    snapshots: int
    checkpoint_every: int
    baseline: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": list(self.datasets),
            "methods": [v.to_dict() for v in self.variants],
            "seeds": list(self.seeds),
            "iterations": self.iterations,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "beta1": self.beta1,
            "z_dim": self.z_dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "eval_every": self.eval_every,
            "eval_samples": self.eval_samples,
            "snapshots": self.snapshots,
            "checkpoint_every": self.checkpoint_every,
            "baseline": self.baseline,
            "device": self.device,
            "protocol": PROTOCOL,
        }

    @property
    def labels(self) -> list[str]:
        return [v.label for v in self.variants]

    def resolved(self, dataset: str) -> GANConfig:
        """This study's settings for one data set: its own sizes where the study sets none."""
        iterations, batch_size, hidden = MIXTURES[dataset].sizes
        return dataclasses.replace(
            self,
            datasets=[dataset],
            iterations=self.iterations or iterations,
            batch_size=self.batch_size or batch_size,
            hidden=self.hidden or hidden,
        )

    def snapshot_iterations(self) -> list[int]:
        """Evenly spaced, ending at the last iteration."""
        n = self.snapshots
        return sorted({max(1, round(self.iterations * (i + 1) / n)) for i in range(n)})

    def eval_iterations(self) -> list[int]:
        points = set(range(self.eval_every, self.iterations + 1, self.eval_every))
        return sorted(points | {self.iterations} | set(self.snapshot_iterations()))


def build_config(s: dict[str, Any]) -> GANConfig:
    """A :class:`GANConfig` from merged settings; ValueError naming the bad setting."""
    unknown = sorted(set(s) - KEYS)
    if unknown:
        raise ValueError(f"Invalid setting: {', '.join(unknown)}")
    s = st.plain({**DEFAULTS, **s})  # NumPy scalars are numbers too
    datasets = grid.check_names("datasets", s["datasets"], MIXTURES)
    variants = grid.variants(s["methods"], s["rho"], GAN_METHODS)
    seeds = grid.seed_list(s["seeds"])
    st.check_int("iterations", s["iterations"], 1, 10**8, none_ok=True)
    st.check_int("batch_size", s["batch_size"], 2, 1 << 20, none_ok=True)
    st.check_float("lr", s["lr"], 0.0, lo_open=True)
    st.check_float("beta1", s["beta1"], 0.0, 1.0, hi_open=True)
    st.check_int("z_dim", s["z_dim"], 1, 4096)
    st.check_int("hidden", s["hidden"], 1, 65_536, none_ok=True)
    st.check_int("depth", s["depth"], 1, 64)
    st.check_int("eval_every", s["eval_every"], 1, 10**8)
    st.check_int("eval_samples", s["eval_samples"], 2, 20_000)
    st.check_int("snapshots", s["snapshots"], 1, 100)
    st.check_int("checkpoint_every", s["checkpoint_every"], 1, 10**8)
    labels = [v.label for v in variants]
    baseline = s["baseline"]
    if baseline is None:
        baseline = "adam" if "adam" in labels else labels[0]
    elif baseline not in labels:
        raise ValueError(
            f"Invalid baseline value: {baseline!r} (one of the labels: {', '.join(labels)})"
        )
    device = st.check_device(s["device"])
    if s.get("out") is not None and (not isinstance(s["out"], str) or not s["out"].strip()):
        raise ValueError(f"Invalid out value: {s['out']!r} (a folder path)")
    return GANConfig(
        datasets,
        variants,
        seeds,
        s["iterations"],
        s["batch_size"],
        float(s["lr"]),
        float(s["beta1"]),
        s["z_dim"],
        s["hidden"],
        s["depth"],
        s["eval_every"],
        s["eval_samples"],
        s["snapshots"],
        s["checkpoint_every"],
        baseline,
        device,
    )


def default_out(config: GANConfig) -> Path:
    return grid.default_out("gan", config.to_dict(), *config.datasets)


# ------------------------------------------------------------------- training
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
    from ..optim.sam import SAM

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
    from ..optim.sam import SAM

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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file is the same user error
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"Invalid training state: {str(path)!r} cannot be read ({reason[:200]}); {hint}"
        ) from exc
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
    try:
        for iteration in range(start + 1, config.iterations + 1):
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
        "time_per_iteration": train_time / max(1, config.iterations),
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


# ---------------------------------------------------------------------- study
def _identity(config: GANConfig, dataset: str, variant: Variant, seed: int) -> dict[str, Any]:
    d = config.resolved(dataset).to_dict()
    for key in ("datasets", "methods", "seeds", "baseline", "device", "checkpoint_every"):
        d.pop(key)
    return {"dataset": dataset, "method": variant.to_dict(), "seed": seed, **d}


@dataclass
class GANResult(grid.StudyResult):
    """What :func:`run` returns: the summary (``results.json``) and where the files are."""

    executed: int = 0

    @property
    def table(self) -> str:
        return format_table(self.rows)


def check(config: GANConfig, out: Path) -> None:
    """What can fail before training: the device, every training state this study would resume."""
    from .trainer import resolve_device

    try:
        resolve_device(config.device)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"Invalid device value: {config.device!r} ({exc})") from exc
    for dataset in config.datasets:
        for variant in config.variants:
            for seed in config.seeds:
                state = out / "runs" / dataset / f"{run_key(variant.label, seed)}.state.pt"
                if state.is_file():
                    load_state(state)


@contextlib.contextmanager
def open_study(config: GANConfig, out: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Lock the run folder and check the study (ValueError before any training), then yield the folder."""
    folder_path = run_folder(out, lambda: default_out(config))
    with grid.open_study(folder_path, lambda folder: check(config, folder)) as folder:
        yield folder


def run(
    config: GANConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    jobs: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
) -> GANResult:
    """Check, then run (or resume) every (data set, method, seed) run; write
    ``results.json`` and ``report.html``. Holds the folder's lock throughout.
    ``jobs``/``threads``/``ray``: the executor (:func:`~samkit.experiments.engine.make_executor`)."""
    with open_study(config, out) as folder:
        return run_checked(
            config, folder, progress=progress, log=log, jobs=jobs, threads=threads, ray=ray
        )


@dataclass
class GANRun:
    """One (data set, method, seed) run: the task the study engine executes."""

    config: GANConfig
    dataset: str
    variant: Variant
    seed: int
    key: str
    identity: dict[str, Any]

    def __call__(self, runs: Path, ctx: Any) -> dict[str, Any]:
        key, identity = self.key, self.identity
        out = train_gan(
            self.config,
            MIXTURES[self.dataset],
            self.variant,
            self.seed,
            state_path=runs / f"{key}.state.pt",
            identity=identity,
            progress=ctx.progress,
            desc=f"{self.dataset} {self.variant.label} s{self.seed}",
        )
        samples = {"config": grid.normalise(identity), "snapshots": out.pop("snapshots")}
        out.pop("weights")
        write_json_atomic(runs / f"{key}.samples.json", samples)
        return {
            "key": key,
            "dataset": self.dataset,
            "label": self.variant.label,
            "method": self.variant.method,
            "seed": self.seed,
            "config": identity,
            "samples": f"{key}.samples.json",
            **out,
        }


def run_checked(
    config: GANConfig,
    folder: Path,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    jobs: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
) -> GANResult:
    """:func:`run` inside :func:`open_study`."""
    from .engine import make_executor

    show = sys.stderr.isatty() if progress is None else progress
    executor = make_executor(jobs, threads, ray=ray, progress=show, log=log)
    with study_folder(folder):
        records, executed = grid.run_cells(
            folder,
            config.to_dict(),
            [(d, v, s) for d in config.datasets for s in config.seeds for v in config.variants],
            identity=lambda dataset, variant, seed: _identity(config, dataset, variant, seed),
            task=lambda dataset, variant, seed, key, identity: GANRun(
                config, dataset, variant, seed, key, identity
            ),
            describe=_describe,
            log=log,
            # the training state, once the result is written
            cleanup=lambda key: (f"{key}.state.pt",),
            executor=executor,
        )
        summary = summarize(config, records)
        write_json_atomic(folder / "results.json", summary)
        write_report(folder / "report.html", config, summary, folder)
    return GANResult(folder, grid.normalise(summary), executed)


def _describe(record: dict[str, Any]) -> str:
    if record.get("diverged"):
        return "DIVERGED (non-finite loss or weights), left out of the summary"
    f = record["final"]
    return (
        f"{f['modes']:.0f} modes, {100 * f['hq']:.1f}% high quality, MMD {f['mmd']:.4f}, "
        f"{record['train_time']:.0f} s"
    )


# -------------------------------------------------------------------- summary
METRICS = (
    ("modes", "modes covered", True),
    ("hq", "high-quality share", True),
    ("mmd", "MMD", False),
    ("mode_kl", "mode KL", False),
)


def summarize(config: GANConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per data set and method: final metrics, mean and std over seeds; paired verdicts."""
    rows: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    for dataset in config.datasets:
        mine = [r for r in records if r["dataset"] == dataset]
        base_time = grid.stats(
            [r["time_per_iteration"] for r in mine if r["label"] == config.baseline]
        )[0]
        for label in config.labels:
            every = [r for r in mine if r["label"] == label]
            if not every:
                continue
            ok = [r for r in every if not r.get("diverged")]
            row: dict[str, Any] = {
                "dataset": dataset,
                "label": label,
                "method": every[0]["method"],
                "runs": len(every),
                "n": len(ok),
                "diverged": len(every) - len(ok),
            }
            for key, _, _ in METRICS:
                mean, std, _se = grid.stats([r["final"].get(key) for r in ok])
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            t = grid.stats([r["time_per_iteration"] for r in every])[0]
            row["time_per_iteration"] = t
            row["cost_time"] = t / base_time if base_time and base_time > 0 else math.nan
            rows.append(row)
        for key, unit, maximize in METRICS[:3]:
            values = {
                label: {
                    r["seed"]: (None if r.get("diverged") else r["final"].get(key))
                    for r in mine
                    if r["label"] == label
                }
                for label in config.labels
            }
            for v in grid.verdicts(
                values, config.baseline, metric=key, unit=unit, maximize=maximize
            ):
                v["dataset"] = dataset
                v["sentence"] = f"{dataset}: {v['sentence']}"
                verdicts.append(v)
    return {
        "format": "samkit-gan",
        "version": 1,
        "settings": config.to_dict(),
        "mixtures": {
            d: {
                "std": MIXTURES[d].std,
                "modes": len(MIXTURES[d].centers),
                "source": MIXTURES[d].source,
            }
            for d in config.datasets
        },
        "summary": rows,
        "verdicts": verdicts,
        "runs": records,
    }


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction  # None: every seed diverged


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "data",
        "method",
        "seeds",
        "modes covered",
        "high quality %",
        "MMD",
        "mode KL",
        "s/iteration",
        "cost (time)",
    ]
    cells = []
    for r in rows:
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        hq_m, hq_s = r["hq_mean"], r["hq_std"]
        cells.append(
            [
                r["dataset"],
                r["label"],
                str(r["runs"]),
                f"{_fmt(r['modes_mean'], '.1f')} +- {_fmt(r['modes_std'], '.1f')}{div}",
                f"{_fmt(_percent(hq_m), '.1f')} +- {_fmt(_percent(hq_s), '.1f')}",
                f"{_fmt(r['mmd_mean'], '.4f')} +- {_fmt(r['mmd_std'], '.4f')}",
                f"{_fmt(r['mode_kl_mean'], '.3f')} +- {_fmt(r['mode_kl_std'], '.3f')}",
                _fmt(r["time_per_iteration"], ".4f"),
                _fmt(r["cost_time"], ".2f") + "x",
            ]
        )
    return headers, cells


def format_table(rows: list[dict[str, Any]]) -> str:
    headers, cells = table_rows(rows)
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------- report
def _figures(
    config: GANConfig, summary: dict[str, Any], dataset: str, folder: Path
) -> list[tuple[str, str]]:
    import json

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import png_base64

    mixture = MIXTURES[dataset]
    runs = [r for r in summary["runs"] if r["dataset"] == dataset]
    figures = []
    fig, panels = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for panel, (key, name, _) in zip(panels, METRICS):
        for label in config.labels:
            mine = [
                r for r in runs if r["label"] == label and not r.get("diverged") and r["history"]
            ]
            if not mine:
                continue
            n = min(len(r["history"]) for r in mine)
            xs = [h["iteration"] for h in mine[0]["history"][:n]]
            ys = np.array(
                [
                    [np.nan if h.get(key) is None else h[key] for h in r["history"][:n]]
                    for r in mine
                ],
                dtype=float,
            )
            panel.plot(xs, np.nanmean(ys, axis=0), label=label.replace("$", r"\$"))
        panel.set(xlabel="iteration", title=name)
        if key == "mmd":
            panel.set_yscale("symlog", linthresh=1e-3)
    if panels[0].get_legend_handles_labels()[0]:  # (none when every run diverged)
        panels[0].legend(fontsize=7)
    fig.tight_layout()
    figures.append((f"{dataset}: metrics over training (mean over seeds)", png_base64(fig)))

    seed = config.seeds[0]
    shots = [str(i) for i in config.resolved(dataset).snapshot_iterations()]
    centers = mixture.centers_tensor().numpy()
    fig, grid_axes = plt.subplots(
        len(config.labels),
        len(shots),
        figsize=(2.4 * len(shots), 2.4 * len(config.labels)),
        squeeze=False,
    )
    lim = float(np.abs(centers).max()) + 1.0
    for row, label in enumerate(config.labels):
        record = next((r for r in runs if r["label"] == label and r["seed"] == seed), None)
        points: dict[str, Any] = {}
        if record is not None:
            with contextlib.suppress(OSError, ValueError):
                points = json.loads((folder / "runs" / dataset / record["samples"]).read_text())[
                    "snapshots"
                ]
        for col, it in enumerate(shots):
            ax = grid_axes[row][col]
            pts = np.array(points.get(it, []), dtype=float).reshape(-1, 2)
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, c="tab:blue")
            ax.scatter(
                centers[:, 0], centers[:, 1], s=14, c="tab:red", marker="x", lw=0.8, zorder=3
            )
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
            if row == 0:
                ax.set_title(f"iteration {it}", fontsize=9)
            if col == 0:
                ax.set_ylabel(label.replace("$", r"\$"), fontsize=9)
    fig.tight_layout()
    figures.append(
        (
            f"{dataset}: generated samples over training (seed {seed}, 512 points; x: the modes)",
            png_base64(fig),
        )
    )
    return figures


def write_report(path: Path, config: GANConfig, summary: dict[str, Any], folder: Path) -> None:
    """``report.html``: the table, the paired verdicts, the metric curves and the scatter plots."""
    import html

    from .report import NO_PLOTS, html_figure, html_list, html_table, plots_available, write_page

    headers, cells = table_rows(summary["summary"])
    sections = [html_table(headers, cells)]
    sections.append(html_list("Paired verdicts", [v["sentence"] for v in summary["verdicts"]]))
    sections.append(
        "<p>"
        + html.escape(
            "Final metrics at the end of training ("
            + ", ".join(
                f"{d}: {config.resolved(d).iterations} iterations, batch "
                f"{config.resolved(d).batch_size}, width {config.resolved(d).hidden}"
                for d in config.datasets
            )
            + f") on {config.eval_samples} generated "
            "points, mean +- sample standard deviation over seeds (diverged runs left out). A "
            "sample is high quality within 3 standard deviations of a mode; a mode is covered with "
            f"at least {20 * config.eval_samples / 2500:g} high-quality samples. MMD: unbiased "
            "MMD^2, Gaussian kernels of bandwidth 0.1, 0.5 and 2 (lower is better). Mode KL: KL "
            "divergence of the generated mode shares from uniform (lower is better). Cost: time "
            f"per iteration relative to {config.baseline}."
        )
        + "</p>"
    )
    plots = plots_available()
    if not plots:
        sections.append(f"<p><b>{html.escape(NO_PLOTS)}.</b></p>")
    for dataset in config.datasets:
        sections.append(
            f"<h2>{html.escape(dataset)} ({html.escape(MIXTURES[dataset].source)})</h2>"
        )
        if plots and any(r["dataset"] == dataset for r in summary["runs"]):
            for caption, b64 in _figures(config, summary, dataset, folder):
                sections.append(html_figure(caption, b64))
    write_page(
        path,
        title="samkit gan: Adam and SAM on 2-D Gaussian mixtures",
        sections=sections,
        settings=dict(summary["settings"]),
    )


# ------------------------------------------------------------------------ API
def gan_study(
    *,
    datasets: Any = None,
    methods: Any = None,
    rho: Any = None,
    seeds: Any = None,
    iterations: int | None = None,
    out: str | os.PathLike[str] | None = None,
    quick: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    jobs: int | str | None = None,
    threads: int | None = None,
    ray: str | None = None,
    **settings: Any,
) -> GANResult:
    """Adam against SAM on the generator, the discriminator or both, on Ring-8 and Grid-25.

    Args:
        datasets: ``"ring8"``, ``"grid25"`` (default both).
        methods: names or ``"name:rho=..."`` specs from :data:`GAN_METHODS`
            (default ``adam``, ``sam_g``, ``sam_d``, ``sam_both``).
        rho: a value or list: each SAM method once per value.
        seeds: a count or a list. ``iterations``: training iterations (default: the data
            set's own, Ring-8 5000, Grid-25 8000; ``batch_size`` and ``hidden`` likewise).
        out: the run folder (default ``samkit-runs/gan-<datasets>-<hash>``); rerunning resumes it.
        quick: start from the ``--quick`` preset.
        progress: a progress bar per run (default: on a terminal); ``quiet``: no log lines.
        jobs, threads, ray: runs at once, torch threads per run, a Ray cluster's
            address (as in :func:`samkit.compare`).
        **settings: ``batch_size``, ``lr``, ``beta1``, ``z_dim``, ``hidden``,
            ``depth``, ``eval_every``, ``eval_samples``, ``snapshots``,
            ``checkpoint_every``, ``baseline``, ``device``.

    Returns:
        a :class:`GANResult` (``rows``, ``verdicts``, ``table``, ``summary``, paths).

    Raises:
        ValueError: any bad setting, found before anything is trained.
    """
    given = dict(
        settings,
        datasets=datasets,
        methods=methods,
        rho=[rho] if is_number(rho) else rho,
        seeds=seeds,
        iterations=iterations,
    )
    from .api import check_flags

    check_flags(quick=quick, progress=progress, quiet=quiet)
    unknown = sorted(set(given) - KEYS)
    if unknown or "out" in settings:
        raise ValueError(f"Invalid setting: {', '.join(unknown or ['out'])}")
    merged = st.merge(QUICK if quick else None, given, defaults=DEFAULTS)
    config = build_config(merged)
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    how = st.execution({"jobs": jobs, "threads": threads, "ray": ray})
    return run(config, out, progress=progress, log=log, **how)
