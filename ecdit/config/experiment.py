"""The experiment config schema: every key with its default, validation, and a text dump for golden files.

Experiments (`experiments/*.py`) start from `base_config()` and override values; they never add keys.
Keys that DESIGN §3 promises (seed, model.size, model.num_experts, model.capacity_factor, model.routing,
data.dir, train.num_steps, train.batch_size, train.log_every, train.checkpoint_every, mesh.*) live here.

`model.*` holds every `ModelConfig` field as a typed placeholder: `None` means "take the preset's
(`model.size`) or ModelConfig's default", so any field can be overridden from the command line.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict

from ecdit import errors
from ecdit.config.data import default_data_config, option, validate_data_config
from ecdit.config.model import ModelConfig

OPTIMIZERS = ('adamw', 'rmsprop')
SCHEDULES = ('constant', 'cosine')
NAN_POLICIES = ('skip', 'stop')
T_SAMPLINGS = ('logit_normal', 'uniform')
SAMPLERS = ('euler', 'heun')
MAX_LEARNING_RATE = 10.0
MAX_SAMPLE_STEPS = 10_000   # ODE steps of a sampler: far past where more steps change a sample
REMAT_POLICIES = ('none', 'full', 'dots', 'save_moe')   # train.remat; ecdit.models.stack says what each keeps
MOMENT_DTYPES = ('float32', 'bfloat16')   # train.moment_dtype; ecdit.train.optim.moment_dtype says what each does
_TYPES = {'int': int, 'float': float, 'str': str, 'bool': bool}


def _model_section() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.size = config_dict.placeholder(str)
  for f in dataclasses.fields(ModelConfig):
    base = str(f.type).split('|')[0].strip()
    m[f.name] = config_dict.placeholder(_TYPES.get(base, object))
  return m


def _data_section() -> ml_collections.ConfigDict:
  return default_data_config()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'experiment'            # default workdir is ./runs/<name>
  c.seed = 0                       # model init, per-step randomness (fold_in(seed, step)), data order
  c.model = _model_section()
  c.data = _data_section()

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.t_sampling = 'logit_normal'  # or 'uniform'
  c.diffusion.t_mean = 0.0                 # logit-normal location
  c.diffusion.t_std = 1.0                  # logit-normal scale
  c.diffusion.mask_ratio = 0.0             # fraction of image tokens dropped from the backbone (paper: 0.5)

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 1000
  t.batch_size = 32                # global batch
  t.optimizer = 'adamw'            # or 'rmsprop' (with momentum, the paper's)
  t.learning_rate = 1e-3           # peak
  t.schedule = 'constant'          # after warm-up: 'constant' or 'cosine' (to end_lr_factor·peak)
  t.warmup_steps = 100             # linear warm-up from 0
  t.end_lr_factor = 0.0
  t.weight_decay = 0.0             # AdamW only (decoupled)
  t.b1 = 0.9                       # AdamW
  t.b2 = 0.999                     # AdamW
  t.eps = 1e-8
  t.rms_decay = 0.999              # RMSProp second-moment decay
  t.momentum = 0.9                 # RMSProp momentum
  t.grad_clip = 1.0                # global-norm clipping; 0 disables
  t.ema_decay = 0.999              # EMA of parameters, warm-up min(decay, (1+n)/(10+n)); 0: ema = params
  t.nan_policy = 'skip'            # non-finite loss/grads/update: 'skip' the update (and count) or 'stop'
  t.max_skipped_steps = 10         # 'skip' stops the run after this many consecutive skipped steps; 0: never
  t.remat = 'none'                 # rematerialise each scanned unit: 'none' | 'full' | 'dots' | 'save_moe'
  t.moment_dtype = 'float32'       # optimizer moments: 'float32' (optax's: the params' dtype) or 'bfloat16'
  t.log_every = 50
  t.checkpoint_every = 500         # and always at the end
  t.keep_checkpoints = 3
  t.async_checkpoints = True
  t.sample_every = 500             # preview grid to workdir/samples; 0 disables (except the final one)
  t.final_sample = True

  s = c.sample = ml_collections.ConfigDict()
  s.sampler = 'euler'              # or 'heun'
  s.num_steps = 25
  s.cfg_scale = 3.0
  s.seed = 0
  s.use_ema = True
  s.prompts = 'a red circle;a blue square;two green triangles;a yellow circle to the left of a red square'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.expert = 1
  c.mesh.model = 1
  return c


# The source checkout this package runs from (an editable install): its experiments/ folder, if there is one.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def experiment_path(spec: str) -> str:
  """`--config`'s value (`path[:variant]`) with a relative path that does not exist here but does in the
  checkout ecdit runs from (`experiments/shapes_tiny.py` from another directory) made absolute; anything
  else unchanged (the caller reports a missing file, naming the path as given)."""
  path, sep, variant = str(spec).partition(':')
  candidate = REPO_ROOT / path
  if path and not pathlib.Path(path).is_absolute() and not pathlib.Path(path).exists() and candidate.is_file():
    return f'{candidate}{sep}{variant}'
  return spec


def experiment_module(path):
  """The module of an experiment file (what `--config=path` reads), loaded by path: experiment files are
  not a package, so one that builds on another (shapes_small on shapes_tiny) loads it with this. A relative
  path is looked up in the current directory, then in ecdit's checkout (`experiment_path`)."""
  path = pathlib.Path(experiment_path(str(path)))
  spec = importlib.util.spec_from_file_location(f'ecdit_experiment_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_paper_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's training recipe (shared/research/paper.md §4): rectified flow with logit-normal t, 50% token
  masking, RMSProp with momentum at lr 1e-4 after 20K warm-up steps, batch 4096 for 800K steps. RMSProp's
  decay/eps, gradient clipping and EMA are not given by the paper: ours. Experiments call this, then override."""
  c.diffusion.t_sampling = 'logit_normal'
  c.diffusion.t_mean, c.diffusion.t_std = 0.0, 1.0
  c.diffusion.mask_ratio = 0.5
  t = c.train
  t.num_steps, t.batch_size = 800_000, 4096
  t.optimizer, t.learning_rate, t.schedule, t.warmup_steps = 'rmsprop', 1e-4, 'constant', 20_000
  t.rms_decay, t.momentum, t.eps = 0.999, 0.9, 1e-8
  t.grad_clip, t.ema_decay = 1.0, 0.9999
  t.log_every, t.checkpoint_every, t.sample_every = 100, 5000, 20_000
  t.keep_checkpoints = 5
  c.sample.num_steps, c.sample.cfg_scale = 50, 4.5
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.model = -1, 1, 1, 1
  return c


def data_implied_model(data_cfg, text_encoder: str | None = 'transformer') -> dict[str, tuple[Any, str]]:
  """The model fields the data decides: {field: (value, where it comes from)}.

  The model's image size and channels are the dataset's pixels (or its stored latents), its vocabulary and
  text length the tokenizer's. With data.vae_dir / data.text_encoder_dir the frozen models' own configs
  decide those shapes instead; they are checked when a run starts (ecdit.train.frozen.check), not here. A
  model reading precomputed text states has no vocabulary to take.
  """
  latent, vae_dir = tuple(option(data_cfg, 'latent_shape') or ()), option(data_cfg, 'vae_dir')
  out = {'text_length': (data_cfg.text_length, 'data.text_length')}
  if text_encoder != 'precomputed' and not option(data_cfg, 'text_encoder_dir'):
    out['vocab_size'] = (data_cfg.vocab_size, 'data.vocab_size')
  if latent and not vae_dir:
    out['image_size'] = (latent[0], 'data.latent_shape[0]')
    out['in_channels'] = (latent[-1], 'data.latent_shape[-1]')
  elif not vae_dir:
    out['image_size'] = (data_cfg.image_size, 'data.image_size')
    out['in_channels'] = (3, 'RGB images (3)')
  return out


def model_config(cfg) -> ModelConfig:
  """The resolved ModelConfig of an experiment: the preset (model.size), then what the data implies
  (`data_implied_model`), then the explicit model.* keys; validated."""
  values = {k: v for k, v in cfg.model.items() if v is not None}
  implied = data_implied_model(cfg.data, values.get('text_encoder'))
  implied = {k: v for k, (v, _) in implied.items() if k not in values}
  return ModelConfig.from_dict({**implied, **values})


class ConfigError(errors.UsageError, ValueError):
  """A bad config value; the message is one line naming the key."""


def _fail(key, value, expected):
  raise ConfigError(f'{key}={value!r} is invalid: expected {expected}')


def _check_keys(cfg, reference, prefix=''):
  for k in cfg.keys():
    if k not in reference:
      known = ', '.join(sorted(reference.keys()))
      raise ConfigError(f'{prefix}{k}: unknown config key; known keys here are: {known}')
    if isinstance(reference[k], ml_collections.ConfigDict) and isinstance(cfg[k], ml_collections.ConfigDict):
      if k != 'model':
        _check_keys(cfg[k], reference[k], f'{prefix}{k}.')


def validate(cfg) -> ModelConfig:
  """Checks every section; raises ConfigError (one line naming the key) or returns the ModelConfig."""
  _check_keys(cfg, base_config())

  def integer(key, lo=1):
    v = cfg
    for part in key.split('.'):
      v = v[part]
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
      _fail(key, v, f'an integer >= {lo}')
    return v

  def number(key, lo=None, hi=None, lo_open=False, hi_open=False):
    v = cfg
    for part in key.split('.'):
      v = v[part]
    bad = not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v)   # nan / inf: never
    bad = bad or (lo is not None and (v <= lo if lo_open else v < lo))
    bad = bad or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
      lo_s = '' if lo is None else f"{'>' if lo_open else '>='} {lo}"
      hi_s = '' if hi is None else f"{'<' if hi_open else '<='} {hi}"
      _fail(key, v, 'a finite number ' + ' and '.join(x for x in (lo_s, hi_s) if x))
    return v

  def choice(key, allowed):
    v = cfg
    for part in key.split('.'):
      v = v[part]
    if v not in allowed:
      _fail(key, v, f'one of {list(allowed)}')

  integer('seed', lo=0)
  if not isinstance(cfg.name, str) or not cfg.name or '/' in cfg.name:
    _fail('name', cfg.name, 'a non-empty name without "/"')
  for k in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    integer(f'train.{k}')
  for k in ('warmup_steps', 'sample_every', 'max_skipped_steps'):
    integer(f'train.{k}', lo=0)
  choice('train.optimizer', OPTIMIZERS)
  choice('train.schedule', SCHEDULES)
  choice('train.nan_policy', NAN_POLICIES)
  choice('train.remat', REMAT_POLICIES)
  choice('train.moment_dtype', MOMENT_DTYPES)
  # An AdamW / RMSProp step moves each parameter by about the learning rate: above 10 it is a typo, not a run.
  number('train.learning_rate', lo=0, hi=MAX_LEARNING_RATE, lo_open=True)
  number('train.end_lr_factor', lo=0, hi=1)
  number('train.weight_decay', lo=0)
  for k in ('b1', 'b2', 'rms_decay', 'momentum', 'ema_decay'):
    number(f'train.{k}', lo=0, hi=1, hi_open=True)
  number('train.eps', lo=0, lo_open=True)
  number('train.grad_clip', lo=0)
  choice('diffusion.t_sampling', T_SAMPLINGS)
  number('diffusion.t_std', lo=0, lo_open=True)
  number('diffusion.t_mean')
  number('diffusion.mask_ratio', lo=0, hi=1, hi_open=True)
  choice('sample.sampler', SAMPLERS)
  if integer('sample.num_steps') > MAX_SAMPLE_STEPS:
    _fail('sample.num_steps', cfg.sample.num_steps, f'an integer from 1 to {MAX_SAMPLE_STEPS}')
  integer('sample.seed', lo=0)
  number('sample.cfg_scale', lo=0)
  if not isinstance(cfg.sample.prompts, str) or not [p for p in cfg.sample.prompts.split(';') if p.strip()]:
    _fail('sample.prompts', cfg.sample.prompts, "a ';'-separated list of prompts")
  for axis in ('data', 'fsdp', 'expert', 'model'):
    v = cfg.mesh[axis]
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      _fail(f'mesh.{axis}', v, 'a positive integer or -1 (the rest of the devices)')
  if sum(cfg.mesh[a] == -1 for a in ('data', 'fsdp', 'expert', 'model')) > 1:
    _fail('mesh', dict(cfg.mesh), 'at most one axis of size -1')

  try:
    validate_data_config(cfg.data)
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None

  try:
    mcfg = model_config(cfg)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None

  text_dir = option(cfg.data, 'text_encoder_dir')
  if text_dir and mcfg.text_encoder != 'precomputed':
    _fail('model.text_encoder', mcfg.text_encoder,
          "'precomputed' with data.text_encoder_dir (the model reads the frozen encoder's states)")
  if not text_dir and mcfg.text_encoder != 'transformer':
    _fail('model.text_encoder', mcfg.text_encoder,
          "'transformer' for training on token ids (or set data.text_encoder_dir for a pretrained encoder)")
  # An explicit model.* key that the data decides must agree with it (unset ones were taken from it).
  for mkey, (want, where) in data_implied_model(cfg.data, mcfg.text_encoder).items():
    if getattr(mcfg, mkey) != want:
      _fail(f'model.{mkey}', getattr(mcfg, mkey), f'{where}={want!r} (they must match)')
  return mcfg


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (a run's config.json) with the keys added since it was written set to their defaults
  (e.g. train.remat, train.moment_dtype, model.scan_layers): older runs keep restoring, with the behaviour they were trained with."""
  def merge(base, over):
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  return merge(to_dict(base_config()), saved)


def to_dict(cfg) -> dict[str, Any]:
  return json.loads(cfg.to_json_best_effort())


def dump(cfg) -> str:
  """A stable text dump: one `key: value` line per leaf, sorted, then the resolved model config."""
  lines = []

  def walk(d, prefix):
    for k in sorted(d.keys()):
      v = d[k]
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(v, f'{prefix}{k}.')
      else:
        lines.append(f'{prefix}{k}: {v!r}')

  walk(cfg, '')
  lines.append('')
  lines.append('# resolved model (preset + overrides)')
  for k, v in sorted(model_config(cfg).to_dict().items()):
    lines.append(f'resolved.model.{k}: {v!r}')
  return '\n'.join(lines) + '\n'
