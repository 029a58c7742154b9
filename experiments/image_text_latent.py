"""image_text_latent: EC-DiT on a user's image-text folder at 256 px, in the latent space of Stable Diffusion's
VAE (32×32×4 latents, patch 2) with a frozen pretrained text encoder — the paper's recipe (RMSProp + momentum,
lr 1e-4 after 20K warm-up steps, logit-normal t, 50% token masking, f_c = 2, bfloat16 compute).

All weights are local folders (no network at run time, no conversion step):
  data.vae_dir           a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors),
                         e.g. the `vae/` folder of a Stable Diffusion download or stabilityai/sd-vae-ft-mse
  data.text_encoder_dir  variant `t5`: a T5 encoder folder (config.json + model.safetensors + spiece.model),
                         e.g. google/t5-v1_1-xl; variant `clip`: a CLIP text model folder (config.json +
                         model.safetensors + vocab.json + merges.txt; or SD's text_encoder/ beside tokenizer/),
                         e.g. openai/clip-vit-large-patch14

  ecdit prepare --config=experiments/image_text_latent.py:t5 --config.data.source_dir=/path/to/images \\
      --config.data.vae_dir=/path/to/sd-vae --config.data.text_encoder_dir=/path/to/t5-v1_1-xl
  ecdit train --config=experiments/image_text_latent.py:t5 --config.data.source_dir=/path/to/images \\
      --config.data.vae_dir=/path/to/sd-vae --config.data.text_encoder_dir=/path/to/t5-v1_1-xl \\
      --workdir=runs/itl_t5
  ecdit sample --workdir=runs/itl_t5 --prompts='a photo of a red fox in the snow'
  ecdit eval --workdir=runs/itl_t5 --prompts=/path/to/geneval_metadata.jsonl

`prepare` imports the folder (256 px images + captions), then encodes every image through the VAE and every
caption through the text encoder once into a new dataset beside the imported one (batched, with a progress
bar, resumable). `train` reads the latents and text states; `sample` and `eval` encode the prompts with the
same text encoder and decode the generated latents with the VAE (`eval` scores the decoded RGB images). Variants: t5 (T5 v1.1 XL, 2048-d states, 120 tokens),
clip (CLIP ViT-L/14 text, 768-d states, 77 tokens). `--config.data.precompute_text=False` encodes captions
on the fly per step instead (the encoder stays frozen). The backbone is the paper's XL with 32 experts; for a
smaller run override e.g. `--config.model.size=B`.
"""
from ecdit.config.experiment import apply_paper_recipe, base_config

# variant -> (text states width, tokens per caption)
VARIANTS = {'t5': (2048, 120), 'clip': (768, 77)}


def get_config(variant=None):
  variant = variant or 't5'
  if variant not in VARIANTS:
    raise ValueError(f'image_text_latent variant {variant!r} is unknown: expected one of {sorted(VARIANTS)}')
  states_dim, length = VARIANTS[variant]
  c = base_config()
  c.name = f'image_text_latent_{variant}'

  m = c.model
  m.size = 'XL'
  m.routing, m.num_experts, m.capacity_factor = 'expert_choice', 32, 2.0
  m.image_size, m.in_channels, m.patch_size = 32, 4, 2     # 256 px through the 8× VAE
  m.text_encoder, m.text_states_dim = 'precomputed', states_dim   # text length: data.text_length
  m.dtype = 'bfloat16'

  d = c.data
  d.name = 'image_text_folder'
  d.source_dir = ''                 # required: --config.data.source_dir=/path/to/images
  d.image_size = 256
  d.num_validation_examples = 1000
  d.text_length = length
  d.caption_dropout = 0.1
  d.worker_count = 8
  d.vae_dir = ''                    # required: the diffusers AutoencoderKL folder
  d.text_encoder_dir = ''           # required: the T5 / CLIP folder
  d.precompute_text = True          # text states stored in the dataset (False: encoded per step, frozen)
  d.sample_latents = False          # store posterior means (True: one posterior sample per image)
  d.text_states_dtype = 'float16'   # storage of precomputed text states

  apply_paper_recipe(c)
  c.sample.prompts = ('a photo of a red fox in the snow;a bowl of fruit on a wooden table;'
                      'a lighthouse on a cliff at sunset;two cats sleeping on a sofa')
  return c
