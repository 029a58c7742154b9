"""`ecdit analyze` (ecdit.eval.routing.analysis over ecdit.eval.routing): routing recorded while sampling, its
summaries, fg/bg on hand-made masks, textual importance, and the command end to end on a tiny workdir (in a
subprocess)."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _train_util import Tokens, tiny_config
from cli_util import run_cli
from ecdit.config.model import ModelConfig
from ecdit.data import shapes
from ecdit.diffusion import flow
from ecdit.eval.routing import collect, heatmap, scenes, summary, textual

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)


def _perturb(params, key, scale=0.2):
  """Random values on top of every parameter, so the zero-initialised adaLN, cross-attention output and
  final layers do something and routing depends on t and on the text."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _tiny_cfg():
  cfg = tiny_config()
  cfg.model.moe_every = 1          # both blocks sparse: two MoE layers
  return cfg


@pytest.fixture(scope='module')
def tiny():
  from ecdit.models.ecdit import build_model, init_params
  from ecdit.config import experiment as config_lib
  mcfg = config_lib.validate(_tiny_cfg())
  model = build_model(mcfg)
  params = _perturb(nn.unbox(init_params(model, jax.random.key(0))), jax.random.key(1))
  return mcfg, model, params


def test_sampling_records_routing_shapes_and_exact_group_totals(tiny):
  from ecdit.diffusion import sampler as sampler_lib
  mcfg, model, params = tiny
  tok = Tokens(mcfg.text_length)
  ids, mask = tok.encode_batch(['a red circle', 'two squares'])
  null_ids, null_mask = tok.encode_batch([''])
  args = [jnp.asarray(a) for a in (ids, mask, null_ids, null_mask)]
  images, ts, states, counts = collect.sample_with_routing(model, params, *args, num_steps=3, cfg_scale=2.0,
                                                           method='heun', seed=5)
  s, e = mcfg.num_tokens, mcfg.num_experts
  assert images.shape == (2, 16, 16, 3) and states.shape == (3, 2, 16, 16, 3)
  assert counts.shape == (3, 2, 2, s) and counts.dtype == np.int32      # [T, layers, B, S]
  np.testing.assert_allclose(ts, [1.0, 2 / 3, 1 / 3], atol=1e-6)
  assert collect.moe_layer_names(mcfg) == ['block_0', 'block_1']
  cap = mcfg.capacity_for(s, train=False)
  # expert choice: every expert takes exactly C tokens of each routing group (one image here)
  np.testing.assert_array_equal(summary.group_totals(counts, mcfg), np.full((3, 2, 2), e * cap))
  assert counts.min() >= 0 and counts.max() <= e
  assert len(np.unique(counts)) > 1, 'routing is trivial; the perturbed model should spread its experts'
  # the library sampler's own trajectory (same noise, grid, guidance and Heun update)
  ref = sampler_lib.make_sampler(model, image_shape=(16, 16, 3), num_steps=3, cfg_scale=2.0, method='heun')
  np.testing.assert_array_equal(images, np.asarray(ref(params, *args, 5)))
  np.testing.assert_array_equal(states[0], np.asarray(sampler_lib.initial_noise(5, 2, (16, 16, 3))))
  # counts are the first model call's of each step: at x_t = states[k], t = ts[k], the conditional text
  fn = collect.routing_fn(model)
  for k in range(3):
    _, want = fn(params, jnp.asarray(states[k]), jnp.full((2,), ts[k]), args[0], args[1])
    np.testing.assert_array_equal(counts[k], np.asarray(want))
  res = summary.summarize(counts, e, collect.moe_layer_names(mcfg), ts)
  assert np.isclose(sum(res['histogram']), 1.0)
  assert np.isclose(res['mean'], e * cap / s)          # mean experts per token = E·C/S exactly
  layer = res['layers']['block_1']
  assert len(layer['zero_fraction_per_t']) == 3 and len(layer['histogram']) == e + 1
  assert np.isclose(layer['zero_fraction'], np.mean(counts[:, 1] == 0))


def test_group_totals_for_group_and_batch_scopes():
  counts = np.arange(2 * 8).reshape(1, 2, 8)        # [layers=1, B=2, S=8]
  c = ModelConfig(routing_scope='group', group_size=4)
  np.testing.assert_array_equal(summary.group_totals(counts, c), [[0 + 1 + 2 + 3, 22, 38, 54]])
  c = ModelConfig(routing_scope='batch')
  np.testing.assert_array_equal(summary.group_totals(counts, c), [[120]])


