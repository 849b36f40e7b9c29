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

The package: :mod:`.data` (the mixtures), :mod:`.evaluation` (the metrics),
:mod:`.config` (methods, defaults, :func:`build_config`), :mod:`.training`,
:mod:`.summary`, :mod:`.report`, and :mod:`.study` (the run folder,
:func:`run`, :func:`gan_study`).
"""

from __future__ import annotations

from .config import (
    DEFAULTS,
    GAN_METHODS,
    KEYS,
    PROTOCOL,
    QUICK,
    GANConfig,
    build_config,
    default_out,
)
from .data import MIXTURES, Mixture
from .evaluation import KERNEL_BANDWIDTHS, mixture_metrics, mmd2, mode_kl, nearest_modes
from .report import write_report
from .study import GANResult, GANRun, check, gan_study, open_study, run, run_checked
from .summary import METRICS, format_table, summarize, table_rows
from .training import build_players, load_state, train_gan

__all__ = [
    "GAN_METHODS",
    "MIXTURES",
    "DEFAULTS",
    "QUICK",
    "KEYS",
    "PROTOCOL",
    "KERNEL_BANDWIDTHS",
    "METRICS",
    "Mixture",
    "GANConfig",
    "GANResult",
    "GANRun",
    "build_config",
    "default_out",
    "check",
    "mixture_metrics",
    "nearest_modes",
    "mmd2",
    "mode_kl",
    "build_players",
    "load_state",
    "train_gan",
    "open_study",
    "run",
    "run_checked",
    "gan_study",
    "summarize",
    "table_rows",
    "format_table",
    "write_report",
]
