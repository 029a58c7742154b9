"""shapes_tiny: the default experiment — a tiny EC-DiT on the embedded 32×32 shapes world, sized to train
on 2 CPU cores in under 15 minutes to recognisable scenes.

  ecdit train                                              # same as the line below
  ecdit train --config=experiments/shapes_tiny.py --workdir=runs/shapes_tiny

Only what differs from `base_config()` is set here. The model's image size, channels, vocabulary and text
length come from the data section (32 px RGB shapes, a 128-piece tokenizer, 32 tokens: its defaults).
"""
from ecdit.config.experiment import base_config


def get_config(variant=None):
  if variant:
    raise ValueError(f'shapes_tiny has no variants (got {variant!r})')
  c = base_config()
  c.name = 'shapes_tiny'

  m = c.model
  # Patch 4 (an 8×8 token grid) rather than the paper's 2: 4× fewer tokens is what fits 2 CPU cores.
  m.patch_size = 4
  m.width, m.depth, m.num_heads, m.mlp_ratio = 128, 4, 4, 4
  m.routing, m.num_experts, m.capacity_factor, m.moe_every = 'expert_choice', 4, 2.0, 2
  m.text_width, m.text_depth, m.text_heads = 128, 1, 4

  c.data.num_train_examples = 20_000

  t = c.train
  t.num_steps, t.schedule, t.end_lr_factor, t.ema_decay = 2000, 'cosine', 0.1, 0.995
  return c
