"""Record optimizer trajectories and compare two recordings bit for bit.

    python benchmarks/trajectories.py record --out new.pt            # this checkout
    PYTHONPATH=/tmp/old/src python benchmarks/trajectories.py record --out old.pt \\
        --registry tests/optim_registry.py --registry /tmp/old/tests/optim_registry.py
    python benchmarks/trajectories.py compare old.pt new.pt          # exit 1 if any bit differs

``record`` runs every method of the test registry (tests/optim_registry.py:
``METHODS``) on every base optimizer it supports (``BASES``), through each call
form it declares (``closure``; ``explicit``: first_step / second_step; both
again with a CPU GradScaler where the method supports one), for ``--steps``
steps on the registry's data, with one torch thread and fixed seeds. A
trajectory, keyed ``method/base/form``, is the final weights and buffers, every
entry of the optimizer's ``state_dict`` (numbers and lists of numbers as float64 or
int64 tensors), the loss (eval mode, no grad) before each step and after the last,
and the GradScaler's final scale. ``--methods`` keeps some registry names only. A method whose class
the running samkit lacks is skipped and listed. ``--registry`` may be given more
than once: the first that imports against the running samkit is used (the
registry of a newer tree may name classes an older one lacks).

``compare A B`` lists each trajectory that differs (entries in one only; how many
common entries differ, the first, and the largest absolute difference) or is in one file only; it exits 1 if a
trajectory both files hold differs in any bit (or in its entries), else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

DEFAULT_REGISTRY = Path(__file__).resolve().parents[1] / "tests" / "optim_registry.py"
Trajectory = dict[str, torch.Tensor]


def load_registry(paths: list[Path]) -> tuple[ModuleType, Path]:
    """The first of ``paths`` that imports, as under pytest (its folder on sys.path);
    sys.path and sys.modules are left as they were."""
    for path in paths:
        saved_path, saved = list(sys.path), sys.modules.get("optim_registry")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location("optim_registry", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["optim_registry"] = module  # dataclasses look their module up
        try:
            spec.loader.exec_module(module)
            return module, path
        except (AttributeError, ImportError, OSError) as err:
            print(f"registry {path} does not import here: {err}", file=sys.stderr)
        finally:
            sys.path[:] = saved_path
            if saved is None:
                del sys.modules["optim_registry"]
            else:
                sys.modules["optim_registry"] = saved
    print("trajectories: no registry imports against this samkit", file=sys.stderr)
    raise SystemExit(2)


def flatten(obj: Any, prefix: str, out: Trajectory) -> None:
    """Every tensor and number of a (nested) state dict, keyed by its path."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, (int, float)) for v in obj):
        out[prefix] = torch.tensor([float(v) for v in obj], dtype=torch.float64)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}", out)
    elif isinstance(obj, (bool, int)):
        out[prefix] = torch.tensor(int(obj), dtype=torch.int64)
    elif isinstance(obj, float):
        out[prefix] = torch.tensor(obj, dtype=torch.float64)


def run_one(reg: ModuleType, info: Any, base: Any, form: str, steps: int, seed: int) -> Trajectory:
    torch.manual_seed(seed)
    x, y = reg.make_data(seed)
    model = info.model(seed)
    opt = info.make(base, model)
    how, _, amp = form.partition("+")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000) if amp else None
    losses = []
    for i in range(steps + 1):
        model.eval()
        with torch.no_grad():
            losses.append(reg.loss_fn(model, x, y).detach().double())
        model.train()
        if i < steps:
            info.step(opt, model, x, y, form=how, scaler=scaler)
            if scaler is not None:
                scaler.update()
    out: Trajectory = {"loss": torch.stack(losses)}
    flatten(model.state_dict(), "model", out)
    flatten(opt.state_dict(), "optimizer", out)
    if scaler is not None:
        out["scale"] = torch.tensor(scaler.get_scale(), dtype=torch.float64)
    return out


