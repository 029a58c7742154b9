"""The DiT block and the exported expert weights against numpy written from the equations, without torch.

Reference (DiT, Peebles & Xie 2023, adaLN-Zero; plus our PixArt-α cross-attention residual, WORKSPACE.md):

  shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = chunk6(W·SiLU(c) + b)
  x ← x + gate_sa · SelfAttn(LN(x)·(1 + scale_sa) + shift_sa)
  x ← x + CrossAttn(LN_affine(x), text, mask)
  x ← x + gate_ff · FFN(LN(x)·(1 + scale_ff) + shift_ff)

with non-affine LayerNorms (eps 1e-6), grouped key/value heads (query head h reads key/value head
h // (H / KV)), softmax(q·kᵀ/√hd) over the unmasked keys, FFN = Linear → tanh-GeLU → Linear. Every parameter
is random (no zero-initialised branch), so swapping shift and scale, or one gate for another, shows.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ecdit.config.model import ModelConfig
from ecdit.export import weights
from ecdit.layers.dit import DiTBlock
from ecdit.layers.moe.ffn import run_experts
from ecdit.models.ecdit import abstract_params, build_model


def _random_like(tree, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(np.float32), tree)


def np_layer_norm(x, scale=None, bias=None, eps=1e-6):
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y if scale is None else y * scale + bias


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_linear(x, p):
  return x @ p['kernel'] + p['bias']


def np_attention(x, ctx, p, heads, kv_heads, mask=None):
  """Multi-head attention with `kv_heads` shared key/value heads; mask `[B, Lk]` True = attend."""
  b, lq, _ = x.shape
  q = np_linear(x, p['query']).reshape(b, lq, heads, -1)
  k = np_linear(ctx, p['key']).reshape(b, ctx.shape[1], kv_heads, -1)
  v = np_linear(ctx, p['value']).reshape(b, ctx.shape[1], kv_heads, -1)
  hd = q.shape[-1]
  out = np.zeros_like(q)
  for h in range(heads):
    g = h // (heads // kv_heads)
    logits = np.einsum('bqd,bkd->bqk', q[:, :, h], k[:, :, g]) / math.sqrt(hd)
    if mask is not None:
      logits = np.where(mask[:, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out[:, :, h] = np.einsum('bqk,bkd->bqd', w / w.sum(-1, keepdims=True), v[:, :, g])
  return np_linear(out.reshape(b, lq, -1), p['out'])


def np_dit_block(p, x, c, text, mask, heads, kv_heads):
  silu = c / (1 + np.exp(-c))
  shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = np.split(np_linear(silu, p['adaln']['proj']), 6, -1)
  h = np_layer_norm(x) * (1 + scale_sa[:, None]) + shift_sa[:, None]
  x = x + gate_sa[:, None] * np_attention(h, h, p['self_attn'], heads, kv_heads)
  h = np_layer_norm(x, p['norm_ca']['scale'], p['norm_ca']['bias'])
  x = x + np_attention(h, text, p['cross_attn'], heads, kv_heads, mask)
  h = np_layer_norm(x) * (1 + scale_ff[:, None]) + shift_ff[:, None]
  return x + gate_ff[:, None] * np_linear(np_gelu(np_linear(h, p['ffn']['wi'])), p['ffn']['wo'])


def test_dense_dit_block_matches_numpy_adaln_zero():
  cfg = ModelConfig.from_dict({'size': 'tiny'})          # width 32, 2 query heads sharing 1 key/value head
  assert cfg.kv_heads < cfg.num_heads and not cfg.is_sparse_block(0)
  b, s, lt, d = 2, 6, cfg.text_length, cfg.width
  rng = np.random.default_rng(1)
  x = rng.standard_normal((b, s, d)).astype(np.float32)
  c = rng.standard_normal((b, d)).astype(np.float32)
  text = rng.standard_normal((b, lt, d)).astype(np.float32)
  mask = np.arange(lt)[None, :] < np.array([[5], [3]])
  block = DiTBlock(cfg, 0)
  shapes = jax.eval_shape(lambda: nn.unbox(block.init(jax.random.key(0), x, c, text, mask)['params']))
  params = _random_like(shapes, seed=2)
  params['norm_ca']['scale'] += 1.0
  got = jax.jit(block.apply)({'params': params}, x, c, text, mask)   # one compile, not one per op
  f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = np_dit_block(f64, x.astype(np.float64), c.astype(np.float64), text.astype(np.float64), mask,
                      cfg.num_heads, cfg.kv_heads)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(want - x).mean() > 0.1   # every branch is switched on


def test_exported_expert_weights_drive_a_pytorch_layout_ffn():
  """The file's expert tensors, read as `nn.Linear` weights `[E, out, in]` by a hand-written numpy FFN
  (y = GeLU(x·W_iᵀ + b_i)·W_oᵀ + b_o per expert), compute what the JAX experts compute from the parameters."""
  cfg = dataclasses.replace(ModelConfig.from_dict({'size': 'tiny'}), routing='expert_choice').validate()
  params = _random_like(nn.unbox(abstract_params(build_model(cfg))), seed=3)
  tensors = weights.export_params(params, cfg)
  i = next(j for j in range(cfg.depth) if cfg.is_sparse_block(j))
  e, d, hidden = cfg.num_experts, cfg.width, cfg.width * cfg.mlp_ratio
  wi, bi = tensors[f'blocks.{i}.moe.wi.weight'], tensors[f'blocks.{i}.moe.wi.bias']
  wo, bo = tensors[f'blocks.{i}.moe.wo.weight'], tensors[f'blocks.{i}.moe.wo.bias']
  assert wi.shape == (e, hidden, d) and wo.shape == (e, d, hidden) and bi.shape == (e, hidden)
  xe = np.random.default_rng(4).standard_normal((e, 1, 5, d)).astype(np.float32)   # [E, G, C, d]
  want = np.stack([np_gelu(xe[k].astype(np.float64) @ wi[k].T + bi[k]) @ wo[k].T + bo[k] for k in range(e)])
  moe = params[f'block_{i}']['moe']
  got = run_experts(jnp.asarray(xe), moe['wi'], moe['bi'], moe['wo'], moe['bo'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # the router too: a bias-free linear d → E, stored [E, d]
  x = xe[0, 0]
  np.testing.assert_allclose(x @ tensors[f'blocks.{i}.moe.router.weight'].T, x @ moe['router'], rtol=1e-5)
