"""Analytic model FLOPs of an EC-DiT forward / train step (the MFU numerator of `ecdit bench suite`).

Counted: every matmul the model defines, 2 FLOPs per multiply-add —
  patch embedding, timestep MLP, text encoder (if `text_encoder='transformer'`), text projection,
  per block: adaLN projection, self-attention q/k/v/o projections and its two `N×N` products (QKᵀ and AV),
  cross-attention q/o on the image tokens, k/v on the text tokens and its `N×L` products, the FFN — dense
  (two `d×hidden` matmuls) or MoE (router `d×E` on every token, plus the experts at their real capacity:
  G groups · E experts · C slots · two `d×hidden` matmuls) — and the final adaLN + projection.
Not counted: biases, norms, activations, softmax, the loss, the optimizer, and the one-hot dispatch einsums
(an implementation choice, not model compute). Training = forward × 3 (backward ≈ 2 × forward).
"""
from __future__ import annotations

from ecdit.layers.dit import TIME_FREQ_DIM
from ecdit.config.model import ModelConfig
from ecdit.models.text import text_states_dim


def _routing_groups(cfg: ModelConfig, batch: int, tokens: int) -> tuple[int, int]:
  """(groups G, tokens per group Sg) as `ecdit.layers.moe.group_tokens` cuts them."""
  if cfg.routing_scope == 'image':
    return batch, tokens
  if cfg.routing_scope == 'batch':
    return 1, batch * tokens
  return batch * tokens // cfg.group_size, cfg.group_size


def forward_flops(cfg: ModelConfig, batch: int, *, train: bool = True, text_length: int | None = None,
                  breakdown: bool = False):
  """FLOPs of one forward pass over `batch` images (no token masking). `train` picks the capacity factor
  (`eval_capacity_factor` applies when False). With `breakdown`, returns a dict of parts (and 'total')."""
  b, n, d = batch, cfg.num_tokens, cfg.width
  L = text_length or cfg.text_length
  h, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
  hidden = cfg.mlp_ratio * d
  dt = text_states_dim(cfg)
  parts = dict(patch_embed=2 * b * n * cfg.patch_dim * d,
               t_embed=2 * b * (TIME_FREQ_DIM * d + d * d),
               text_proj=2 * b * L * dt * d,
               text_encoder=0, adaln=0, self_attn_proj=0, self_attn_core=0, cross_attn_proj=0,
               cross_attn_core=0, dense_ffn=0, router=0, experts=0)
  if cfg.text_encoder == 'transformer':
    tw = cfg.text_width
    per = 2 * b * L * 4 * tw * tw + 2 * 2 * b * L * L * tw + 2 * b * L * 2 * 4 * tw * tw
    parts['text_encoder'] = cfg.text_depth * per
  for i in range(cfg.depth):
    parts['adaln'] += 2 * b * d * 6 * d
    parts['self_attn_proj'] += 2 * b * n * d * (2 * h * hd + 2 * kv * hd)
    parts['self_attn_core'] += 2 * 2 * b * h * n * n * hd
    parts['cross_attn_proj'] += 2 * b * n * d * 2 * h * hd + 2 * b * L * d * 2 * kv * hd
    parts['cross_attn_core'] += 2 * 2 * b * h * n * L * hd
    if cfg.is_sparse_block(i):
      groups, group_len = _routing_groups(cfg, b, n)
      cap = cfg.capacity_for(group_len, train)
      parts['router'] += 2 * b * n * d * cfg.num_experts
      parts['experts'] += 2 * groups * cfg.num_experts * cap * 2 * d * hidden
    else:
      parts['dense_ffn'] += 2 * b * n * 2 * d * hidden
  parts['final'] = 2 * b * d * 2 * d + 2 * b * n * d * cfg.patch_dim
  total = sum(parts.values())
  if breakdown:
    return dict(parts, total=total)
  return total


def train_step_flops(cfg: ModelConfig, batch: int, text_length: int | None = None) -> int:
  """Model FLOPs of one train step: forward × 3."""
  return 3 * forward_flops(cfg, batch, train=True, text_length=text_length)
