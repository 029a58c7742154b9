"""model.inference_group_size: routing groups of one size in training and another at sampling / export.

The reference for "the model built for inference routes over inference_group_size" is a second model whose
group_size is set to that value directly: with the same parameters the two must agree exactly, and differ
from the training group size (capacity binds: C = S·f/E = S/2 per group).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit import parallel
from ecdit.config import experiment as config_lib
from ecdit.config.model import ModelConfig
from ecdit.diffusion import flow
from ecdit.diffusion import sampler as sampler_lib
from ecdit.eval.routing import summary
from ecdit.export import weights
from ecdit.models import ecdit as ecdit_model

from _train_util import load_experiment, tiny_config

# tiny_config: 16×16 images, patch 4 → 16 tokens an image; 4 experts, f_c = 2.
TRAIN_GROUP, INFER_GROUP = 64, 32   # 4 images, 2 images


def _mcfg(**over) -> ModelConfig:
  c = tiny_config()
  c.model.routing_scope = 'group'
  for k, v in over.items():
    c.model[k] = v
  return config_lib.model_config(c)


def test_sampler_routes_over_the_inference_group_size():
  trained = _mcfg(group_size=TRAIN_GROUP, inference_group_size=INFER_GROUP)
  direct = _mcfg(group_size=INFER_GROUP)
  train_sized = _mcfg(group_size=TRAIN_GROUP)
  assert trained.num_tokens == 16 and trained.for_inference() == direct
  model = ecdit_model.build_model(trained)
  # Random weights everywhere: at init adaLN-zero gates make every block the identity, hiding the routing.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
                        nn.unbox(ecdit_model.abstract_params(model)))
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (4, trained.text_length)), jnp.int32)
  mask = jnp.ones(ids.shape, bool)
  null_ids, null_mask = jnp.zeros((1, trained.text_length), jnp.int32), jnp.zeros((1, trained.text_length), bool)

  # One Euler step from t=1 with no guidance: images = clip(noise − v(noise, 1)).
  run = sampler_lib.make_sampler(model, image_shape=(16, 16, 3), num_steps=1, cfg_scale=1.0)
  got = np.asarray(run(params, ids, mask, null_ids, null_mask, 0))
  noise = sampler_lib.initial_noise(0, 4, (16, 16, 3))

  def by_hand(mcfg):
    v = jax.jit(functools.partial(ecdit_model.build_model(mcfg).apply, train=False))(
        {'params': params}, noise, jnp.ones((4,)), ids, mask)
    return np.asarray(jnp.clip(noise - v, -1.0, 1.0))

  np.testing.assert_allclose(got, by_hand(direct), rtol=1e-4, atol=1e-4)   # two compiles' rounding
  assert np.abs(got - by_hand(train_sized)).max() > 0.05  # 64-token groups route differently


def test_exports_and_routing_summaries_use_the_inference_groups():
  trained = _mcfg(group_size=TRAIN_GROUP, inference_group_size=INFER_GROUP)
  conf = weights.export_config(trained, tokenizer=False)['model']
  assert conf['group_size'] == INFER_GROUP and 'inference_group_size' not in conf
  assert ModelConfig.from_dict(conf) == trained.for_inference()
  # Sampling counts [B=4, S=16] → one total per 32-token group; C = floor(32·2/4) = 16, E·C = 64.
  counts = np.ones((4, 16), np.int32)
  np.testing.assert_array_equal(summary.group_totals(counts, trained), [32, 32])
  assert summary.capacity(trained) == 16
  # Unset: the model is its own inference model, and its dict (workdir hashes, exports) has no new key.
  plain = _mcfg(group_size=TRAIN_GROUP)
  assert plain.for_inference() is plain and 'inference_group_size' not in plain.to_dict()
  assert ecdit_model.for_inference(ecdit_model.build_model(plain)).config is plain


@pytest.mark.parametrize('over,message', [
    (dict(routing_scope='group', group_size=64, inference_group_size=0),
     'model.inference_group_size=0 is invalid: expected a positive integer'),
    (dict(routing_scope='group', group_size=64, inference_group_size=True),
     'model.inference_group_size=True is invalid: expected a positive integer'),
    (dict(routing_scope='group', group_size=64, inference_group_size=32.0),
     'model.inference_group_size=32.0 is invalid: expected a positive integer'),
    (dict(routing_scope='image', inference_group_size=32),
     "model.inference_group_size=32 is invalid: expected None unless routing_scope='group' (it is 'image')"),
])
def test_bad_inference_group_size_is_one_line(over, message):
  with pytest.raises(ValueError) as e:
    ModelConfig(**over).validate()
  assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_paper_presets_route_over_1024_token_groups_and_512_at_inference():
  for variant in ('xl_32e', 'xxl_32e', '3xl_32e', 'm_64e', 'xl_8e', 'xl_16e'):
    c = load_experiment('paper', variant)
    m = config_lib.model_config(c)
    assert (m.routing, m.routing_scope, m.group_size, m.inference_group_size) == (
        'expert_choice', 'group', 1024, 512), variant
    # Training routes the 128 kept tokens of 256 (50% masking): 8 images a group; sampling 2 images of 256.
    assert flow.routed_tokens(c, m) == 128 and m.num_tokens == 256
  for variant in ('dense_xl', 'gshard_xl_32e', 'xl_32e_image', 'm_64e_image'):
    m = config_lib.model_config(load_experiment('paper', variant))
    assert (m.routing_scope, m.group_size, m.inference_group_size) == ('image', None, None), variant


def test_check_fits_splits_the_routed_tokens_into_groups():
  # 2 images: 32 tokens, one whole group of 32; with half the tokens masked, 16 routed tokens cannot.
  c = tiny_config()
  c.model.routing_scope, c.model.group_size = 'group', 32
  c.diffusion.mask_ratio = 0.5
  m = config_lib.model_config(c)
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1, model=1), jax.devices()[:1])
  ecdit_model.check_fits(m, mesh, 2)
  assert flow.routed_tokens(c, m) == 8
  with pytest.raises(ValueError, match='model.group_size=32 must divide'):
    ecdit_model.check_fits(m, mesh, 2, flow.routed_tokens(c, m))


def test_paper_image_suffix_only_for_expert_choice():
  with pytest.raises(ValueError, match="paper variant 'dense_xl_image' is unknown"):
    load_experiment('paper', 'dense_xl_image')


def test_upcycle_may_change_the_inference_group_size():
  from ecdit.export.upcycle import check_compatible  # the export layer pulls in training: import late
  dense = ModelConfig(routing='dense')
  check_compatible(dense, ModelConfig(routing_scope='group', group_size=1024, inference_group_size=512))
  with pytest.raises(ValueError, match='model.width differs'):
    check_compatible(dense, ModelConfig(width=64))
