"""The user's own data and code, read and checked: what a :class:`~samkit.experiments.problem.Problem`
is built from when it is not a built-in data set or model.

* :class:`UserData`: ``train``, optional ``val`` and ``test``, each a map-style
  ``torch.utils.data.Dataset``, a pair of arrays ``(x, y)``, an
  ``IterableDataset`` or (``train`` only) a factory ``train(seed=, epoch=)``;
* :func:`load_callable`: ``module:function`` (a module importable from the
  current folder or an installed package, or ``path/to/file.py``);
  :func:`user_code_error` turns an exception raised in that code into one line;
* :func:`load_user_data`: ``path.npz`` (arrays ``x_train, y_train, x_test,
  y_test``, optional ``x_val, y_val``; read without pickle) or a function.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, TensorDataset

__all__ = [
    "UserData",
    "IndexedSubset",
    "as_source",
    "batch_indexable",
    "load_callable",
    "load_user_data",
    "source_kind",
    "user_code_error",
]


class IndexedSubset(TorchDataset):
    """``base[indices[i]]``; batch indexing (a tensor of positions) when the base allows it."""

    def __init__(self, base: Any, indices: Tensor) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, index: Any) -> Any:
        return (
            self.base[self.indices[index]]
            if torch.is_tensor(index)
            else self.base[int(self.indices[index])]
        )


def batch_indexable(ds: Any) -> bool:
    """True when ``ds[index_tensor]`` gives a whole batch at once (no per-sample collate)."""
    from .datasets import Split

    if isinstance(ds, IndexedSubset):
        return batch_indexable(ds.base)
    return isinstance(ds, (Split, TensorDataset))


def _numbers(name: str, a: Any) -> Any:
    """``a`` as an array of numbers, or a ValueError naming what it holds instead."""
    if torch.is_tensor(a):
        return a
    try:
        arr = np.asarray(a)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise ValueError(
            f"Invalid {name} value: {type(a).__name__} that is not an array "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    if arr.dtype.kind not in "biuf":
        what = {"U": "strings", "S": "bytes", "O": "Python objects"}.get(arr.dtype.kind, "")
        hint = " (encode class labels as integers 0..K-1)" if name.endswith(" y") else ""
        raise ValueError(
            f"Invalid {name} value: dtype {arr.dtype}{' (' + what + ')' if what else ''}, "
            f"numbers expected: bool, int or float{hint}"
        )
    return arr


def _tensor(name: str, a: Any) -> Tensor:
    t = torch.as_tensor(_numbers(name, a)) if not torch.is_tensor(a) else a
    if t.dtype == torch.float64:
        t = t.float()
    elif t.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        t = t.long()
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.bool)):
        raise ValueError(f"Invalid {name} value: dtype {t.dtype} (numbers expected)")
    if t.dim() == 0:
        raise ValueError(f"Invalid {name} value: a scalar (an array with one row per sample)")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"Invalid {name} value: holds NaN or infinite entries")
    return t


def _pair(name: str, xy: Any) -> TensorDataset:
    if len(xy) != 2:
        raise ValueError(f"Invalid {name} value: expected a pair (x, y), got {len(xy)} items")
    x, y = _tensor(f"{name} x", xy[0]), _tensor(f"{name} y", xy[1])
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Invalid {name} value: x has {x.shape[0]} rows, y has {y.shape[0]} (one each per sample)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"Invalid {name} value: no samples")
    return TensorDataset(x, y)


def as_source(name: str, obj: Any, *, factory_ok: bool = False) -> Any:
    """A map-style Dataset, an IterableDataset or (``factory_ok``) a batch factory from ``obj``."""
    if obj is None:
        return None
    if isinstance(obj, torch.utils.data.DataLoader):
        raise ValueError(
            f"Invalid {name} value: a DataLoader (pass its dataset, so every method sees the same "
            "batches in the same order, or a factory train(seed=, epoch=) returning the batches)"
        )
    if isinstance(obj, (TorchDataset, IterableDataset)):
        if not isinstance(obj, IterableDataset):
            try:
                n = len(obj)  # type: ignore[arg-type]
            except TypeError as exc:
                raise ValueError(
                    f"Invalid {name} value: a map-style Dataset needs __len__ ({exc})"
                ) from None
            if n == 0:
                raise ValueError(f"Invalid {name} value: an empty dataset")
        return obj
    if isinstance(obj, (tuple, list)):
        return _pair(name, obj)
    if callable(obj) and factory_ok:
        return obj
    what = "a Dataset, a pair (x, y) of arrays" + (
        ", or a factory (seed=, epoch=)" if factory_ok else ""
    )
    raise ValueError(f"Invalid {name} value: {type(obj).__name__} ({what})")


def source_kind(source: Any) -> str:
    """``"map"``, ``"iterable"``, ``"factory"`` (a batch factory) or ``"none"``."""
    if source is None:
        return "none"
    if isinstance(source, IterableDataset):
        return "iterable"
    if isinstance(source, TorchDataset):
        return "map"
    return "factory"


@dataclass
class UserData:
    """The user's data: ``train`` (required), ``val`` (optional) and ``test`` (optional)."""

    name: str
    train: Any
    val: Any = None
    test: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Invalid data value: {self.name!r} (a name)")
        self.train = as_source("train", self.train, factory_ok=True)
        if self.train is None:
            raise ValueError("Invalid train value: None (the training data is required)")
        self.val = as_source("val", self.val)
        self.test = as_source("test", self.test)

    @property
    def kind(self) -> str:
        return source_kind(self.train)

    def fingerprint(self) -> dict[str, Any]:
        """Name, kinds and sizes (and a content hash of array data): changes retrain.
        Computed once (it reads samples of a Dataset of the user's own); a copy each call."""
        return copy.deepcopy(self._fingerprint)

    @functools.cached_property
    def _fingerprint(self) -> dict[str, Any]:

        def describe(source: Any) -> Any:
            if source is None:
                return None
            d: dict[str, Any] = {"kind": source_kind(source)}
            if d["kind"] == "map":
                d["len"] = len(source)
            if isinstance(source, TensorDataset):
                h = hashlib.sha1()
                for t in source.tensors:
                    h.update(str((tuple(t.shape), str(t.dtype))).encode())
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
                d["sha1"] = h.hexdigest()[:12]
            elif d["kind"] == "map":
                d["sampled"] = _sampled_fingerprint(source)
            return d

        return {
            "name": self.name,
            "train": describe(self.train),
            "val": describe(self.val),
            "test": describe(self.test),
        }


