"""The EC-DiT model on the 'tiny' preset: shapes, adaLN-Zero identity at init, token masking, text masks,
input checks. One initialised model is shared by the module (compiles are the cost here)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ecdit.layers.dit import DiTBlock, patchify
from ecdit.config.model import ModelConfig
from ecdit.models.ecdit import ECDiT, build_model, dummy_inputs, init_params


@pytest.fixture(scope='module')
def tiny():
  cfg = ModelConfig.from_dict({'size': 'tiny'})
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0), batch_size=2)
  # A perturbed copy, so that outputs are not trivially zero.
  leaves, tree = jax.tree.flatten(nn.unbox(params))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  apply = jax.jit(lambda p, x, t, ids, m, keep=None: model.apply({'params': p}, x, t, ids, m, keep_idx=keep))
  return cfg, model, params, noisy, apply


def _inputs(cfg, b=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (b, cfg.image_size, cfg.image_size, cfg.in_channels))
  t = jax.random.uniform(ks[1], (b,))
  ids = jax.random.randint(ks[2], (b, cfg.text_length), 0, cfg.vocab_size)
  mask = jnp.arange(cfg.text_length)[None, :] < jnp.array([[5], [3]])[:b]
  return x, t, ids, mask


def test_zero_velocity_at_init(tiny):
  cfg, model, params, _, apply = tiny
  v = apply(params, *_inputs(cfg))
  assert v.shape == (2, cfg.image_size, cfg.image_size, cfg.in_channels)
  np.testing.assert_array_equal(np.asarray(v), 0.0)


def test_each_block_is_identity_at_init(tiny):
  cfg, _, params, _, _ = tiny
  x = jax.random.normal(jax.random.key(3), (2, cfg.num_tokens, cfg.width))
  c = jax.random.normal(jax.random.key(4), (2, cfg.width))
  ctx = jax.random.normal(jax.random.key(5), (2, cfg.text_length, cfg.width))
  mask = jnp.ones((2, cfg.text_length), bool)
  for i in range(cfg.depth):
    assert cfg.is_sparse_block(i) == (i % 2 == 1)
    y = DiTBlock(cfg, i).apply({'params': params[f'block_{i}']}, x, c, ctx, mask)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert 'moe' in params['block_1'] and 'ffn' in params['block_0']


def test_keep_all_tokens_matches_full_output(tiny):
  cfg, _, _, noisy, apply = tiny
  x, t, ids, mask = _inputs(cfg)
  full = apply(noisy, x, t, ids, mask)
  assert not np.allclose(np.asarray(full), 0.0)
  keep = jnp.tile(jnp.arange(cfg.num_tokens, dtype=jnp.int32)[None], (2, 1))
  part = apply(noisy, x, t, ids, mask, keep)
  np.testing.assert_allclose(part, patchify(full, cfg.patch_size), atol=1e-5)


def test_keep_idx_subset_shape(tiny):
  cfg, _, _, noisy, apply = tiny
  keep = jnp.array([[0, 3, 5, 9, 15, 2, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  out = apply(noisy, *_inputs(cfg), keep)
  assert out.shape == (2, 8, cfg.patch_dim)
  assert np.isfinite(np.asarray(out)).all()


def test_padded_text_tokens_do_not_matter(tiny):
  cfg, _, _, noisy, apply = tiny
  x, t, ids, mask = _inputs(cfg)
  ids2 = jnp.where(mask, ids, (ids + 7) % cfg.vocab_size)
  np.testing.assert_allclose(apply(noisy, x, t, ids, mask), apply(noisy, x, t, ids2, mask), atol=1e-5)
  # an all-padding caption (e.g. dropped for classifier-free guidance) is finite
  empty = apply(noisy, x, t, ids, jnp.zeros_like(mask))
  assert np.isfinite(np.asarray(empty)).all()


def test_param_logical_axes(tiny):
  _, _, params, _, _ = tiny
  assert params['block_0']['self_attn']['key']['kernel'].names == ('embed', 'kv')
  assert params['block_1']['moe']['wi'].names == ('expert', 'embed', 'mlp')
  assert params['block_0']['adaln']['proj']['kernel'].names == ('embed', 'cond')
  assert params['text_encoder']['token_embed']['embedding'].names == ('vocab', 'text_embed')


@pytest.mark.parametrize('bad, match', [
    ('x', 'input x'), ('t', 'input t'), ('text_len', 'input text'), ('text_float', 'integer token ids'),
    ('mask', 'input text_mask'), ('keep', 'input keep_idx')])
def test_wrong_input_shapes_raise(tiny, bad, match):
  cfg, model, params, _, _ = tiny
  x, t, ids, mask = _inputs(cfg)
  keep = None
  if bad == 'x':
    x = x[:, :4]
  elif bad == 't':
    t = t[:1]
  elif bad == 'text_len':
    ids = jnp.zeros((2, cfg.text_length + 1), jnp.int32)
    mask = jnp.ones((2, cfg.text_length + 1), bool)
  elif bad == 'text_float':
    ids = ids.astype(jnp.float32)
  elif bad == 'mask':
    mask = mask[:, :3]
  elif bad == 'keep':
    keep = jnp.zeros((2, cfg.num_tokens + 1), jnp.int32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.apply({'params': params}, x, t, ids, mask, keep_idx=keep))


def test_precomputed_text_and_bfloat16():
  cfg = dataclasses.replace(ModelConfig.from_dict({'size': 'tiny'}), text_encoder='precomputed',
                            text_states_dim=12, dtype='bfloat16')
  model = ECDiT(cfg)
  inputs = dummy_inputs(cfg, 2)
  assert inputs[2].shape == (2, cfg.text_length, 12)
  out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *inputs))
  assert out.shape == (2, cfg.image_size, cfg.image_size, cfg.in_channels) and out.dtype == jnp.bfloat16
  assert 'text_encoder' not in variables['params']
  assert variables['params']['text_proj']['kernel'].value.shape == (12, cfg.width)


def test_moe_stats_are_sown(tiny):
  cfg, model, _, noisy, _ = tiny
  _, state = model.apply({'params': noisy}, *_inputs(cfg), train=True, mutable=['moe_stats', 'losses'])
  assert 'block_1' in state['moe_stats']


def test_group_routing_pooled_over_images_initialises(tiny):
  """Groups larger than one image's tokens need a dummy batch of whole groups at init; the parameters are
  the image-scope model's."""
  cfg, _, params, _, _ = tiny
  pooled = dataclasses.replace(cfg, routing_scope='group', group_size=3 * cfg.num_tokens)
  got = init_params(build_model(pooled), jax.random.key(0))
  assert jax.tree.map(jnp.shape, nn.unbox(got)) == jax.tree.map(jnp.shape, nn.unbox(params))
  x, t, ids, mask = _inputs(pooled, b=2)
  x, t, ids, mask = (jnp.concatenate([a, a, a[:2]])[:3] for a in (x, t, ids, mask))   # 3 images: one group
  assert build_model(pooled).apply({'params': got}, x, t, ids, mask).shape == x.shape
