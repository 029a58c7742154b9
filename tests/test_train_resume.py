"""`ecdit train` end to end in subprocesses: SIGKILL mid-run, resume, and the log is bit-for-bit the one of
an uninterrupted run; then `ecdit sample` draws a grid from the resumed workdir."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 30


def _env(root=None):
  env = dict(os.environ, XLA_FLAGS=os.environ.get('ECDIT_TEST_XLA_FLAGS', ''), JAX_PLATFORMS='cpu')
  if root is not None:  # later runs reuse the first run's compiled executables (same programs)
    env.update(JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _train_args(workdir, data_dir):
  """Relative paths on purpose (the runs start in a scratch cwd); workdir None = the default one."""
  where = [f'--workdir={workdir}'] if workdir else []
  return [sys.executable, '-m', 'ecdit.cli', 'train', *where,
          '--config.model.width=32', '--config.model.depth=2', '--config.model.num_heads=2',
          '--config.model.text_width=32', '--config.model.text_heads=2', '--config.model.patch_size=4',
          f'--config.data.dir={data_dir}', '--config.data.num_train_examples=256',
          '--config.data.num_validation_examples=16', '--config.data.num_eval_prompts=12',
          f'--config.train.num_steps={STEPS}', '--config.train.batch_size=8', '--config.train.warmup_steps=5',
          '--config.train.log_every=1', '--config.train.checkpoint_every=5', '--config.train.sample_every=0',
          '--config.train.final_sample=False', '--config.mesh.data=1', '--config.sample.num_steps=2',
          '--noprogress']


def _losses(workdir):
  recs = [json.loads(l) for l in (Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['loss'], r['grad_norm']) for r in recs]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('resume')
  a, b = root / 'runs' / 'shapes_tiny', root / 'b'   # a: the default workdir ./runs/<experiment name>
  # Run a uses the default config file (experiments/shapes_tiny.py) and workdir; b names them.
  full = subprocess.run(_train_args(None, 'data'), cwd=root, env=_env(root), capture_output=True, text=True,
                        timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  b_args = _train_args('b', 'data')
  b_args.insert(4, f'--config={REPO / "experiments" / "shapes_tiny.py"}')  # before the overrides

  with open(root / 'killed_run.log', 'w') as log:
    proc = subprocess.Popen(b_args, cwd=root, env=_env(root), stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    metrics = b / 'metrics.jsonl'
    while time.time() < deadline and proc.poll() is None:
      # Kill once a checkpoint is committed (its step directory exists; an async save in progress is a
      # temporary directory) and the run has gone on past it.
      ckpt_dir = b / 'checkpoints'
      done = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.exists() else []
      if done and metrics.exists() and len(metrics.read_text().splitlines()) > max(done) + 1:
        break
      time.sleep(0.05)
    assert proc.poll() is None, 'the run ended before it could be killed'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  killed_at = len(metrics.read_text().splitlines())
  resumed = subprocess.run(b_args, cwd=root, env=_env(root), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return dict(root=root, a=a, b=b, full=full, resumed=resumed, killed_at=killed_at)


def test_killed_and_resumed_run_logs_the_same_losses(runs):
  assert 'resuming shapes_tiny from checkpoint step' in runs['resumed'].stdout
  assert runs['killed_at'] < STEPS
  la, lb = _losses(runs['a']), _losses(runs['b'])
  assert [s for s, *_ in la] == list(range(1, STEPS + 1))
  assert la == lb  # step, loss and grad norm, bit for bit (JSON floats round-trip exactly)
  assert np.isfinite([l for _, l, _ in la]).all()
  assert 'done: shapes_tiny' in runs['full'].stdout and 'done: shapes_tiny' in runs['resumed'].stdout
  ckpts = sorted(int(p.name) for p in (runs['b'] / 'checkpoints').iterdir() if p.name.isdigit())
  assert ckpts[-1] == STEPS and len(ckpts) <= 3
  cfg = json.loads((runs['b'] / 'config.json').read_text())
  assert cfg['train']['num_steps'] == STEPS and cfg['resolved_model']['width'] == 32
  assert list((runs['b'] / 'tensorboard').glob('events.out.tfevents.*'))


def test_sample_grid_from_workdir(runs):
  out = runs['root'] / 'grid.png'
  r = subprocess.run([sys.executable, '-m', 'ecdit.cli', 'sample', f'--workdir={runs["b"]}',
                      '--prompts=a red circle;two squares', f'--out={out}', '--steps=2'],
                     cwd=REPO, env=_env(runs['root']), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  from PIL import Image
  img = np.asarray(Image.open(out))
  assert img.ndim == 3 and img.shape[2] == 3 and img.shape[1] > 2 * 64
  assert f'from checkpoint step {STEPS}' in r.stdout


def test_restore_a_given_step(runs):
  import jax   # pylint: disable=import-outside-toplevel
  from ecdit.train import workdir as workdir_lib   # pylint: disable=import-outside-toplevel
  newest, older = workdir_lib.restore(runs['b']), workdir_lib.restore(runs['b'], step=STEPS - 5)
  assert (newest.step, older.step) == (STEPS, STEPS - 5)
  diffs = [float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(newest.params), jax.tree.leaves(older.params))]
  assert max(diffs) > 0   # five more updates
  kept = ', '.join(str(s) for s in (STEPS - 10, STEPS - 5, STEPS))
  with pytest.raises(workdir_lib.WorkdirError, match=rf'--step=7: .* has no checkpoint of step 7 \(steps there: {kept}\)'):
    workdir_lib.restore(runs['b'], step=7)
