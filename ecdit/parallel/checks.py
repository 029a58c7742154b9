"""Will the mesh split these numbers evenly? Errors that name both numbers, before anything compiles.

  check_divisibility(mesh, named=[('model.num_heads', 8, 'model')], global_batch=256, params=abstract_boxed)

The parallel package knows meshes and the rules table, not models: the caller (ecdit.models.ecdit.check_fits)
says which model numbers go with which mesh axes and hands over the boxed abstract parameters.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

import flax.linen as nn
from flax import traverse_util
from jax.sharding import Mesh

from ecdit.parallel.mesh import BATCH_AXES
from ecdit.parallel.rules import param_specs


def host_memory_bytes() -> int | None:
  """This machine's physical memory in bytes (None where the OS does not say): the bound of a batch, an image
  count or an expert count that could never fit, refused before anything is allocated."""
  try:
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return None


def memory_shortfall(need: int, memory: int | None = None) -> str | None:
  """None if `need` bytes fit this machine's memory (or `memory`; unknown: they fit), else the words of an
  error's end: 'X GiB, more than this machine's Y GiB of memory'."""
  memory = host_memory_bytes() if memory is None else memory
  if not memory or need <= memory:
    return None
  return f"{need / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of memory"


def require_divisible(what: str, value: int, mesh_shape: Mapping[str, int], axes: str | Iterable[str]) -> None:
  """ValueError `'{what}={value} is not divisible by mesh {a·b}={n}'` unless the product of `axes` divides it."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  n = math.prod(mesh_shape.get(a, 1) for a in axes)
  if value % n:
    raise ValueError(f'{what}={value} is not divisible by mesh {"·".join(axes)}={n}')


def check_divisibility(mesh: Mesh, named: Iterable[tuple[str, int, Any]] = (), global_batch: int | None = None,
                       params: Any = None) -> None:
  """ValueError, naming both numbers, when `mesh` cannot split evenly, checked in this order:

    each `(what, value, mesh axes)` of `named`; the global batch by data·fsdp·expert; then every dimension
    of the boxed abstract parameter tree `params` (`nn.Partitioned` leaves of `jax.ShapeDtypeStruct`) by the
    mesh axes the rules table gives it, so a dimension the named checks missed is still reported with its
    parameter path."""
  shape = dict(mesh.shape)
  for what, value, axes in named:
    require_divisible(what, value, shape, axes)
  if global_batch is not None:
    require_divisible('global batch size', global_batch, shape, BATCH_AXES)
  if params is None:
    return
  flat_specs = traverse_util.flatten_dict(param_specs(params))
  flat_shapes = traverse_util.flatten_dict(nn.unbox(params))
  for path, spec in flat_specs.items():
    for dim, axes in zip(flat_shapes[path].shape, tuple(spec)):
      if axes is not None:
        require_divisible(f'parameter {"/".join(path)} dimension', dim, shape, axes)
