"""The keys every config file shares, around a model config.

Config files (`configs/*.py`, ml_collections) call `experiment_config(model)`
and override what they need; the command line overrides any key with
`--config.key=value`.
"""
import ml_collections


def experiment_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model
  config.seed = 0
  # One value, two names: scripts set `--config.attention`, the model reads
  # `model.attention`. A FieldReference keeps them from drifting apart.
  config.attention = model.attention
  config.model.attention = config.get_ref("attention")
  return config
