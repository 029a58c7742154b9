"""A device mesh with axes (data, fsdp, expert, model) from the config's `mesh.*` sizes (-1 = the rest).

A stop-gap until the scale-out issue's `ecdit/parallel/mesh.py`: parameters stay replicated and only the
batch is sharded, over 'data'. A mesh smaller than the device count uses the first devices.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'expert', 'model')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_cfg[a]) for a in AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh: {num_devices} devices are not divisible by the fixed axes {dict(zip(AXES, sizes))}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices:
    raise ValueError(f'mesh: {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices; {num_devices} available')
  return tuple(sizes)


def build_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  used = np.array(devices[:math.prod(shape)]).reshape(shape)
  return Mesh(used, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over every data-parallel axis of this mesh."""
  return NamedSharding(mesh, P('data'))


def check_batch(batch_size: int, mesh: Mesh):
  n = mesh.shape['data']
  if batch_size % n:
    raise ValueError(f'train.batch_size={batch_size} is invalid: expected a multiple of mesh.data={n}')
