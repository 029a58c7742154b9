"""`ecdit prepare --config=...`: materialise an experiment's dataset (and its tokenizer) under data.dir.

  ecdit prepare --config=experiments/shapes_small.py

The dataset is written into a temporary directory next to its final place and renamed into place only once
complete, so an interrupted or repeated run never leaves a half-written or corrupted dataset behind; an
existing dataset is checked (feature shapes) and reused. The library is `ecdit.data.prepare`.
"""
from __future__ import annotations

from ecdit import errors
from ecdit.commands import flags as cflags
from ecdit.config import data as config_lib
from ecdit.data import prepare as prepare_lib

_CONFIG = cflags.define_config(None, 'experiment config file (its `data` section is used); without it, '
                               'ecdit.data.default_data_config()')


def main(argv):
  cflags.no_arguments(argv)
  cfg = cflags.config_value(_CONFIG)
  data_cfg = config_lib.default_data_config() if cfg is None else (cfg.data if 'data' in cfg else cfg)
  cflags.quiet_logging()
  with cflags.translate(errors.RunError, catch=(ValueError, FileNotFoundError, NotADirectoryError)):
    prepare_lib.prepare(data_cfg)
