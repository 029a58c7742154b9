"""The scanned block stack (model.scan_layers) and rematerialisation (train.remat): with the same weights
(moved between layouts by ecdit.models.stack) the scanned model gives the unrolled model's loss, gradients and
MoE statistics — under every remat policy, for expert choice, token choice and dense, on one device and
expert-parallel on 8 simulated devices."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ecdit.config.model import ModelConfig
from ecdit.config.sizes import preset
from ecdit.models import ecdit as ecdit_lib
from ecdit.models import stack
from ecdit.parallel import AXES, batch_sharding, make_mesh, param_shardings, use_mesh

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)

BASE = ModelConfig(**dict(preset('tiny'), depth=4, num_experts=8, image_size=12, router_init_std=0.5))
CASES = {'ec': {}, 'tc': dict(routing='token_choice', capacity_factor=1.0, top_k=2), 'dense': dict(routing='dense')}
REL = 1e-6


def cfg_of(case, scan):
  return dataclasses.replace(BASE, scan_layers=scan, **CASES[case])


@functools.lru_cache(maxsize=None)
def weights(case):
  """Unrolled parameters with every leaf perturbed (fresh adaLN-Zero blocks are the identity, whose gradients
  would say little), and a batch."""
  model = ecdit_lib.build_model(cfg_of(case, False))
  params = nn.unbox(ecdit_lib.init_params(model, 0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  k = jax.random.split(jax.random.key(1), 4)
  batch = (jax.random.normal(k[0], (8, 12, 12, 3)), jax.random.uniform(k[1], (8,)),
           jax.random.randint(k[2], (8, 8), 0, BASE.vocab_size), jnp.arange(8)[None, :] <= jnp.arange(8)[:, None],
           jax.random.normal(k[3], (8, 12, 12, 3)))
  return params, batch


def loss_fn(model, params, x, t, text, mask, target):
  v, col = model.apply({'params': params}, x, t, text, mask, train=True, mutable=['moe_stats', 'losses'])
  loss = jnp.mean(jnp.square(v - target)) + sum(jnp.sum(a) for a in jax.tree.leaves(col.get('losses', {})))
  return loss, col.get('moe_stats', {})


def result(case, scan, remat='none', mesh_shape=None):
  """(loss, unrolled moe_stats, unrolled grads) on host."""
  cfg = cfg_of(case, scan)
  model = ecdit_lib.build_model(cfg, remat)
  params, batch = weights(case)
  params = stack.to_scanned(params, cfg) if scan else params
  fn = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)
  if mesh_shape is None:
    (loss, stats), grads = jax.jit(fn)(params, *batch)
  else:
    mesh = make_mesh(dict(zip(AXES, mesh_shape)))
    psh, bsh = param_shardings(ecdit_lib.abstract_params(model), mesh), batch_sharding(mesh)
    with use_mesh(mesh):
      (loss, stats), grads = jax.jit(fn, in_shardings=(psh,) + (bsh,) * len(batch))(
          jax.device_put(params, psh), *jax.device_put(batch, bsh))
  loss, stats, grads = jax.device_get((loss, stats, grads))
  if scan:
    stats, grads = stack.to_unrolled(stats, cfg), stack.to_unrolled(grads, cfg)
  return loss, stats, grads


def assert_close(got, want, rtol):
  """Relative to each leaf's largest value. A key bias shifts every attention logit of a query equally, so its
  true gradient is zero and both sides hold rounding noise: those leaves must only be tiny."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  top = max((float(np.max(np.abs(w))) for w in jax.tree.leaves(want)), default=0.0)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    if jax.tree_util.keystr(path).endswith("['key']['bias']"):
      assert float(np.max(np.abs(g))) <= 1e-5 * top
      continue
    scale = max(float(np.max(np.abs(w))), 1e-30)
    err = float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))) / scale
    assert err <= rtol, f'{jax.tree_util.keystr(path)}: relative error {err:.2e} > {rtol:.0e}'


@functools.lru_cache(maxsize=None)
def unrolled(case):
  return result(case, False)


# Each routing once and each remat policy once (a compile of the loss+grad each): the policies only change
# what the backward pass recomputes, never the numbers.
@pytest.mark.parametrize('case,remat', [('ec', 'none'), ('ec', 'save_moe'), ('tc', 'full'), ('dense', 'dots')])
def test_scanned_equals_unrolled_on_one_device(case, remat):
  got, want = result(case, True, remat), unrolled(case)
  assert abs(float(got[0]) - float(want[0])) <= REL * abs(float(want[0]))
  assert_close(got[1], want[1], REL)   # sown statistics, per block again
  assert_close(got[2], want[2], REL)   # gradients
  assert any(np.max(np.abs(g)) > 0 for g in jax.tree.leaves(want[2]['block_0']))


@pytest.mark.parametrize('shape', [(2, 1, 4, 1), (1, 2, 2, 2)], ids=str)
def test_scanned_expert_parallel_equals_unrolled_single_device(shape):
  got, want = result('ec', True, 'save_moe', shape), unrolled('ec')
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert_close(got[1], want[1], 1e-5)
  assert_close(got[2], want[2], 1e-5)


