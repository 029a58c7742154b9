"""Helpers shared by the launch scripts: argument splitting, environment flags, shell and YAML quoting.

Standard library only: the launch scripts run on a login node or laptop that may not have JAX installed.
Rule kept by every script: a user value that reaches a shell goes through `shlex.quote` (`sh_quote`), a value
that reaches YAML goes through `yaml_str`, and a value that reaches an `#SBATCH` directive through
`sbatch_quote`; nothing is pasted into a command line as raw text.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

# The variables ecdit/parallel/distributed.py reads (kept in step by tests/test_launch.py).
ENV_COORDINATOR = 'ECDIT_COORDINATOR'
ENV_NUM_PROCESSES = 'ECDIT_NUM_PROCESSES'
ENV_PROCESS_ID = 'ECDIT_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'ECDIT_LOCAL_DEVICE_IDS'
ENV_MODE = 'ECDIT_DISTRIBUTED'

_ENV_KEY = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_DNS_LABEL = re.compile(r'^[a-z]([-a-z0-9]*[a-z0-9])?$')


class LaunchError(Exception):
  """A bad launcher argument: printed as one line, exit status 2."""


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
  """`[launcher flags] -- command...` → (flags, command). The command may not be empty."""
  if '--' not in argv:
    return argv, []
  i = argv.index('--')
  return argv[:i], argv[i + 1:]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
  """Parses the launcher's flags (before `--`) and attaches the command after it as `args.command`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  flags, command = split_command(argv)
  args = parser.parse_args(flags)
  if not command:
    parser.error('no command: put it after `--`, e.g. `-- ecdit train --workdir=runs/x`')
  args.command = command
  return args


def add_env_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                      help='environment variable for the job (repeatable)')


def parse_env(items: list[str]) -> list[tuple[str, str]]:
  """KEY=VALUE strings → pairs; the key must be a shell identifier (it is never quoted)."""
  out = []
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not _ENV_KEY.match(key):
      raise LaunchError(f'--env {item!r}: expected KEY=VALUE with KEY matching [A-Za-z_][A-Za-z0-9_]*')
    out.append((key, value))
  return out


def sh_quote(value) -> str:
  return shlex.quote(str(value))


def sh_join(words) -> str:
  return ' '.join(sh_quote(w) for w in words)


_SBATCH_SAFE = re.compile(r'^[A-Za-z0-9_@%+=:,./-]+$')


def sbatch_quote(value) -> str:
  """Quotes a value for an `#SBATCH` directive as sbatch reads it (and as shlex.split reads it).

  sbatch splits directive lines itself: quotes group words, a backslash escapes the next character even
  inside quotes, and an unquoted `#` ends the line. Double quotes with `\\` and `"` escaped mean the same
  to sbatch and to a POSIX shell. Newlines cannot be expressed and are refused.
  """
  value = str(value)
  if '\n' in value or '\r' in value or '\0' in value:
    raise LaunchError(f'{value!r}: an #SBATCH value cannot contain a newline or NUL')
  if _SBATCH_SAFE.match(value):
    return value
  return '"' + value.replace('\\', '\\\\').replace('"', '\\"') + '"'


def check_dns_label(flag: str, value: str, max_len: int = 40) -> str:
  """Kubernetes object names: lowercase letters, digits and '-', starting with a letter."""
  if not _DNS_LABEL.match(value) or len(value) > max_len:
    raise LaunchError(f'{flag}={value!r}: must be lowercase letters, digits and "-", start with a letter, '
                      f'end with a letter or digit, at most {max_len} characters')
  return value


# ---- YAML (written by hand: every string double-quoted with explicit escapes, so nothing is re-typed) ----

def yaml_str(value: str) -> str:
  """A YAML double-quoted scalar that reads back as exactly `value` (YAML 1.1 and 1.2)."""
  out = ['"']
  for ch in str(value):
    code = ord(ch)
    if ch == '"':
      out.append('\\"')
    elif ch == '\\':
      out.append('\\\\')
    elif 0x20 <= code < 0x7f:
      out.append(ch)
    elif code < 0x100:
      out.append(f'\\x{code:02x}')
    elif code < 0x10000:
      out.append(f'\\u{code:04x}')
    else:
      out.append(f'\\U{code:08x}')
  out.append('"')
  return ''.join(out)


_PLAIN_KEY = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_./-]*$')


def _yaml_scalar(value) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, int):
    return str(value)
  if value is None:
    return 'null'
  return yaml_str(value)


def _yaml_key(key: str) -> str:
  return key if _PLAIN_KEY.match(key) and key.lower() not in ('y', 'n', 'yes', 'no', 'on', 'off', 'true',
                                                              'false', 'null') else yaml_str(key)


def yaml_dump(obj, indent: int = 0) -> str:
  """Block-style YAML for nested dicts/lists of str/int/bool/None (what a manifest needs)."""
  pad = ' ' * indent
  lines = []
  if isinstance(obj, dict):
    for key, value in obj.items():
      if isinstance(value, (dict, list)) and value:
        lines.append(f'{pad}{_yaml_key(key)}:')
        lines.append(yaml_dump(value, indent + 2))
      elif isinstance(value, (dict, list)):
        lines.append(f'{pad}{_yaml_key(key)}: {"{}" if isinstance(value, dict) else "[]"}')
      else:
        lines.append(f'{pad}{_yaml_key(key)}: {_yaml_scalar(value)}')
  elif isinstance(obj, list):
    for item in obj:
      if isinstance(item, (dict, list)) and item:
        body = yaml_dump(item, indent + 2)
        lines.append(f'{pad}- {body[indent + 2:]}')   # first line of the block goes after the dash
      else:
        empty = '{}' if isinstance(item, dict) else '[]'
        lines.append(f'{pad}- {empty if isinstance(item, (dict, list)) else _yaml_scalar(item)}')
  else:
    lines.append(pad + _yaml_scalar(obj))
  return '\n'.join(lines)


# ---- running things ----

def resolve_ecdit(command: list[str]) -> list[str]:
  """`ecdit ...` → the console script next to this Python, or `python -m ecdit.cli ...` when not installed."""
  if not command or command[0] != 'ecdit' or shutil.which('ecdit'):
    return command
  sibling = os.path.join(os.path.dirname(sys.executable), 'ecdit')
  if os.access(sibling, os.X_OK):
    return [sibling] + command[1:]
  return [sys.executable, '-m', 'ecdit.cli'] + command[1:]


def submit(argv: list[str], dry_run: bool, stdin_text: str | None = None, label: str = '') -> int:
  """Runs an external tool (never through a shell), or prints the shell-quoted command with --dry_run."""
  if dry_run:
    if label:
      print(f'# {label}')
    print(sh_join(argv))
    return 0
  if shutil.which(argv[0]) is None:
    raise LaunchError(f'{argv[0]!r} not found on PATH (use --dry_run to only print what would run)')
  print(f'[launch] {sh_join(argv)}', file=sys.stderr, flush=True)
  return subprocess.run(argv, input=stdin_text, text=True, check=False).returncode


def main_wrapper(main):
  """Runs main(argv) and turns a LaunchError into one line on stderr and exit status 2."""
  try:
    return main(None)
  except LaunchError as e:
    print(f'{os.path.basename(sys.argv[0])}: error: {e}', file=sys.stderr)
    return 2
