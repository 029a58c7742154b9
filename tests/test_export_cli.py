"""`ecdit export` and `ecdit upcycle` end to end on a tiny workdir (commands run in subprocesses)."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from _train_util import tiny_config
from cli_util import run_cli, snapshot

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)


@pytest.fixture(scope='module')
def dense_workdir(tmp_path_factory):
  """A workdir as `ecdit train` leaves it (config.json + one checkpoint), without training: the step-0 state
  with perturbed params, so the exported model computes something non-trivial."""
  from ecdit.train import checkpoint as ckpt_lib
  from ecdit.config import experiment as config_lib
  from ecdit.train import loop
  root = tmp_path_factory.mktemp('dense')
  workdir = root / 'run'
  workdir.mkdir()
  cfg = tiny_config()
  cfg.model.routing = 'dense'
  tok = root / 'tok.model'
  tok.write_bytes(b'not a real sentencepiece model; the safetensors export only copies it')
  cfg.data.tokenizer_path = str(tok)
  mcfg = config_lib.validate(cfg)
  setup = loop.build(cfg, mcfg)
  state = setup.init_state()
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  state = state.replace(params=params, ema_params=jax.tree.map(lambda p: 0.5 * p, params))
  resolved = loop.resolved_config(cfg, mcfg)
  (workdir / 'config.json').write_text(json.dumps(resolved, indent=2, sort_keys=True) + '\n')
  ck = ckpt_lib.Checkpointer(workdir, use_async=False)
  ck.save(5, state.replace(step=state.step + 5), {'version': 1, 'step': 5}, resolved)
  ck.close()
  return workdir, mcfg, nn.unbox(params), nn.unbox(state.ema_params)


def test_export_safetensors_from_workdir(dense_workdir, tmp_path):
  from ecdit.export import load_jax
  workdir, mcfg, params, ema = dense_workdir
  run_cli('export', f'--workdir={workdir}', f'--out={tmp_path}', '--ema', check=True)
  assert {p.name for p in tmp_path.iterdir()} == {'model.safetensors', 'config.json', 'README.md',
                                                  'tokenizer.model'}
  conf = json.loads((tmp_path / 'config.json').read_text())
  assert conf['routing'] == 'dense' and conf['source']['step'] == 5 and conf['source']['ema'] is True
  assert conf['tokenizer'] == 'tokenizer.model'
  fn = load_jax(tmp_path)
  assert fn.config == mcfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fn.params, ema)


def test_export_stablehlo_from_workdir(dense_workdir, tmp_path):
  from ecdit.export import load_jax, load_stablehlo
  from ecdit.export import weights
  workdir, mcfg, params, _ = dense_workdir
  run_cli('export', f'--workdir={workdir}', f'--out={tmp_path}', '--format=stablehlo', '--platforms=cpu',
          '--steps=2', check=True)
  art = load_stablehlo(tmp_path)
  weights.write_export(tmp_path / 'st', params, mcfg)
  ref = load_jax(tmp_path / 'st')
  rng = np.random.default_rng(0)
  for b in (1, 2):
    x = rng.standard_normal((b, mcfg.image_size, mcfg.image_size, mcfg.in_channels)).astype(np.float32)
    t = rng.uniform(size=(b,)).astype(np.float32)
    ids = rng.integers(1, mcfg.vocab_size, (b, mcfg.text_length)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    np.testing.assert_allclose(np.asarray(art.velocity(x, t, ids, mask)), np.asarray(ref(x, t, ids, mask)),
                               rtol=1e-5, atol=1e-6)


def test_upcycle_command(dense_workdir, tmp_path):
  from ecdit.train import workdir as workdir_lib
  workdir, mcfg, params, _ = dense_workdir
  out = tmp_path / 'moe'
  proc = run_cli('upcycle', f'--workdir={workdir}', f'--out={out}', '--num_experts=3', '--noema', check=True)
  assert '--config.model.routing=expert_choice --config.model.num_experts=3' in proc.stdout
  run = workdir_lib.restore(out)
  assert run.step == 0 and run.model_config.num_experts == 3 and run.model_config.routing == 'expert_choice'
  assert run.data_state['step'] == 0
  assert json.loads((out / 'upcycled_from.json').read_text())['step'] == 5
  sparse = [i for i in range(mcfg.depth) if run.model_config.is_sparse_block(i)]
  assert sparse
  for i in sparse:
    moe, ffn = run.params[f'block_{i}']['moe'], params[f'block_{i}']['ffn']
    for e in range(3):
      np.testing.assert_array_equal(np.asarray(moe['wo'][e]), np.asarray(ffn['wo']['kernel']))
  np.testing.assert_array_equal(np.asarray(run.params['final']['proj']['kernel']),
                                np.asarray(params['final']['proj']['kernel']))


def test_export_errors_are_one_line(tmp_path, dense_workdir):
  workdir = dense_workdir[0]
  before = snapshot(workdir)   # --out=<the run itself> would have replaced its config.json
  proc = run_cli('export', f'--workdir={workdir}', f'--out={workdir}')
  assert proc.returncode == 2 and f'--out={workdir} is inside the ecdit run {workdir}' in proc.stderr
  assert 'Traceback' not in proc.stderr and snapshot(workdir) == before
  proc = run_cli('export', f'--workdir={tmp_path / "nope"}', f'--out={tmp_path / "o"}')
  assert proc.returncode == 2
  assert 'no config.json there' in proc.stderr and 'Traceback' not in proc.stderr
  proc = run_cli('export', f'--out={tmp_path / "o"}')
  assert proc.returncode == 2 and '--workdir is required' in proc.stderr
