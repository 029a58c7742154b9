"""shapes_small: dense vs expert choice vs token choice at equal activated compute on the shapes world.

The paper's comparison (EC-DiT vs dense vs GShard-style token choice) at a size that trains on 2 CPU cores:
shapes_tiny's width and patch grid with 6 blocks (3 sparse FFNs). Every variant has the same activated FFN
compute per token: `:ec` lets each of 8 experts pick S/8 tokens per image (capacity factor 1, so a token gets
one expert on average) and `:tc` sends each token to its top-1 expert (capacity factor 1). `:ec2` and `:tc2`
are the paper's pairing at twice the sparse-layer compute (f_c = 2 vs top-2). docs/results.md holds the
measured comparison and the procedure (about 15 minutes per variant on 2 cores):

  ecdit train --config=experiments/shapes_small.py:dense --workdir=runs/shapes_small_dense
  ecdit train --config=experiments/shapes_small.py:ec --workdir=runs/shapes_small_ec
  ecdit train --config=experiments/shapes_small.py:tc --workdir=runs/shapes_small_tc
  ecdit compare --workdirs=runs/shapes_small_dense,runs/shapes_small_ec,runs/shapes_small_tc --out=runs/compare
"""
import pathlib

from ecdit.config.experiment import experiment_module

VARIANTS = {
    'dense': dict(routing='dense', num_experts=1, capacity_factor=1.0),
    'ec': dict(routing='expert_choice', num_experts=8, capacity_factor=1.0),
    'tc': dict(routing='token_choice', num_experts=8, capacity_factor=1.0, top_k=1),
    'ec2': dict(routing='expert_choice', num_experts=8, capacity_factor=2.0),
    'tc2': dict(routing='token_choice', num_experts=8, capacity_factor=1.0, top_k=2),
}


def get_config(variant=None):
  variant = variant or 'ec'
  if variant not in VARIANTS:
    raise ValueError(f'shapes_small variant {variant!r} is unknown: expected one of {sorted(VARIANTS)}')
  # shapes_tiny's data (one prepare serves both), recipe, width and patch grid; 6 blocks and the variant's FFNs.
  c = experiment_module(pathlib.Path(__file__).with_name('shapes_tiny.py')).get_config()
  c.name = f'shapes_small_{variant}'
  c.model.depth = 6
  for k, v in VARIANTS[variant].items():
    c.model[k] = v
  return c
