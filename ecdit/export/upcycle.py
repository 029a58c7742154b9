"""Sparse upcycling: an EC-DiT (MoE) parameter set from a dense one.

`upcycle_params(dense_params, dense_cfg, moe_cfg, rng)` copies every parameter of the dense model, and for each
block that is sparse in `moe_cfg` copies that block's dense FFN (wi, wo with biases) into all E experts; the
routers are freshly initialised (the MoE model's own initialiser from `rng`). With a capacity that lets every
expert take every token (capacity factor = E for expert choice) the upcycled model computes exactly the dense
model's function up to float rounding, since the gates (router probabilities) sum to 1 over the experts.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ecdit.config import experiment as config_lib
from ecdit.config.model import ModelConfig
from ecdit.models import stack
from ecdit.models.ecdit import build_model, init_params
from ecdit.train import checkpoint as ckpt_lib
from ecdit.train import loop

# Fields that may differ between the dense source and the MoE target; every other field must match.
ROUTING_FIELDS = ('routing', 'num_experts', 'moe_every', 'capacity_factor', 'eval_capacity_factor',
                  'routing_scope', 'group_size', 'inference_group_size', 'moe_backend', 'top_k', 'aux_loss_weight',
                  'router_init_std')


def check_compatible(dense_cfg: ModelConfig, moe_cfg: ModelConfig) -> None:
  for f in dataclasses.fields(ModelConfig):
    if f.name not in ROUTING_FIELDS and getattr(dense_cfg, f.name) != getattr(moe_cfg, f.name):
      raise ValueError(f'upcycle: model.{f.name} differs between the dense model ({getattr(dense_cfg, f.name)!r}) '
                       f'and the MoE target ({getattr(moe_cfg, f.name)!r}); only routing fields may change: '
                       f'{list(ROUTING_FIELDS)}')
  if moe_cfg.routing == 'dense':
    raise ValueError("upcycle: the target model.routing is 'dense'; expected 'expert_choice' or 'token_choice'")


def check_source(cfg, dense_cfg: ModelConfig, overrides: dict) -> None:
  """From the run's config alone (before its checkpoint is read): the source is dense and `overrides` make a
  valid MoE target of it; ValueError otherwise."""
  if dense_cfg.routing != 'dense':
    raise ValueError(f'upcycle: the source run has model.routing={dense_cfg.routing!r}; expected a dense run '
                     "(model.routing='dense') whose FFNs are copied into the experts")
  target = cfg.copy_and_resolve_references()
  for k, v in overrides.items():
    target.model[k] = v
  check_compatible(dense_cfg, config_lib.validate(target))


def upcycle_params(dense_params, dense_cfg: ModelConfig, moe_cfg: ModelConfig, rng: jax.Array) -> dict:
  """Unboxed MoE params for `moe_cfg` from (boxed or unboxed) dense params of `dense_cfg` (either stack layout;
  the result has `moe_cfg`'s)."""
  check_compatible(dense_cfg, moe_cfg)
  src = traverse_util.flatten_dict(stack.to_unrolled(nn.unbox(dict(dense_params)), dense_cfg))
  fresh = traverse_util.flatten_dict(stack.to_unrolled(nn.unbox(init_params(build_model(moe_cfg), rng)), moe_cfg))
  out = {}
  for path, value in fresh.items():
    block = path[0]
    if len(path) >= 2 and path[1] == 'moe':
      ffn = lambda layer, leaf: src.get((block, 'ffn', layer, leaf))  # noqa: E731
      if ffn('wi', 'kernel') is None:
        raise ValueError(f'upcycle: {block} of the source model has no dense FFN ({block}/ffn) to copy into the '
                         'experts; is the source a dense model (model.routing=dense)?')
      copy = {'wi': ffn('wi', 'kernel'), 'bi': ffn('wi', 'bias'), 'wo': ffn('wo', 'kernel'), 'bo': ffn('wo', 'bias')}
      leaf = path[2]
      if leaf == 'router':
        out[path] = value
      else:
        e = moe_cfg.num_experts
        out[path] = jnp.broadcast_to(jnp.asarray(copy[leaf])[None], (e,) + tuple(copy[leaf].shape)).astype(
            value.dtype)
      continue
    if path not in src:
      raise ValueError(f'upcycle: parameter {"/".join(path)} is missing from the dense params')
    if tuple(src[path].shape) != tuple(value.shape):
      raise ValueError(f'upcycle: parameter {"/".join(path)} has shape {tuple(src[path].shape)} in the dense '
                       f'params, but the MoE model needs {tuple(value.shape)}')
    out[path] = jnp.asarray(src[path])
  out = traverse_util.unflatten_dict(out)
  return stack.to_scanned(out, moe_cfg) if moe_cfg.scan_layers else out


def upcycle_workdir(run, out: Path, overrides: dict, *, seed: int, source: dict) -> ModelConfig:
  """Writes `out` as a new workdir upcycled from `run` (a `train.workdir.restore` result): config.json (the
  run's config with `overrides` on its model section), upcycled_from.json (`source` + seed + overrides) and a
  step-0 checkpoint (fresh optimizer state, params = EMA params = the upcycled ones, the input pipeline's
  position reset to 0). Returns the new ModelConfig; a bad override raises ValueError before anything is
  written."""
  cfg = run.cfg
  for k, v in overrides.items():
    cfg.model[k] = v
  mcfg = config_lib.validate(cfg)
  params = upcycle_params(run.params, run.model_config, mcfg, jax.random.key(seed))

  setup = loop.build(cfg, mcfg)
  state = setup.init_state()
  boxed = jax.tree_util.tree_structure(state.params)
  new = jax.tree_util.tree_unflatten(boxed, jax.tree_util.tree_leaves(params))
  state = state.replace(params=new, ema_params=jax.tree.map(lambda x: x, new))
  data_state = dict(run.data_state) if isinstance(run.data_state, dict) else run.data_state
  if isinstance(data_state, dict) and 'step' in data_state:
    data_state['step'] = 0
  resolved = loop.resolved_config(cfg, mcfg)
  loop.write_run_config(out, resolved)
  # Provenance beside the config (config.json itself only holds schema keys).
  source = dict(source, seed=seed, overrides=overrides)
  (out / 'upcycled_from.json').write_text(json.dumps(source, indent=2, sort_keys=True) + '\n')
  ck = ckpt_lib.Checkpointer(out, keep=cfg.train.keep_checkpoints, use_async=False)
  try:
    ck.save(0, state, data_state, resolved)
  finally:
    ck.close()
  return mcfg