def test_token_fraction_and_fg_bg_exact_on_hand_made_mask():
  mask = np.zeros((8, 8), bool)
  mask[0:4, 0:4] = True      # token 0 full
  mask[0:2, 4:8] = True      # token 1 half
  mask[4, 4] = True          # token 3: one pixel of 16
  frac = scenes.token_fraction(mask, 4)
  np.testing.assert_allclose(frac, [1.0, 0.5, 0.0, 1 / 16])
  fg, bg = scenes.fg_bg_tokens(frac, 0.5)
  np.testing.assert_array_equal(fg, [True, True, False, False])
  np.testing.assert_array_equal(bg, [False, False, True, False])
  counts = np.array([[3, 1, 1, 4], [2, 2, 0, 0]])     # two steps; token 3 is an edge token, ignored
  r = summary.foreground_background(counts, fg, bg)
  assert r['fg_mean'] == pytest.approx((3 + 1 + 2 + 2) / 4) and r['bg_mean'] == pytest.approx(0.5)
  assert r['ratio'] == pytest.approx(4.0) and (r['fg_tokens'], r['bg_tokens']) == (4, 2)
  none = summary.foreground_background(counts, np.zeros(4, bool), bg)
  assert none['fg_mean'] is None and none['ratio'] is None
  # [N, H, W] object masks are merged
  np.testing.assert_allclose(scenes.token_fraction(np.stack([mask, ~mask]), 4), 1.0)
  with pytest.raises(ValueError, match='patch size'):
    scenes.token_fraction(np.zeros((6, 6), bool), 4)
  # scenes are noised with the training interpolation: x_t = t·ε + (1 − t)·x0
  x0, eps = np.ones((2, 2, 2, 3), np.float32), np.zeros((2, 2, 2, 3), np.float32)
  np.testing.assert_allclose(flow.interpolate(x0, eps, np.array([1.0, 0.25]))[:, 0, 0, 0], [0.0, 0.75])


def test_textual_importance_zero_for_padding_nonnegative_otherwise(tiny):
  mcfg, model, params = tiny
  fn = collect.routing_fn(model)
  ids, mask = Tokens(mcfg.text_length).encode_batch(['a red circle'])
  ids, mask = ids[0], mask[0]
  n_real = int(mask.sum())
  states = np.asarray(jax.random.normal(jax.random.key(2), (2, 16, 16, 3)))
  ts = np.array([0.9, 0.4], np.float32)
  positions = [0, 1, 4, n_real, mcfg.text_length - 1]            # 3 real characters, 2 padding slots
  variants = [textual.drop_token(ids, mask, j) for j in positions]
  assert (variants[3][0] == ids).all() and (variants[3][1] == mask).all()
  res = textual.textual_importance(fn, params, states, ts, ids, mask, variants)
  assert len(res) == 5 and all(len(r['l1_per_layer']) == 2 for r in res)
  for r in res[3:]:
    assert r['l1'] == 0.0 and r['changed_fraction'] == 0.0
  for r in res[:3]:
    assert r['l1'] >= 0.0 and 0.0 <= r['changed_fraction'] <= 1.0
  assert max(r['l1'] for r in res[:3]) > 0.0, 'dropping a real token never moved routing'
  assert summary.routing_change(np.array([1, 2]), np.array([1, 0])) == {'l1': 1.0, 'changed_fraction': 0.5}
  assert textual.drop_word('a red circle', 1) == 'a circle'


def test_record_from_prompt_matches_shapes_captions():
  for i in range(60):
    meta = shapes.split_example(3, 'train', i).metadata
    rec = scenes.record_from_prompt(meta['prompt'])
    assert rec is not None, meta['prompt']
    assert rec['tag'] == meta['tag'] and rec['include'] == meta['include'], (meta, rec)
  assert scenes.record_from_prompt('two green triangles')['include'] == [
      {'class': 'triangle', 'count': 2, 'color': 'green'}]
  assert scenes.record_from_prompt('a photo of a cat') is None
  assert scenes.record_from_prompt('a pink circle') is None


def test_heatmap_png(tmp_path):
  from PIL import Image
  maps = np.random.default_rng(0).integers(0, 5, (2, 3, 4, 4))
  img = np.zeros((16, 16, 3), np.uint8)
  p = heatmap.heatmap_png(tmp_path / 'h.png', img, maps, num_experts=4, row_labels=['a', 'b'],
                          col_labels=['1', '2', '3'], cell=32)
  w, h = Image.open(p).size
  assert w >= 64 + 4 * 34 and h >= 30 + 2 * 34
  np.testing.assert_array_equal(heatmap.colorize(np.array([0, 4]), 4), [[68, 1, 84], [253, 231, 37]])


