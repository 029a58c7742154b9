"""`ecdit train` configuration errors: one line naming the key, before any compile."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ecdit(*args, timeout=120):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'ecdit.cli', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  """stderr lines other than absl's standard hint after a flag error."""
  return [l for l in stderr.splitlines() if l.strip() and not l.startswith('Pass --helpshort')]


@pytest.mark.parametrize('args,needle', [
    (['--config.train.bogus=1'], 'train.bogus'),
    (['--config=experiments/shapes_tiny.py', '--config.model.widht=64'], 'model.widht'),
    (['--config.train.num_steps=abc'], 'config.train.num_steps'),
    (['--config.train.num_steps=0'], 'train.num_steps'),
    (['--config.train.optimizer=sgd'], 'train.optimizer'),
    (['--config.model.routing=random'], 'model.routing'),
    (['--config.model.width=100', '--config.model.num_heads=3'], 'model.width'),
    (['--config.diffusion.mask_ratio=1.5'], 'diffusion.mask_ratio'),
    (['--config.mesh.data=0'], 'mesh.data'),
    (['--config.mesh.data=3', '--config.mesh.fsdp=1'], 'multiplies to 3 devices'),   # vs the device count
    (['--config=experiments/shapes_small.py:moe'], 'moe'),
    (['--config=experiments/nope.py'], 'nope.py'),
])
def test_bad_config_is_one_line(args, needle, tmp_path):
  r = ecdit('train', f'--workdir={tmp_path}', *args)
  assert r.returncode != 0
  lines = error_lines(r.stderr)
  assert len(lines) == 1, r.stderr
  assert needle in lines[0], lines[0]
  assert 'Traceback' not in r.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_help_lists_commands():
  r = ecdit('--help')
  assert r.returncode == 0 and 'train' in r.stdout and 'sample' in r.stdout
