"""Run the CLI rows of tests/test_bad_inputs.py against a samkit source tree; count the outcomes.

    python benchmarks/bad_inputs.py [SRC]        # SRC: a samkit src/ folder (default: this tree's)

Each bad input runs as `python -m samkit.cli.main ...` in a fresh folder, 60 s
at most, and is classified: one line and exit 2 (the message names the
problem, or another one), a traceback, accepted (exit 0), or still running
after 60 s (no bound). For the issue's closing note: run it on the code
before and after a fix (e.g. `git worktree add /tmp/old <commit>` and
`python benchmarks/bad_inputs.py /tmp/old/src`). Not a speed benchmark.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_bad_inputs as t  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "src")
py = sys.executable
rows = []
for argv, m in t.COMPARE:
    rows.append(("compare", ["compare", *t.FAST, "--out", "{d}/run", *argv], m))
for text, m in t.TOML:
    head = 'dataset = "synthetic"\ntrain_size = 100\nepochs = 1\n'
    if not text.startswith("optimizers"):
        head += 'optimizers = ["sgd"]\n'
    if text.startswith("epoch"):
        head = head.replace("epochs = 1\n", "")
    argv = ["compare", "--config", "{d}/c.toml", "-q"] + (
        [] if text.startswith("out") else ["--out", "{d}/run"]
    )
    rows.append(("toml", argv, m, head + text))
for argv, m in t.TUNE:
    rows.append(
        (
            "tune",
            [
                "tune",
                "--dataset",
                "synthetic",
                "--train-size",
                "100",
                "--epochs",
                "1",
                "-q",
                "--out",
                "{d}/t",
                *argv,
            ],
            m,
        )
    )
counts = {}
out = []
for row in rows:
    kind, argv, m = row[0], row[1], row[2]
    d = tempfile.mkdtemp()
    if kind == "toml":
        open(f"{d}/c.toml", "w").write(row[3])
    argv = [a.replace("{d}", d) for a in argv]
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    try:
        p = subprocess.run(
            [py, "-m", "samkit.cli.main", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=d,
        )
        err = p.stderr.strip()
        if "Traceback" in err:
            cls = "traceback"
        elif p.returncode == 0:
            cls = "accepted (exit 0)"
        elif p.returncode == 2 and len(err.splitlines()) == 1:
            cls = "one line, exit 2" + ("" if m in err else " (other message)")
        else:
            cls = f"exit {p.returncode}"
        trained = os.path.exists(f"{d}/run/runs/sgd-seed0.json")
    except subprocess.TimeoutExpired:
        cls, trained = "still running after 60 s", os.path.exists(f"{d}/run/runs/sgd-seed0.json")
    if trained and cls.startswith("one line"):
        cls += ", after training"
    counts[cls] = counts.get(cls, 0) + 1
    out.append(
        (kind, " ".join(argv[1:])[-80:] if kind != "toml" else row[3].strip().splitlines()[-1], cls)
    )
for o in out:
    print(*o, sep=" | ")
print(json.dumps(counts, indent=1))
