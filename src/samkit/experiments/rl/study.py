"""The ``samkit rl`` study: every (environment, method, seed) run trained, evaluated and
resumed in one run folder, then summarised (:func:`run`, :func:`rl_study`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._atomic import atomic_write_via
from .. import grid, grid_run
from ..grid import Variant
from ..grid_run import call_study
from ..study import run_key, write_json_atomic
from .config import DEFAULTS, KEYS, PROTOCOL, QUICK, RLConfig, build_config, default_out
from .envs import ENVS
from .evaluation import sb3_policy
from .report import write_report
from .summary import format_axis_tables, format_table, summarize
from .training import _make_model, _model_class

__all__ = ["check", "open_study", "run", "run_checked", "rl_study", "RLResult"]


def _package() -> Any:
    # train_run and evaluate are looked up on samkit.experiments.rl when a run
    # calls them, so that replacing them there (a test cutting a study short)
    # replaces what the study runs
    return sys.modules[__package__]


def _train_identity(config: RLConfig, env: str, variant: Variant, seed: int) -> dict[str, Any]:
    spec = ENVS[env]
    return {
        "env": env,
        "method": variant.to_dict(),
        "seed": seed,
        "timesteps": config.timesteps[env],
        "hyper": spec.hyper,
        "curve_points": config.curve_points,
        "protocol": PROTOCOL,
    }


def _run_identity(config: RLConfig, env: str, variant: Variant, seed: int) -> dict[str, Any]:
    return {
        **_train_identity(config, env, variant, seed),
        "eval_episodes": config.eval_episodes,
        "grid": {a.name: list(a.grid_levels(config.grid)) for a in ENVS[env].axes},
    }


def check(config: RLConfig, out: Path | None = None) -> None:
    """Everything that can fail before any training: the packages, each method on
    each environment (built, not trained), the output folder."""
    try:
        import gymnasium  # noqa: F401
        import stable_baselines3  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            "Invalid envs value: samkit rl needs stable-baselines3 and gymnasium "
            "(pip install -c constraints.txt 'samkit[rl]')"
        ) from exc
    grid.check_device_works(config.device)
    for env in config.envs:
        for variant in config.variants:
            try:
                model = _make_model(ENVS[env], variant, config.seeds[0], config.device)
            except ValueError as exc:
                raise ValueError(f"Invalid settings for method {variant.label!r}: {exc}") from exc
            model.env.close()
    if out is not None:
        from ..folder import check_writable

        check_writable(out)


@dataclass
class RLResult(grid.StudyResult):
    """What :func:`run` returns: the summary (``results.json``) and where the files are."""

    executed: int = 0

    @property
    def table(self) -> str:
        return format_table(self.rows)

    @property
    def axis_tables(self) -> str:
        return format_axis_tables(self.rows)

    def __str__(self) -> str:
        return "\n".join([self.table, "", self.axis_tables, "", *self.verdicts])


def _execute(
    config: RLConfig,
    env: str,
    variant: Variant,
    seed: int,
    folder: Path,
    progress: bool,
    log: Callable[[str], None] | None,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec = ENVS[env]
    key = run_key(variant.label, seed)
    train_path, zip_path = folder / f"{key}.train.json", folder / f"{key}.zip"
    train_id = _train_identity(config, env, variant, seed)
    if identity is not None and "threads" in identity:  # trained on that many threads
        train_id["threads"] = identity["threads"]
    train_id = grid.normalise(train_id)
    grid_run.accept_renamed(train_path, train_id)
    trained = grid.finished(train_path, train_id)
    model = None
    if trained is not None and not trained["diverged"] and zip_path.is_file():
        try:
            model = _model_class(variant).load(zip_path, device=config.device)
        except Exception as exc:  # noqa: BLE001 - a damaged agent file: not trusted, retrained
            if log:
                log(
                    f"  {env} {variant.label} seed {seed}: its saved agent {zip_path.name} "
                    f"cannot be read ({type(exc).__name__}): training it again"
                )
            trained = None
    if trained is not None and (trained["diverged"] or model is not None):
        if log:
            log(f"  {env} {variant.label} seed {seed}: trained before, evaluating")
    else:
        model, training = _package().train_run(
            spec,
            variant,
            seed,
            config.timesteps[env],
            device=config.device,
            curve_points=config.curve_points,
            progress=progress,
            desc=f"{env} {variant.label} s{seed}",
        )
        if model is not None:
            atomic_write_via(zip_path, lambda tmp: model.save(tmp), suffix=".zip")
        trained = {"config": train_id, **training}
        write_json_atomic(train_path, trained)
    record = dict(trained)
    record.update(key=key, env=env, label=variant.label, method=variant.method, seed=seed)
    if model is not None:
        t0 = time.perf_counter()
        record["robustness"] = _package().evaluate(
            sb3_policy(model), spec, seed, config.eval_episodes, config.grid
        )
        record["eval_time"] = time.perf_counter() - t0
        record["checkpoint"] = zip_path.name
    record["config"] = grid.normalise(identity or _run_identity(config, env, variant, seed))
    return record


@contextlib.contextmanager
def open_study(config: RLConfig, out: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Lock the run folder and check the study (ValueError before any training), then yield the folder."""
    with grid_run.open_study(
        out, lambda: default_out(config), lambda f: check(config, f), "rl"
    ) as folder:
        yield folder