def record(args: argparse.Namespace) -> int:
    reg, used = load_registry(args.registry or [DEFAULT_REGISTRY])
    import samkit

    trajectories: dict[str, Trajectory] = {}
    skipped: dict[str, str] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations and rho warnings are not what is recorded
        try:
            record_all(reg, args, trajectories, skipped)
        finally:
            torch.set_num_threads(threads)
    meta = {
        "samkit": samkit.__file__,
        "registry": str(used.resolve()),
        "torch": str(torch.__version__),
    }
    torch.save({"meta": meta, "trajectories": trajectories, "skipped": skipped}, args.out)
    print(f"{len(trajectories)} trajectories ({args.steps} steps) from {meta['samkit']}")
    print(f"registry {used}; written to {args.out}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return 0


def record_all(
    reg: ModuleType, args: argparse.Namespace, out: dict[str, Trajectory], skipped: dict[str, str]
) -> None:
    """Every (method, base, form) of the registry into ``out``; what cannot run into ``skipped``."""
    for info in reg.METHODS:
        if args.methods and info.name not in args.methods:
            continue
        forms = list(info.forms) + (
            [f"{f}+scaler" for f in info.forms] if info.supports_scaler else []
        )
        for base in reg.BASES:
            if not info.supports(base):
                continue
            for form in forms:
                key = f"{info.name}/{base.name}/{form}"
                try:
                    out[key] = run_one(reg, info, base, form, args.steps, args.seed)
                except Exception as err:  # a class this samkit lacks, or a refusal
                    lacks = "module 'samkit' has no attribute" in str(err)
                    skipped[info.name if lacks else key] = f"{type(err).__name__}: {err}"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (floats viewed as integers of their width: -0.0 != 0.0, nan == nan)."""
    if t.is_floating_point():
        return t.contiguous().view(
            {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        )
    return t


def difference(a: Trajectory, b: Trajectory) -> str | None:
    """None if ``a`` and ``b`` are equal bit for bit, else which entries differ and by how much."""
    notes = []
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        notes.append(
            f"entries only in A {only_a[:4]} ({len(only_a)}), only in B {only_b[:4]} ({len(only_b)})"
        )
    common = [k for k in a if k in b]
    differ = [
        k
        for k in common
        if a[k].dtype != b[k].dtype
        or a[k].shape != b[k].shape
        or not torch.equal(bits(a[k]), bits(b[k]))
    ]
    if differ:
        worst = max(
            (
                float((a[k].double() - b[k].double()).abs().max())
                for k in differ
                if a[k].shape == b[k].shape
            ),
            default=float("nan"),
        )
        notes.append(
            f"{len(differ)} of {len(common)} common entries differ (first {differ[0]}), max |A - B| {worst:.3g}"
        )
    elif notes:
        notes.append(f"the {len(common)} common entries (weights, losses, ...) are bit-identical")
    return "; ".join(notes) or None


def compare(args: argparse.Namespace) -> int:
    loaded = []
    for path in (args.a, args.b):
        try:
            data = torch.load(path, weights_only=True)
            assert isinstance(data, dict) and {"meta", "trajectories", "skipped"} <= data.keys()
        except Exception as err:  # missing, not torch.save, or not from record
            print(f"trajectories: not a recording: {path} ({type(err).__name__})", file=sys.stderr)
            return 2
        loaded.append(data)
    (ta, tb) = (d["trajectories"] for d in loaded)
    for tag, d in zip("AB", loaded):
        print(f"{tag}: {len(d['trajectories'])} trajectories, samkit {d['meta']['samkit']}")
        print(f"   registry {d['meta']['registry']}; skipped {sorted(d['skipped']) or 'none'}")
    common = [k for k in ta if k in tb]
    differ = 0
    for key in common:
        why = difference(ta[key], tb[key])
        if why is not None:
            differ += 1
            print(f"DIFFERS {key}: {why}")
    for tag, mine, other in (("A", ta, tb), ("B", tb, ta)):
        for key in mine:
            if key not in other:
                print(f"ONLY IN {tag} {key}")
    print(
        f"{len(common)} trajectories compared: {len(common) - differ} bit-identical, {differ} differ; "
        f"{len(ta.keys() - tb.keys())} only in A, {len(tb.keys() - ta.keys())} only in B"
    )
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the registry's methods and save their trajectories")
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument(
        "--registry", type=Path, action="append", help="tests/optim_registry.py (repeatable)"
    )
    rec.add_argument("--steps", type=int, default=8)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--methods", nargs="+", help="only these registry names (default: all)")
    cmp = sub.add_parser("compare", help="compare two recordings bit for bit")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record" and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
