r"""``SAMModel``: sharpness-aware training for any Keras 3 model.

SAM (Foret et al., ICLR 2021, arXiv 2010.01412) minimises the worst loss in
a ball of radius ``rho`` around the weights. Each training step, on batch B:

.. math::

    g = \nabla L_B(w), \qquad
    e = \rho \, \frac{g}{\lVert g \rVert + \epsilon}, \qquad
    w \leftarrow \mathrm{base\_step}\big(w, \nabla L_B(w + e)\big)

ASAM (Kwon et al., ICML 2021, arXiv 2102.11600), ``adaptive=True``, makes the
ball scale-invariant with ``T = |w| + eta`` element-wise:
``e = rho T^2 g / (||T g|| + eps)``.

m-sharpness (``num_batch_splits=K``, arXiv 2010.01412 sec. 4; mSAM, arXiv
2302.09693): the batch is split into K micro-batches of near-equal size
``n_k``; each gets its own ascent ``e_k`` from its own gradient at ``w``, and
the base step receives the average ``sum_k (n_k / n) grad L_k(w + e_k)``.
"""

from __future__ import annotations

from typing import Any

import keras

from .._checks import check_int, check_nonneg, check_pos
from ._common import ascent

__all__ = ["SAMModel"]

_BACKENDS = ("tensorflow", "jax", "torch")


def _check_model(model: Any) -> None:
    if isinstance(model, keras.layers.Layer):
        return
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    hint = ""
    if kind.startswith("torch."):
        hint = "; for a torch.nn.Module use samkit.SAM(torch_optimizer, rho=...)"
    elif kind.startswith(("tf_keras.", "keras.src.engine", "tensorflow.python.keras")):
        hint = (
            "; this is a tf-keras (Keras 2) model: build it with Keras 3, or use "
            "tf_keras.models.experimental.SharpnessAwareMinimization"
        )
    raise ValueError(
        f"Invalid model value: {kind} is not a Keras 3 model (keras.Model or keras.layers.Layer){hint}"
    )


