"""The device mesh: four named axes ('data', 'fsdp', 'expert', 'model'), built once from the real devices.

  mesh = make_mesh(cfg.mesh)            # {'data': -1, 'fsdp': 1, 'expert': 4, 'model': 1}; -1 = the rest

Whether a model and batch divide over it: `ecdit.parallel.checks` (given the numbers), called by
`ecdit.models.ecdit.check_fits` (which knows the model).

What each axis does (the table that maps names to axes is `ecdit.parallel.rules.LOGICAL_RULES`):
  data    pure data parallelism: the batch is split, every parameter is replicated.
  fsdp    the batch is split *and* large weights are split along their width ('embed'); XLA gathers a weight
          before it is used and reduce-scatters its gradient.
  expert  expert weights `[E, ...]` are split along E; outside MoE layers the axis is one more batch axis. Inside
          an MoE layer tokens reach their experts' devices by `all_to_all` (ecdit.layers.moe.parallel).
  model   tensor parallelism: FFN hidden ('mlp'), attention heads and adaLN outputs are split.

All axes are `AxisType.Auto` (jax.make_mesh's default is now Explicit, under which flax's logical constraints
fail; see shared/research/feasibility.md §2). Sizes of 1 are allowed; the batch is split over
data·fsdp·expert devices.

Per-accelerator defaults (`default_mesh_config`), used when an experiment does not pin the mesh:
  cpu  everything on 'data' (simulated CPU devices share the host's cores; no axis is faster than another).
  gpu  'expert' = the largest divisor of the expert count that fits in one host's GPUs (all-to-all stays on
       NVLink/NVSwitch); the rest on 'data'.
  tpu  'expert' = the largest divisor of the expert count that divides the device count (ICI carries the
       all-to-all well across a slice); the rest on 'fsdp' (weights and optimizer state split, as the paper's
       large models need).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ('data', 'fsdp', 'expert', 'model')
# Mesh axes that split the batch outside MoE layers (in this order: it is the order of the batch's split).
BATCH_AXES = ('data', 'fsdp', 'expert')


def _get(mesh_cfg: Any, axis: str):
  try:
    return mesh_cfg[axis]
  except (KeyError, TypeError):
    return getattr(mesh_cfg, axis)


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int, int]:
  """Sizes of (data, fsdp, expert, model) with the one −1 replaced by the rest of the devices.

  ValueError (naming the numbers) for a missing key, a size that is not a positive integer or −1, more than
  one −1, or a product that does not equal `num_devices`."""
  sizes = []
  for axis in AXES:
    try:
      v = _get(mesh_cfg, axis)
    except AttributeError:
      raise ValueError(f'mesh.{axis} is missing: the mesh config needs keys {list(AXES)}') from None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise ValueError(f'mesh.{axis}={v!r} is invalid: expected a positive integer or -1 (the rest of the devices)')
    sizes.append(int(v))
  free = [a for a, s in zip(AXES, sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {free} in {dict(zip(AXES, sizes))}')
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'mesh: the fixed axes {dict(zip(AXES, sizes))} multiply to {fixed}, which does not divide '
                       f'the {num_devices} devices, so mesh.{free[0]}=-1 cannot take the rest')
    sizes[AXES.index(free[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'mesh: {dict(zip(AXES, sizes))} multiplies to {fixed} devices, but there are {num_devices} '
                     'devices; make the product equal the device count (or set one axis to -1)')
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all of `jax.devices()`, every process's) with axes `AXES`, all Auto.

  Devices are laid out by `jax.experimental.mesh_utils.create_device_mesh` when all devices are used (it puts
  the innermost axes — 'model', then 'expert' — on the best-connected devices of a TPU/GPU topology), and in
  the given order otherwise."""
  all_devices = devices is None
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  grid = None
  if all_devices and devices[0].platform != 'cpu':
    try:
      from jax.experimental import mesh_utils
      grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001  (topology-aware layout is a nicety; fall back to the plain order)
      grid = None
  if grid is None:
    grid = np.array(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def fit_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh for programs that only load and run a trained model (sample, eval, export) in one process.

  The run's mesh config is kept when it fits these devices (default: this process's devices): exactly, or on
  the first N devices when its fixed axes need fewer. Otherwise (a checkpoint trained on more devices than
  there are here) every device goes on 'data'. Training uses `make_mesh`, which refuses a mismatch instead."""
  devices = list(jax.local_devices() if devices is None else devices)
  try:
    return make_mesh(mesh_cfg, devices)
  except ValueError:
    pass
  try:
    sizes = [int(_get(mesh_cfg, a)) for a in AXES]
  except (AttributeError, TypeError, ValueError):
    sizes = [-1]
  if -1 not in sizes and all(s >= 1 for s in sizes) and math.prod(sizes) < len(devices):
    return make_mesh(mesh_cfg, devices[:math.prod(sizes)])
  return make_mesh(dict(data=-1, fsdp=1, expert=1, model=1), devices)


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into: data·fsdp·expert."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def default_mesh_config(num_experts: int = 1, devices: Sequence[jax.Device] | None = None) -> dict[str, int]:
  """The per-accelerator default mesh config (see the module docstring)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  platform = devices[0].platform
  cfg = dict(data=-1, fsdp=1, expert=1, model=1)
  if platform == 'gpu':
    per_host = max(1, sum(d.process_index == devices[0].process_index for d in devices))
    cfg['expert'] = math.gcd(max(num_experts, 1), per_host)
  elif platform == 'tpu':
    cfg.update(data=1, fsdp=-1, expert=math.gcd(max(num_experts, 1), n))
  return cfg
