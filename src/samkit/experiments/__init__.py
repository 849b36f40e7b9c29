"""Experiments on real data: datasets, models, the trainer, comparative studies.

Modules (import what you need; nothing is loaded eagerly, so importing
:mod:`samkit.experiments.checkpoint` stays cheap):

- :mod:`.datasets`: ``load_dataset("mnist1d" | "digits" | "synthetic", seed=, noise=, val_fraction=)``
- :mod:`.models`: ``build_model("cnn" | "gru" | "mlp" | "resnet", **kwargs)``
- :mod:`.methods`: the registry of training methods (``sgd``, ``adam``, ``sam``, ``asam``, variants)
- :mod:`.trainer`: ``train(model, method, data, TrainConfig(...))``, the one training loop
- :mod:`.study`: ``run_study(StudyConfig(...), out_dir)``, resumable (method x seed) grids
- :mod:`.report`: tables and the self-contained HTML report
- :mod:`.config`: settings from presets, TOML files and flags
- :mod:`.checkpoint`: ``save_checkpoint`` / ``load_checkpoint``
"""
