"""Experiments on real data: the comparative study and what it is built from.

Modules (import what you need; nothing is loaded eagerly, so importing
:mod:`samkit.experiments.checkpoint` stays cheap):

- :mod:`.api`: ``compare(model=, train=, val=, test=, ...)``, the study from Python
  (also ``samkit.compare``); :mod:`.tuning`: ``tune(...)`` (also ``samkit.tune``)
- :mod:`.settings`: every setting (``TrainSpec``, ``TrainConfig``, ``MethodSpec``,
  ``StudyConfig``), presets, TOML files and flags, and all their validation
- :mod:`.registry`: the method contract and the ``@register`` decorator;
  :mod:`.methods`: every method, each declared where it is defined
- :mod:`.problem`: the user's data, model factory, loss and metrics (or the built-in ones)
- :mod:`.datasets`: ``load_dataset("mnist1d" | "digits" | "synthetic", ...)``
- :mod:`.models`: ``build_model("cnn" | "gru" | "mlp" | "resnet", **kwargs)``
- :mod:`.trainer`: ``train(model, method, data, TrainConfig(...))``, the one training loop
- :mod:`.study`: validation, resumable (method x seed) grids, summary and paired verdicts
- :mod:`.report`: tables and the self-contained HTML report
- :mod:`.folder`: one study per folder (a lock), stale temporary files
- :mod:`.checkpoint`: ``save_checkpoint`` / ``load_checkpoint`` / ``check_checkpoint``
- :mod:`.rl`, :mod:`.gan`: ``samkit rl`` and ``samkit gan``, a package each;
  :mod:`.grid` and :mod:`.grid_run`: what the two share (method specs, summary,
  verdicts; the run folder and the running)
"""
