"""SAM for Keras 3 on any backend: wrap the model, compile, fit.

The same script runs on TensorFlow, JAX and PyTorch; Keras picks the backend
from ``KERAS_BACKEND`` at import time::

    KERAS_BACKEND=jax python examples/keras_sam.py --epochs 10
    KERAS_BACKEND=torch python examples/keras_sam.py --rho 0.1 --splits 4

Data: scikit-learn's 8x8 digits (shipped with the package, nothing to
download). The model has BatchNorm and dropout: SAMModel runs the first pass
in training mode, updates the BatchNorm statistics once per step, and reports
the loss and metrics at the weights w (not at w + e).
"""

from __future__ import annotations

import argparse

import keras
from sklearn.datasets import load_digits

from samkit.keras import SAMModel


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--splits", type=int, default=None, help="num_batch_splits (m-sharpness)")
    parser.add_argument("--adaptive", action="store_true", help="ASAM (use --rho 0.5 or more)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    y = y.astype("int32")
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10),
        ]
    )
    sam = SAMModel(model, rho=args.rho, num_batch_splits=args.splits, adaptive=args.adaptive)
    sam.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = sam.fit(x_train, y_train, batch_size=60, epochs=args.epochs, verbose=0)
    _, accuracy = sam.evaluate(x_test, y_test, verbose=0)
    losses = [float(v) for v in history.history["loss"]]
    print(
        f"backend {keras.backend.backend()}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"test accuracy {accuracy:.3f}"
    )
    # sam.model is the trained Keras model; save it alone for inference without samkit.
    return {"backend": keras.backend.backend(), "losses": losses, "accuracy": float(accuracy)}


if __name__ == "__main__":
    main()
