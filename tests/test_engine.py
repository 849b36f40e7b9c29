"""The study engine (issue 19): one run loop for compare, rl and gan; its executors
(in-process, worker processes, Ray) give the same numbers; a worker killed mid-run
is retried from its last checkpoint; Ctrl-C stops every worker and the folder resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samkit.cli.main import main
from samkit.experiments import engine
from samkit.experiments.engine import Cell, run_cells
from samkit.experiments.engine.core import Event, Executor

TINY = [
    "--dataset",
    "synthetic",
    "--train-size",
    "120",
    "--epochs",
    "2",
    "--seeds",
    "2",
    "--optimizers",
    "sgd,sam",
    "--no-sharpness",
    "--batch-size",
    "40",
    "--model",
    "mlp",
]


def _timeless(obj):
    """results.json without what depends on the clock (times and their ratios)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if "time" not in k}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _compare(capsys, out, *extra):
    rc = main(["compare", *TINY, "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads((out / "results.json").read_text()), captured.err


def _weights(out):
    return {
        p.name: torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
        for p in sorted((out / "runs").glob("*.pt"))
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny study with --jobs 1 --threads 1 (in this process)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    rc = main(["compare", *TINY, "--out", str(out), "--jobs", "1", "--threads", "1", "-q"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert list(wa) == list(wb) and len(wa) == 4
    for name in wa:
        for k in wa[name]:
            assert torch.equal(wa[name][k], wb[name][k]), (name, k)


def test_two_worker_processes_give_the_numbers_of_one_job_to_the_bit(tmp_path, capsys, reference):
    ref_out, ref = reference
    res, err = _compare(capsys, tmp_path / "j2", "--jobs", "2", "--threads", "1")
    assert _timeless(res) == _timeless(ref)
    assert all(r["config"]["threads"] == 1 for r in res["runs"])
    _same_weights(ref_out, tmp_path / "j2")
    # one line for the study, and one per run named by the run
    assert "study: 4 runs, 2 worker processes, 1 thread(s) each" in err
    assert "study: 4/4 done, 0 running, 0 left" in err and "elapsed" in err
    assert "] sam seed 1: test acc" in err


def test_threads_are_part_of_a_runs_identity(tmp_path, capsys, reference):
    ref_out, _ = reference
    out = tmp_path / "o"
    import shutil

    shutil.copytree(ref_out, out)
    (out / ".samkit.lock").unlink(missing_ok=True)
    _, err = _compare(capsys, out, "--threads", "1")
    assert err.count("done before, skipped") == 4  # same threads: kept
    _, err = _compare(capsys, out, "--threads", "2")
    assert "done before, skipped" not in err  # other threads: trained again
    assert "4 retrained with other settings" in err


def test_a_worker_killed_mid_run_is_retried_from_its_checkpoint(
    tmp_path, capsys, monkeypatch, reference
):
    _, ref = reference
    marker = tmp_path / "killed"
    monkeypatch.setenv(engine.core.FAULT_ENV, f"sam-seed0.state.pt@1@{marker}")
    res, err = _compare(capsys, tmp_path / "k", "--jobs", "2", "--threads", "1")
    assert marker.exists()  # the worker did kill itself after epoch 1 of sam seed 0
    assert "sam seed 0: its worker process was killed (SIGKILL); retrying" in err
    assert _timeless(res) == _timeless(ref)
    lines = (tmp_path / "k" / "runs" / "sam-seed0.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # epoch 1 not trained twice
    assert not list((tmp_path / "k" / "runs").glob("*.state.pt"))


class _Dying(Executor):
    """Every run's worker dies."""

    slots = 2
    name = "dying"

    def __init__(self):
        self.live = []

    def free(self):
        return len(self.live) < self.slots

    def running(self):
        return len(self.live)

    def submit(self, index, cell):
        self.live.append(index)

    def wait(self):
        out, self.live = [Event(i, "died", reason="out of memory") for i in self.live], []
        return out


def _ok(folder, ctx):
    return {"config": {"n": 1}, "value": 3}


def test_a_run_whose_worker_keeps_dying_is_failed_with_the_reason(tmp_path):
    cells = [
        Cell("a seed 0", tmp_path, "a", {"n": 1}, _ok),
        Cell("b", tmp_path, "b", {"n": 1}, _ok),
    ]
    lines = []
    out = run_cells(cells, executor=_Dying(), log=lines.append, retries=2)
    assert [o.error for o in out] == ["out of memory (3 tries)"] * 2
    assert [o.attempts for o in out] == [3, 3] and not list(tmp_path.glob("*.json"))
    assert any("[1/2] a seed 0: FAILED: out of memory (3 tries)" in x for x in lines)
    assert "2 failed" in lines[-1]
    # the in-process executor: the driver writes the result, a rerun skips it
    out = run_cells(cells, log=lines.append)
    assert [o.record["value"] for o in out] == [3, 3] and all(o.executed for o in out)
    out = run_cells(cells, log=lines.append)
    assert not any(o.executed for o in out)


def test_the_study_line_counts_runs_and_estimates_the_time_left(monkeypatch):
    progress = engine.StudyProgress(total=10, slots=2)
    assert progress.line().startswith("study: 0/10 done, 0 running, 10 left; 0:00 elapsed")
    assert progress.line().endswith("time left not known yet")
    progress.done, progress.failed, progress.running = 3, 1, 2
    progress.run_times = [60.0, 60.0, 60.0]
    monkeypatch.setattr(engine.core.time, "perf_counter", lambda: progress.t0 + 3725)
    # 4 left and 2 half-done runs at 60 s each, 2 at once: (4 + 1) * 60 / 2 = 150 s
    assert progress.line() == (
        "study: 3/10 done, 2 running, 4 left, 1 failed; 1:02:05 elapsed, about 2:30 left"
    )


def _where(folder, ctx):
    return {"config": {}, "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": ctx.threads}


def test_jobs_auto_reads_the_devices_a_run_may_use(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    n, threads, devices = engine.auto_plan()
    assert (n, devices) == (2, ["3", "5"]) and threads >= 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    n, threads, devices = engine.auto_plan()
    assert n == engine.physical_cores() and threads == 1 and devices == [None] * n
    # each worker sees exactly its own device, and the run records it
    pool = engine.LocalPool(2, 1, ["3", "5"])
    cells = [Cell(f"r{i}", tmp_path, f"r{i}", {}, _where) for i in range(2)]
    out = run_cells(cells, executor=pool)
    got = sorted(o.record["devices"] for o in out)
    assert got == ["3", "5"]
    assert all(o.record["placement"]["cuda_visible_devices"] == o.record["devices"] for o in out)
    assert all(o.record["threads"] == 1 for o in out)


RL = ["rl", "--envs", "CartPole-v1", "--seeds", "1", "--timesteps", "512", "--methods", "ppo"]
RL += ["sam", "--eval-episodes", "2", "--grid", "coarse", "-q"]
GAN = ["gan", "--datasets", "ring8", "--methods", "adam", "sam_g", "--seeds", "2"]
GAN += ["--iterations", "20", "--eval-every", "10", "--batch-size", "32", "-q"]


def _same_study(a, b):
    for x, y in zip(a["runs"], b["runs"], strict=True):
        assert _timeless(x) == _timeless(y)
    assert _timeless(a) == _timeless(b)


@pytest.mark.parametrize("study", ["rl", "gan"])
def test_rl_and_gan_with_two_worker_processes_give_the_numbers_of_one_job(
    study, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("stable_baselines3" if study == "rl" else "torch")
    argv = RL if study == "rl" else GAN
    if study == "gan":
        toml = tmp_path / "gan.toml"
        toml.write_text("hidden = 16\ndepth = 2\nz_dim = 4\neval_samples = 200\n")
        argv = [*argv, "--config", str(toml)]
    # with several runs at once an rl or gan run trains on one thread, however many cores
    monkeypatch.setattr(engine.executors, "physical_cores", lambda: 8)
    results = {}
    for jobs, threads in (("1", ["--threads", "1"]), ("2", [])):
        out = tmp_path / f"j{jobs}"
        rc = main([*argv, "--out", str(out), "--jobs", jobs, *threads])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert err == ""  # -q: nothing, with workers as without
        results[jobs] = json.loads((out / "results.json").read_text())
    _same_study(results["1"], results["2"])
    runs = results["2"]["runs"]
    assert len(runs) == (2 if study == "rl" else 4)
    assert all(r["config"]["threads"] == 1 for r in runs)  # each run's thread count


# The driver as a user runs it in a terminal, where Ctrl-C raises KeyboardInterrupt:
# started in the background by a non-interactive shell (as CI may start the suite),
# a process inherits SIGINT ignored, and Python then installs no handler for it.
DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from samkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _driver(argv, env, cwd):
    """The CLI in a child process as a terminal runs it (DRIVER), its stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *argv], env=env, cwd=cwd, stderr=subprocess.PIPE, text=True
    )


def _children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_stops_every_worker_and_the_folder_resumes(tmp_path, reference, sig, code):
    """SIGTERM (a scheduler's stop) as Ctrl-C: it ended with exit 143 and no line."""
    _, ref = reference
    out = tmp_path / "c"
    argv = ["compare", *TINY, "--epochs", "6", "--out", str(out), "--jobs", "2", "--threads", "1"]
    argv += ["-q"]
    # every run holds after its first epoch (SAMKIT_FAULT_HOLD names a file never made),
    # so the study is mid-run when SIGINT comes, however fast the machine: it once
    # finished first (exit 0) on an idle one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env["SAMKIT_FAULT_HOLD"] = str(tmp_path / "never")
    proc = _driver(argv, env, tmp_path)
    # both workers started and held (so the driver waits on them, not mid-start)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((out / "runs").glob("*.state.pt"))) < 2:
        time.sleep(0.2)
    time.sleep(0.5)
    workers = _children(proc.pid)
    assert workers, "no worker started"
    proc.send_signal(sig)
    assert proc.wait(120) == code
    assert "interrupted (finished runs are saved; rerun to resume)" in proc.stderr.read()
    workers = [w for w in workers if "resource_tracker" not in _cmdline(w)]
    assert workers
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if _running(w)]
    assert not alive, f"workers left running: {alive}"
    # the folder resumes (its lock was released) and finishes
    rc = main(
        [
            "compare",
            *TINY,
            "--epochs",
            "6",
            "--out",
            str(out),
            "--jobs",
            "2",
            "--threads",
            "1",
            "-q",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 4 and all(r["epochs_run"] == 6 for r in res["runs"])


TUNE = ["tune", "--dataset", "synthetic", "--train-size", "120", "--epochs", "2", "--seeds", "1"]
TUNE += ["--model", "mlp", "--batch-size", "40", "--grid", "0.01,0.05,0.1,0.2", "-q"]


def _journal_complete(path):
    done = []
    if not path.exists():
        return done
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(
        study_name="samkit-tune", storage=JournalStorage(JournalFileBackend(str(path)))
    )
    return [
        (t.number, t.params["rho"], t.value)
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
def test_tune_jobs_2_resumes_after_kill_9_without_repeating_finished_trials(tmp_path, capsys):
    pytest.importorskip("optuna")
    out = tmp_path / "t"
    argv = [*TUNE, "--jobs", "2", "--threads", "1", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = _driver(argv, env, tmp_path)
    journal = out / "optuna-journal.log"
    deadline = time.time() + 180
    before = []
    while time.time() < deadline and proc.poll() is None:
        before = _journal_complete(journal)
        if before:
            break
        time.sleep(0.3)
    proc.kill()  # kill -9 of the driver: its workers go with it
    proc.wait(30)
    assert before, "no trial finished before the kill"
    before = _journal_complete(journal)
    rc = main([*argv])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((out / "tune.json").read_text())
    complete = [t for t in res["trials"] if t["state"] == "COMPLETE"]
    assert sorted(t["params"]["rho"] for t in complete) == [0.01, 0.05, 0.1, 0.2]  # each once
    for number, rho, value in before:  # finished before the kill: kept, not trained again
        assert {"number": number, "rho": rho, "value": value} in [
            {"number": t["number"], "rho": t["params"]["rho"], "value": t["value"]}
            for t in complete
        ]


def test_tune_resumes_a_trial_cut_between_its_creation_and_its_rho(tmp_path, capsys, monkeypatch):
    """kill -9 may land after Optuna stored a trial (and its grid point) but before its
    rho: the resumed grid search still runs each rho once."""
    pytest.importorskip("optuna")
    from samkit.experiments import tune_parallel

    out = tmp_path / "t"
    argv = [*TUNE, "--jobs", "2", "--threads", "1", "--out", str(out)]
    real, calls = tune_parallel.suggest, []

    def cut(trial, search):
        calls.append(1)
        if len(calls) == 2:  # the second trial exists, RUNNING, with no rho yet
            raise KeyboardInterrupt
        return real(trial, search)

    monkeypatch.setattr(tune_parallel, "suggest", cut)
    assert main(argv) == 130
    monkeypatch.setattr(tune_parallel, "suggest", real)
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "tune.json").read_text())
    complete = [t for t in res["trials"] if t["state"] == "COMPLETE"]
    assert sorted(t["params"]["rho"] for t in complete) == [0.01, 0.05, 0.1, 0.2]


class _DiesOn(engine.InProcess):
    """Trains in this process, but the worker of every run ``dies(task)`` picks dies."""

    dies = staticmethod(lambda task: False)

    def __init__(self, *args, **kwargs):
        super().__init__(1)
        self.slots = 2

    def free(self):
        return len(self._events) < self.slots

    def submit(self, index, cell):
        if self.dies(cell.task):
            self._events.append(Event(index, "died", reason="out of memory"))
        else:
            super().submit(index, cell)


class _DiesOnRho(_DiesOn):
    """Every trial with rho 0.2."""

    dies = staticmethod(lambda task: task.rho == 0.2)


def test_a_tune_trial_whose_worker_keeps_dying_is_failed_after_two_retries(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("optuna")
    from samkit.experiments import tune_parallel

    monkeypatch.setattr(tune_parallel, "make_executor", _DiesOnRho)
    out = tmp_path / "t"
    argv = [a for a in TUNE if a != "-q"]
    assert main([*argv, "--jobs", "2", "--threads", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("out of memory; queued again (try") == 2
    assert "FAILED: out of memory (3 tries)" in err
    trials = json.loads((out / "tune.json").read_text())["trials"]
    at_02 = [t for t in trials if t["params"]["rho"] == 0.2]
    assert [t["state"] for t in at_02] == ["FAIL"] * 3
    assert [t.get("failure") for t in at_02][-1] == "out of memory (3 tries)"
    done = sorted(t["params"]["rho"] for t in trials if t["state"] == "COMPLETE")
    assert done == [0.01, 0.05, 0.1]


class _DiesOnSamSeed1(_DiesOn):
    """sam seed 1, on every try."""

    dies = staticmethod(lambda task: (task.spec.label, task.seed) == ("sam", 1))


def test_runs_that_fail_every_retry_are_listed_and_the_exit_code_says_so(
    tmp_path, capsys, monkeypatch
):
    """They were left out of the table and results.json without a trace, exit code 0
    (only the log, hidden by -q, said FAILED): a verdict over fewer seeds than asked."""
    import warnings

    from samkit.experiments import study

    monkeypatch.setattr(study, "make_executor", _DiesOnSamSeed1)
    out = tmp_path / "f"
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        rc = main(["compare", *TINY, "--out", str(out), "--jobs", "2", "-q"])
    assert rc == 1
    summary = json.loads((out / "results.json").read_text())
    assert summary["failed"] == [
        {"run": "sam seed 1", "key": "sam-seed1", "reason": "out of memory (3 tries)",
         "attempts": 3}
    ]  # fmt: skip
    assert [(r["label"], r["seed"]) for r in summary["runs"]] == [
        ("sgd", 0), ("sam", 0), ("sgd", 1)
    ]  # fmt: skip
    assert any("1 run(s) failed after every retry" in str(w.message) for w in got)
    assert "FAILED after every retry" in (out / "report.html").read_text()
    monkeypatch.undo()  # the rerun trains the failed run, and only it
    assert main(["compare", *TINY, "--out", str(out), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == 3
    assert json.loads((out / "results.json").read_text())["failed"] == []


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pids):
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(_children(pid))
    return out


def _pids_whose_command_has(*marks):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and any(m in _cmdline(int(entry.name)) for m in marks):
            pids.append(int(entry.name))
    return pids


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on localhost, one CPU each (started and stopped here).

    Every process of this cluster names its own temp folder (or its own client
    port) on its command line: the cleanup kills those, by pid, with their
    children (the workers), even when a test failed, and no other Ray on the
    machine (``ray stop`` would stop every one).
    """
    pytest.importorskip("ray")
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc (Linux) to stop the cluster's processes")
    import shutil
    import tempfile

    port, client_port, dashboard_port = _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="samkit-ray-")  # short: Ray's socket paths must fit
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_USAGE_STATS_ENABLED="0")
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    common = ["--disable-usage-stats", f"--temp-dir={temp}"]

    def start(*args, **extra_env):
        subprocess.run(
            [*ray_cli, "start", *args, *common],
            env={**env, **extra_env},
            check=True,
            capture_output=True,
            timeout=180,
        )

    try:
        start(
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-port={dashboard_port}",
            "--include-dashboard=false",
            "--num-cpus=1",
        )
        start(f"--address=127.0.0.1:{port}", "--num-cpus=1")
        yield {"address": f"127.0.0.1:{port}", "start": start}
    finally:
        mine = _pids_whose_command_has(temp, f"--port={client_port}\0")
        _kill(_descendants(mine))
        shutil.rmtree(temp, ignore_errors=True)


def test_a_two_node_ray_cluster_gives_the_numbers_of_one_job(
    tmp_path, capsys, reference, ray_cluster
):
    ref_out, ref = reference
    res, err = _compare(capsys, tmp_path / "r", "--ray", ray_cluster["address"], "--threads", "1")
    assert _timeless(res) == _timeless(ref)
    assert "study: 4 runs, Ray cluster" in err
    _same_weights(ref_out, tmp_path / "r")  # the nodes' files, written by the driver


def test_ray_refusals_come_before_any_run_in_one_line(tmp_path, capsys, ray_cluster):
    """An address where nothing answers hung for minutes printing Ray's warnings; more
    threads per run than any node has waited for ever, silently."""
    rc = main(["compare", *TINY, "--out", str(tmp_path / "a"), "--ray", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: Invalid ray value: '127.0.0.1:1' (nothing answers there" in err
    argv = ["compare", *TINY, "--out", str(tmp_path / "b"), "--ray", ray_cluster["address"]]
    rc = main([*argv, "--threads", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "Invalid threads value: 8 CPUs per run, and the Ray cluster's" in err
    assert not list((tmp_path / "b" / "runs").glob("*.json"))


def test_a_ray_session_the_caller_opened_is_used_and_left_open(tmp_path, ray_cluster):
    """ray= was ignored when Ray was initialised already (the study ran on whatever the
    session was, and said it ran on the address given), and the caller's session was shut
    down afterwards."""
    import ray

    import samkit

    args = dict(
        dataset="synthetic", train_size=120, epochs=1, seeds=1, methods=["sgd"],
        sharpness=False, batch_size=40, model="mlp", quiet=True, threads=1,
    )  # fmt: skip
    ray.init(address=ray_cluster["address"], logging_level="ERROR", log_to_driver=False)
    try:
        here = ray.get_runtime_context().gcs_address
        with pytest.raises(ValueError, match=r"connected to the Ray cluster at .* already"):
            samkit.compare(out=tmp_path / "other", ray="10.255.255.1:6379", **args)
        result = samkit.compare(out=tmp_path / "same", ray=here, **args)
        assert result.rows[0]["n"] == 1
        assert ray.is_initialized()  # still the caller's
    finally:
        ray.shutdown()


def test_a_ray_node_removed_mid_run_is_retried_from_its_checkpoint(
    tmp_path, reference, ray_cluster
):
    _, ref = reference
    # a third node whose runs hold after each epoch (until the node is gone)
    node_port = _free_port()
    hold = {engine.core.HOLD_ENV: str(tmp_path / "never")}
    ray_cluster["start"](
        f"--address={ray_cluster['address']}",
        "--num-cpus=1",
        f"--node-manager-port={node_port}",
        **hold,
    )
    out, log = tmp_path / "n", tmp_path / "driver.log"
    argv = ["compare", *TINY, "--out", str(out), "--ray", ray_cluster["address"], "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_USAGE_STATS_ENABLED="0")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], env=env, stderr=fh)
    try:
        # three runs end on the other two nodes; the fourth holds on the third node, its
        # training state after epoch 1 already sent to the driver's run folder
        runs, deadline = out / "runs", time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            results = [p for p in runs.glob("*-seed*.json")] if runs.exists() else []
            states = list(runs.glob("*.state.pt")) if runs.exists() else []
            if len(results) == 3 and len(states) == 1:
                break
            time.sleep(0.3)
        assert proc.poll() is None and len(states) == 1, log.read_text()[-3000:]
        state = torch.load(states[0], map_location="cpu", weights_only=False)
        assert [r["epoch"] for r in state["history"]] == [1]
        # the node goes: its raylet and every process under it (its workers), at once
        raylet = [
            pid
            for pid in _pids_whose_command_has(f"--node_manager_port={node_port}\0")
            if "raylet" in _cmdline(pid)
        ]
        assert len(raylet) == 1
        _kill(_descendants(raylet))
        assert proc.wait(240) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    err = log.read_text()
    name = states[0].name.split(".")[0]  # e.g. sam-seed0
    assert (
        "its Ray task was lost" in err
        and "retrying (from its last epoch's checkpoint, if it saved one) (try 2 of 3)" in err
    )
    res = json.loads((out / "results.json").read_text())
    assert _timeless(res) == _timeless(ref)
    # trained on from its epoch-1 state: that epoch's record is the held node's, to the bit
    lines = [json.loads(x) for x in (runs / f"{name}.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert lines[0]["epoch_time"] == state["history"][0]["epoch_time"]
    assert not list(runs.glob("*.state.pt"))


def test_a_ray_node_with_two_gpus_gives_each_run_one_device(tmp_path, capsys, ray_cluster):
    ray_cluster["start"](f"--address={ray_cluster['address']}", "--num-cpus=2", "--num-gpus=2")
    out = tmp_path / "g"
    rc = main(
        ["compare", *TINY, "--seeds", "1", "--out", str(out), "--ray", ray_cluster["address"]]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    runs = json.loads((out / "results.json").read_text())["runs"]
    devices = [r["placement"]["cuda_visible_devices"] for r in runs]
    assert len(devices) == 2 and all(d in ("0", "1") for d in devices)  # one entry each


BOMB = """
import numpy as np
import torch


class Bomb(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 4:
            raise RuntimeError("boom in forward")
        return self.lin(x)


def make_model():
    return Bomb()


def load():
    r = np.random.default_rng(0)
    x, y = r.normal(size=(160, 6)).astype("float32"), r.integers(0, 3, 160)
    return (x[:120], y[:120]), (x[120:], y[120:])
"""


def test_an_error_in_the_users_code_in_a_worker_is_one_line_naming_their_line(tmp_path, capsys):
    """In a worker process the traceback was lost on its way to the driver: the CLI
    printed a traceback and exited 1, where --jobs 1 gives one line naming the user's
    file and line, exit 2. (And a model and data function from one file were two loads
    of it: the model function no longer pickled by name, so --jobs 2 was refused.)"""
    mod = tmp_path / "bombs.py"
    mod.write_text(BOMB)
    argv = ["compare", "--model", f"{mod}:make_model", "--data", f"{mod}:load",
            "--optimizers", "sgd,sam", "--seeds", "2", "--epochs", "2", "--batch-size", "40",
            "--no-sharpness", "-q"]  # fmt: skip
    for jobs in ("1", "2"):
        rc = main([*argv, "--jobs", jobs, "--out", str(tmp_path / f"j{jobs}")])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "Traceback" not in err
        assert (
            "error: in your model function" in err
            and "RuntimeError: boom in forward (bombs.py:15, in Bomb.forward)" in err
        ), err


def test_a_study_defined_in_a_script_without_a_file_is_refused_for_worker_processes(tmp_path):
    """From stdin or python -c the model function pickled by name, then failed in the
    worker (a traceback; from stdin a BrokenPipeError in the driver)."""
    script = f"""
import numpy as np, torch, samkit
def make_model():
    return torch.nn.Linear(6, 3)
r = np.random.default_rng(0)
x, y = r.normal(size=(120, 6)).astype("float32"), r.integers(0, 3, 120)
try:
    samkit.compare(model=make_model, train=(x, y), methods=["sgd"], seeds=2, epochs=1,
                   jobs=2, quiet=True, sharpness=False, out={str(tmp_path / "o")!r})
except ValueError as e:
    print("refused:", e)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "refused: Invalid jobs value: 2 (the model or data is defined in a script" in (
        done.stdout
    ), done.stdout + done.stderr
    assert not (tmp_path / "o" / "runs").exists() or not list((tmp_path / "o" / "runs").iterdir())


def test_more_jobs_than_cores_is_warned(monkeypatch):
    """--jobs 1000 on 2 cores was taken silently (a process and its memory per run at once,
    none faster); the log said "1000 worker processes"."""
    import warnings

    from samkit.experiments.engine import executors

    monkeypatch.setattr(executors.os, "cpu_count", lambda: 2)
    with pytest.warns(RuntimeWarning, match=r"jobs=3 worker processes on 2 CPU core\(s\)"):
        executors.make_executor(3)
    with pytest.warns(RuntimeWarning, match=r"threads=3 torch threads per run on 2 CPU"):
        executors.make_executor(1, threads=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        executors.make_executor(2)
        executors.make_executor(1, threads=2)
