"""The ``samkit gan`` study: every (data set, method, seed) run trained and resumed in one
run folder, then summarised (:func:`run`, :func:`gan_study`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import grid, grid_run
from ..grid import Variant
from ..grid_run import call_study
from ..study import run_key, write_json_atomic
from .config import DEFAULTS, KEYS, QUICK, GANConfig, build_config, default_out
from .data import MIXTURES
from .report import write_report
from .summary import format_table, summarize
from .training import load_state

__all__ = ["check", "open_study", "run", "run_checked", "gan_study", "GANResult"]


def _package() -> Any:
    # train_gan is looked up on samkit.experiments.gan when a run calls it, so
    # that replacing it there (a test cutting a study short) replaces what runs
    return sys.modules[__package__]


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
    grid.check_device_works(config.device)
    for dataset in config.datasets:
        for variant in config.variants:
            for seed in config.seeds:
                state = out / "runs" / dataset / f"{run_key(variant.label, seed)}.state.pt"
                if state.is_file():
                    load_state(state)


@contextlib.contextmanager
def open_study(config: GANConfig, out: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Lock the run folder and check the study (ValueError before any training), then yield the folder."""
    with grid_run.open_study(
        out, lambda: default_out(config), lambda f: check(config, f), "gan"
    ) as folder:
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
        out = _package().train_gan(
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
    summary, executed = grid_run.run_study(
        folder,
        config.to_dict(),
        [(d, v, s) for d in config.datasets for s in config.seeds for v in config.variants],
        identity=lambda dataset, variant, seed: _identity(config, dataset, variant, seed),
        task=lambda dataset, variant, seed, key, identity: GANRun(
            config, dataset, variant, seed, key, identity
        ),
        describe=_describe,
        summarize=lambda records: summarize(config, records),
        report=lambda summary: write_report(folder / "report.html", config, summary, folder),
        progress=progress,
        log=log,
        jobs=jobs,
        threads=threads,
        ray=ray,
        # the training state, once the result is written
        cleanup=lambda key: (f"{key}.state.pt",),
        kind="gan",
    )
    return GANResult(folder, summary, executed)


def _describe(record: dict[str, Any]) -> str:
    if record.get("diverged"):
        return "DIVERGED (non-finite loss or weights), left out of the summary"
    f = record["final"]
    return (
        f"{f['modes']:.0f} modes, {100 * f['hq']:.1f}% high quality, MMD {f['mmd']:.4f}, "
        f"{record['train_time']:.0f} s"
    )


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
        rho=rho,
        seeds=seeds,
        iterations=iterations,
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
