"""DiT layers and attention: shapes, patch round trip, GQA math, padding masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit.layers.attention import Attention, dot_product_attention
from ecdit.layers.dit import (PatchEmbed, TimestepEmbedder, patchify, sincos_pos_embed_2d, timestep_embedding,
                              unpatchify)


def test_patchify_round_trip_and_layout():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  tok = patchify(x, 2)
  assert tok.shape == (2, 24, 12)
  # token 1 is the patch at grid row 0, column 1
  np.testing.assert_array_equal(tok[0, 1], x[0, 0:2, 2:4, :].reshape(-1))
  np.testing.assert_array_equal(unpatchify(tok, 2, (4, 6), 3), x)
  with pytest.raises(ValueError, match='not divisible'):
    patchify(x, 5)


def test_embedding_shapes():
  assert sincos_pos_embed_2d(32, 4).shape == (16, 32)
  e = timestep_embedding(jnp.array([0.0, 0.5, 1.0]))
  assert e.shape == (3, 256) and e.dtype == jnp.float32
  np.testing.assert_allclose(e[0, :128], 1.0)   # cos(0) = 1 first, then sin(0) = 0
  np.testing.assert_allclose(e[0, 128:], 0.0)
  te = TimestepEmbedder(16)
  p = te.init(jax.random.key(0), jnp.zeros(2))
  assert te.apply(p, jnp.ones(2)).shape == (2, 16)
  pe = PatchEmbed(2, 16)
  p = pe.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))
  assert pe.apply(p, jnp.zeros((3, 8, 8, 4))).shape == (3, 16, 16)


def _naive_mha(q, k, v, mask=None):
  """Per-head softmax attention, heads of k/v repeated to match q."""
  h, kvh = q.shape[2], k.shape[2]
  k = jnp.repeat(k, h // kvh, axis=2)
  v = jnp.repeat(v, h // kvh, axis=2)
  logits = jnp.einsum('bqhd,bshd->bhqs', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -1e30)
  return jnp.einsum('bhqs,bshd->bqhd', jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_gqa_matches_naive(kv_heads):
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (2, 5, 4, 8))
  k = jax.random.normal(ks[1], (2, 7, kv_heads, 8))
  v = jax.random.normal(ks[2], (2, 7, kv_heads, 8))
  mask = jnp.array([[True] * 7, [True] * 3 + [False] * 4])
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask), _naive_mha(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize('kv_heads,lk', [(4, 7), (2, 7), (1, 9)])
def test_attention_gradients_match_naive(kv_heads, lk):
  """The backward recomputes the weights (custom VJP): its gradients must be autodiff's of the naive
  reference, for every input, with GQA and padding (row 1 has a single valid key, row 2 none)."""
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (3, 5, 4, 8))
  k = jax.random.normal(ks[1], (3, lk, kv_heads, 8))
  v = jax.random.normal(ks[2], (3, lk, kv_heads, 8))
  w = jax.random.normal(ks[3], (3, 5, 4, 8))       # a random cotangent
  mask = jnp.array([[True] * lk, [True] + [False] * (lk - 1), [False] * lk])

  def naive(q, k, v, m):     # ours returns zeros for a row with no valid key (the naive softmax: uniform)
    out = _naive_mha(q, k, v, m)
    return out if m is None else out * jnp.any(m, axis=-1)[:, None, None, None]
  for m in (None, mask):
    ours = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, m) * w), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda q, k, v: jnp.sum(naive(q, k, v, m) * w), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip('qkv', ours, ref):
      np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f'd{name}, mask={m is not None}')
  # a query row with no valid key gets no gradient, and padded keys/values get none either
  g = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask) * w), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_array_equal(g[0][2], 0.0)
  np.testing.assert_array_equal(g[1][1:, 1:], 0.0)
  np.testing.assert_array_equal(g[2][2], 0.0)


def test_attention_bfloat16_gradients_keep_dtype():
  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8), jnp.bfloat16)
  grads = jax.grad(lambda q: jnp.sum(dot_product_attention(q, q, q).astype(jnp.float32)))(q)
  assert grads.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grads, np.float32)).all()


def test_attention_module_params_and_gqa_projection_shapes():
  attn = Attention(num_heads=4, num_kv_heads=2, head_dim=8, out_features=32)
  x = jnp.ones((1, 6, 32))
  params = attn.init(jax.random.key(0), x)['params']
  shapes = jax.tree.map(lambda a: a.value.shape if hasattr(a, 'value') else a.shape, params,
                        is_leaf=lambda a: hasattr(a, 'value'))
  assert shapes['query']['kernel'] == (32, 32) and shapes['out']['kernel'] == (32, 32)
  assert shapes['key']['kernel'] == (32, 16) and shapes['value']['kernel'] == (32, 16)
  assert params['query']['kernel'].names == ('embed', 'heads')
  assert params['key']['kernel'].names == ('embed', 'kv')


def test_cross_attention_padding_mask():
  attn = Attention(num_heads=2, num_kv_heads=1, head_dim=8, out_features=16)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  ctx = jax.random.normal(jax.random.key(1), (2, 6, 16))
  mask = jnp.array([[True, True, True, False, False, False], [False] * 6])
  params = attn.init(jax.random.key(2), x, ctx, mask)
  y = attn.apply(params, x, ctx, mask)
  ctx2 = ctx.at[:, 3:].set(100.0)     # change only padded positions (all of row 1 is padding)
  y2 = attn.apply(params, x, ctx2, mask)
  assert np.isfinite(np.asarray(y)).all()
  np.testing.assert_allclose(y, y2, atol=1e-6)
  # a fully padded caption attends to nothing: output is the out-projection bias (zero at init)
  np.testing.assert_allclose(y[1], 0.0)
