"""benchmarks/trajectories.py: a recording compares equal to itself, one changed bit is found,
a method whose class samkit lacks is skipped and listed, a registry that cannot import falls back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "trajectories.py"
REGISTRY = Path(__file__).resolve().parent / "optim_registry.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("trajectories", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recorded(tool, tmp_path_factory):
    """sam (closure, explicit, both with a scaler) and msam (closure only) on every base;
    the first registry given cannot import, the second adds a method of a class samkit lacks."""
    folder = tmp_path_factory.mktemp("traj")
    (folder / "broken.py").write_text("import samkit\nsamkit.NoSuchThing\n")
    (folder / "extra.py").write_text(  # the registry plus one entry (it loads the real one aside)
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('real_registry', {str(REGISTRY)!r})\n"
        "real = sys.modules['real_registry'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(real)\n"
        "make_data, loss_fn, BASES, samkit = real.make_data, real.loss_fn, real.BASES, real.samkit\n"
        "ghost = lambda b, n, **k: samkit.GhostSAM(b, **k)\n"
        "METHODS = [*real.METHODS, real.MethodInfo('ghost', ghost)]\n"
    )
    out = folder / "a.pt"
    args = ["record", "--out", str(out), "--steps", "2", "--methods", "sam", "msam", "ghost"]
    threads = torch.get_num_threads()
    assert (
        tool.main(
            [*args, "--registry", str(folder / "broken.py"), "--registry", str(folder / "extra.py")]
        )
        == 0
    )
    assert torch.get_num_threads() == threads
    return out


def test_record_holds_every_form_and_lists_what_is_missing(recorded):
    data = torch.load(recorded, weights_only=True)
    keys = set(data["trajectories"])
    assert len(keys) == 6 * 4 + 6  # sam: 4 forms; msam: closure only (no scaler, no two-step)
    assert {"sam/adam/explicit+scaler", "msam/sgd/closure"} <= keys
    assert list(data["skipped"]) == ["ghost"] and "GhostSAM" in data["skipped"]["ghost"]
    one = data["trajectories"]["sam/adam/closure"]
    assert one["loss"].shape == (3,) and one["loss"][-1] < one["loss"][0]
    assert any(k.startswith("optimizer.state.") for k in one) and "model.0.weight" in one


def test_compare_finds_one_bit(tool, recorded, tmp_path, capsys):
    assert tool.main(["compare", str(recorded), str(recorded)]) == 0
    assert "30 trajectories compared: 30 bit-identical, 0 differ" in capsys.readouterr().out
    data = torch.load(recorded, weights_only=True)
    w = data["trajectories"]["sam/sgd/explicit"]["model.0.weight"]
    w.view(torch.int32).view(-1)[0] ^= 1  # the last bit of one weight
    del data["trajectories"]["msam/sgd/closure"]
    changed = tmp_path / "b.pt"
    torch.save(data, changed)
    assert tool.main(["compare", str(recorded), str(changed)]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS sam/sgd/explicit: 1 of" in out and "(first model.0.weight)" in out
    assert "ONLY IN A msam/sgd/closure" in out and out.count("DIFFERS") == 1
    assert tool.main(["compare", str(recorded), str(tmp_path / "none.pt")]) == 2
    assert "not a recording" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("junk")
    assert tool.main(["compare", str(tmp_path / "junk.pt"), str(recorded)]) == 2
