"""ecdit.parallel.mesh: mesh shapes from the config, errors naming both numbers; divisibility checks
(ecdit.parallel.checks, through ecdit.models.ecdit.check_fits)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType

from ecdit.config.model import ModelConfig
from ecdit.config.sizes import preset
from ecdit.models.ecdit import check_fits
from ecdit.parallel import AXES, check_divisibility, default_mesh_config, make_mesh

TINY = ModelConfig(**dict(preset('tiny'), num_experts=8))


def cfg(data=1, fsdp=1, expert=1, model=1):
  return dict(data=data, fsdp=fsdp, expert=expert, model=model)


@pytest.mark.parametrize('sizes,want', [((8, 1, 1, 1), (8, 1, 1, 1)), ((-1, 1, 4, 1), (2, 1, 4, 1)),
                                        ((1, 2, 2, -1), (1, 2, 2, 2)), ((1, 1, -1, 1), (1, 1, 8, 1))])
def test_make_mesh_shapes(sizes, want):
  mesh = make_mesh(cfg(*sizes))
  assert mesh.axis_names == AXES
  assert tuple(mesh.shape[a] for a in AXES) == want
  assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_on_given_devices():
  mesh = make_mesh(cfg(), devices=jax.devices()[:1])
  assert mesh.size == 1


def test_product_mismatch_names_both_numbers():
  with pytest.raises(ValueError, match=r'multiplies to 4 devices, but there are 8'):
    make_mesh(cfg(2, 1, 2, 1))
  with pytest.raises(ValueError, match=r'multiply to 3.*8 devices'):
    make_mesh(cfg(-1, 1, 3, 1))


@pytest.mark.parametrize('bad,match', [(cfg(-1, -1), 'at most one axis'), (cfg(0), r'mesh.data=0'),
                                       ({'data': 8}, 'mesh.fsdp is missing'), (cfg(expert=2.0), 'mesh.expert')])
def test_bad_mesh_config(bad, match):
  with pytest.raises(ValueError, match=match):
    make_mesh(bad)


def test_divisibility_ok():
  check_fits(TINY, make_mesh(cfg(1, 2, 2, 2)), global_batch=8)


@pytest.mark.parametrize('model_cfg,sizes,batch,match', [
    (dataclasses.replace(TINY, num_experts=6), (1, 1, 4, 2), 8, r'num_experts=6 is not divisible by mesh expert=4'),
    (TINY, (1, 1, 1, 8), 8, r'num_heads=2 is not divisible by mesh model=8'),
    (TINY, (2, 1, 4, 1), 12, r'global batch size=12 is not divisible by mesh data·fsdp·expert=8'),
    (dataclasses.replace(TINY, width=36, num_heads=2), (1, 8, 1, 1), 8, r'model.width=36 is not divisible by mesh fsdp=8'),
])
def test_divisibility_errors(model_cfg, sizes, batch, match):
  with pytest.raises(ValueError, match=match):
    check_fits(model_cfg, make_mesh(cfg(*sizes)), global_batch=batch)


def test_check_divisibility_from_given_numbers():
  """The parallel package checks numbers and abstract shapes it is handed; it knows no model."""
  mesh = make_mesh(cfg(1, 1, 2, 4))
  param = lambda shape: {'w': nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), ('expert', 'mlp'))}
  check_divisibility(mesh, [('x', 8, 'model'), ('y', 16, ('expert', 'model'))], global_batch=2, params=param((6, 8)))
  with pytest.raises(ValueError, match=r'^x=6 is not divisible by mesh model=4$'):
    check_divisibility(mesh, [('x', 6, 'model')])
  with pytest.raises(ValueError, match=r'^y=4 is not divisible by mesh expert·model=8$'):
    check_divisibility(mesh, [('y', 4, ('expert', 'model'))])
  with pytest.raises(ValueError, match=r'^global batch size=3 is not divisible by mesh data·fsdp·expert=2$'):
    check_divisibility(mesh, global_batch=3)
  with pytest.raises(ValueError, match=r'^parameter w dimension=5 is not divisible by mesh expert=2$'):
    check_divisibility(mesh, params=param((5, 8)))
  with pytest.raises(ValueError, match=r'^parameter w dimension=6 is not divisible by mesh model=4$'):
    check_divisibility(mesh, params=param((6, 6)))


def test_check_fits_routing_groups():
  """16 tokens per image, one image per device on (8, 1, 1, 1): groups of 8 or 16 stay local, 12 would straddle
  devices; on one device the groups must tile the batch's 16 tokens."""
  grouped = lambda g: dataclasses.replace(TINY, routing_scope='group', group_size=g)  # noqa: E731
  mesh8 = make_mesh(cfg(8, 1, 1, 1))
  check_fits(grouped(8), mesh8, global_batch=8)
  check_fits(grouped(16), mesh8, global_batch=8)
  with pytest.raises(ValueError, match=r'group_size=12 neither divides .* = 16\)'):
    check_fits(grouped(12), mesh8, global_batch=8)
  mesh1 = make_mesh(cfg(), devices=jax.devices()[:1])
  check_fits(grouped(16), mesh1, global_batch=1)
  with pytest.raises(ValueError, match=r'group_size=32 must divide .* = 1·16 = 16'):
    check_fits(grouped(32), mesh1, global_batch=1)


def test_default_mesh_config_cpu():
  assert default_mesh_config(8) == cfg(-1, 1, 1, 1)
  assert make_mesh(default_mesh_config(8)).shape['data'] == jax.device_count()