def code_source(cls: type) -> str:
    """The code a class's behaviour depends on, as text: the whole file of the module it
    is defined in (its constants and helpers too), or the class alone for a script's
    (``__main__``: its other lines are the study's settings, not the model's or data's)."""
    import inspect

    module = sys.modules.get(cls.__module__)
    try:
        if module is not None and cls.__module__ != "__main__":
            return inspect.getsource(module)
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def _sampled_fingerprint(source: Any) -> str | None:
    """A map-style Dataset of the user's own class: a hash of its code (:func:`code_source`)
    and of up to 16 of its samples, evenly spaced. Its length was all a run's identity held,
    so labels changed in its code kept the runs trained on the old ones. The samples are
    read twice under the same seeds (torch, numpy, random): a Dataset whose samples still
    differ (augmentation from a generator of its own) is fingerprinted by its code alone,
    so a rerun of the same command is never taken for another problem."""
    cls = type(source)
    # torch's and torchvision's own classes (Subset, ConcatDataset, ...): their samples
    # only (their code is the installed version's: an upgrade is no other problem)
    own = cls.__module__.split(".")[0] not in ("torch", "torchvision", "samkit")
    code = hashlib.sha1(code_source(cls).encode()).hexdigest()[:12] if own else "lib"
    n = len(source)
    picks = sorted({round(k * (n - 1) / 15) for k in range(16)})
    try:
        first, second = _hash_samples(source, picks), _hash_samples(source, picks)
    except Exception:  # noqa: BLE001 - the study's checks say what is wrong with a sample
        return code
    return f"{code}-{first}" if first == second else code


def _hash_samples(source: Any, picks: list[int]) -> str:
    import random

    h = hashlib.sha1()

    def feed(value: Any) -> None:
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(
                t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes()
            )
        elif isinstance(value, np.ndarray):
            h.update(str((value.shape, str(value.dtype))).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, (tuple, list)):
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):  # (the CPU generator only, restored after)
        try:
            torch.default_generator.manual_seed(0)
            np.random.seed(0)
            random.seed(0)
            for i in picks:
                feed(source[i])
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    return h.hexdigest()[:12]


#: modules loaded from a file path, by their name: (the file's mtime and size, the module)
_FILE_MODULES: dict[str, tuple[tuple[int, int], Any]] = {}


def _import_module(module: str, spec: str, what: str) -> Any:
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise ValueError(
                f"Invalid {what} value: {spec!r} ({module} is not a file; a relative path is "
                f"read from the current folder, {os.getcwd()}, or from a config file's folder)"
            )
        name = f"samkit_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        loaded = _FILE_MODULES.get(name)
        if loaded is not None and loaded[0] == stamp and sys.modules.get(name) is loaded[1]:
            # the same file, unchanged: the same module (a model and data function from one
            # file, loaded twice, were two modules, and the first's functions no longer
            # pickled by name for worker processes)
            return loaded[1]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"Invalid {what} value: {spec!r} (cannot load {module})")
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod
        loader_spec.loader.exec_module(mod)
        _FILE_MODULES[name] = (stamp, mod)
        return mod
    # the current folder first, as `python -m` does, so a user's module beside
    # their data is found without installing it
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(module)


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    return f" at {Path(last.tb_frame.f_code.co_filename).name}:{last.tb_lineno}"


