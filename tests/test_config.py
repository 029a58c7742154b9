"""Bad model configs fail early with a ValueError naming the field and the allowed values."""
import pytest

from ecdit.config.model import ModelConfig
from ecdit.models.ecdit import build_model
from ecdit.config.sizes import KNOWN, preset


@pytest.mark.parametrize('override, field, allowed', [
    ({'width': 100, 'num_heads': 6}, 'model.width=100', 'multiple of num_heads=6'),
    ({'width': 48, 'num_heads': 6, 'num_kv_heads': 4}, 'model.num_kv_heads=4', 'divisor of num_heads=6'),
    ({'image_size': 33, 'patch_size': 2}, 'model.image_size=33', 'multiple of patch_size=2'),
    ({'routing': 'top1'}, "model.routing='top1'", "'expert_choice', 'token_choice', 'dense'"),
    ({'moe_backend': 'scatter'}, "model.moe_backend='scatter'", "'gather', 'onehot'"),
    ({'routing_scope': 'global'}, "model.routing_scope='global'", "'image', 'group', 'batch'"),
    ({'text_encoder': 't5'}, "model.text_encoder='t5'", "'transformer', 'precomputed'"),
    ({'size': 'XXXL'}, "model.size='XXXL'", "'tiny', 'S', 'B', 'XL', 'XXL', '3XL', 'M', 'M-64E'"),
])
def test_bad_values_name_field_and_choices(override, field, allowed):
  with pytest.raises(ValueError) as e:
    build_model(dict({'size': 'tiny'}, **override) if 'size' not in override else override)
  assert field in str(e.value) and allowed in str(e.value)


def test_unknown_key():
  with pytest.raises(ValueError, match='unknown key'):
    ModelConfig.from_dict({'size': 'tiny', 'widht': 3})


def test_presets():
  assert set(KNOWN) >= {'tiny', 'S', 'B', 'XL', 'XXL', '3XL', 'M', 'M-64E'}
  m = ModelConfig.from_dict({'size': 'M-64E'})
  assert (m.width, m.depth, m.num_heads, m.kv_heads, m.num_experts) == (3072, 38, 48, 12, 64)
  xl = ModelConfig.from_dict({'size': 'XL-32E'})
  assert (xl.width, xl.depth, xl.kv_heads, xl.num_experts, xl.head_dim) == (1152, 28, 6, 32, 64)
  assert (xl.image_size, xl.in_channels, xl.patch_size, xl.num_tokens) == (32, 4, 2, 256)
  for name in ('XL', 'XXL', '3XL', 'M', 'S', 'B', 'tiny'):
    ModelConfig.from_dict({'size': name})     # every preset validates
  assert preset('M')['depth'] == 46 and preset('M-32E')['depth'] == 46
