"""SAM for Keras 3, on the TensorFlow, JAX and PyTorch backends.

:class:`SAMModel` wraps any Keras 3 model; compile it with any Keras optimizer
and train it with ``fit``::

    import keras
    from samkit.keras import SAMModel

    sam = SAMModel(model, rho=0.05)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    sam.fit(x, y, batch_size=64, epochs=5)

This subpackage is the only place in samkit that imports ``keras``; the torch
core (``samkit.optim``, ``samkit.functional``) never does. Install it with
``pip install 'samkit[keras]'``. Keras picks its backend at import time, from
the ``KERAS_BACKEND`` environment variable (``tensorflow``, ``jax`` or
``torch``); set it before the first ``import keras``.
"""

from __future__ import annotations

import importlib.util as _util
import os as _os

try:
    import keras as _keras
except ImportError as error:
    if (error.name or "").split(".")[0] == "keras" or _util.find_spec("keras") is None:
        raise ModuleNotFoundError(
            "samkit.keras needs Keras 3: pip install 'samkit[keras]' "
            "(keras 3.15 with tensorflow, jax or torch as its backend)",
            name="keras",
        ) from error
    # Keras is there, but the backend it was told to use (KERAS_BACKEND, else
    # ~/.keras/keras.json, else tensorflow) is not
    _chosen = _os.environ.get("KERAS_BACKEND")
    raise ImportError(
        f"samkit.keras: Keras is installed but its backend "
        f"{repr(_chosen) + ' (KERAS_BACKEND)' if _chosen else '(tensorflow unless ~/.keras/keras.json says otherwise)'} "
        f"cannot be imported ({type(error).__name__}: {error}). Install that backend, or "
        "choose an installed one before keras is first imported, e.g. KERAS_BACKEND=torch "
        "(or jax, tensorflow)",
        name=error.name,
    ) from error

if not _keras.__version__.startswith("3."):  # pragma: no cover
    raise ImportError(
        f"samkit.keras needs Keras 3, found keras {_keras.__version__}; "
        "for tf-keras (Keras 2) use tf_keras.models.experimental.SharpnessAwareMinimization"
    )

from .model import SAMModel  # noqa: E402

__all__ = ["SAMModel"]
