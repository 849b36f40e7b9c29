"""Experiments on real data: the comparative study and what it is built from.

Modules (import what you need; nothing is loaded eagerly, so importing
:mod:`samkit.experiments.checkpoint` stays cheap):

- :mod:`.api`: ``compare(model=, train=, val=, test=, ...)``, the study from Python
  (also ``samkit.compare``); :mod:`.tuning`: ``tune(...)`` (also ``samkit.tune``;
  the search: :mod:`.tune_search`, one trial: :mod:`.tune_trial`, N at once:
  :mod:`.tune_parallel`)
- :mod:`.settings`: every setting (``TrainSpec``, ``TrainConfig``, ``MethodSpec``,
  ``StudyConfig``, defined in :mod:`.types` and :mod:`.configs`), presets, TOML
  files and flags, and all their validation
- :mod:`.registry`: the method contract and the ``@register`` decorator;
  :mod:`.methods`: every method, each declared where it is defined
- :mod:`.problem`: the data, model factory, loss and metrics (built-in or the user's:
  :mod:`.userdata` reads and checks the user's data and code)
- :mod:`.datasets`: ``load_dataset("mnist1d" | "digits" | "synthetic", ...)``
- :mod:`.models`: ``build_model("cnn" | "gru" | "mlp" | "resnet", **kwargs)``
- :mod:`.trainer`: ``train(model, method, data, TrainConfig(...))``, the one training loop;
  :mod:`.batches`: the data order and ``evaluate``; :mod:`.trainstate`: resuming a run
- :mod:`.engine`: the one study engine (cells, resume by identity, executors)
- :mod:`.study`: resumable (method x seed) grids on the engine, re-exporting
  :mod:`.study_checks` (validation), :mod:`.study_sharpness`, :mod:`.study_summary`
  (summary and paired verdicts) and :mod:`.runfiles` (run names, atomic records)
- :mod:`.report`: tables and the self-contained HTML report
- :mod:`.folder`: one study per folder (a lock), stale temporary files
- :mod:`.checkpoint`: ``save_checkpoint`` / ``load_checkpoint`` / ``check_checkpoint``
- :mod:`.rl`, :mod:`.gan`: ``samkit rl`` and ``samkit gan``, a package each;
  :mod:`.grid` and :mod:`.grid_run`: what the two share (method specs, summary,
  verdicts; the run folder and the running)
"""
