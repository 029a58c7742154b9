"""DiT building blocks: patches, positional and timestep embeddings, adaLN-Zero, the EC-DiT block, the final
layer.

Conventions (following the DiT reference, written afresh here):
- `modulate(x, shift, scale) = x·(1 + scale) + shift`; LayerNorms in front of modulated branches have no
  affine parameters (eps 1e-6).
- Timestep embedding: t ∈ [0, 1] is multiplied by `TIME_SCALE = 1000` before the sinusoid, so the frequencies
  see the same range as DiT's integer timesteps 0…999; the sinusoid is float32, `[cos, sin]` order, 256 dims,
  then Dense → SiLU → Dense to the model width.
- Positions: a fixed (not learned) 2-D sin-cos table over the patch grid: half the channels encode the row,
  half the column.
- adaLN-Zero: each block maps SiLU(c) through a zero-initialised Dense to 6 vectors (shift/scale/gate for the
  self-attention and the FFN branches). Gates start at 0, so both gated branches start switched off.
- Cross-attention (PixArt-α style): a plain residual `x + CA(LN(x), text)` with an affine LayerNorm and no
  timestep modulation; its output projection is zero-initialised, so together with the zero gates a freshly
  initialised block is exactly the identity.
- Final layer: non-affine LN, adaLN (shift, scale; zero-init) and a zero-initialised linear to the patch
  dimension, so a fresh model predicts exactly zero velocity.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ecdit.config.model import ModelConfig
from ecdit.layers.attention import Attention
from ecdit.layers.dense import logical_dense, zeros
from ecdit.layers.moe import make_ffn

TIME_SCALE = 1000.0
TIME_FREQ_DIM = 256
LN_EPS = 1e-6
MOE_OUT = 'moe_out'   # checkpoint name of a sparse block's FFN output


# ---- patches ------------------------------------------------------------------------------------------

def patchify(x: jax.Array, p: int) -> jax.Array:
  """`[B, H, W, C]` → `[B, (H/p)·(W/p), p·p·C]`; patches in row-major grid order, each patch flattened
  as (row-in-patch, col-in-patch, channel)."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f'patchify: image {h}x{w} is not divisible by patch size {p}')
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, grid: int | tuple[int, int], channels: int) -> jax.Array:
  """Inverse of `patchify`: `[B, gh·gw, p·p·C]` → `[B, gh·p, gw·p, C]`."""
  gh, gw = (grid, grid) if isinstance(grid, int) else grid
  b, n, pd = tokens.shape
  if n != gh * gw or pd != p * p * channels:
    raise ValueError(f'unpatchify: tokens {tokens.shape} do not match grid {gh}x{gw}, patch {p}, '
                     f'channels {channels}')
  x = tokens.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


# ---- embeddings ---------------------------------------------------------------------------------------

def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = pos.reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
  """Fixed `[grid·grid, dim]` table (row-major). `dim` must be a multiple of 4."""
  if dim % 4:
    raise ValueError(f'2-D sin-cos positions need a width divisible by 4, got {dim}')
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')
  emb = np.concatenate([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], axis=1)
  return emb.astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of `t·TIME_SCALE` (t in [0, 1]), float32 `[B, dim]`, `[cos, sin]` order."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * TIME_SCALE)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """t `[B]` → conditioning vector `[B, width]` (sinusoid → Dense → SiLU → Dense)."""
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    h = nn.with_logical_constraint(timestep_embedding(t).astype(self.dtype), ('batch', 'patch'))
    h = logical_dense(self.width, ('patch', 'embed'), 'fc1', self.dtype, self.param_dtype)(h)
    h = nn.with_logical_constraint(nn.silu(h), ('batch', 'embed'))
    return logical_dense(self.width, ('embed', 'embed'), 'fc2', self.dtype, self.param_dtype)(h)


class PatchEmbed(nn.Module):
  """`[B, H, W, C]` → `[B, N, width]`: patchify, then one Dense (equivalent to a stride-p conv)."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    tokens = patchify(x, self.patch_size).astype(self.dtype)
    return logical_dense(self.width, ('patch', 'embed'), 'proj', self.dtype, self.param_dtype)(tokens)


# ---- adaLN-Zero ---------------------------------------------------------------------------------------

def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x `[B, S, d]`, shift/scale `[B, d]`."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNModulation(nn.Module):
  """SiLU(c) → zero-initialised Dense → `chunks` vectors of `width`."""
  width: int
  chunks: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array) -> list[jax.Array]:
    out = logical_dense(self.chunks * self.width, ('embed', 'cond'), 'proj', self.dtype, self.param_dtype,
                        kernel_init=zeros)(nn.silu(c))
    # Gathered whole over 'model' once, before the split: the weight's 'cond' split would otherwise put
    # whole chunks on one 'model' device, and each chunk would be moved separately.
    out = nn.with_logical_constraint(out, ('batch', None))
    return jnp.split(out, self.chunks, axis=-1)


def _norm(name: str, dtype, param_dtype, affine: bool = False):
  return nn.LayerNorm(epsilon=LN_EPS, use_bias=affine, use_scale=affine, dtype=dtype,
                      param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
                      bias_init=nn.with_logical_partitioning(zeros, ('embed',)))


# ---- the block ----------------------------------------------------------------------------------------

class DiTBlock(nn.Module):
  """adaLN-Zero self-attention → cross-attention to text → FFN or MoE (`make_ffn(cfg, cfg.is_sparse_block(
  index))`). x `[B, S, d]`, c `[B, d]`, text `[B, L, d]`, text_mask bool `[B, L]`."""
  cfg: ModelConfig
  index: int

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, text: jax.Array, text_mask: jax.Array, *,
               train: bool = False) -> jax.Array:
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d = cfg.width
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = AdaLNModulation(
        d, 6, dtype, pdtype, name='adaln')(c)
    attn = lambda name, zero: Attention(cfg.num_heads, cfg.kv_heads, cfg.head_dim, d,  # noqa: E731
                                        zero_init_out=zero, dtype=dtype, param_dtype=pdtype, name=name)
    h = modulate(_norm('norm_sa', dtype, pdtype)(x), shift_sa, scale_sa)
    x = x + gate_sa[:, None, :] * attn('self_attn', False)(h)
    h = _norm('norm_ca', dtype, pdtype, affine=True)(x)
    x = x + attn('cross_attn', True)(h, text, text_mask)
    h = modulate(_norm('norm_ff', dtype, pdtype)(x), shift_ff, scale_ff)
    sparse = cfg.is_sparse_block(self.index)
    out = make_ffn(cfg, sparse, name='moe' if sparse else 'ffn')(h, train=train)
    if sparse:   # named for train.remat='save_moe' (ecdit.models.stack): kept, not recomputed
      out = checkpoint_name(out, MOE_OUT)
    x = x + gate_ff[:, None, :] * out
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class FinalLayer(nn.Module):
  """Non-affine LN → adaLN(shift, scale) → zero-initialised Dense to `patch_dim`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    shift, scale = AdaLNModulation(cfg.width, 2, dtype, pdtype, name='adaln')(c)
    h = modulate(_norm('norm', dtype, pdtype)(x), shift, scale)
    return logical_dense(cfg.patch_dim, ('embed', 'patch'), 'proj', dtype, pdtype, kernel_init=zeros)(h)
