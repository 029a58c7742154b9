"""The train step on a device mesh (ecdit.parallel wired into ecdit.train): the same parameters and batch give
the same loss, gradients and MoE statistics on one device and on 8 simulated devices; optimizer-state shardings
follow the parameters'; a checkpoint written on one mesh restores onto another."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ecdit.parallel import AXES, batch_sharding, replicated
from ecdit.train import checkpoint as ckpt_lib
from ecdit.train import loop

from _train_util import Batches, tiny_config

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)

TOL = dict(rtol=1e-5, atol=1e-5)
MESHES = [(2, 1, 4, 1), (1, 2, 2, 2)]


def grad_probe_config(shape, **model):
  """tiny_config whose first update is a smooth, nearly linear function of the gradient: RMSProp with eps=1
  and lr=1 (update = -g / sqrt(0.001·g² + 1)), no clipping. Comparing updates compares gradients."""
  c = tiny_config(optimizer='rmsprop', learning_rate=1.0, eps=1.0, grad_clip=0.0, momentum=0.0)
  for axis, size in zip(AXES, shape):
    c.mesh[axis] = size
  for k, v in model.items():
    c.model[k] = v
  return c


@functools.lru_cache(maxsize=None)
def setup_of(shape):
  cfg = grad_probe_config(shape)
  return loop.build(cfg, devices=jax.devices()[:int(np.prod(shape))], strict=True)


@functools.lru_cache(maxsize=None)
def one_step(shape):
  """(metrics, update = params after − params before) of the first step, on host."""
  s = setup_of(shape)
  state = s.init_state()
  before = jax.device_get(state.params)
  batch = next(Batches(s.cfg, batch_sharding(s.mesh)))
  state, metrics = s.train_step(state, batch)
  after = jax.device_get(state.params)
  assert s.train_step._cache_size() == 1
  return jax.device_get(metrics), jax.tree.map(lambda a, b: a - b, after, before)


@pytest.mark.parametrize('shape', MESHES, ids=str)
def test_train_step_matches_single_device(shape):
  got_m, got_u = one_step(shape)
  want_m, want_u = one_step((1, 1, 1, 1))
  assert bool(got_m['finite']) and bool(want_m['finite'])
  assert set(got_m) == set(want_m) and any(k.startswith('moe/') for k in got_m)
  for k in want_m:
    np.testing.assert_allclose(got_m[k], want_m[k], err_msg=k, **TOL)
  assert max(float(np.max(np.abs(u))) for u in jax.tree.leaves(want_u)) > 1e-2   # not trivially zero
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_u), jax.tree.leaves(want_u)):
    np.testing.assert_allclose(g, w, err_msg=jax.tree_util.keystr(path), **TOL)


def test_state_shardings_follow_the_rules():
  s = setup_of((1, 2, 2, 2))
  sh = s.state_shardings
  params_by_path = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(sh.params)}
  assert sh.params['block_1']['moe']['wi'].spec == P('expert', 'fsdp', 'model')
  # Optimizer state: every parameter-shaped leaf (RMSProp's nu, momentum) takes its parameter's sharding; the
  # rest (counts) is replicated.
  matched = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(sh.opt_state):
    key = jax.tree_util.keystr(path)
    owners = [p for p in params_by_path if key.endswith(p)]
    if owners:
      assert leaf == params_by_path[max(owners, key=len)], key
      matched += 1
    else:
      assert leaf == replicated(s.mesh), key
  assert matched >= len(params_by_path)
  # The initialised state really lies that way (an expert weight's moment is split over 'expert').
  state = s.init_state()
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(sh)):
    assert got.sharding == want
  nu = [l for p, l in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if jax.tree_util.keystr(p).endswith("['block_1']['moe']['wi']")]
  assert nu and nu[0].addressable_shards[0].data.shape == (2, 16, 64)   # [4/2 experts, 32/2, 128/2]


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  src, dst = setup_of((2, 1, 4, 1)), setup_of((8, 1, 1, 1))
  state = src.init_state()
  ck = ckpt_lib.Checkpointer(tmp_path, use_async=False)
  ck.save(0, state, {'i': 0}, {})
  ck.close()
  for target in (dst,):
    ck = ckpt_lib.Checkpointer(tmp_path, use_async=False)
    restored, _, step = ck.restore_latest(target.abstract_state)
    ck.close()
    assert step == 0
    for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target.state_shardings)):
      assert got.sharding == sh
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_mesh_errors_before_compiling():
  cfg = grad_probe_config((2, 1, 4, 1))
  with pytest.raises(ValueError, match=r'devices'):
    loop.build(cfg, devices=jax.devices()[:4], strict=True)
  cfg = grad_probe_config((1, 1, 8, 1))
  with pytest.raises(ValueError, match=r'model.num_experts=4 is not divisible by mesh expert=8'):
    loop.build(cfg, strict=True)
  cfg = grad_probe_config((8, 1, 1, 1))
  cfg.train.batch_size = 12
  with pytest.raises(ValueError, match=r'global batch size=12 is not divisible by mesh data·fsdp·expert=8'):
    loop.build(cfg, strict=True)
  # Restoring for sampling/export adapts the run's mesh to the devices at hand instead.
  assert loop.build(grad_probe_config((2, 1, 4, 1)), devices=jax.devices()[:2]).mesh.shape['data'] == 2


def test_startup_line_names_backend_mesh_and_size():
  from ecdit.models import params as params_lib
  s = setup_of((2, 1, 4, 1))
  line = loop.startup_line(s, 'runs/x')
  assert '8 cpu device(s) (cpu) in 1 process(es); mesh data=2 fsdp=1 expert=4 model=1;' in line
  # the train state's parameters, counted from the model's abstract init (ecdit params' path)
  assert f"{params_lib.count(s.mcfg)['total'] / 1e6:.2f}M parameters" in line and line.endswith('workdir runs/x')
