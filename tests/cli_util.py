"""Run the `ecdit` command in a subprocess, as a user would.

Command modules define their absl flags at import, and two commands may share a flag name (`--workdir`,
`--seed`), so tests never import two command modules into the pytest process: they go through `run_cli`.
"""
import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args, timeout=600, cwd=None, env=None, check=False):
  """`ecdit <args>` in a fresh Python process with 1 CPU device; returns the CompletedProcess (text)."""
  full_env = dict(os.environ)
  full_env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1 ' + os.environ.get('ECDIT_TEST_XLA_FLAGS', '')
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, '-m', 'ecdit.cli', *map(str, args)], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd, env=full_env)
  if check and proc.returncode != 0:
    raise AssertionError(f'ecdit {" ".join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def snapshot(root: Path) -> dict:
  """Every path under `root` with its bytes (None for a folder): what a refused command must leave as it was."""
  return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(Path(root).rglob('*'))}
