"""Text side of EC-DiT: a small pre-LN transformer encoder over token ids, or precomputed text states.

`text_encoder='transformer'`: ids int32 `[B, L]` (L ≤ text_length) → token embedding (vocab_size ×
text_width) + learned positions → `text_depth` pre-LN blocks (bidirectional MHA with a key padding mask,
GeLU MLP 4×) → final LayerNorm → states `[B, L, text_width]`.
`text_encoder='precomputed'`: the input is already `[B, L, text_states_dim]` states (e.g. from a frozen
encoder run offline); they are passed through unchanged.

The model then projects the states to its width once (`ECDiT.text_proj`), and every block's cross-attention
reads those projected states.

At paper scale (`sizes.PAPER_TEXT`) the encoder is CLIP-text-like: width 1280, 32 layers, 20 heads, the T5
tokenizer's 32128-entry vocabulary, 77 positions — 0.671B parameters, the paper's "670M CLIP-based text
encoder with a T5 tokenizer".
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecdit.layers.attention import Attention
from ecdit.layers.dense import logical_dense
from ecdit.config.model import ModelConfig

_zeros = nn.initializers.zeros_init()


def text_states_dim(cfg: ModelConfig) -> int:
  """Feature width of the text states the model's cross-attention projection reads."""
  return cfg.text_width if cfg.text_encoder == 'transformer' else cfg.text_states_dim


class _Embed(nn.Embed):
  """`nn.Embed` (same parameters, same lookup) that gathers its table whole before the lookup: a lookup
  into a table split along its width ('text_embed' over 'fsdp') would come out split along the width, and
  resharding that to the batch layout is a full rematerialisation."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError('Input type must be an integer or unsigned integer.')
    (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    embedding = nn.with_logical_constraint(embedding, ('vocab', None))
    return jnp.take(embedding, inputs, axis=0)


class TextBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    w = cfg.text_width
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=1e-5, dtype=dtype, param_dtype=pdtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('text_embed',)),
        bias_init=nn.with_logical_partitioning(_zeros, ('text_embed',)))
    dense = lambda f, axes, name: logical_dense(f, axes, name, dtype, pdtype)  # noqa: E731
    heads = cfg.text_heads
    # Attention's parameter axes say 'embed'; rename is not needed for counting, and the text encoder is
    # small enough to replicate (the sharding rules map 'embed' consistently either way).
    x = x + Attention(heads, heads, w // heads, w, dtype=dtype, param_dtype=pdtype, name='attn')(
        norm('norm1')(x), key_mask=mask)
    h = jax.nn.gelu(dense(4 * w, ('text_embed', 'mlp'), 'mlp_in')(norm('norm2')(x)))
    return x + dense(w, ('mlp', 'text_embed'), 'mlp_out')(h)


class TextEncoder(nn.Module):
  """ids `[B, L]` + mask `[B, L]` → states `[B, L, text_width]` (or precomputed states passed through).

  `remat`: recompute each block in the backward pass (set with any train.remat but 'none'). The paper-size
  encoder (32 blocks of width 1280, trained with the DiT) otherwise keeps more activations per image than the
  whole rematerialised DiT stack (`ecdit plan`, docs/scale.md)."""
  cfg: ModelConfig
  remat: bool = False

  @nn.compact
  def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.text_encoder == 'precomputed':
      return text.astype(jnp.dtype(cfg.dtype))
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    length = text.shape[1]
    tok = _Embed(cfg.vocab_size, cfg.text_width, dtype=dtype, param_dtype=pdtype, name='token_embed',
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ('vocab', 'text_embed')))
    pos = self.param('pos_embed', nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                               (None, 'text_embed')),
                     (cfg.text_length, cfg.text_width), pdtype)
    act = ('batch', 'length', 'text_embed')   # batch over data·fsdp·expert, width whole
    x = nn.with_logical_constraint(tok(text) + pos[None, :length].astype(dtype), act)
    block = nn.remat(TextBlock, prevent_cse=False) if self.remat else TextBlock
    for i in range(cfg.text_depth):
      x = nn.with_logical_constraint(block(cfg, name=f'block_{i}')(x, mask), act)
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=pdtype, name='final_norm',
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('text_embed',)),
                        bias_init=nn.with_logical_partitioning(_zeros, ('text_embed',)))(x)
