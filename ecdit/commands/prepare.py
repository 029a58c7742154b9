"""`ecdit prepare --config=...`: materialise an experiment's dataset (and its tokenizer) under data.dir.

  ecdit prepare --config=experiments/shapes_small.py
  ecdit prepare --config.data.dir=/tmp/data     # the default experiment's (shapes_tiny, as `ecdit train`)

The dataset is written into a temporary directory next to its final place and renamed into place only once
complete, so an interrupted or repeated run never leaves a half-written or corrupted dataset behind; an
existing dataset is checked (feature shapes) and reused. The library is `ecdit.data.prepare`.
"""
from __future__ import annotations

from ecdit import errors
from ecdit.commands import flags as cflags
from ecdit.data import prepare as prepare_lib

# The same default experiment as `ecdit train`, so `--config.data.<key>=...` overrides work without --config
# and a bare `ecdit prepare` prepares what a bare `ecdit train` reads.
_CONFIG = cflags.define_config('experiments/shapes_tiny.py', 'experiment config file (its `data` section is used)')


def main(argv):
  cflags.no_arguments(argv)
  cfg = cflags.config_value(_CONFIG)
  data_cfg = cfg.data if 'data' in cfg else cfg   # an experiment, or a file holding a data section only
  cflags.quiet_logging()
  with cflags.translate(errors.RunError, catch=(ValueError, FileNotFoundError, NotADirectoryError)):
    prepare_lib.prepare(data_cfg)
