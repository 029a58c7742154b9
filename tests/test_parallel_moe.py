"""Expert-parallel MoE (ecdit.layers.moe.parallel): the same parameters and batch give the same outputs, MoE
statistics, loss and gradients on one device and on 8 simulated devices in several (data, fsdp, expert, model)
meshes — for the MoE layer alone and for the whole model under `jax.jit` with the rules' shardings — plus a
guard on the compiled HLO (all-to-all count, no all-gather of routing-group activations or router probabilities,
bounded collective counts on the (1, 2, 2, 2) mesh).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ecdit.layers import moe
from ecdit.models import ecdit as ecdit_lib
from ecdit.config.model import ModelConfig
from ecdit.config.sizes import preset
from ecdit.parallel import AXES, batch_sharding, make_mesh, param_shardings, use_mesh
from ecdit.layers.moe import parallel as moe_parallel

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)

MESHES = [(8, 1, 1, 1), (2, 1, 4, 1), (1, 1, 8, 1), (1, 2, 2, 2)]
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def mesh_of(shape):
  if shape == (1, 1, 1, 1):
    return make_mesh(dict(zip(AXES, shape)), devices=jax.devices()[:1])
  return make_mesh(dict(zip(AXES, shape)))


def assert_trees_close(got, want):
  got, want = jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = want
    for k in path:
      w = w[k.key if hasattr(k, 'key') else k.idx]
    np.testing.assert_allclose(g, w, err_msg=jax.tree_util.keystr(path), **TOL)


# ---- the MoE layer alone ---------------------------------------------------------------------------------

B, S, D, E = 8, 16, 16, 8
LAYER = ModelConfig(width=D, num_heads=2, mlp_ratio=2, num_experts=E, capacity_factor=2.0, router_init_std=1.0)
LAYER_CASES = {
    'ec-gather-image': {},
    'ec-onehot-image': dict(moe_backend='onehot'),
    'ec-gather-group': dict(routing_scope='group', group_size=8),            # groups inside a device
    'ec-onehot-group-pooled': dict(moe_backend='onehot', routing_scope='group', group_size=64),  # spans devices
    'ec-gather-batch': dict(routing_scope='batch'),
    'tc-gather-image': dict(routing='token_choice', capacity_factor=0.5),
}
# Every case on two meshes (one with data and expert, one with all of fsdp/expert/model), the cheap ones on all.
LAYER_RUNS = [(c, m) for c in LAYER_CASES for m in MESHES
              if m in ((2, 1, 4, 1), (1, 2, 2, 2)) or c in ('ec-gather-image', 'ec-gather-batch', 'tc-gather-image')]


@functools.lru_cache(maxsize=None)
def layer_setup(case):
  cfg = dataclasses.replace(LAYER, **LAYER_CASES[case])
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = nn.unbox(moe.MoEFFN(cfg).init(jax.random.key(1), x, train=True)['params'])
  return cfg, x, params


@functools.lru_cache(maxsize=None)
def layer_result(case, shape):
  """(loss, (y, stats), grads) of a squared-output loss (plus the balance loss) on mesh `shape`."""
  cfg, x, params = layer_setup(case)

  def loss(p, x):
    y, col = moe.MoEFFN(cfg).apply({'params': p}, x, train=True, mutable=['moe_stats', 'losses'])
    aux = sum(jnp.sum(a) for a in jax.tree.leaves(col.get('losses', {})))
    return jnp.mean(jnp.square(y)) + aux, (y, col['moe_stats'])

  with use_mesh(mesh_of(shape)):
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
  return jax.device_get((value, aux, grads))


@pytest.mark.parametrize('case,shape', LAYER_RUNS, ids=[f'{c}-{m}' for c, m in LAYER_RUNS])
def test_layer_matches_single_device(case, shape):
  assert_trees_close(layer_result(case, shape), layer_result(case, (1, 1, 1, 1)))


def test_layer_takes_the_sharded_path():
  cfg, x, params = layer_setup('ec-gather-image')
  fn = jax.jit(lambda p, x: moe.MoEFFN(cfg).apply({'params': p}, x, train=True))
  assert 'all-to-all' not in fn.lower(params, x).compile().as_text()
  with use_mesh(mesh_of((2, 1, 4, 1))):
    assert moe_parallel.active_mesh() is not None
    assert 'all-to-all' in fn.lower(params, x).compile().as_text()
  with use_mesh(mesh_of((1, 1, 1, 1))):
    assert moe_parallel.active_mesh() is None        # one device: the single-device code


def test_layer_errors_name_the_numbers():
  cfg, x, params = layer_setup('ec-gather-image')
  with use_mesh(mesh_of((2, 1, 4, 1))):
    with pytest.raises(ValueError, match=r'batch size 4 is not divisible by mesh data·fsdp·expert=8'):
      jax.jit(lambda p, x: moe.MoEFFN(cfg).apply({'params': p}, x, train=True))(params, x[:4])
  cfg12 = dataclasses.replace(cfg, routing_scope='group', group_size=12)
  with use_mesh(mesh_of((8, 1, 1, 1))):
    with pytest.raises(ValueError, match=r'group_size=12 .* = 16'):
      jax.jit(lambda p, x: moe.MoEFFN(cfg12).apply({'params': p}, x, train=True))(params, x)


# ---- the whole model under jit with the rules' shardings --------------------------------------------------

# 'tiny' with 8 experts and 12×12 images (36 tokens per image: a number no parameter dimension has, so the
# HLO guard can recognise activations along a routing group's token axis).
MODEL = ModelConfig(**dict(preset('tiny'), num_experts=8, image_size=12, router_init_std=0.5))
TOKENS = MODEL.num_tokens
MODEL_CASES = {
    'ec-gather-image': {},
    'ec-onehot-group': dict(moe_backend='onehot', routing_scope='group', group_size=18),
    'ec-gather-batch': dict(routing_scope='batch'),
    'tc': dict(routing='token_choice', capacity_factor=1.0, top_k=2),
    'dense': dict(routing='dense'),
}
# Compiling the model takes seconds per mesh on 2 shared cores, so the model level runs every routing once on
# the data×expert mesh the HLO guard also reads, and EC and TC on the mesh with all of fsdp/expert/model too;
# the layer tests above cover every backend and scope, and the pure data and pure expert meshes.
MODEL_RUNS = ([(c, (2, 1, 4, 1)) for c in MODEL_CASES] + [(c, (1, 2, 2, 2)) for c in ('ec-gather-image', 'tc')])


@functools.lru_cache(maxsize=None)
def model_setup(case):
  cfg = dataclasses.replace(MODEL, **MODEL_CASES[case])
  model = ecdit_lib.build_model(cfg)
  boxed = jax.jit(lambda k: ecdit_lib.init_params(model, k))(jax.random.key(0))
  k = jax.random.split(jax.random.key(1), 4)
  batch = (jax.random.normal(k[0], (8, 12, 12, 3)), jax.random.uniform(k[1], (8,)),
           jax.random.randint(k[2], (8, 8), 0, cfg.vocab_size), jnp.arange(8)[None, :] <= jnp.arange(8)[:, None],
           jax.random.normal(k[3], (8, 12, 12, 3)))
  return model, boxed, batch


def model_loss(model, params, x, t, text, mask, target):
  v, col = model.apply({'params': params}, x, t, text, mask, train=True, mutable=['moe_stats', 'losses'])
  return jnp.mean(jnp.square(v - target)) + sum(jnp.sum(a) for a in jax.tree.leaves(col.get('losses', {})))


@functools.lru_cache(maxsize=None)
def compiled_model_step(case, shape):
  """The loss+grad, jitted with the rules' in/out shardings and compiled under `use_mesh`, with its inputs
  placed on the mesh: `(compiled, params, batch)`. Shared by the equivalence tests and the HLO guard."""
  model, boxed, batch = model_setup(case)
  mesh = mesh_of(shape)
  psh, bsh = param_shardings(boxed, mesh), batch_sharding(mesh)
  fn = jax.jit(jax.value_and_grad(functools.partial(model_loss, model)),
               in_shardings=(psh,) + (bsh,) * len(batch), out_shardings=(NamedSharding(mesh, P()), psh))
  params, batch = jax.device_put(nn.unbox(boxed), psh), jax.device_put(batch, bsh)
  with use_mesh(mesh):
    return fn.lower(params, *batch).compile(), params, batch


@functools.lru_cache(maxsize=None)
def model_result(case, shape):
  if shape == (1, 1, 1, 1):   # the reference: plain jit on one device
    model, boxed, batch = model_setup(case)
    return jax.device_get(jax.jit(jax.value_and_grad(functools.partial(model_loss, model)))(nn.unbox(boxed),
                                                                                              *batch))
  compiled, params, batch = compiled_model_step(case, shape)
  return jax.device_get(compiled(params, *batch))


@pytest.mark.parametrize('case,shape', MODEL_RUNS, ids=[f'{c}-{m}' for c, m in MODEL_RUNS])
def test_model_loss_and_grads_match_single_device(case, shape):
  got, want = model_result(case, shape), model_result(case, (1, 1, 1, 1))
  assert_trees_close(got, want)


def collectives(hlo: str) -> dict[str, list[str]]:
  """Collective instructions of a compiled module by kind (async '-start' forms counted once)."""
  kinds = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')
  out = {k: [] for k in kinds}
  for line in hlo.splitlines():
    for k in kinds:
      if re.search(rf'\s{k}(-start)?\(', line):
        out[k].append(line.strip())
  return out


def result_shapes(line: str) -> list[tuple[int, ...]]:
  """Shapes of an HLO instruction's result (one, or several for a tuple)."""
  result_type = re.split(r'\s(?:all-gather|all-to-all|all-reduce|reduce-scatter)(?:-start)?\(', line.split('=', 1)[1])[0]
  return [tuple(int(d) for d in dims.split(',') if d) for dims in re.findall(r'\w+\[([\d,]*)\]', result_type)]


