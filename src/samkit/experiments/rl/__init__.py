r"""``samkit rl``: PPO against PPO with SAM, return over training and robustness of the final policies.

The question (Lee & Yoon, ICLR 2025, "Flat reward in policy parameter space
implies robust reinforcement learning", openreview 4OaO3GjP7k): does a policy
trained with sharpness-aware updates keep its return better when the actions
or the dynamics it meets differ from those it was trained on? Their argument:
a reward that is flat around the policy's parameters :math:`\theta`,

.. math:: \max_{\lVert \epsilon \rVert \le \rho} \big(J(\theta) - J(\theta + \epsilon)\big) \ \text{small},

bounds the loss of return under perturbed actions, and through them under
perturbed transitions and rewards. PPO with SAM (Foret et al., arXiv
2010.01412) seeks such parameters: every PPO gradient step is a SAM step on
PPO's loss (:class:`samkit.integrations.sb3.SAMPPO`, Stable-Baselines3's PPO
with samkit's optimizer; nothing here re-implements PPO).

Protocol (one study = environments x methods x seeds):

* **training**: Stable-Baselines3 PPO with the RL Baselines3 Zoo's tuned
  hyper-parameters for each environment; every method of a seed starts from the
  same initial weights and the same environment seeds (SB3's ``seed``), so the
  differences are paired. The return of each training episode (stochastic
  policy) is binned over the timesteps: the learning curve.
* **evaluation** (as Lee & Yoon: the deterministic policy, the mean over many
  episodes, a grid of perturbation strengths): the final policy plays
  ``eval_episodes`` episodes on the nominal environment and on each point of
  a grid of perturbed ones -- random actions taken with probability ``p``
  (action perturbation) and scaled physical parameters (pole length and mass,
  cart mass, force, gravity; link masses, inertias and lengths). Every
  method and grid point uses the same episode seeds (and the same random
  actions for the same ``p``), so the evaluation is paired too.
* **summary**: per method, the nominal return, the *robust return* (for each
  perturbation axis the mean return over its non-nominal levels, then the mean
  over axes) and the per-axis means; paired verdicts against PPO.

The run folder::

    config.json                        the study's settings
    runs/<env>/<label>-seed<k>.zip     the trained agent (SB3 zip: PPO.load / SAMPPO.load)
    runs/<env>/<label>-seed<k>.train.json  its training record (learning curve, time)
    runs/<env>/<label>-seed<k>.json    the run's result (training + robustness), atomically
    results.json, report.html          the summary and the report

Resume: a run whose result file holds the same settings is not run again; a
run whose training finished (its ``.train.json`` and ``.zip`` with the same
training settings) is only evaluated. A run interrupted while training starts
that training again from the beginning (SB3 cannot resume its environments
mid-episode), so keep runs short enough to lose.

A run folder written before ``everyk`` was renamed ``sam_every_k`` is resumed
by the old command: its runs count as finished (see
:func:`~samkit.experiments.grid_run.accept_renamed`).

The package: :mod:`.envs` (the environments and their perturbation grids),
:mod:`.config` (methods, defaults, :func:`build_config`), :mod:`.training`,
:mod:`.evaluation`, :mod:`.summary`, :mod:`.report`, and :mod:`.study` (the
run folder, :func:`run`, :func:`rl_study`).
"""

from __future__ import annotations

from .config import (
    DEFAULTS,
    GRIDS,
    KEYS,
    PROTOCOL,
    QUICK,
    RL_METHODS,
    RLConfig,
    build_config,
    default_out,
)
from .envs import ENVS, Axis, EnvSpec
from .evaluation import episode_seeds, evaluate, play, sb3_policy
from .report import write_report
from .study import RLResult, RLRun, check, open_study, rl_study, run, run_checked
from .summary import axis_table, format_axis_tables, format_table, summarize, table_rows
from .training import _sam_arguments as _sam_arguments
from .training import learning_curve, train_run

__all__ = [
    "RL_METHODS",
    "ENVS",
    "DEFAULTS",
    "QUICK",
    "KEYS",
    "GRIDS",
    "PROTOCOL",
    "Axis",
    "EnvSpec",
    "RLConfig",
    "RLResult",
    "RLRun",
    "build_config",
    "default_out",
    "check",
    "run",
    "open_study",
    "run_checked",
    "rl_study",
    "train_run",
    "learning_curve",
    "evaluate",
    "episode_seeds",
    "play",
    "sb3_policy",
    "summarize",
    "table_rows",
    "axis_table",
    "format_table",
    "format_axis_tables",
    "write_report",
]
