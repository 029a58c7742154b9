"""What every command shares: the --config flag with one-line errors, the flags parser, argument checks and
the per-command help.

A bad flag, an unknown `--config.<key>` or a config file that does not load raises `errors.UsageError` (one
line, exit 2 at the `ecdit.cli` boundary) instead of absl's multi-line usage dump.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import textwrap
import types

from absl import flags
from absl import logging
from ml_collections import config_dict, config_flags

from ecdit import errors
from ecdit.config import experiment as experiment_lib

FLAGS = flags.FLAGS

VERBOSE = flags.DEFINE_bool('verbose', False, 'on an error, print its traceback too (or set ECDIT_VERBOSE=1)')

# The helpers below call DEFINE_*: absl then attributes those flags to the command module that called them.
flags.disclaim_key_flags()

HELP_ARGS = ('--help', '-h', '-?', '--helpshort')
_WIDTH = 110


# ---- one-line messages -------------------------------------------------------------------------------------

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


def _unknown_key_message(e: BaseException, argv) -> str:
  """Names the override that failed: config_flags reports unknown keys as a bare KeyError/AttributeError.

  The override is the one whose path the error names (`(in: train.num_stepz)`), else the one with a key the
  error mentions as a word; the "did you mean" part is not searched (it names a valid key, maybe another
  override's)."""
  raw = str(e)
  hint = re.search(r'Did you mean "([^"]+)"', raw)
  body = raw[:hint.start()] if hint else raw
  hint = f' (did you mean {hint.group(1)!r}?)' if hint else ''
  where = re.search(r'\(in: ([\w.]+)\)', body)
  names = [arg.lstrip('-').split('=', 1)[0] for arg in argv]
  names = [n for n in names if n.startswith('config.')]
  for name in names:
    if where and name == f'config.{where.group(1)}':
      return f'--{name}: unknown config key {name[len("config."):]!r}{hint}'
  for name in names:
    if any(re.search(rf'(?<![\w.]){re.escape(part)}(?![\w])', body) for part in name.split('.')[1:]):
      return f'--{name}: unknown config key {name[len("config."):]!r}{hint}'
  return f'--config: {one_line(e)}'


# ---- flags -------------------------------------------------------------------------------------------------

def define_config(default: str | None, help_: str, *, lock_config: bool = True) -> flags.FlagHolder:
  """`--config=<file>[:variant]` plus `--config.<key>=<value>` overrides; every failure is one line."""
  if default is not None:   # a relative default names the checkout's file from any directory
    default = experiment_lib.experiment_path(default)
  try:
    holder = config_flags.DEFINE_config_file(
        'config', default=default, lock_config=lock_config,
        help_string=f'{help_}; override one key with --config.<key>=<value>')
  except Exception as e:  # noqa: BLE001 — the default config is parsed at import with sys.argv's overrides.
    raise errors.UsageError(_unknown_key_message(e, sys.argv)) from None
  flag = FLAGS['config']
  original = flag.parse

  def parse(argument):
    path = experiment_lib.experiment_path(argument).partition(':')[0]
    if not os.path.isfile(path):
      places = dict.fromkeys([os.getcwd(), str(experiment_lib.REPO_ROOT)])
      where = '' if os.path.isabs(path) else f' (looked in {" and ".join(places)})'
      raise flags.Error(f'--config={argument}: no experiment file at {path}{where}')
    try:
      return original(experiment_lib.experiment_path(argument))
    except flags.Error as e:
      raise flags.Error(condense(str(e))) from None
    except (KeyError, AttributeError) as e:
      raise flags.Error(_unknown_key_message(e, sys.argv)) from None
    except Exception as e:  # noqa: BLE001
      raise flags.Error(f'--config={argument}: {condense(str(e))}') from None

  flag.parse = parse
  return holder


def config_value(holder: flags.FlagHolder):
  """The parsed --config (None when it has no default and was not given); a file that failed to load raises
  UsageError naming the cause."""
  cfg = holder.value
  if cfg is None or isinstance(cfg, config_dict.ConfigDict):
    return cfg
  try:
    cfg.name  # an _ErrorConfig raises the load error on access.
  except Exception as e:  # noqa: BLE001
    raise errors.UsageError(f'--config: {one_line(e)}') from None
  raise errors.UsageError(f'--config: not a ConfigDict: {type(cfg).__name__}')


def define_workdir(help_: str) -> flags.FlagHolder:
  """`--workdir`: the training run directory a command reads (or train writes)."""
  return flags.DEFINE_string('workdir', None, help_)


def flags_parser(argv):
  """For `app.run(..., flags_parser=...)`: any flag error is one UsageError line (exit 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    raise errors.UsageError(condense(str(e))) from None


@contextlib.contextmanager
def translate(kind: type[errors.EcditError] = errors.UsageError, *, first_line: bool = False,
              catch: tuple[type[BaseException], ...] = (ValueError,)):
  """Library errors raised inside become one ecdit error line: an EcditError keeps its exit status, any other
  `catch` exception (a value the library rejected) becomes `kind`. `first_line` keeps only the message's first
  line (a WorkdirError's hint, a dump from Orbax)."""
  try:
    yield
  except catch as e:
    msg = str(e)
    if first_line and msg:
      msg = msg.splitlines()[0]
    if isinstance(e, errors.EcditError):
      kind = errors.UsageError if e.exit_code == errors.UsageError.exit_code else errors.RunError
    raise kind(msg) from e


# ---- argument checks ---------------------------------------------------------------------------------------

def no_arguments(argv, hint: str = '') -> None:
  """Commands take flags only: anything left after parsing is a mistake (e.g. a missing `--`)."""
  if len(argv) > 1:
    raise errors.UsageError(f'unexpected arguments {argv[1:]}{hint}')


def require(*holders: flags.FlagHolder, why: str = '') -> None:
  """Each flag must be given (non-empty)."""
  for h in holders:
    if not h.value:
      raise errors.UsageError(f'--{h.name} is required{why}')


def at_least(holder: flags.FlagHolder, minimum: int | float) -> None:
  """A number flag, when given, is >= minimum (an integer flag: an int minimum; a float flag: a float one, and
  finite: nan would slip past a plain `<` test)."""
  v = holder.value
  if v is not None and (v < minimum or (isinstance(minimum, float) and not math.isfinite(v))):
    kind = f'a finite number >= {minimum:g}' if isinstance(minimum, float) else f'an integer >= {minimum}'
    raise errors.UsageError(f'--{holder.name}={holder.value} is invalid: expected {kind}')


def ode_steps(holder: flags.FlagHolder) -> None:
  """A `--steps` flag (sampler ODE steps), when given: 1 to config.MAX_SAMPLE_STEPS."""
  if holder.value is not None and not 1 <= holder.value <= experiment_lib.MAX_SAMPLE_STEPS:
    raise errors.UsageError(f'--{holder.name}={holder.value} is invalid: expected an integer from 1 to '
                            f'{experiment_lib.MAX_SAMPLE_STEPS} (ODE steps)')


def prompt_list(holder: flags.FlagHolder, default: str | None = None) -> list[str]:
  """The ';'-separated prompts of a --prompts flag, blanks dropped. `default` (a run's sample.prompts) is used
  only when the flag was not given: a given but empty --prompts is an error, never the default."""
  text = default if holder.value is None else holder.value
  prompts = [p.strip() for p in (text or '').split(';') if p.strip()]
  if not prompts:
    raise errors.UsageError(f'--{holder.name}={holder.value!r} holds no prompt: expected a \';\'-separated list')
  return prompts


def quiet_logging() -> None:
  """Keeps library INFO chatter (Orbax, grain, tfds) off the console unless --verbosity asks for it."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


# ---- help --------------------------------------------------------------------------------------------------

def holders(module: types.ModuleType) -> list[flags.FlagHolder]:
  """The flags a command module defined, in definition order (its module-level FlagHolders)."""
  return [v for v in vars(module).values() if isinstance(v, flags.FlagHolder)]


def render(title: str, doc: str, flag_holders) -> str:
  """A command's help: usage line, its description, then each of its flags with help and default."""
  lines = [f'usage: {title} [--flags]', '', textwrap.dedent(doc).strip(), '', 'flags:']
  for h in [*flag_holders, VERBOSE]:
    f = FLAGS[h.name]
    lines += textwrap.wrap(f'--{"[no]" if f.boolean else ""}{f.name}: {f.help}', _WIDTH,
                           initial_indent='  ', subsequent_indent='      ')
    if f.default is not None:
      lines.append(f'    (default: {f.default_as_str})')
  lines += ['', f'absl\'s own flags (--verbosity, ...): {title.split(" <")[0]} --helpfull']
  return '\n'.join(lines)


def usage(module: types.ModuleType, command: str, args) -> str:
  """`ecdit <command> --help`: a module may define `usage(args)` (bench: per benchmark); else its
  docstring and its flags."""
  own = getattr(module, 'usage', None)
  return own(args) if own else render(f'ecdit {command}', module.__doc__ or '', holders(module))