@pytest.mark.parametrize('case', ['ec-gather-image', 'ec-onehot-group', 'tc'])
def test_hlo_guard(case):
  compiled, params, _ = compiled_model_step(case, (2, 1, 4, 1))
  ops = collectives(compiled.as_text())
  moe_layers = sum(MODEL.is_sparse_block(i) for i in range(MODEL.depth))
  # Dispatch and return, forward and backward: 4 all-to-alls per MoE layer, no more.
  assert len(ops['all-to-all']) == 4 * moe_layers, ops['all-to-all']
  param_shapes = {tuple(a.shape) for a in jax.tree.leaves(params)}
  for line in ops['all-gather']:
    for shape in result_shapes(line):
      # Router probabilities [G, S, E] / activations [G, S, d]: any all-gather along a routing group's token
      # axis would show that axis; only (FSDP/expert-sharded) parameters may be gathered.
      assert TOKENS not in shape, line
      assert shape in param_shapes, line


# Collectives of the loss+grad on the (data, fsdp, expert, model) = (1, 2, 2, 2) mesh. With every activation
# pinned to its layout (text states, timestep embedding, q/k/v and attention outputs, adaLN outputs), what
# remains is the MoE all-to-alls, FSDP weight gathers, tensor-parallel reductions and a few weight moves.
# Before those constraints: 21 all-to-alls, 112 all-gathers, 43 all-reduces and 42 collective-permutes, from
# XLA resharding the text states at every cross-attention ("involuntary full rematerialization").
FULL_MESH_BOUNDS = {'all-gather': 88, 'all-reduce': 28, 'collective-permute': 10, 'reduce-scatter': 0}


@pytest.mark.parametrize('case', ['ec-gather-image', 'tc'])
def test_hlo_guard_fsdp_expert_model_mesh(case):
  compiled, _, _ = compiled_model_step(case, (1, 2, 2, 2))
  counts = {k: len(v) for k, v in collectives(compiled.as_text()).items()}
  moe_layers = sum(MODEL.is_sparse_block(i) for i in range(MODEL.depth))
  assert counts['all-to-all'] == 4 * moe_layers, counts
  for kind, bound in FULL_MESH_BOUNDS.items():
    assert counts[kind] <= bound, (kind, counts)
