"""Export: the safetensors name table, PyTorch parity, JAX round trip, StableHLO, upcycling, bad input.

The library-level tests run in this process; the `ecdit export` / `ecdit upcycle` commands are exercised in
tests/test_export_cli.py through subprocesses. PyTorch tests skip when torch is not installed
(`pip install -e .[torch]`).
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ecdit.export import weights
from ecdit.export.jax_model import load_jax
from ecdit.config.model import ModelConfig
from ecdit.models.ecdit import abstract_params, build_model, init_params

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)

TOL = 1e-5


def make_cfg(**overrides) -> ModelConfig:
  base = ModelConfig.from_dict({'size': 'tiny'})
  return dataclasses.replace(base, **overrides).validate()


CONFIGS = {
    'ec_image': dict(routing='expert_choice', routing_scope='image', capacity_factor=2.0),
    'ec_group': dict(routing='expert_choice', routing_scope='group', group_size=8, capacity_factor=1.0),
    'token_choice': dict(routing='token_choice', top_k=2, capacity_factor=1.0),
    'dense': dict(routing='dense'),
}


def random_params(cfg: ModelConfig, seed: int = 0):
  """Initialised params with every leaf perturbed (the zero-initialised adaLN, cross-attention output and
  final layers included), so the velocity is not trivially zero."""
  params = nn.unbox(init_params(build_model(cfg), jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [l + 0.05 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def random_inputs(cfg: ModelConfig, b: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
  t = rng.uniform(0, 1, (b,)).astype(np.float32)
  ids = rng.integers(1, cfg.vocab_size, (b, cfg.text_length)).astype(np.int32)
  mask = np.ones((b, cfg.text_length), bool)
  mask[0, 5:] = False          # padded caption
  mask[-1, :] = False          # empty caption: cross-attention contributes nothing
  ids[~mask] = 0
  return x, t, ids, mask


def jax_velocity(cfg, params, x, t, ids, mask):
  """The original model's velocity, jitted (as load_jax's callable is, so the two compile the same program)."""
  model = build_model(cfg)
  fn = jax.jit(lambda p, x, t, ids, mask: model.apply({'params': p}, x, t, ids, mask, train=False))
  return np.asarray(fn(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ids), jnp.asarray(mask)))


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope='module', params=list(CONFIGS))
def exported(request, tmp_path_factory):
  cfg = make_cfg(**CONFIGS[request.param])
  params = random_params(cfg)
  out = tmp_path_factory.mktemp(request.param)
  weights.write_export(out, params, cfg)
  return request.param, cfg, params, out


# ---- the name table -----------------------------------------------------------------------------------

@pytest.mark.parametrize('overrides', list(CONFIGS.values()) + [dict(text_encoder='precomputed')])
def test_name_table_covers_every_param_once(overrides):
  cfg = make_cfg(**overrides)
  paths = set(traverse_util.flatten_dict(nn.unbox(abstract_params(build_model(cfg)))))
  table = weights.name_table(cfg)
  assert {e.jax_path for e in table} == paths
  assert len({e.name for e in table}) == len(table)


def test_export_files_and_layout(exported):
  name, cfg, params, out = exported
  umask = os.umask(0)
  os.umask(umask)
  for f in ('model.safetensors', 'config.json', 'README.md'):   # safetensors alone would write 0600
    assert (out / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
  conf = json.loads((out / 'config.json').read_text())
  for k in ('image_size', 'in_channels', 'patch_size', 'text_length', 'vocab_size', 'routing', 'num_experts'):
    assert conf[k] == getattr(cfg, k)
  assert ModelConfig.from_dict(conf['model']) == cfg
  readme = (out / 'README.md').read_text()
  tensors = weights.read_tensors(out)
  assert all(f'`{n}`' in readme for n in tensors)
  np.testing.assert_array_equal(tensors['blocks.0.self_attn.query.weight'],
                                np.asarray(params['block_0']['self_attn']['query']['kernel']).T)
  if name != 'dense':
    wi = tensors['blocks.1.moe.wi.weight']
    assert wi.shape == (cfg.num_experts, cfg.mlp_ratio * cfg.width, cfg.width)
    np.testing.assert_array_equal(wi[2], np.asarray(params['block_1']['moe']['wi'][2]).T)
    assert tensors['blocks.1.moe.router.weight'].shape == (cfg.num_experts, cfg.width)


# ---- JAX round trip -----------------------------------------------------------------------------------

def test_load_jax_round_trip_is_bit_exact(exported):
  _, cfg, params, out = exported
  fn = load_jax(out)
  assert fn.config == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fn.params, params)
  x, t, ids, mask = random_inputs(cfg)
  np.testing.assert_array_equal(np.asarray(fn(x, t, ids, mask)), jax_velocity(cfg, params, x, t, ids, mask))
  # The default mask is `ids != 0`.
  np.testing.assert_array_equal(np.asarray(fn(x, t, ids)), np.asarray(fn(x, t, ids, ids != 0)))


# ---- PyTorch parity -----------------------------------------------------------------------------------

def test_torch_parity(exported):
  torch = pytest.importorskip('torch', reason='torch is not installed (pip install -e .[torch])')
  from ecdit.export import torch_reference
  _, cfg, params, out = exported
  model = torch_reference.load_model(out)
  x, t, ids, mask = random_inputs(cfg)
  ref = jax_velocity(cfg, params, x, t, ids, mask)
  assert np.max(np.abs(ref)) > 1e-2
  with torch.no_grad():
    got = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
  assert got.shape == ref.shape
  assert rel_err(got, ref) <= TOL, rel_err(got, ref)


def test_torch_routing_plans_match_jax_with_ties():
  torch = pytest.importorskip('torch', reason='torch is not installed (pip install -e .[torch])')
  from ecdit.export import torch_reference
  from ecdit.layers import routing
  rng = np.random.default_rng(0)
  # Probabilities drawn from a few values, so many ties within each expert's column and each token's row.
  probs = rng.choice(np.array([0.1, 0.2, 0.3], np.float32), size=(3, 16, 4))
  gate, index = routing.expert_choice(jnp.asarray(probs), 5)
  tgate, tindex = torch_reference.expert_choice_plan(torch.from_numpy(probs), 5)
  np.testing.assert_array_equal(tindex.numpy(), np.asarray(index))
  np.testing.assert_array_equal(tgate.numpy(), np.asarray(gate))
  gate, index, valid, _ = routing.token_choice(jnp.asarray(probs), 2, 6)
  tgate, tindex, tvalid = torch_reference.token_choice_plan(torch.from_numpy(probs), 2, 6)
  np.testing.assert_array_equal(tvalid.numpy(), np.asarray(valid))
  np.testing.assert_array_equal(tindex.numpy(), np.asarray(index))
  np.testing.assert_array_equal(tgate.numpy(), np.asarray(gate))


def test_torch_reference_imports_no_jax(tmp_path):
  pytest.importorskip('torch', reason='torch is not installed (pip install -e .[torch])')
  import subprocess
  import sys
  code = ('import sys; import ecdit.export.torch_reference; '
          'bad = [m for m in sys.modules if m == "jax" or m.startswith(("jax.", "flax"))]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


# ---- StableHLO ----------------------------------------------------------------------------------------

def test_stablehlo_reloads_and_matches_at_any_batch(tmp_path):
  from ecdit.diffusion.sampler import integrate
  from ecdit.export.stablehlo import load_stablehlo, write_stablehlo
  cfg = make_cfg(**CONFIGS['ec_image'])
  params = random_params(cfg)
  null_ids, null_mask = np.zeros((1, cfg.text_length), np.int32), np.zeros((1, cfg.text_length), bool)
  null_ids[0, 0], null_mask[0, 0] = 2, True
  write_stablehlo(tmp_path, params, cfg, num_steps=2, cfg_scale=3.0, platforms=('cpu',),
                  null_caption=(null_ids, null_mask))
  art = load_stablehlo(tmp_path)
  assert art.config['stablehlo']['num_steps'] == 2
  model = build_model(cfg)
  for b in (1, 3):
    x, t, ids, mask = random_inputs(cfg, b=b, seed=b)
    ref = jax_velocity(cfg, params, x, t, ids, mask)
    got = np.asarray(art.velocity(x, t, ids, mask))
    assert got.shape == ref.shape and rel_err(got, ref) <= 1e-6
    apply_fn = lambda p, *a: model.apply({'params': p}, *a, train=False)  # noqa: E731
    want = jnp.clip(integrate(apply_fn, params, jnp.asarray(x), ids, mask, null_ids, null_mask, num_steps=2,
                              cfg_scale=3.0), -1, 1)
    got = np.asarray(art.sample(x, ids, mask))   # the stored null caption
    assert got.shape == x.shape and rel_err(got, want) <= 1e-5


def test_stablehlo_refuses_batch_scope(tmp_path):
  from ecdit.export.stablehlo import write_stablehlo
  cfg = make_cfg(routing_scope='batch')
  with pytest.raises(weights.ExportError, match="routing_scope='batch'"):
    write_stablehlo(tmp_path, random_params(cfg), cfg, num_steps=1, cfg_scale=1.0, platforms=('cpu',))


def test_stablehlo_platforms_are_checked_first():
  from ecdit.export.stablehlo import check_platforms
  check_platforms(['cpu', 'cuda'])
  for bad in (['quantum'], ['cpu', 'gpu'], []):
    with pytest.raises(weights.ExportError, match=r"^--platforms=.* is invalid: expected one or more of \['cpu'"):
      check_platforms(bad)


def test_stablehlo_missing_file(tmp_path):
  from ecdit.export.stablehlo import load_stablehlo
  with pytest.raises(weights.ExportError, match='config.json is missing'):
    load_stablehlo(tmp_path)


# ---- upcycling ----------------------------------------------------------------------------------------

def test_upcycled_model_equals_dense_when_every_expert_takes_every_token():
  from ecdit.export.upcycle import upcycle_params
  dense_cfg = make_cfg(routing='dense')
  moe_cfg = make_cfg(routing='expert_choice', num_experts=4, capacity_factor=4.0)  # C = S: all tokens
  dense = random_params(dense_cfg)
  moe = upcycle_params(dense, dense_cfg, moe_cfg, jax.random.key(7))
  for e in range(4):
    np.testing.assert_array_equal(np.asarray(moe['block_1']['moe']['wi'][e]),
                                  np.asarray(dense['block_1']['ffn']['wi']['kernel']))
  np.testing.assert_array_equal(np.asarray(moe['block_0']['ffn']['wo']['bias']),
                                np.asarray(dense['block_0']['ffn']['wo']['bias']))
  assert float(jnp.std(moe['block_1']['moe']['router'])) > 0   # freshly initialised router
  x, t, ids, mask = random_inputs(dense_cfg)
  ref = jax_velocity(dense_cfg, dense, x, t, ids, mask)
  got = jax_velocity(moe_cfg, moe, x, t, ids, mask)
  assert rel_err(got, ref) <= 1e-5
  # With fewer slots than tokens the two differ: the check above is not vacuous.
  small = dataclasses.replace(moe_cfg, capacity_factor=1.0)
  assert rel_err(jax_velocity(small, moe, x, t, ids, mask), ref) > 1e-3


def test_upcycle_rejects_architecture_change():
  from ecdit.export.upcycle import upcycle_params
  dense_cfg = make_cfg(routing='dense')
  with pytest.raises(ValueError, match='model.width'):
    upcycle_params(random_params(dense_cfg), dense_cfg, make_cfg(width=64), jax.random.key(0))


def test_upcycle_refuses_a_non_dense_source_or_bad_target_from_the_config_alone():
  """`ecdit upcycle` hands check_source to workdir.restore as `require`: refused before a checkpoint is read."""
  from ecdit.config import experiment as config_lib
  from ecdit.export.upcycle import check_source
  from _train_util import tiny_config
  cfg = tiny_config()
  cfg.model.routing = 'dense'
  check_source(cfg, config_lib.validate(cfg), {'routing': 'expert_choice', 'num_experts': 4})
  assert cfg.model.routing == 'dense'   # the run's config is left as it was
  with pytest.raises(ValueError, match=r"num_experts=0 is invalid"):
    check_source(cfg, config_lib.validate(cfg), {'routing': 'expert_choice', 'num_experts': 0})
  ec = tiny_config()
  with pytest.raises(ValueError, match=r"^upcycle: the source run has model.routing='expert_choice'; expected a "
                                       r"dense run"):
    check_source(ec, config_lib.validate(ec), {'routing': 'expert_choice', 'num_experts': 4})


# ---- bad input ----------------------------------------------------------------------------------------

def _loaders():
  """(load function, its error type) for JAX, and for PyTorch when installed."""
  yield load_jax, weights.ExportError
  try:
    import torch  # noqa: F401
  except ImportError:
    return
  from ecdit.export import torch_reference
  yield torch_reference.load_model, torch_reference.ExportError


@pytest.fixture(scope='module')
def ec_base(tmp_path_factory):
  cfg = make_cfg(**CONFIGS['ec_image'])
  out = tmp_path_factory.mktemp('ec_base')
  weights.write_export(out, random_params(cfg), cfg)
  return cfg, out


@pytest.fixture
def ec_export(ec_base, tmp_path):
  """A private copy of an exported EC model directory that a test may damage."""
  import shutil
  cfg, out = ec_base
  shutil.copytree(out, tmp_path / 'x')
  return cfg, tmp_path / 'x'


@pytest.mark.parametrize('missing', ['config.json', 'model.safetensors'])
def test_missing_files(ec_export, missing):
  _, d = ec_export
  (d / missing).unlink()
  for load, error in _loaders():
    with pytest.raises(error, match=f'{missing} is missing'):
      load(d)


def test_tensor_shape_mismatch_names_the_tensor(ec_export):
  import safetensors.numpy
  _, d = ec_export
  tensors = weights.read_tensors(d)
  tensors['blocks.1.moe.wo.weight'] = tensors['blocks.1.moe.wo.weight'][:3]
  safetensors.numpy.save_file(tensors, str(d / 'model.safetensors'))
  for load, error in _loaders():
    with pytest.raises(error, match=r"tensor 'blocks\.1\.moe\.wo\.weight' has shape \[3, "):
      load(d)


def test_missing_tensor_is_named(ec_export):
  import safetensors.numpy
  _, d = ec_export
  tensors = weights.read_tensors(d)
  del tensors['blocks.0.cross_attn.key.bias']
  safetensors.numpy.save_file(tensors, str(d / 'model.safetensors'))
  for load, error in _loaders():
    with pytest.raises(error, match=r"missing tensor 'blocks\.0\.cross_attn\.key\.bias'"):
      load(d)


# Both loaders check depth, width and experts on the file's header first (weights.check_header,
# ecdit_torch.ecdit_reference.check_config), then every tensor; either message names the mismatch.
@pytest.mark.parametrize('change, match', [
    (dict(num_experts=8), r"tensor 'blocks\.1\.moe\.router\.weight' has shape \[4, 32\], but config.json implies "
                          r'\[8, 32\]|model\.num_experts=8, but the weights hold num_experts=4;'),
    (dict(routing='dense'), r"missing tensor 'blocks\.1\.ffn\.wi\.weight'"),
    (dict(depth=1), r"unexpected tensor\(s\) \['blocks\.1\.|model\.depth=1, but the weights hold depth=2;"),
])
def test_config_weights_mismatch_names_the_tensor(ec_export, change, match):
  _, d = ec_export
  conf = json.loads((d / 'config.json').read_text())
  conf['model'].update(change)
  for k in change:
    conf.pop(k, None)
  (d / 'config.json').write_text(json.dumps(conf))
  for load, error in _loaders():
    with pytest.raises(error, match=match):
      load(d)


def test_top_level_config_must_agree_with_model(ec_export):
  _, d = ec_export
  conf = json.loads((d / 'config.json').read_text())
  conf['num_experts'] = 16
  (d / 'config.json').write_text(json.dumps(conf))
  with pytest.raises(weights.ExportError, match='top-level num_experts=16 disagrees with model.num_experts=4'):
    load_jax(d)


@pytest.mark.parametrize('key,value', [('depth', 200000), ('width', 32768), ('num_experts', 16)])
def test_config_sizes_disagreeing_with_the_weights_fail_before_building(ec_export, key, value):
  """Both loaders read the header's sizes first: a config.json saying depth=200000 used to hang load_jax tracing
  it, and width=32768 made the torch loader allocate ~25 GB."""
  cfg, out = ec_export
  conf = json.loads((out / 'config.json').read_text())
  conf['model'][key] = value
  if key in conf:
    conf[key] = value                      # the top-level copy (read_config checks the two agree)
  if key == 'width':
    conf['model']['text_width'] = value    # keeps the config itself valid (heads divide it)
  (out / 'config.json').write_text(json.dumps(conf))
  for load, error in _loaders():
    with pytest.raises(error, match=rf"model.{key}={value}, but the weights hold {key}={getattr(cfg, key)};"):
      load(out)
