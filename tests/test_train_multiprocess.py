"""`ecdit train` as two JAX processes × 4 simulated CPU devices (launch/local.py) against one process with 8
devices on the same mesh; then the 2-process checkpoint resumes in one process on another mesh.

  reference   in this (pytest) process, 8 devices, mesh data=2 expert=4, steps 1..5 uninterrupted
  two procs   launch/local.py --num_processes=2 --devices_per_process=4, same mesh, steps 1..3 (+ a preview)
  resumed     in this process, 8 devices, mesh data=8, from the two processes' step-3 checkpoint to step 5
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ecdit.train import loop

from _train_util import load_experiment

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS, SPLIT = 5, 3
TOL = dict(rtol=1e-5, atol=1e-5)
SETTINGS = {
    'model.width': 32, 'model.depth': 2, 'model.num_heads': 2, 'model.text_width': 32, 'model.text_heads': 2,
    'model.image_size': 16, 'data.image_size': 16,
    'data.num_train_examples': 256, 'data.num_validation_examples': 16, 'data.num_eval_prompts': 12,
    'train.batch_size': 8, 'train.warmup_steps': 2, 'train.log_every': 1, 'train.checkpoint_every': 100,
    'train.sample_every': 0, 'train.final_sample': False, 'sample.num_steps': 1,
    'mesh.data': 2, 'mesh.expert': 4,
}


def config(data_dir, **changes):
  cfg = load_experiment('shapes_tiny')
  for key, value in {**SETTINGS, 'data.dir': str(data_dir), **changes}.items():
    section, name = key.split('.')
    cfg[section][name] = value
  return cfg


def flags(data_dir, **changes):
  return [f'--config.{k}={v}' for k, v in {**SETTINGS, 'data.dir': str(data_dir), **changes}.items()]


def losses(workdir):
  return [(r['step'], r['loss'], r['grad_norm'])
          for r in (json.loads(l) for l in (Path(workdir) / 'metrics.jsonl').read_text().splitlines())]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('multiprocess')
  data = root / 'data'
  # The reference also prepares the dataset the other runs read.
  t0 = time.perf_counter()
  loop.train(config(data, **{'train.num_steps': STEPS}), root / 'reference', progress=False)
  t1 = time.perf_counter()

  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, str(REPO / 'launch' / 'local.py'), '--num_processes=2', '--devices_per_process=4', '--',
         sys.executable, '-m', 'ecdit.cli', 'train', f'--workdir={root / "two"}', '--noprogress',
         *flags(data, **{'train.num_steps': SPLIT, 'train.final_sample': True, 'sample.prompts': 'a red circle'})]
  two = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  # Read before the resumed run appends to the log and rewrites the config.
  two_losses = losses(root / 'two')
  two_config = json.loads((root / 'two' / 'config.json').read_text())

  cfg = config(data, **{'train.num_steps': STEPS, 'mesh.data': 8, 'mesh.expert': 1})
  t2 = time.perf_counter()
  resumed = loop.train(cfg, root / 'two', progress=False)
  print(f'reference {t1 - t0:.1f}s, two processes {t2 - t1:.1f}s, resumed {time.perf_counter() - t2:.1f}s')
  return dict(root=root, two=two, two_losses=two_losses, two_config=two_config, resumed=resumed)


def test_two_processes_log_the_losses_of_one(runs):
  ref, two = losses(runs['root'] / 'reference'), runs['two_losses']
  assert [s for s, *_ in two] == list(range(1, SPLIT + 1))
  np.testing.assert_allclose(np.array(two)[:, 1:], np.array(ref[:SPLIT])[:, 1:], **TOL)
  print('two processes vs one, max |Δloss| =', np.max(np.abs(np.array(two)[:, 1] - np.array(ref[:SPLIT])[:, 1])))
  out = runs['two'].stdout
  assert '[p0] done: shapes_tiny' in out and '[p1] done: shapes_tiny' in out
  # Only process 0 writes the run's files: one record per step, one preview; both write checkpoint shards.
  workdir = runs['root'] / 'two'
  assert runs['two_config']['mesh'] == {'data': 2, 'fsdp': 1, 'expert': 4, 'model': 1}
  assert [p.name for p in (workdir / 'samples').iterdir()] == [f'step_{SPLIT:07d}.png']
  state_files = [p.name for p in (workdir / 'checkpoints' / str(SPLIT) / 'state').rglob('*')]
  assert any('process_1' in name for name in state_files), state_files


def test_checkpoint_of_two_processes_resumes_in_one_on_another_mesh(runs):
  assert runs['resumed']['start_step'] == SPLIT and runs['resumed']['steps'] == STEPS
  # ... through the checksums the two processes wrote (their shards' sums added up), verified on 8 devices.
  meta = [json.loads((runs['root'] / 'two' / 'checkpoints' / str(step) / 'meta' / 'metadata').read_text())
          for step in (SPLIT, STEPS)]
  assert meta[0]['checksums'].keys() == meta[1]['checksums'].keys() and len(meta[0]['checksums']) > 100
  ref, resumed = losses(runs['root'] / 'reference'), losses(runs['root'] / 'two')
  assert [s for s, *_ in resumed] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(np.array(resumed)[SPLIT:, 1:], np.array(ref[SPLIT:])[:, 1:], **TOL)
  assert jax.device_count() == 8
