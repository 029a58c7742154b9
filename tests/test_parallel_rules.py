"""ecdit.parallel.rules: the logical→mesh table, parameter and batch shardings, golden PartitionSpecs.

Regenerate the golden files after an intended change with:
  ECDIT_UPDATE_GOLDEN=1 pytest tests/test_parallel_rules.py
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ecdit.models import ecdit as ecdit_lib
from ecdit.models import stack
from ecdit.config.model import ModelConfig
from ecdit.config.sizes import preset
from ecdit.parallel import (LOGICAL_RULES, batch_sharding, logical_to_spec, make_mesh, param_shardings, param_specs,
                            shard_params)
from ecdit.config import experiment as config_lib

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / 'golden'
TINY = ModelConfig(**dict(preset('tiny'), num_experts=8))
# Experiment configs with golden specs (the paper's other sizes repeat the same rules at other widths).
CASES = [('shapes_tiny', None), ('shapes_small', 'dense'), ('shapes_small', 'ec'), ('shapes_small', 'tc'),
         ('paper', 'xl_32e'), ('paper', 'm_64e')]


def _experiment(name, variant):
  spec = importlib.util.spec_from_file_location(f'exp_{name}', REPO / 'experiments' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return config_lib.model_config(mod.get_config(variant))


def spec_dump(model_cfg) -> str:
  """One line per parameter kind: path (block numbers folded to `*`) → mesh PartitionSpec and shape. A
  scanned stack is dumped per block (its leading 'layers' axis is never split), so both layouts share goldens."""
  boxed = ecdit_lib.abstract_params(ecdit_lib.build_model(model_cfg))
  specs = traverse_util.flatten_dict(stack.to_unrolled(param_specs(boxed), model_cfg))
  shapes = traverse_util.flatten_dict(nn.unbox(boxed))
  lines = {}
  for path, spec in specs.items():
    key = re.sub(r'block_\d+', 'block_*', '/'.join(path))
    lines.setdefault(key, f'{key}: {spec}')
  return '\n'.join(sorted(lines.values())) + '\n'


def test_table_covers_every_logical_name():
  names = {n for n, _ in LOGICAL_RULES}
  assert {'embed', 'mlp', 'heads', 'kv', 'expert', 'vocab', 'patch', 'text_embed', 'cond', 'batch', 'length',
          'group', 'capacity'} <= names
  # A routing group's token axis and the capacity axis are never split.
  assert dict(LOGICAL_RULES)['length'] is None and dict(LOGICAL_RULES)['capacity'] is None


def test_logical_to_spec():
  assert logical_to_spec(('expert', 'embed', 'mlp')) == P('expert', 'fsdp', 'model')
  assert logical_to_spec(('embed', 'embed')) == P('fsdp', None)          # a second 'embed' stays whole
  assert logical_to_spec(('batch', 'length', 'embed')) == P(('data', 'fsdp', 'expert'), None, None)
  with pytest.raises(ValueError, match='no rule'):
    logical_to_spec(('nonsense',))


@pytest.fixture(scope='module')
def tiny_boxed():
  model = ecdit_lib.build_model(TINY)
  return jax.jit(lambda k: ecdit_lib.init_params(model, k))(jax.random.key(0))


def test_param_shardings_and_shard_params(tiny_boxed):
  mesh = make_mesh(dict(data=1, fsdp=2, expert=2, model=2))
  sh = param_shardings(tiny_boxed, mesh)
  moe = sh['block_1']['moe']
  assert moe['wi'].spec == P('expert', 'fsdp', 'model') and moe['router'].spec == P('fsdp', 'expert')
  assert jax.tree.structure(sh) == jax.tree.structure(nn.unbox(tiny_boxed))
  placed = shard_params(tiny_boxed, mesh)
  wi = placed['block_1']['moe']['wi']
  assert wi.sharding.spec == P('expert', 'fsdp', 'model')
  assert wi.addressable_shards[0].data.shape == (4, 16, 64)    # [8, 32, 128] / (2, 2, 2)
  np.testing.assert_array_equal(np.asarray(wi), np.asarray(nn.unbox(tiny_boxed)['block_1']['moe']['wi']))


def test_batch_sharding():
  mesh = make_mesh(dict(data=2, fsdp=1, expert=4, model=1))
  x = jax.device_put(jnp.zeros((16, 3, 5)), batch_sharding(mesh))
  assert x.addressable_shards[0].data.shape == (2, 3, 5)


@pytest.mark.parametrize('name,variant', CASES, ids=[f'{n}:{v}' if v else n for n, v in CASES])
def test_golden_partition_specs(name, variant):
  text = spec_dump(_experiment(name, variant))
  path = GOLDEN / (f'partition_specs_{name}_{variant}.txt' if variant else f'partition_specs_{name}.txt')
  if os.environ.get('ECDIT_UPDATE_GOLDEN') == '1':
    path.write_text(text)
  # Known without the golden file, so regenerating it cannot bless a bug: Megatron's column-parallel input
  # projections (in over fsdp, out over model) and row-parallel output projections, experts split first.
  specs = dict(line.split(': ', 1) for line in text.splitlines())
  for layer in ('self_attn/query', 'self_attn/key', 'self_attn/value', 'cross_attn/query'):
    assert specs[f'block_*/{layer}/kernel'] == "P('fsdp', 'model')", layer
  assert specs['block_*/self_attn/out/kernel'] == "P('model', 'fsdp')"
  if 'block_*/moe/wi' in specs:
    assert specs['block_*/moe/wi'] == "P('expert', 'fsdp', 'model')"
    assert specs['block_*/moe/wo'] == "P('expert', 'model', 'fsdp')"
  if 'block_*/ffn/wi/kernel' in specs:
    assert (specs['block_*/ffn/wi/kernel'], specs['block_*/ffn/wo/kernel']) == ("P('fsdp', 'model')",
                                                                                "P('model', 'fsdp')")
  assert path.exists(), f'{path} is missing: run with ECDIT_UPDATE_GOLDEN=1'
  assert text == path.read_text(), f'{name}:{variant} differs from {path}; regenerate with ECDIT_UPDATE_GOLDEN=1'
