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

The paper's other claims, each against `:ec` (8 experts, per-image routing, f_c = 1):

- more experts at fixed activated compute: `:ec_e4`, `:ec_e16`, `:ec_e32` (f_c = 1 keeps one expert FFN per
  token on average whatever E; total parameters grow with E);
- routing groups spanning images (the paper routes over 1024 tokens = 8 masked images in training, 512 at
  inference): `:ec_g4` routes over 256 tokens (4 images) in training and 128 (2 images) when sampling;
- capacity factor 1 vs 2: `:ec` vs `:ec2`.

Three seeds of a variant (replicas differ only in `seed`, so `ecdit compare` aggregates them):

  for s in 0 1 2; do
    ecdit train --config=experiments/shapes_small.py:ec --config.seed=$s --workdir=runs/ec_s$s
    ecdit eval --workdir=runs/ec_s$s --num_prompts=300 --images_per_prompt=4
  done
  ecdit compare --workdirs=runs/ec_s0,runs/ec_s1,runs/ec_s2,runs/tc_s0,runs/tc_s1,runs/tc_s2 --out=runs/cmp
"""
import pathlib

from ecdit.config.experiment import experiment_module

VARIANTS = {
    'dense': dict(routing='dense', num_experts=1, capacity_factor=1.0),
    'ec': dict(routing='expert_choice', num_experts=8, capacity_factor=1.0),
    'tc': dict(routing='token_choice', num_experts=8, capacity_factor=1.0, top_k=1),
    'ec2': dict(routing='expert_choice', num_experts=8, capacity_factor=2.0),
    'tc2': dict(routing='token_choice', num_experts=8, capacity_factor=1.0, top_k=2),
    'ec_e4': dict(routing='expert_choice', num_experts=4, capacity_factor=1.0),
    'ec_e16': dict(routing='expert_choice', num_experts=16, capacity_factor=1.0),
    'ec_e32': dict(routing='expert_choice', num_experts=32, capacity_factor=1.0),
    'ec_g4': dict(routing='expert_choice', num_experts=8, capacity_factor=1.0, routing_scope='group',
                  group_size=4 * 64, inference_group_size=2 * 64),   # 4 images of 64 tokens; 2 at inference
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
