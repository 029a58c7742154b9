"""`ecdit train`: train an experiment into a workdir, resuming from its latest checkpoint.

  ecdit train                                   # experiments/shapes_tiny.py into ./runs/shapes_tiny
  ecdit train --config=experiments/shapes_small.py:ec --workdir=runs/ec --config.train.num_steps=100

A bad key, type or value stops the command with one line naming the key, before anything compiles.
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from ecdit import cli
from ml_collections import config_dict, config_flags

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / 'experiments' / 'shapes_tiny.py')


def one_line(e: BaseException) -> str:
  """A single line for a config/flag error (KeyError reprs and multi-line messages flattened)."""
  msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  msg = ' '.join(msg.strip().strip('"\'').split())
  return msg or type(e).__name__


def condense(msg: str) -> str:
  """A flag error that embeds a traceback becomes its first line plus the final exception line."""
  lines = [l.strip() for l in msg.strip().splitlines() if l.strip()]
  if any(l.startswith('Traceback') for l in lines):
    return f'{lines[0]} {lines[-1]}'
  return ' '.join(lines)


_fail = cli.fail


def _unknown_key_message(e: BaseException, argv) -> str:
  """Names the override that failed: config_flags reports unknown keys as a bare KeyError/AttributeError."""
  import re
  raw = str(e)
  hint = re.search(r'Did you mean "([^"]+)"', raw)
  hint = f' (did you mean {hint.group(1)!r}?)' if hint else ''
  for arg in argv:
    name = arg.lstrip('-').split('=', 1)[0]
    if name.startswith('config.') and name.rsplit('.', 1)[-1] in raw:
      return f'--{name}: unknown config key {name[len("config."):]!r}{hint}'
  return f'--config: {one_line(e)}'


def define_config_flag(name: str = 'config', default: str = DEFAULT_CONFIG, help_: str = ''):
  """DEFINE_config_file whose failures (bad file, unknown override key) end in one clear line."""
  try:
    holder = config_flags.DEFINE_config_file(name, default=default, lock_config=True,
                                             help_string=help_ or 'experiment file[:variant]')
  except Exception as e:  # noqa: BLE001 — the default config is parsed at import with sys.argv's overrides.
    _fail(_unknown_key_message(e, sys.argv))
  flag = flags.FLAGS[name]
  original = flag.parse

  def parse(argument):
    try:
      return original(argument)
    except flags.Error as e:
      raise flags.Error(condense(str(e))) from None
    except (KeyError, AttributeError) as e:
      raise flags.Error(_unknown_key_message(e, sys.argv)) from None
    except Exception as e:  # noqa: BLE001
      raise flags.Error(f'--{name}={argument}: {condense(str(e))}') from None

  flag.parse = parse
  return holder


_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (default ./runs/<config name>)')
_PROGRESS = flags.DEFINE_bool('progress', True, 'show a progress bar')


def flags_parser(argv):
  """For `app.run(..., flags_parser=...)`: any flag error is one line on stderr, exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(condense(str(e)))


def load_config():
  cfg = _CONFIG.value
  if not isinstance(cfg, config_dict.ConfigDict):
    try:
      cfg.name  # an _ErrorConfig raises the load error on access.
    except Exception as e:  # noqa: BLE001
      _fail(f'--config: {one_line(e)}')
    _fail(f'--config: not a ConfigDict: {type(cfg).__name__}')
  return cfg


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; flags look like --config.train.num_steps=100')
  from absl import logging
  if not flags.FLAGS['verbosity'].present:  # keep library INFO chatter (Orbax, grain) off the console
    logging.set_verbosity(logging.WARNING)
  from ecdit.config import experiment as config_lib
  cfg = load_config()
  try:
    from ecdit.train import frozen
    frozen.check(cfg, config_lib.validate(cfg))   # and the VAE / text encoder folders' config.json
  except config_lib.ConfigError as e:
    _fail(one_line(e))
  # Join the multi-process job (a no-op for one process) before anything asks JAX for its devices.
  from ecdit.parallel import distributed
  try:
    distributed.initialize()
  except (ValueError, RuntimeError) as e:
    _fail(one_line(e), code=1)
  workdir = Path(_WORKDIR.value or Path('runs') / cfg.name)
  from ecdit.train import loop
  from ecdit.train.checkpoint import CheckpointError
  try:
    summary = loop.train(cfg, workdir, progress=_PROGRESS.value)
  except config_lib.ConfigError as e:   # mesh vs devices, model or batch: found before any compile
    _fail(one_line(e))
  except (loop.NonFiniteLossError, CheckpointError) as e:
    _fail(one_line(e), code=1)
  print(loop.summary_line(summary), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=flags_parser)
