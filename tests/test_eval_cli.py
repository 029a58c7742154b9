"""`ecdit eval` end to end (ground truth, no model) and its errors, in a subprocess like the other CLIs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ecdit.data import shapes

REPO = Path(__file__).resolve().parents[1]


def ecdit(*args, cwd=REPO, timeout=120):
  env = dict(os.environ, XLA_FLAGS=os.environ.get('ECDIT_TEST_XLA_FLAGS', ''), JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', 'ecdit.cli', *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_ground_truth_end_to_end(tmp_path):
  prompts = tmp_path / 'prompts.jsonl'
  shapes.write_eval_prompts(prompts, 36, seed=4)
  out = tmp_path / 'res' / 'gt.json'
  r = ecdit('eval', f'--prompts={prompts}', f'--out={out}', '--ground_truth', '--images_per_prompt=2',
            '--image_size=64')
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())
  assert set(res['tags']) == set(shapes.TAGS) and res['overall'] >= 0.99
  assert res['counts']['position'] == {'correct': 12, 'images': 12, 'prompts': 6}
  assert 'overall' in r.stdout and 'color_attr' in r.stdout


def test_default_prompts_and_workdir_layout(tmp_path):
  r = ecdit('eval', '--ground_truth', '--num_prompts=12', '--images_per_prompt=1', f'--workdir={tmp_path}')
  assert r.returncode == 0, r.stderr
  res = json.loads((tmp_path / 'eval' / 'ground_truth.json').read_text())
  assert len(res['records']) == 12 and res['source'] == 'ground_truth'


def test_errors_are_one_line(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"tag": "colors", "prompt": "a pink circle", '
                 '"include": [{"class": "circle", "count": 1, "color": "pink"}]}\n')
  for args, needle in [
      (['--ground_truth', f'--prompts={bad}'], 'line 1'),
      (['--ground_truth', f'--prompts={tmp_path / "none.jsonl"}'], 'none.jsonl'),
      ([], '--workdir is required'),
      ([f'--workdir={tmp_path / "run"}'], str(tmp_path / 'run')),
      (['--ground_truth', '--images_per_prompt=0'], 'images_per_prompt'),
  ]:
    r = ecdit('eval', *args, cwd=tmp_path)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
