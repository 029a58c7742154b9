"""The EC-DiT model: text-conditioned latent DiT whose every `moe_every`-th FFN is a Mixture-of-Experts.

    velocity = ECDiT(cfg).apply({'params': p}, x, t, text, text_mask, train=..., keep_idx=None,
                                mutable=['moe_stats', 'losses'])

x NHWC `[B, H, W, C]`; t `[B]` in [0, 1]; text int32 ids `[B, L]` ('transformer') or float states
`[B, L, text_states_dim]` ('precomputed'); text_mask bool `[B, L]`, True = real token. Returns the velocity
`[B, H, W, C]`; with `keep_idx` int32 `[B, K]` (token masking), only the kept tokens (positions added first)
go through the blocks and the output is their predicted patches `[B, K, patch_dim]`.

Data path: patch embed + fixed 2-D sin-cos positions → (gather kept tokens) → blocks → final layer. The
timestep embedding conditions every block (adaLN-Zero); the text encoder's states are projected to the model
width once and read by every block's cross-attention.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ecdit.config.model import ModelConfig
from ecdit.layers import moe
from ecdit.layers.dense import logical_dense
from ecdit.layers.dit import FinalLayer, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from ecdit.models import stack
from ecdit.models.text import TextEncoder, text_states_dim
from ecdit.parallel.checks import check_divisibility


def check_inputs(cfg: ModelConfig, x, t, text, text_mask, keep_idx=None) -> None:
  """Shape/dtype checks against the config, before anything is traced into a computation."""
  def fail(name, got, want):
    raise ValueError(f'ECDiT input {name}: got shape {tuple(got)}, expected {want}')

  if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.image_size, cfg.image_size, cfg.in_channels):
    fail('x', x.shape, f'[B, {cfg.image_size}, {cfg.image_size}, {cfg.in_channels}] (NHWC, from model.image_size '
         'and model.in_channels)')
  b = x.shape[0]
  if tuple(t.shape) != (b,):
    fail('t', t.shape, f'[{b}] (one time in [0, 1] per image)')
  if cfg.text_encoder == 'transformer':
    if text.ndim != 2 or text.shape[0] != b or text.shape[1] > cfg.text_length:
      fail('text', text.shape, f'int ids [{b}, L] with L <= model.text_length={cfg.text_length} '
           "(model.text_encoder='transformer')")
    if not jnp.issubdtype(text.dtype, jnp.integer):
      raise ValueError(f"ECDiT input text: dtype {text.dtype}, expected integer token ids "
                       "(model.text_encoder='transformer'; use 'precomputed' for float states)")
  else:
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_states_dim:
      fail('text', text.shape, f'float states [{b}, L, {cfg.text_states_dim}] '
           "(model.text_encoder='precomputed', model.text_states_dim)")
  if tuple(text_mask.shape) != tuple(text.shape[:2]):
    fail('text_mask', text_mask.shape, f'{list(text.shape[:2])} (bool, True = real token)')
  if keep_idx is not None:
    if keep_idx.ndim != 2 or keep_idx.shape[0] != b or keep_idx.shape[1] > cfg.num_tokens:
      fail('keep_idx', keep_idx.shape, f'int [{b}, K] with K <= {cfg.num_tokens} tokens')


class ECDiT(nn.Module):
  config: ModelConfig
  remat: str = 'none'   # train.remat: a checkpoint policy for the scanned units (ecdit.models.stack)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, text: jax.Array, text_mask: jax.Array, *,
               train: bool = False, keep_idx: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    check_inputs(cfg, x, t, text, text_mask, keep_idx)
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    text_mask = text_mask.astype(bool)
    tokens = PatchEmbed(cfg.patch_size, cfg.width, dtype, pdtype, name='patch_embed')(x)       # [B, S, d]
    tokens = tokens + jnp.asarray(sincos_pos_embed_2d(cfg.width, cfg.grid_size), dtype)[None]
    if keep_idx is not None:                                                                   # [B, K, d]
      tokens = jnp.take_along_axis(tokens, keep_idx.astype(jnp.int32)[:, :, None], axis=1)
    tokens = nn.with_logical_constraint(tokens, ('batch', 'length', 'embed'))
    # Activations pinned to the batch layout (batch over data·fsdp·expert, features whole): without these,
    # XLA's propagation lets the FSDP split of the weights leak into the text states and the timestep
    # embedding, and reshards them at every cross-attention / adaLN (full rematerialisations).
    c = nn.with_logical_constraint(TimestepEmbedder(cfg.width, dtype, pdtype, name='t_embed')(t),
                                   ('batch', 'embed'))                                         # [B, d]
    states = TextEncoder(cfg, self.remat != 'none', name='text_encoder')(text, text_mask)      # [B, L, D]
    states = nn.with_logical_constraint(states, ('batch', 'length', 'text_embed'))
    text_proj = logical_dense(cfg.width, ('text_embed', 'embed'), 'text_proj', dtype, pdtype)
    ctx = nn.with_logical_constraint(text_proj(states), ('batch', 'length', 'embed'))           # [B, L, d]
    tokens = stack.run_blocks(cfg, self.remat, tokens, c, ctx, text_mask, train=train)         # [B, S, d]
    out = FinalLayer(cfg, name='final')(tokens, c)                                             # [B, S, p·p·C]
    if keep_idx is not None:
      return out
    return unpatchify(out, cfg.patch_size, cfg.grid_size, cfg.in_channels)                     # [B, H, W, C]


def as_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
  if isinstance(cfg, ModelConfig):
    return cfg.validate()
  if hasattr(cfg, 'to_dict'):   # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  return ModelConfig.from_dict(cfg)


def build_model(cfg: ModelConfig | Mapping[str, Any], remat: str = 'none') -> ECDiT:
  """ECDiT from a ModelConfig or a mapping (a ConfigDict's `model` section); validates first. `remat` is a
  train.remat policy (REMAT_POLICIES), checked here, before anything is traced."""
  cfg = as_config(cfg)
  stack.check_remat(cfg, remat)
  return ECDiT(cfg, remat)


def for_inference(model: ECDiT) -> ECDiT:
  """`model` as sampling and evaluation run it (`ModelConfig.for_inference`: the inference routing group
  size); the same module when that changes nothing, or when it is not an ECDiT (the samplers take any module
  with `apply`). Takes the same parameters."""
  if not isinstance(model, ECDiT):
    return model
  cfg = model.config.for_inference()
  return model if cfg is model.config else model.clone(config=cfg)


def dummy_inputs(cfg: ModelConfig, batch: int = 1) -> tuple[jax.Array, ...]:
  """Zero inputs of the right shapes/dtypes: (x, t, text, text_mask). Cheap; usable under jax.eval_shape."""
  x = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  if cfg.text_encoder == 'transformer':
    text = jnp.zeros((batch, cfg.text_length), jnp.int32)
  else:
    text = jnp.zeros((batch, cfg.text_length, text_states_dim(cfg)), jnp.float32)
  mask = jnp.ones((batch, cfg.text_length), bool)
  return x, t, text, mask


def params_key(seed: int) -> jax.Array:
  """The key the parameters of an experiment with `seed` are drawn from: split off the seed's key, so it is
  separate from the per-step keys (`fold_in(key(seed), step)`, ecdit.train.state.step_key)."""
  return jax.random.split(jax.random.key(seed))[1]


def init_params(model: ECDiT, seed: int | jax.Array, batch_size: int = 1):
  """Initialised parameters (the 'params' collection, boxed with logical axis metadata). `seed` is an
  experiment's integer seed (what training uses: one seed gives the same weights in train, bench and tests)
  or an explicit key."""
  key = params_key(seed) if isinstance(seed, int) else seed
  cfg = model.config
  if cfg.routing != 'dense' and cfg.routing_scope == 'group' and cfg.group_size > cfg.num_tokens:
    # Routing groups pooled over images: the dummy batch must hold whole groups (parameters do not depend
    # on the batch, only tracing does).
    batch_size = max(batch_size, math.lcm(cfg.group_size, cfg.num_tokens) // cfg.num_tokens)
  return model.init(key, *dummy_inputs(cfg, batch_size), train=False)['params']


def abstract_params(model: ECDiT, batch_size: int = 1):
  """`jax.ShapeDtypeStruct` tree of the parameters (boxed), nothing allocated."""
  return jax.eval_shape(lambda: init_params(model, 0, batch_size))


def check_fits(cfg: ModelConfig | Mapping[str, Any], mesh: Mesh, global_batch: int | None = None,
               tokens: int | None = None) -> None:
  """ValueError, naming both numbers, when `mesh` cannot split this model or the global batch evenly; cheap
  (abstract parameters only), so programs call it before anything compiles:

    experts (model.num_experts) by 'expert' and the FFN hidden width by 'model'; attention heads by 'model';
    the model width and the text width by 'fsdp'; the global batch by data·fsdp·expert; the MoE layer's split
    of the batch's routing groups over the devices (ecdit.layers.moe.layout) for `tokens` routed tokens per
    image (training with token masking routes the kept ones; default all); then every parameter dimension
    against the rules table, so a dimension missed here is still reported with its path."""
  cfg = as_config(cfg)
  shape = dict(mesh.shape)
  if cfg.routing != 'dense':
    moe.check_experts(cfg, shape)
  named = [('model.num_heads', cfg.num_heads, 'model'), ('model.width', cfg.width, 'fsdp')]
  if cfg.text_encoder == 'transformer':
    named.append(('model.text_width', cfg.text_width, 'fsdp'))
  check_divisibility(mesh, named, global_batch)
  if global_batch is not None and cfg.routing != 'dense':
    moe.layout(cfg, global_batch, cfg.num_tokens if tokens is None else tokens, shape)
  check_divisibility(mesh, params=abstract_params(build_model(cfg)))