@keras.saving.register_keras_serializable(package="samkit")
class SAMModel(keras.Model):
    r"""Wrap a Keras 3 model so ``fit`` takes sharpness-aware steps.

    Compile the wrapper with any Keras optimizer (it is the base step) and
    train it with ``fit``; ``predict``/``evaluate``/``__call__`` are the inner
    model's. The weights are the inner model's, so ``sam.model`` is the
    trained model.

    Args:
        model: the Keras 3 model (any ``keras.Model`` or layer) to train.
        rho: radius of the ascent (default 0.05; ASAM: 0.5 to 2.0).
            ``rho=0`` trains exactly as the base optimizer would (still paying
            for two passes).
        num_batch_splits: split every batch into this many micro-batches,
            each with its own ascent (m-sharpness); the base step gets the
            *average* of their gradients, weighted by micro-batch size.
            ``None`` (default) or 1: no split. A batch that does not divide
            evenly is split as ``numpy.array_split`` does; one with fewer
            rows than ``num_batch_splits`` (an epoch's last batch) into
            one-row micro-batches.
        adaptive: ASAM's scale-invariant ascent.
        eta: ASAM's offset (default 0.01).
        eps: added to the norm (default 1e-12): a zero gradient gives a zero
            perturbation, never NaN.
        name: the wrapper's name.

    Each step, per micro-batch, with ``w`` and the non-trainable state ``s``
    (BatchNorm moving statistics, random-seed counters) as the step found them:

    * pass 1 at ``w`` **in training mode** (dropout on, BatchNorm on batch
      statistics): its loss and predictions are the ones reported to
      ``fit``'s metrics and callbacks, and the state it leaves is the state
      after the step (BatchNorm statistics move once per step);
    * pass 2 at ``w + e`` from the same state ``s``: the very same function
      (dropout draws the same masks), whose state changes and metric updates
      are dropped;
    * both passes run through Keras' ``stateless_call`` on every backend, so
      the model's variables hold ``w`` throughout: nothing is moved for the
      ascent and nothing is restored (exact by construction). The base
      optimizer then steps from ``w``.

    With micro-batches, each starts from ``s``'s float state and BatchNorm
    statistics move once per step by the size-weighted mean of the
    micro-batches' updates (as synchronised data-parallel replicas would);
    seed counters run on through the micro-batches.

    Differences from tf-keras's ``SharpnessAwareMinimization``: its first
    pass runs in inference mode (no dropout, BatchNorm frozen; its BatchNorm
    statistics then move by pass 2, at ``w + e``), it restores by subtracting
    ``e`` (not exact in floating point), and it *sums* the micro-batch
    gradients (a step ``num_batch_splits`` times larger with SGD). On a model
    without dropout or BatchNorm, ``SAMModel(m, rho, K)`` with learning rate
    ``K * lr`` matches tf-keras's with ``lr`` under plain or momentum SGD;
    without splits they match at the same learning rate.

    Not supported (refused at ``fit``): ``jit_compile=True`` on the torch
    backend, and TensorFlow ``tf.distribute`` strategies.

    Saving: ``sam.save("run.keras")`` then ``keras.models.load_model("run.keras")``
    (import ``samkit.keras`` first, which registers the class) gives the
    wrapper back with its settings, weights and optimizer state. Or save the
    inner model, ``sam.model.save(...)``, for inference without samkit.

    ``rho`` and the other settings are read-only: they are baked into the
    compiled training function. To change them, wrap the model again and
    compile the new wrapper.

    Example:
        >>> import keras
        >>> from samkit.keras import SAMModel
        >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> sam = SAMModel(inner, rho=0.05)
        >>> sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        >>> sam.rho
        0.05
        >>> import numpy as np
        >>> history = sam.fit(np.ones((8, 4)), np.zeros((8, 2)), epochs=1, verbose=0)
        >>> sorted(history.history)
        ['loss']
    """

    def __init__(
        self,
        model: Any,
        rho: float = 0.05,
        num_batch_splits: int | None = None,
        *,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        _check_model(model)
        rho = check_nonneg("rho", rho)
        eta = check_nonneg("eta", eta)
        eps = check_pos("eps", eps)
        if not isinstance(adaptive, bool):
            raise ValueError(f"Invalid adaptive value: {adaptive!r} (must be True or False)")
        if num_batch_splits is not None:
            num_batch_splits = check_int("num_batch_splits", num_batch_splits, 1)
        backend = keras.backend.backend()
        if backend not in _BACKENDS:
            raise NotImplementedError(
                f"samkit.keras.SAMModel trains on the tensorflow, jax and torch backends, "
                f"not {backend!r}: set KERAS_BACKEND before importing keras"
            )
        super().__init__(name=name, **kwargs)
        self.model = model
        self._rho = rho
        self._num_batch_splits = num_batch_splits
        self._adaptive = adaptive
        self._eta = eta
        self._eps = eps

    # Read-only: the traced training function has them as constants.
    rho = property(lambda self: self._rho, doc="Radius of the ascent.")
    num_batch_splits = property(
        lambda self: self._num_batch_splits, doc="Micro-batches per batch (None: no split)."
    )
    adaptive = property(lambda self: self._adaptive, doc="ASAM's scale-invariant ascent.")
    eta = property(lambda self: self._eta, doc="ASAM's offset.")
    eps = property(lambda self: self._eps, doc="Added to the ascent's norm.")

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.model(inputs, training=training)

    def _ascent(self, weights: list[Any], grads: list[Any]) -> list[Any]:
        return ascent(
            weights, grads, rho=self._rho, adaptive=self._adaptive, eta=self._eta, eps=self._eps
        )

    def _check_jit(self) -> None:
        # torch.compile of the two-pass step recompiles on every variable
        # assignment (measured: 90x slower than eager on a small MLP) and is
        # not tested; TensorFlow's XLA and JAX's jit are.
        if keras.backend.backend() == "torch" and self.jit_compile:
            raise ValueError(
                "Invalid jit_compile value: True (torch.compile) is not supported by "
                "samkit.keras.SAMModel on the torch backend; compile with "
                "jit_compile=False (the torch default) or use the jax backend for a compiled step"
            )

    def make_train_function(self, force: bool = False) -> Any:
        self._check_jit()
        return super().make_train_function(force)

    def train_step(self, *args: Any) -> Any:
        # JAX's trainer calls train_step(state, data); the others train_step(data).
        backend = keras.backend.backend()
        if backend == "jax":
            from . import _jax

            return _jax.train_step(self, *args)
        from ._stateful import train_step

        if backend == "tensorflow":
            from . import _tensorflow

            _tensorflow.check_strategy()
            # Without a tf.distribute strategy Keras defers building to the
            # first trace of train_step; the stateless passes need it done.
            self._symbolic_build(data_batch=args[0])
            return train_step(self, args[0], _tensorflow.BACKEND)
        from . import _torch

        return train_step(self, args[0], _torch.BACKEND)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.model),
            "rho": self._rho,
            "num_batch_splits": self._num_batch_splits,
            "adaptive": self._adaptive,
            "eta": self._eta,
            "eps": self._eps,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> SAMModel:
        config = dict(config)
        if "model" not in config:
            raise ValueError("Invalid config value: no 'model' entry (not a SAMModel config)")
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model, **config)
