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
from ecdit.config.experiment import base_config

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
  c = base_config()
  c.name = f'shapes_small_{variant}'
  c.seed = 0

  m = c.model
  # Patch 4 (8×8 tokens) like shapes_tiny: patch 2 at this width is ~2 s/step on 2 cores.
  m.image_size, m.in_channels, m.patch_size = 32, 3, 4
  m.width, m.depth, m.num_heads, m.mlp_ratio, m.moe_every = 128, 6, 4, 4, 2
  m.text_width, m.text_depth, m.text_heads = 128, 1, 4
  m.vocab_size, m.text_length = 128, 32
  for k, v in VARIANTS[variant].items():
    m[k] = v

  c.data.dir = './data'
  c.data.image_size = 32
  c.data.num_train_examples = 20_000  # the shapes_tiny dataset: one prepare serves both experiments
  c.data.vocab_size, c.data.text_length = 128, 32

  c.diffusion.t_sampling = 'logit_normal'
  c.diffusion.mask_ratio = 0.0

  t = c.train
  t.num_steps, t.batch_size = 2000, 32
  t.optimizer, t.learning_rate, t.schedule, t.warmup_steps = 'adamw', 1e-3, 'cosine', 100
  t.end_lr_factor = 0.1
  t.grad_clip, t.ema_decay = 1.0, 0.995
  t.log_every, t.checkpoint_every, t.sample_every = 50, 500, 500

  c.sample.num_steps, c.sample.cfg_scale = 25, 3.0
  return c
