"""Wall time of one fixed study with --jobs 1, --jobs 2 and a local two-node Ray cluster.

    python benchmarks/study_scaling.py            # compare --quick's 8 runs (no sharpness)
    python benchmarks/study_scaling.py --small    # a few minutes: 8 short runs on synthetic data
    python benchmarks/study_scaling.py --no-ray --repeats 1 --json out.json
    python benchmarks/study_scaling.py --epochs 200 --seeds 1   # 4 runs of ~30 s each here

Each study runs as its own ``samkit compare`` process into a fresh folder, so
its time includes the start-up of Python, the executor and the workers,
shipping the runs and writing the results: what a user waits for. Reported
(median over ``--repeats``):

* ``study s``: the command's wall time;
* ``efficiency``: time at 1 job / (N x time at N jobs), N runs at once
  (1.0 is perfect scaling);
* ``overhead/run``: the executor's cost per run, beyond what the runs
  themselves take: (N x study time - the runs' own wall times) / runs,
  minus the same for ``--jobs 1`` (the driver's fixed cost: checks, summary,
  report); and that as a share of the mean run.

Ray's start-up (``ray start`` of the two nodes) is timed once and reported
apart; the Ray rows connect to the running cluster, as a user's study does.
At the end it runs ``ray stop --force``, which stops every Ray process of
this user: run it where you have no Ray cluster of your own (or ``--no-ray``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = ["--quick", "--no-sharpness"]
SMALL = [
    "--dataset", "synthetic", "--model", "mlp", "--epochs", "8",
    "--seeds", "2", "--optimizers", "sgd,adam,sam,asam", "--no-sharpness",
]  # fmt: skip


def _study(argv: list[str], out: Path, env: dict[str, str]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "samkit.cli.main", "compare", *argv, "--out", str(out), "-q"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    runs = json.loads((out / "results.json").read_text())["runs"]
    return wall, [r["wall_time"] for r in runs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a short study (a few minutes in all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    ap.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    ap.add_argument(
        "--epochs", type=int, help="train each run this many epochs (longer runs: the 30-s target)"
    )
    ap.add_argument("--seeds", type=int, help="seeds per method (fewer runs)")
    args = ap.parse_args()
    for flag in ("repeats", "epochs", "seeds"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag} must be >= 1")
    base = list(SMALL if args.small else STUDY)
    for flag in ("epochs", "seeds"):
        value = getattr(args, flag)
        if value is not None:
            option = f"--{flag}"
            base = [a for i, a in enumerate(base) if a != option and base[i - 1 : i] != [option]]
            base += [option, str(value)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_USAGE_STATS_ENABLED="0")
    modes: list[tuple[str, list[str], int]] = [
        ("--jobs 1", ["--jobs", "1", "--threads", "1"], 1),
        ("--jobs 2", ["--jobs", "2", "--threads", "1"], 2),
    ]
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    ray_startup = None
    use_ray = not args.no_ray
    if use_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            use_ray = False
    results: dict[str, dict[str, float]] = {}
    try:
        if use_ray:
            port = _free_port()
            t0 = time.perf_counter()
            common = ["--include-dashboard=false", "--disable-usage-stats"]
            subprocess.run(
                [*ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", *common],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            subprocess.run(
                [*ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            ray_startup = time.perf_counter() - t0
            modes.append(("Ray, 2 nodes", ["--ray", f"127.0.0.1:{port}", "--threads", "1"], 2))
        with tempfile.TemporaryDirectory(prefix="samkit-scaling-") as tmp:
            times: dict[str, list[tuple[float, list[float]]]] = {m: [] for m, _, _ in modes}
            for r in range(args.repeats):  # interleaved: outside load hits every mode alike
                for name, extra, _ in modes:
                    out = Path(tmp) / f"{name.replace(' ', '_').replace(',', '')}-{r}"
                    times[name].append(_study([*base, *extra], out, env))
                    print(f"  repeat {r + 1}: {name}: {times[name][-1][0]:.1f} s", flush=True)
            fixed1 = None
            t1 = None
            for name, _, slots in modes:
                walls = [w for w, _ in times[name]]
                wall = statistics.median(walls)
                runs = statistics.median(sum(rs) for _, rs in times[name])
                n = len(times[name][0][1])
                fixed = (slots * wall - runs) / n
                if fixed1 is None:
                    fixed1, t1 = fixed, wall
                overhead = fixed - fixed1
                mean_run = runs / n
                results[name] = {
                    "study_s": wall,
                    "runs": n,
                    "slots": slots,
                    "efficiency": t1 / (slots * wall),
                    "overhead_per_run_s": overhead,
                    "overhead_share": overhead / mean_run,
                    "mean_run_s": mean_run,
                }
    finally:
        if use_ray:
            subprocess.run([*ray_cli, "stop", "--force"], env=env, capture_output=True)
    print(f"\nstudy: {' '.join(base)} ({args.repeats} repeats, median); {os.cpu_count()} CPUs")
    print(f"{'executor':<14}{'study s':>9}{'efficiency':>12}{'overhead/run':>14}{'of a run':>10}")
    for name, v in results.items():
        print(
            f"{name:<14}{v['study_s']:>9.1f}{v['efficiency']:>12.2f}"
            f"{v['overhead_per_run_s']:>12.2f} s{100 * v['overhead_share']:>9.1f}%"
        )
    if ray_startup is not None:
        print(f"Ray start-up (ray start, two nodes): {ray_startup:.1f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"study": base, "results": results, "ray_startup_s": ray_startup}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