#: the user's modules loaded by :func:`load_callable`: real file path -> [(what, spec)]
_USER_FILES: dict[str, list[tuple[str, str]]] = {}


def _installed(path: str) -> bool:
    """True for a file of the Python installation (the standard library, site-packages)."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return "site-packages" in Path(path).parts or any(
        path.startswith(root + os.sep) for root in roots
    )


def _remember_user_file(mod: Any, what: str, spec: str) -> None:
    file = getattr(mod, "__file__", None)
    if isinstance(file, str) and not _installed(os.path.realpath(file)):
        entries = _USER_FILES.setdefault(os.path.realpath(file), [])
        if (what, spec) not in entries:
            entries.append((what, spec))


def user_code_error(exc: BaseException) -> str | None:
    """One line for an exception raised inside the user's ``--model`` / ``--data`` code.

    ``"in your data function mod:load: IndexError: 0 (mod.py:35, in Data.__getitem__)"``,
    or None when no frame of the traceback is in a module that
    :func:`load_callable` loaded (or in a file beside one: the user's helpers).
    The innermost such frame names the place; its ``self`` (a Module or a
    Dataset) or its name tells which of the user's functions it belongs to.
    """
    if not _USER_FILES:
        return None
    folders = {os.path.dirname(f) for f in _USER_FILES}

    def users(file: str) -> bool:
        file = os.path.realpath(file)
        return file in _USER_FILES or os.path.dirname(file) in folders

    text = str(exc).splitlines()[0] if str(exc) else ""
    owner: Any = None
    found = None
    tb = exc.__traceback__
    while tb is not None:
        if users(tb.tb_frame.f_code.co_filename):
            found = tb
        tb = tb.tb_next
    travelled = [f for f in getattr(exc, "_samkit_frames", None) or () if users(f[0])]
    if found is not None:
        file, line = found.tb_frame.f_code.co_filename, found.tb_lineno
        func = found.tb_frame.f_code.co_name
        owner = found.tb_frame.f_locals.get("self")
    elif travelled:  # raised in a worker process or on a Ray node (see frames_for_travel)
        file, line, func, owner_kind, owner_name = travelled[-1]
        owner = _Owner(owner_kind, owner_name) if owner_name else None
        found = True
    else:
        # raised in a DataLoader worker: torch re-raises it here with the worker's
        # traceback as text ("Caught IndexError in DataLoader worker process 0. ...")
        frames = re.findall(r'File "(.+?)", line (\d+), in (\S+)', str(exc))
        mine = [f for f in frames if users(f[0])]
        if not mine or "DataLoader worker" not in text:
            return None
        file, line, func = mine[-1][0], int(mine[-1][1]), mine[-1][2]
        last = str(exc).strip().splitlines()[-1]
        text = last.partition(": ")[2] if last.startswith(type(exc).__name__) else text
    file = os.path.realpath(file)
    specs = _USER_FILES.get(file) or [e for entries in _USER_FILES.values() for e in entries]
    kinds = {w for w, _ in specs}
    if isinstance(owner, nn.Module) or (isinstance(owner, _Owner) and owner.kind == "model"):
        kind: str | None = "model"
    elif (
        isinstance(owner, (TorchDataset, IterableDataset))
        or (isinstance(owner, _Owner) and owner.kind == "data")
        or (found is None and "data" in kinds)
    ):
        kind = "data"  # (a DataLoader worker runs the data's code only)
    else:
        by_name = [w for w, sp in specs if sp.rpartition(":")[2] == func]
        kind = by_name[0] if by_name else (next(iter(kinds)) if len(kinds) == 1 else None)
    named = [sp for w, sp in specs if w == kind]
    who = f"your {kind} function {named[0]}" if named else "your code"
    if isinstance(owner, _Owner):
        func = f"{owner.name}.{func}"
    elif owner is not None and not isinstance(owner, type):
        func = f"{type(owner).__name__}.{func}"
    return f"in {who}: {type(exc).__name__}: {text} ({Path(file).name}:{line}, in {func})"


@dataclass(frozen=True)
class _Owner:
    """A frame's ``self`` as it travelled from a worker: its kind and class name."""

    kind: str | None
    name: str


def frames_for_travel(exc: BaseException) -> None:
    """In a worker: keep ``exc``'s traceback as plain data on it (file, line, function,
    the kind and class of its ``self``), which pickling keeps (the traceback itself is
    lost on the way), so the driver's :func:`user_code_error` can name the user's line."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code, owner = tb.tb_frame.f_code, tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            kind: str | None = "model"
        elif isinstance(owner, (TorchDataset, IterableDataset)):
            kind = "data"
        else:
            kind = None
        name = type(owner).__name__ if owner is not None and not isinstance(owner, type) else ""
        frames.append((code.co_filename, tb.tb_lineno, code.co_name, kind, name))
        tb = tb.tb_next
    with contextlib.suppress(AttributeError, TypeError):  # (an exception without __dict__)
        exc._samkit_frames = frames  # type: ignore[attr-defined]


def load_callable(spec: Any, what: str) -> Callable[..., Any]:
    """``"package.module:function"`` or ``"path/file.py:function"`` -> the function.

    Import errors become one ``ValueError`` naming ``what`` (the setting), the
    spec and the reason (with the file and line when the user's code raised).
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError(f"Invalid {what} value: {spec!r} (expected module:function)")
    module, _, attr = spec.rpartition(":")
    if not module or not attr.isidentifier():
        raise ValueError(f"Invalid {what} value: {spec!r} (expected module:function)")
    try:
        mod = _import_module(module, spec, what)
    except ValueError:
        raise
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"Invalid {what} value: {spec!r} (cannot import {module!r}: {exc}; run from the folder "
            "that holds it, or install it)"
        ) from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's module raised (or exited) while importing
        raise ValueError(
            f"Invalid {what} value: {spec!r} (importing {module!r} raised "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{_where(exc)})"
        ) from exc
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"Invalid {what} value: {spec!r} ({module!r} has no function {attr!r})")
    _remember_user_file(mod, what, spec)
    return fn


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")


