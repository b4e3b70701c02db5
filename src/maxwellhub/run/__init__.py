"""Job orchestration: what ``maxwellhub run`` does with a config, on top of the hub and
the EM side.

- :mod:`~maxwellhub.run.config`: the TOML config, parsed and validated before anything
  starts;
- :mod:`~maxwellhub.run.runner`: the main job (plan, start, run, summarise), with
  :mod:`~maxwellhub.run.validate` (the config against the models),
  :mod:`~maxwellhub.run.fleet` (the driver processes) and :mod:`~maxwellhub.run.summary`
  (its output files and summary line);
- :mod:`~maxwellhub.run.launch`: starting and reaping local driver processes;
- :mod:`~maxwellhub.run.checkpoint`: whole-run checkpoints and ``--resume``;
- :mod:`~maxwellhub.run.output`, :mod:`~maxwellhub.run.engine_summary`,
  :mod:`~maxwellhub.run.kick_spectrum`: what a run writes and prints at its end.

Nothing below this package imports it (tests/unit/test_layers.py).
"""