def test_layouts_round_trip_and_stack_on_a_layers_axis():
  cfg = cfg_of('ec', True)
  params, _ = weights('ec')
  scanned = stack.to_scanned(params, cfg)
  assert stack.layout_of(scanned) == 'scanned' and stack.layout_of(params) == 'unrolled'
  assert set(scanned['blocks']) == {'block_0', 'block_1'}   # the unit: a dense block, then an MoE block
  # unit k, block j of the scanned stack is block u·k + j of the unrolled one
  np.testing.assert_array_equal(scanned['blocks']['block_1']['moe']['wi'][1], params['block_3']['moe']['wi'])
  back = stack.to_unrolled(scanned, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # the model's own scanned init has the converted tree's structure, and its partitioning names 'layers' first
  boxed = ecdit_lib.abstract_params(ecdit_lib.build_model(cfg))
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(scanned)
  assert boxed['blocks']['block_1']['moe']['wi'].names == ('layers', 'expert', 'embed', 'mlp')
  abstract = stack.to_unrolled(nn.unbox(boxed), cfg)   # abstract trees convert too (ShapeDtypeStructs)
  assert abstract['block_3']['moe']['wi'].shape == params['block_3']['moe']['wi'].shape


def test_bad_scan_and_remat_settings_fail_before_tracing():
  with pytest.raises(ValueError, match=r'model.depth=3 .*scan unit \(2 blocks'):
    dataclasses.replace(BASE, depth=3, scan_layers=True).validate()
  with pytest.raises(ValueError, match=r"train.remat='full' needs model.scan_layers=True"):
    ecdit_lib.build_model(cfg_of('ec', False), 'full')
  with pytest.raises(ValueError, match=r"train.remat='some' is invalid: expected one of \['none', 'full'"):
    ecdit_lib.build_model(cfg_of('ec', True), 'some')
  assert dataclasses.replace(BASE, depth=3, routing='dense', scan_layers=True).validate().scan_unit == 1


def test_resuming_with_the_other_layout_is_refused(tmp_path):
  from ecdit.config.experiment import ConfigError
  from ecdit.train import loop
  cfg = cfg_of('ec', True)
  (tmp_path / 'checkpoints' / '100').mkdir(parents=True)
  (tmp_path / 'config.json').write_text('{"resolved_model": {"scan_layers": false}}')
  before = (tmp_path / 'config.json').read_text()
  with pytest.raises(ConfigError, match=r'model.scan_layers=True does not match the checkpoints .*'
                                        r'--config.model.scan_layers=False'):
    loop.check_layout_matches_run(tmp_path, cfg)
  assert (tmp_path / 'config.json').read_text() == before
  loop.check_layout_matches_run(tmp_path, cfg_of('ec', False))   # the same layout resumes


def test_export_names_and_parameter_counts_do_not_depend_on_the_layout():
  from ecdit.export import weights as weights_lib
  from ecdit.models import params as params_lib
  scan_cfg = cfg_of('ec', True)
  params, _ = weights('ec')
  flat = weights_lib.export_params(params, cfg_of('ec', False))
  from_scanned = weights_lib.export_params(stack.to_scanned(params, scan_cfg), scan_cfg)
  assert sorted(flat) == sorted(from_scanned) and 'blocks.3.moe.wi.weight' in flat
  for k in flat:
    np.testing.assert_array_equal(flat[k], from_scanned[k])
  back = weights_lib.import_params(flat, scan_cfg)   # the file → the scanned layout
  np.testing.assert_array_equal(back['blocks']['block_1']['moe']['wi'][1], params['block_3']['moe']['wi'])
  assert params_lib.count(scan_cfg) == params_lib.count(cfg_of('ec', False))


def test_remat_also_recomputes_each_text_encoder_block():
  """Any policy but 'none' wraps the scanned unit and each of the text encoder's blocks in a checkpoint: the
  paper-size encoder (32 blocks) would otherwise keep most of a step's activations (docs/scale.md)."""
  cfg = dataclasses.replace(BASE, scan_layers=True, text_depth=3)
  batch = (jnp.zeros((2, 12, 12, 3)), jnp.zeros((2,)), jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool),
           jnp.zeros((2, 12, 12, 3)))

  def checkpoints(remat):
    model = ecdit_lib.build_model(cfg, remat)
    p = nn.unbox(jax.eval_shape(lambda: ecdit_lib.init_params(model, 0)))
    jaxpr = jax.make_jaxpr(lambda p: loss_fn(model, p, *batch)[0])(p)
    found = []

    def walk(jp):
      for eqn in jp.eqns:
        if eqn.primitive.name in ('checkpoint', 'remat2'):   # jax.checkpoint's primitive (named per version)
          found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jaxpr.jaxpr)
    return len(found)

  assert checkpoints('none') == 0, checkpoints('none')
  assert checkpoints('full') == 3 + 1, checkpoints('full')   # three text blocks, one scanned unit (traced once inside the scan)
  assert checkpoints('save_moe') == 3 + 1, checkpoints('save_moe')   # every policy, not only 'full'
