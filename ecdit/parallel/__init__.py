"""Scale-out: the device mesh, the logical-axis rules and the divisibility checks; meshes and rules, not models
(the expert-parallel MoE layer is ecdit.layers.moe.parallel).

For a training or inference step:

  mesh = make_mesh(cfg.mesh)                                    # axes data, fsdp, expert, model
  check_fits(model_cfg, mesh, global_batch)                     # ecdit.models.ecdit → check_divisibility
  param_sh = param_shardings(abstract_params(model), mesh)      # from the boxed (nn.Partitioned) tree
  batch_sh = batch_sharding(mesh)
  step = jax.jit(step_fn, in_shardings=(param_sh, batch_sh, ...), out_shardings=...)
  with use_mesh(mesh):                                          # = jax.set_mesh + flax logical rules
    out = step(params, batch, ...)

`use_mesh` must surround the *call* (tracing happens there): the MoE layers see the mesh and run
expert-parallel in shard_map, and the model's `nn.with_logical_constraint`s resolve through LOGICAL_RULES.
"""
from __future__ import annotations

import contextlib

import jax

from ecdit.parallel.checks import check_divisibility, require_divisible
from ecdit.parallel.mesh import AXES, BATCH_AXES, batch_shards, default_mesh_config, fit_mesh, make_mesh
from ecdit.parallel.rules import (LOGICAL_RULES, activation_rules, batch_sharding, batch_spec, logical_to_spec,
                                  opt_state_shardings, param_shardings, param_specs, replicated, shard_params)


@contextlib.contextmanager
def use_mesh(mesh):
  """`jax.set_mesh(mesh)` and the flax logical-axis rules together."""
  with jax.set_mesh(mesh), activation_rules():
    yield mesh


__all__ = ['AXES', 'BATCH_AXES', 'LOGICAL_RULES', 'activation_rules', 'batch_shards', 'batch_sharding',
           'batch_spec', 'check_divisibility', 'default_mesh_config', 'fit_mesh', 'logical_to_spec', 'make_mesh',
           'opt_state_shardings', 'param_shardings', 'param_specs', 'replicated', 'require_divisible', 'shard_params', 'use_mesh']
