"""samkit.keras.SAMModel on Keras 3's TensorFlow, JAX and PyTorch backends.

Keras fixes its backend at import, so each backend runs in its own child
process (tests/keras_checks.py with ``KERAS_BACKEND`` set), all of them
started at once so they share the two cores; each test here waits for its
backend and fails with the message of every check that failed. What each
check asserts, and the float tolerance, is in keras_checks.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BACKENDS = ("tensorflow", "jax", "torch")
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
TIMEOUT_S = 900

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None,
    reason="Keras 3 is not installed (pip install -c constraints.txt -e '.[keras]')",
)


def _child_env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        OMP_NUM_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    )
    return env


@pytest.fixture(scope="module")
def children(request, tmp_path_factory):
    """Start one child per backend selected in this session, all at once."""
    selected = {
        item.callspec.params["backend"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    out = tmp_path_factory.mktemp("keras")
    procs = {}
    for backend in BACKENDS:
        if backend not in selected:
            continue
        result = out / f"{backend}.json"
        log = open(out / f"{backend}.log", "w")  # noqa: SIM115 - closed after wait
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "keras_checks.py"), str(result)],
            env=_child_env(backend),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs[backend] = (proc, result, log, out / f"{backend}.log")
    yield procs
    for proc, _, log, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend(backend, children):
    if importlib.util.find_spec(MODULES[backend]) is None:
        pytest.skip(f"{MODULES[backend]} is not installed")
    proc, result, log, log_path = children[backend]
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{backend}: checks still running after {TIMEOUT_S} s")
    log.flush()
    tail = log_path.read_text()[-3000:]
    assert code == 0 and result.exists(), f"{backend}: child exited {code}:\n{tail}"
    results = json.loads(result.read_text())
    assert results, f"{backend}: no check ran:\n{tail}"
    failed = {name: r["detail"] for name, r in results.items() if not r["ok"]}
    assert not failed, f"{backend}: {len(failed)} of {len(results)} checks failed:\n" + "\n\n".join(
        f"--- {name}\n{detail}" for name, detail in failed.items()
    )


def test_torch_core_does_not_import_keras():
    code = (
        "import sys, samkit, samkit.optim, samkit.functional, samkit.sharpness, "
        "samkit.experiments, samkit.integrations\n"
        "bad = sorted({'keras', 'tensorflow', 'jax', 'tf_keras'} & set(sys.modules))\n"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
