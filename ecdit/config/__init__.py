"""Every config key, its default and its check, in one package (pure Python: importing it loads no JAX).

  model.py       `ModelConfig` (the `model` section, resolved and validated) and `capacity`, the slot rule
  sizes.py       presets for `model.size`: the paper's Table 1 and CPU sizes
  data.py        the `data` section: defaults and validation
  experiment.py  the whole experiment: `base_config()`, `validate(cfg)`, `dump(cfg)` (golden files)

Experiments (`experiments/*.py`) start from `base_config()` and override values; they never add keys.
"""
