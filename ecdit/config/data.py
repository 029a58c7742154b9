"""The `data` section of an experiment config: defaults and validation."""
from __future__ import annotations

import ml_collections

DATASET_NAMES = ('shapes', 'image_text_folder')
BAD_IMAGE_POLICIES = ('skip', 'fail')
TEXT_DTYPES = ('float16', 'float32')   # storage of precomputed text states (ecdit.data.latents)


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for the embedded shapes dataset; experiment files start from this and override keys."""
  cfg = ml_collections.ConfigDict()
  cfg.name = 'shapes'                 # 'shapes' | 'image_text_folder'
  cfg.dir = './data'                  # root under which datasets (and their tokenizers) are written
  cfg.image_size = 32                 # square images, pixels
  cfg.num_train_examples = 50_000     # shapes only; a folder import uses every image
  cfg.num_validation_examples = 1_000  # shapes: generated; folder: held back from the images
  cfg.num_eval_prompts = 600          # shapes only: size of the eval_prompts split (100 per GenEval tag)
  cfg.source_dir = ''                 # image_text_folder: the folder of images + captions
  cfg.on_bad_image = 'skip'           # image_text_folder: 'skip' (and count) or 'fail' on unusable images
  cfg.latent_shape = ()               # image_text_folder: shape of optional <stem>.npy latents, () = none
  cfg.vocab_size = 128                # sentencepiece BPE vocabulary (the shapes corpus supports <= ~190)
  cfg.tokenizer_path = ''             # '' = train/reuse one next to the dataset; else this .model file
  cfg.text_length = 32                # token ids per caption (padded / truncated)
  cfg.caption_dropout = 0.1           # probability of the empty caption (classifier-free guidance)
  cfg.seed = 0                        # what a generated dataset holds (shapes scenes); not the training order
  cfg.worker_count = 0                # grain worker processes; 0 = in-process with a prefetch thread
  cfg.vae_dir = ''                    # diffusers AutoencoderKL folder: prepare encodes images to latents
  cfg.text_encoder_dir = ''           # T5 / CLIP text folder: frozen pretrained text encoder (no BPE training)
  cfg.precompute_text = True          # with text_encoder_dir: store text states in the dataset (else per step)
  cfg.sample_latents = False          # with vae_dir: store one posterior sample instead of the mean
  cfg.text_states_dtype = 'float16'   # storage type of precomputed text states
  return cfg


# Keys beyond the ones every experiment sets; a config without them (an older run's config.json) gets the
# defaults above.
OPTIONAL_KEYS = ('on_bad_image', 'latent_shape', 'tokenizer_path', 'vae_dir', 'text_encoder_dir',
                 'precompute_text', 'sample_latents', 'text_states_dtype')
OPTIONAL_DEFAULTS = {k: default_data_config()[k] for k in OPTIONAL_KEYS}


def option(cfg, key: str):
  """The value of an optional key (OPTIONAL_DEFAULTS) of a data config."""
  return cfg[key] if key in cfg else OPTIONAL_DEFAULTS[key]


def _fail(key: str, value, expected: str):
  raise ValueError(f'data.{key}={value!r} is invalid: expected {expected}')


def validate_data_config(cfg) -> None:
  """Raises ValueError naming the first bad key of a data config."""
  required = [k for k in default_data_config().keys() if k not in OPTIONAL_DEFAULTS]
  missing = [k for k in required if k not in cfg]
  if missing:
    raise ValueError(f'data config lacks key(s) {", ".join("data." + k for k in missing)}; '
                     'start from ecdit.data.default_data_config()')
  if cfg.name not in DATASET_NAMES:
    _fail('name', cfg.name, f'one of {DATASET_NAMES}')
  if not isinstance(cfg.dir, str) or not cfg.dir:
    _fail('dir', cfg.dir, 'a non-empty directory path')
  if not isinstance(cfg.image_size, int) or not 8 <= cfg.image_size <= 4096:
    _fail('image_size', cfg.image_size, 'an integer in [8, 4096]')
  for key, least in (('num_train_examples', 1), ('num_validation_examples', 0), ('num_eval_prompts', 0)):
    if not isinstance(cfg[key], int) or cfg[key] < least:
      _fail(key, cfg[key], f'an integer >= {least}')
  if cfg.name == 'image_text_folder' and not cfg.source_dir:
    _fail('source_dir', cfg.source_dir, "the folder to import when data.name='image_text_folder'")
  if option(cfg, 'on_bad_image') not in BAD_IMAGE_POLICIES:
    _fail('on_bad_image', option(cfg, 'on_bad_image'), f'one of {BAD_IMAGE_POLICIES}')
  shape = option(cfg, 'latent_shape')
  if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d > 0 for d in shape):
    _fail('latent_shape', shape, '() or a tuple of positive integers')
  if shape and cfg.name != 'image_text_folder':
    _fail('latent_shape', shape, "() for data.name='shapes' (latents come from a folder import)")
  if not isinstance(option(cfg, 'tokenizer_path'), str):
    _fail('tokenizer_path', option(cfg, 'tokenizer_path'), "'' or the path of a sentencepiece .model file")
  if not isinstance(cfg.vocab_size, int) or cfg.vocab_size < 8:
    _fail('vocab_size', cfg.vocab_size, 'an integer >= 8')
  if not isinstance(cfg.text_length, int) or cfg.text_length < 2:
    _fail('text_length', cfg.text_length, 'an integer >= 2 (room for one token and the end marker)')
  if not isinstance(cfg.caption_dropout, (int, float)) or not 0.0 <= cfg.caption_dropout <= 1.0:
    _fail('caption_dropout', cfg.caption_dropout, 'a probability in [0, 1]')
  if not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**31:
    _fail('seed', cfg.seed, 'an integer in [0, 2**31)')
  if not isinstance(cfg.worker_count, int) or cfg.worker_count < 0:
    _fail('worker_count', cfg.worker_count, 'an integer >= 0')
  for key in ('vae_dir', 'text_encoder_dir'):
    if not isinstance(option(cfg, key), str):
      _fail(key, option(cfg, key), "'' or a local model folder")
  for key in ('precompute_text', 'sample_latents'):
    if not isinstance(option(cfg, key), bool):
      _fail(key, option(cfg, key), 'True or False')
  if option(cfg, 'text_states_dtype') not in TEXT_DTYPES:
    _fail('text_states_dtype', option(cfg, 'text_states_dtype'), f'one of {TEXT_DTYPES}')
  if option(cfg, 'vae_dir') and cfg.name != 'image_text_folder':
    _fail('vae_dir', option(cfg, 'vae_dir'), "'' for data.name='shapes' (32 px RGB, no VAE)")
  if option(cfg, 'vae_dir') and shape:
    _fail('latent_shape', shape, '() with data.vae_dir (prepare computes the latents)')