def _load_npz(path: Path) -> UserData:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive of named arrays")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "pickled" in reason:  # numpy's guess for any file that is not an archive
            reason = "not an archive written by numpy.savez"
        raise ValueError(
            f"Invalid data value: {str(path)!r} is not a readable .npz ({reason})"
        ) from exc
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ValueError(
                f"Invalid data value: {str(path)!r} array {key} has dtype {array.dtype} "
                "(needs numbers: bool, int or float)"
            )
    unknown = sorted(set(arrays) - set(_NPZ_KEYS))
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing or unknown:
        raise ValueError(
            f"Invalid data value: {str(path)!r} (needs arrays x_train, y_train, optional x_test, "
            f"y_test, x_val, y_val; {'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(unknown)})"
        )
    for a, b in (("x_test", "y_test"), ("x_val", "y_val")):
        if (a in arrays) != (b in arrays):
            raise ValueError(
                f"Invalid data value: {str(path)!r} has {a if a in arrays else b} alone"
            )
    pair = lambda s: (arrays[f"x_{s}"], arrays[f"y_{s}"]) if f"x_{s}" in arrays else None  # noqa: E731
    return UserData(name=path.name, train=pair("train"), val=pair("val"), test=pair("test"))


def _as_user_data(name: str, out: Any) -> UserData:
    if isinstance(out, UserData):
        return out
    if isinstance(out, dict):
        unknown = sorted(set(out) - {"train", "val", "test"})
        if unknown or "train" not in out:
            raise ValueError(
                f"Invalid data value: {name!r} returned a dict with keys {sorted(out)} "
                "(expected train, and optional val, test)"
            )
        return UserData(name, out["train"], out.get("val"), out.get("test"))
    # (train, test) or (train, val, test) of datasets or (x, y) pairs; a bare (x, y)
    # pair of arrays is ambiguous with (train, test), so it is refused
    if (
        isinstance(out, (tuple, list))
        and len(out) in (2, 3)
        and not any(torch.is_tensor(p) or isinstance(p, np.ndarray) for p in out)
    ):
        parts = list(out)
        if len(parts) == 2:
            return UserData(name, parts[0], None, parts[1])
        return UserData(name, parts[0], parts[1], parts[2])
    raise ValueError(
        f"Invalid data value: {name!r} returned {type(out).__name__} (expected (train, test), "
        "(train, val, test) or a dict with those keys)"
    )


def load_user_data(spec: Any) -> UserData:
    """``path.npz`` or ``module:function`` (returning ``(train, test)``, ``(train, val,
    test)`` or a dict with those keys) -> :class:`UserData`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Invalid data value: {spec!r} (a path.npz or module:function)")
    if spec.endswith(".npz"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"Invalid data value: {spec!r} is not a file (a relative path is read from the "
                f"current folder, {os.getcwd()}, or from a config file's folder)"
            )
        return _load_npz(path)
    fn = load_callable(spec, "data")
    try:
        out = fn()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's loader raised (or exited)
        raise ValueError(
            f"Invalid data value: {spec!r} raised {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}{_where(exc)}"
        ) from exc
    return _as_user_data(spec, out)
