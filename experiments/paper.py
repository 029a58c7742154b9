"""paper: the EC-DiT paper's Table 1 models with its training recipe (shared/research/paper.md §4).

Rectified flow, logit-normal t (μ=0, σ=1), 50% token masking, RMSProp with momentum, lr 1e-4 after 20K
warm-up steps, batch 4096, 800K steps, 32×32×4 latents (a 256² image through a VAE), patch 2, bfloat16
compute. Expert-choice models use f_c = 2 and route over groups of 1024 tokens in training (8 images of 128
kept tokens) and 512 at inference (2 images of 256 tokens), as the paper's implementation paragraph reports;
a variant name ending in `_image` (`xl_32e_image`) routes each image on its own instead (Algorithm 1). `gshard_*` are the token-choice top-2 baselines (routed per image). Data: latents
imported with the image_text_folder builder (the VAE runs elsewhere); the text encoder is our small
transformer of sizes.py (0.67B, T5 vocabulary size) standing in for the paper's CLIP-based one. Values the paper does not give (RMSProp decay,
eps, grad clipping, EMA) are our choices.

  ecdit train --config=experiments/paper.py:xl_32e --config.data.source_dir=/path/to/latents --workdir=runs/xl_32e
  ecdit params --config=experiments/paper.py:m_64e

Variants: xl_32e, xxl_32e, 3xl_32e, m_64e, dense_xl, dense_xxl, dense_3xl, dense_m, gshard_xl_32e,
xl_8e, xl_16e.
"""
from ecdit.config.experiment import apply_paper_recipe, base_config

# variant -> (size preset, routing, experts, depth override)
VARIANTS = {
    'xl_32e': ('XL', 'expert_choice', 32, None),
    'xxl_32e': ('XXL', 'expert_choice', 32, None),
    '3xl_32e': ('3XL', 'expert_choice', 32, None),
    'm_64e': ('M', 'expert_choice', 64, 38),
    'xl_8e': ('XL', 'expert_choice', 8, None),
    'xl_16e': ('XL', 'expert_choice', 16, None),
    'dense_xl': ('XL', 'dense', 1, None),
    'dense_xxl': ('XXL', 'dense', 1, None),
    'dense_3xl': ('3XL', 'dense', 1, None),
    'dense_m': ('M', 'dense', 1, 46),
    'gshard_xl_32e': ('XL', 'token_choice', 32, None),
}


def get_config(variant=None):
  variant = variant or 'xl_32e'
  base, per_image = variant.removesuffix('_image'), variant.endswith('_image')
  if base not in VARIANTS or (per_image and VARIANTS[base][1] != 'expert_choice'):
    raise ValueError(f'paper variant {variant!r} is unknown: expected one of {sorted(VARIANTS)}, an '
                     'expert-choice one optionally with the suffix _image')
  size, routing, experts, depth = VARIANTS[base]
  c = base_config()
  c.name = f'paper_{variant}'

  m = c.model
  m.size = size
  if depth is not None:
    m.depth = depth
  m.routing, m.num_experts = routing, experts
  m.capacity_factor = 1.0 if routing == 'token_choice' else 2.0
  if routing == 'token_choice':
    m.top_k = 2
  if routing == 'expert_choice' and not per_image:
    m.routing_scope, m.group_size, m.inference_group_size = 'group', 1024, 512
  m.patch_size = 2   # on the 32×32×4 latents (data.latent_shape); the preset's text encoder stands in for CLIP
  m.dtype = 'bfloat16'
  m.scan_layers = True   # XL-32E on 8 devices: compile 60 s at 8 blocks, 66 s at 28 (unrolled: 103 s, 412 s)

  c.data.name = 'image_text_folder'
  c.data.source_dir = ''            # required: --config.data.source_dir=/path/to/latents
  c.data.image_size = 256
  c.data.latent_shape = (32, 32, 4)
  c.data.vocab_size, c.data.text_length = 32_128, 77   # the presets' text encoder (ecdit/config/sizes.py)
  c.data.caption_dropout = 0.1
  c.data.worker_count = 8

  apply_paper_recipe(c)
  return c
