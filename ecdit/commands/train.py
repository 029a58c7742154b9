"""`ecdit train`: train an experiment into a workdir, resuming from its latest checkpoint.

  ecdit train                                   # experiments/shapes_tiny.py into ./runs/shapes_tiny
  ecdit train --config=experiments/shapes_small.py:ec --workdir=runs/ec --config.train.num_steps=100

A bad key, type or value stops the command with one line naming the key, before anything compiles. So does a
workdir that is not empty and not an ecdit run, or a run of a different model (use a new workdir).
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

from ecdit import errors
from ecdit import outputs
from ecdit.commands import flags as cflags
from ecdit.config import experiment as config_lib
from ecdit.parallel import distributed
from ecdit.train import frozen, loop

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / 'experiments' / 'shapes_tiny.py')

_CONFIG = cflags.define_config(DEFAULT_CONFIG, 'experiment file[:variant]')
_WORKDIR = cflags.define_workdir('run directory (default ./runs/<config name>)')
_PROGRESS = flags.DEFINE_bool('progress', True, 'show a progress bar')


def main(argv):
  cflags.no_arguments(argv, '; flags look like --config.train.num_steps=100')
  cflags.quiet_logging()
  cfg = cflags.config_value(_CONFIG)
  frozen.check(cfg, config_lib.validate(cfg))   # and the VAE / text encoder folders' config.json
  # Join the multi-process job (a no-op for one process) before anything asks JAX for its devices.
  try:
    distributed.initialize()
  except (ValueError, RuntimeError) as e:
    raise errors.RunError(cflags.one_line(e)) from None
  if not _WORKDIR.value:
    outputs.check_run_name(cfg.name)   # `--config.name=..` must not train into ./
  workdir = Path(_WORKDIR.value or Path('runs') / cfg.name)
  # A workdir that is neither new, empty nor a run of this model is a WorkdirError (nothing written);
  # ConfigError (mesh vs devices, model or batch: found before any compile), NonFiniteLossError and
  # CheckpointError reach the ecdit.cli boundary as one line each.
  summary = loop.train(cfg, workdir, progress=_PROGRESS.value)
  print(loop.summary_line(summary), flush=True)