def run(
    config: RLConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    jobs: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
) -> RLResult:
    """Check, then run (or resume) every (environment, method, seed) run; write
    ``results.json`` and ``report.html``. Holds the folder's lock throughout.
    ``jobs``/``threads``/``ray``: the executor (:func:`~samkit.experiments.engine.make_executor`)."""
    with open_study(config, out) as folder:
        return run_checked(
            config, folder, progress=progress, log=log, jobs=jobs, threads=threads, ray=ray
        )


@dataclass
class RLRun:
    """One (environment, method, seed) run: the task the study engine executes."""

    config: RLConfig
    env: str
    variant: Variant
    seed: int
    identity: dict[str, Any]

    def __call__(self, folder: Path, ctx: Any) -> dict[str, Any]:
        return _execute(
            self.config,
            self.env,
            self.variant,
            self.seed,
            folder,
            ctx.progress,
            ctx.log,
            self.identity,
        )


def run_checked(
    config: RLConfig,
    folder: Path,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    jobs: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
) -> RLResult:
    """:func:`run` inside :func:`open_study`."""
    summary, executed = grid_run.run_study(
        folder,
        config.to_dict(),
        [(e, v, s) for e in config.envs for s in config.seeds for v in config.variants],
        identity=lambda env, variant, seed: _run_identity(config, env, variant, seed),
        task=lambda env, variant, seed, key, identity: RLRun(config, env, variant, seed, identity),
        describe=_describe,
        summarize=lambda records: summarize(config, records),
        report=lambda summary: write_report(folder / "report.html", config, summary),
        progress=progress,
        log=log,
        jobs=jobs,
        threads=threads,
        ray=ray,
    )
    return RLResult(folder, summary, executed)


def _describe(record: dict[str, Any]) -> str:
    if record.get("diverged"):
        return f"DIVERGED ({record.get('error')}), left out of the summary"
    rob = record["robustness"]
    return (
        f"return {rob['nominal']:.1f}, robust return {rob['robust']:.1f}, "
        f"{record['train_time']:.0f} s training"
    )


def rl_study(
    *,
    envs: Any = None,
    methods: Any = None,
    rho: Any = None,
    seeds: Any = None,
    timesteps: Any = None,
    eval_episodes: int | None = None,
    grid: str | None = None,
    out: str | os.PathLike[str] | None = None,
    quick: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    jobs: int | str | None = None,
    threads: int | None = None,
    ray: str | None = None,
    **settings: Any,
) -> RLResult:
    """PPO against PPO with SAM (and variants) on classic-control tasks, paired over seeds.

    Args:
        envs: environment ids (default ``["CartPole-v1", "Acrobot-v1"]``; see :data:`ENVS`).
        methods: names or ``"name:key=value,..."`` specs from :data:`RL_METHODS`
            (default ``ppo``, ``sam``, ``sam_every_k``; ``everyk``, its old name,
            still works, with a FutureWarning).
        rho: a value or list on SAM's scale: each SAM-type method once per value.
        seeds: a count or a list. ``timesteps``: training length (an int, or a
            dict env -> int; default: each environment's own).
        eval_episodes: episodes per point of the robustness grid (default 20).
        grid: ``"full"`` or ``"coarse"`` (three levels per perturbation).
        out: the run folder (default ``samkit-runs/rl-<envs>-<hash>``); rerunning resumes it.
        quick: start from the ``--quick`` preset (CartPole, PPO and SAM, two seeds).
        progress: a progress bar per run (default: on a terminal); ``quiet``: no log lines.
        jobs, threads, ray: runs at once, torch threads per run, a Ray cluster's
            address (as in :func:`samkit.compare`).
        **settings: ``baseline``, ``curve_points``, ``device``.

    Returns:
        an :class:`RLResult` (``rows``, ``verdicts``, ``table``, ``summary``,
        ``results_path``, ``report_path``).

    Raises:
        ValueError: any bad setting, found before anything is trained.
    """
    given = dict(
        settings,
        envs=envs,
        methods=methods,
        rho=rho,
        seeds=seeds,
        timesteps=timesteps,
        eval_episodes=eval_episodes,
        grid=grid,
    )
    return call_study(
        given,
        keys=KEYS,
        defaults=DEFAULTS,
        preset=QUICK,
        build=build_config,
        run=run,
        out=out,
        quick=quick,
        progress=progress,
        quiet=quiet,
        jobs=jobs,
        threads=threads,
        ray=ray,
    )
