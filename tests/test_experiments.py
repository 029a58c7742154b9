"""Every experiment and variant builds, validates, and matches its golden config dump.

Regenerate the golden files after an intended change with: ECDIT_UPDATE_GOLDEN=1 pytest tests/test_experiments.py
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections
import pytest

from ecdit.config import experiment as config_lib

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / 'golden'
EXPERIMENTS = sorted(p.stem for p in (REPO / 'experiments').glob('*.py') if not p.stem.startswith('_'))


def _module(name):
  spec = importlib.util.spec_from_file_location(f'exp_{name}', REPO / 'experiments' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _variants(name):
  """An experiment file lists its variants in a module-level VARIANTS (dict or sequence); none: [None]."""
  return list(getattr(_module(name), 'VARIANTS', None) or [None])


CASES = [(name, v) for name in EXPERIMENTS for v in _variants(name)]
REQUIRED_KEYS = ['seed', 'model.size', 'model.num_experts', 'model.capacity_factor', 'model.routing', 'data.dir',
                 'train.num_steps', 'train.batch_size', 'train.log_every', 'train.checkpoint_every', 'mesh.data',
                 'mesh.fsdp', 'mesh.expert', 'mesh.model']


def test_every_experiment_file_documents_its_command():
  assert {'shapes_tiny', 'shapes_small', 'paper'} <= set(EXPERIMENTS)
  assert _variants('shapes_small')[:3] == ['dense', 'ec', 'tc']
  for name in EXPERIMENTS:
    mod = _module(name)
    assert 'ecdit train' in mod.__doc__, f'{name}: the docstring must show the command that runs it'


@pytest.mark.parametrize('name,variant', CASES, ids=[f'{n}:{v}' if v else n for n, v in CASES])
def test_golden(name, variant):
  cfg = _module(name).get_config(variant)
  for key in REQUIRED_KEYS:
    node = cfg
    for part in key.split('.'):
      assert part in node, f'{name}: missing config key {key}'
      node = node[part]
  if cfg.data.name == 'shapes':  # the others need the user's data folder (data.source_dir) first
    config_lib.validate(cfg)
  text = config_lib.dump(cfg)
  path = GOLDEN / (f'{name}_{variant}.txt' if variant else f'{name}.txt')
  if os.environ.get('ECDIT_UPDATE_GOLDEN') == '1':
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  assert path.exists(), f'{path} is missing: run with ECDIT_UPDATE_GOLDEN=1'
  assert text == path.read_text(), f'{name}:{variant} differs from {path}; regenerate with ECDIT_UPDATE_GOLDEN=1'


# Table 1 of the paper (docs: ../shared/research/paper.md §3): width, depth, heads, KV heads per size, and the
# experts in the variant's name; known without the golden dumps above.
TABLE1 = {'xl': (1152, 28, 18, 6), 'xxl': (1536, 38, 24, 6), '3xl': (2304, 42, 36, 6), 'm': (3072, 38, 48, 12)}


@pytest.mark.parametrize('variant,size,experts', [('xl_8e', 'xl', 8), ('xl_16e', 'xl', 16), ('xl_32e', 'xl', 32),
                                                  ('xxl_32e', 'xxl', 32), ('3xl_32e', '3xl', 32),
                                                  ('m_64e', 'm', 64)])
def test_paper_variants_are_table_1(variant, size, experts):
  c = _module('paper').get_config(variant)
  c.data.source_dir = '/data/latents'
  m = config_lib.validate(c)
  assert (m.width, m.depth, m.num_heads, m.num_kv_heads) == TABLE1[size]
  assert (m.num_experts, m.routing, m.moe_every, m.width // m.num_heads) == (experts, 'expert_choice', 2, 64)


def test_paper_configs_carry_the_recipe():
  for variant in _variants('paper'):
    c = _module('paper').get_config(variant)
    assert (c.train.optimizer, c.train.learning_rate, c.train.warmup_steps, c.train.batch_size,
            c.train.num_steps) == ('rmsprop', 1e-4, 20_000, 4096, 800_000)
    assert c.train.momentum > 0 and c.diffusion.t_sampling == 'logit_normal' and c.diffusion.mask_ratio == 0.5
    c.data.source_dir = '/data/latents'
    m = config_lib.validate(c)
    assert (m.image_size, m.in_channels, m.patch_size) == (32, 4, 2)   # from data.latent_shape (32, 32, 4)


def test_shapes_small_comparisons_hold_activated_compute_fixed():
  """The expert-count family differs only in E: activated = dense total + E·d router weights per sparse layer
  (f_c = 1: one expert FFN per token on average), while total parameters grow by (E−1) expert FFNs per layer."""
  from ecdit.models import params as P   # pylint: disable=import-outside-toplevel
  dense = P.count(config_lib.validate(_module('shapes_small').get_config('dense')))
  d, sparse, expert = 128, 3, 8 * 128 * 128 + 5 * 128                # 6 blocks, every 2nd FFN sparse
  for variant, experts in (('ec_e4', 4), ('ec', 8), ('ec_e16', 16), ('ec_e32', 32)):
    m = config_lib.validate(_module('shapes_small').get_config(variant))
    assert (m.num_experts, m.capacity_factor, m.routing_scope) == (experts, 1.0, 'image')
    counts = P.count(m)
    assert counts['activated'] == dense['total'] + sparse * experts * d, variant
    assert counts['total'] == dense['total'] + sparse * ((experts - 1) * expert + experts * d), variant
  g = config_lib.validate(_module('shapes_small').get_config('ec_g4'))
  tokens = (g.image_size // g.patch_size) ** 2                          # 64 per image
  assert (g.routing_scope, g.group_size, g.for_inference().group_size) == ('group', 4 * tokens, 2 * tokens)
  assert g.capacity_for(g.group_size, train=True) == 4 * tokens // 8   # each expert picks 32 of 256


def test_unknown_variant():
  with pytest.raises(ValueError, match='xl_32e'):
    _module('paper').get_config('nope')
  with pytest.raises(ValueError, match='dense'):
    _module('shapes_small').get_config('moe')


def test_image_text_latent_configs_validate():
  for variant, (dim, length) in _module('image_text_latent').VARIANTS.items():
    c = _module('image_text_latent').get_config(variant)
    c.data.source_dir, c.data.vae_dir, c.data.text_encoder_dir = '/data/images', '/models/vae', '/models/text'
    m = config_lib.validate(c)   # the folders themselves are checked when a run starts
    assert (m.text_encoder, m.text_states_dim, m.text_length) == ('precomputed', dim, length)
    c.data.text_encoder_dir = ''
    with pytest.raises(config_lib.ConfigError, match='model.text_encoder'):
      config_lib.validate(c)


def test_model_shapes_come_from_the_data_section():
  c = _module('shapes_tiny').get_config()
  assert c.model.image_size is None and c.model.vocab_size is None   # one home: the data section
  c.data.image_size, c.data.vocab_size, c.data.text_length = 64, 100, 20
  m = config_lib.validate(c)
  assert (m.image_size, m.in_channels, m.vocab_size, m.text_length) == (64, 3, 100, 20)
  c.model.image_size = 32   # an explicit model key the data decides must agree with it
  with pytest.raises(config_lib.ConfigError, match=r'model.image_size=32 .*data.image_size=64'):
    config_lib.validate(c)


def test_an_older_run_config_gets_the_keys_added_since():
  saved = config_lib.to_dict(_module('shapes_tiny').get_config())
  del saved['train']['remat'], saved['model']['scan_layers']   # written before these keys existed
  saved['train']['num_steps'] = 7
  filled = config_lib.with_defaults(saved)
  assert filled['train']['remat'] == 'none' and filled['model']['scan_layers'] is None
  assert filled['train']['num_steps'] == 7 and filled['model']['width'] == 128   # the run's own values kept
  config_lib.validate(ml_collections.ConfigDict(filled))
