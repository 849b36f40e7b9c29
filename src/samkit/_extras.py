"""Optional dependencies: the pyproject extra that brings each, and errors that say so.

samkit's core needs torch and numpy only. A feature that needs more names the
extra to install (``pip install 'samkit[lightning]'``) instead of ending in a
bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from typing import NoReturn

__all__ = ["EXTRA", "available", "install", "reraise_missing"]

#: top-level module -> the samkit extra (pyproject.toml) that installs it
EXTRA = {
    "matplotlib": "experiments",
    "mnist1d": "experiments",
    "sklearn": "experiments",
    "tomli": "experiments",
    "optuna": "tune",
    "lightning": "lightning",
    "transformers": "huggingface",
    "keras": "keras",
    "ray": "distributed",
}


def available(module: str) -> bool:
    """True when ``module`` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def install(module: str) -> str:
    """How to install ``module``: ``pip install 'samkit[<extra>]'``."""
    return f"pip install 'samkit[{EXTRA[module]}]'"


def reraise_missing(exc: ImportError, feature: str, package: str, how: str) -> NoReturn:
    """Re-raise ``exc``; when it is ``package`` itself that is missing (not one of
    its own dependencies), as a ModuleNotFoundError saying ``feature`` needs it
    and ``how`` to install it."""
    name = getattr(exc, "name", None) or ""
    if name.split(".")[0] == package.split(".")[0]:
        raise ModuleNotFoundError(
            f"{feature} needs {package}, which is not installed: {how}", name=package
        ) from exc
    raise exc