def test_dense_model_is_refused():
  from ecdit.models.ecdit import build_model
  from ecdit.config import experiment as config_lib
  cfg = tiny_config()
  cfg.model.routing = 'dense'
  with pytest.raises(ValueError, match='no MoE layers'):
    collect.routing_fn(build_model(config_lib.validate(cfg)))


# ---------------------------------------------------------------------------------------------- CLI

def _write_workdir(root, cfg, step=3):
  """config.json + one checkpoint of the perturbed step-0 state, as `ecdit train` leaves a workdir."""
  from ecdit.train import checkpoint as ckpt_lib
  from ecdit.config import experiment as config_lib
  from ecdit.train import loop
  workdir = root / 'run'
  workdir.mkdir()
  mcfg = config_lib.validate(cfg)
  setup = loop.build(cfg, mcfg)
  state = setup.init_state()
  params = _perturb(state.params, jax.random.key(7))
  state = state.replace(params=params, ema_params=params, step=state.step + step)
  resolved = loop.resolved_config(cfg, mcfg)
  (workdir / 'config.json').write_text(json.dumps(resolved, indent=2, sort_keys=True) + '\n')
  ck = ckpt_lib.Checkpointer(workdir, use_async=False)
  ck.save(step, state, {'version': 1, 'step': step}, resolved)
  ck.close()
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from ecdit.data import tokenizer as T
  root = tmp_path_factory.mktemp('analyze')
  captions = [shapes.split_example(0, 'train', i).caption for i in range(600)]
  tok = T.train_sentencepiece(captions, 96, root / 'tok.model')
  cfg = _tiny_cfg()
  cfg.data.tokenizer_path = str(tok)
  cfg.data.vocab_size = cfg.model.vocab_size = 96
  return _write_workdir(root, cfg)


def test_cli_end_to_end(workdir, tmp_path):
  out = tmp_path / 'an'
  proc = run_cli('analyze', f'--workdir={workdir}', '--prompts=a red circle;a blue square to the left of a circle',
                 '--steps=2', '--scenes=1', f'--out={out}', '--cfg_scale=2', check=True)
  res = json.loads((out / 'analysis.json').read_text())
  assert res['step'] == 3 and res['moe_layers'] == ['block_0', 'block_1'] and len(res['timesteps']) == 2
  assert len(res['prompts']) == 2
  e, s = res['num_experts'], res['tokens']
  for p in res['prompts']:
    for name in ('sample_png', 'routing_png', 'scene_png'):
      assert (out / p[name]).is_file(), p[name]
    maps = np.array(p['experts_per_token'])                      # [layers, T, g, g]
    assert maps.shape == (2, 2, 4, 4)
    np.testing.assert_array_equal(maps.reshape(2, 2, s).sum(-1), e * res['capacity'])
    assert p['fg_bg']['fg_tokens'] > 0 and p['fg_bg']['bg_tokens'] > 0 and p['fg_bg']['ratio'] > 0
    words = p['prompt'].split()
    assert [r['word'] for r in p['textual_importance']] == words
    assert all(r['l1'] >= 0 for r in p['textual_importance'])
  assert len(res['fg_bg']['per_t']) == 2 and set(res['fg_bg']['per_layer']) == {'block_0', 'block_1'}
  assert np.isclose(sum(res['summary']['histogram']), 1.0)
  assert 'ratio' in proc.stdout and 'analysis.json' in proc.stdout


def test_cli_bad_input_is_one_clear_line(workdir, tmp_path):
  import shutil
  no_ck = tmp_path / 'no_ck'
  no_ck.mkdir()
  shutil.copy(workdir / 'config.json', no_ck / 'config.json')
  dense = tmp_path / 'dense'
  (dense / 'checkpoints' / '3').mkdir(parents=True)
  d = json.loads((workdir / 'config.json').read_text())
  d['model']['routing'] = 'dense'
  (dense / 'config.json').write_text(json.dumps(d))
  for args, needle in [
      ([f'--workdir={tmp_path / "missing"}'], str(tmp_path / 'missing')),
      ([f'--workdir={no_ck}'], str(no_ck / 'checkpoints')),
      ([f'--workdir={dense}'], 'no MoE layers'),
      ([], '--workdir is required'),
      ([f'--workdir={workdir}', '--steps=0'], '--steps'),
      ([f'--workdir={workdir}', f'--prompts={tmp_path / "p.jsonl"}'], 'p.jsonl'),
  ]:
    proc = run_cli('analyze', *args)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
