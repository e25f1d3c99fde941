"""Pipelines: one YAML file chains the stages through a run folder, resumably.

- :mod:`alignkit.pipeline.schema`: what a stage of each kind takes (its inputs, and the config
  schemas of the kinds that have none elsewhere: cai, eval, compare, report).
- :mod:`alignkit.pipeline.plan`: the file → a validated plan in dependency order; every mistake
  is one line naming the stage and the key, before any model loads.
- :mod:`alignkit.pipeline.execute`: runs a plan stage by stage, skipping finished stages.

Import-light: nothing is imported here (torch loads only when a stage runs).
"""
