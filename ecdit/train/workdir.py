"""Reading a training workdir (`ecdit train` output): resolved config, newest checkpoint, tokenizer, VAE.

  run = restore('runs/shapes_tiny', ema=True)     # cfg, model_config, model, params, step, data_state
  images = sampler_lib.sample_prompts(sampler, run.params, run.tokenizer, prompts, seed, decode=run.decode)

`<workdir>/config.json` is the resolved experiment config; `<workdir>/checkpoints/` the Orbax checkpoints
(ecdit.train.checkpoint). The restore target is built from that config with `loop.build`. One loader for
`ecdit sample`, `eval`, `analyze`, `export` and `upcycle`; every problem with the workdir itself is a
one-line WorkdirError naming the path.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from ecdit import outputs
from ecdit.config import data as data_config
from ecdit.config import experiment as config_lib
from ecdit.config.model import ModelConfig
from ecdit.data import prepare, tokenizer
from ecdit.train import checkpoint as ckpt_lib
from ecdit.train import frozen
from ecdit.train import loop


WorkdirError = outputs.WorkdirError   # its home is the output guard's layer, which training checks with it


@dataclasses.dataclass
class Restored:
  workdir: Path
  cfg: Any                 # ml_collections.ConfigDict of the run
  model_config: ModelConfig
  model: Any               # the run's flax module (loop.build)
  params: Any              # unboxed Flax params (EMA ones if asked)
  step: int
  data_state: Any
  tokenizer_path: Path | None   # the run's sentencepiece file, if it has one

  @functools.cached_property
  def tokenizer(self):
    """What prompts are encoded with: the run's frozen pretrained text encoder, or its sentencepiece file.
    Reading a run never prepares a dataset or trains a tokenizer (that would write beside someone's data)."""
    if frozen.uses_text_encoder(self.cfg.data):
      return frozen.prompt_tokenizer(self.cfg.data)
    if self.tokenizer_path is None:
      raise WorkdirError(f'--workdir={self.workdir}: the run\'s tokenizer is missing (data.dir='
                         f'{self.cfg.data.dir!r}, read from {Path.cwd()}); expected the file the training '
                         f'wrote beside its dataset, or set data.tokenizer_path in {self.workdir}/config.json')
    fix = (tokenizer.run_fix(self.workdir / 'config.json') if data_config.option(self.cfg.data, 'tokenizer_path')
           else tokenizer.DATASET_FIX)
    return tokenizer.load_tokenizer(self.tokenizer_path, self.cfg.data.vocab_size, self.cfg.data.text_length, fix)

  @functools.cached_property
  def decode(self) -> Callable[[Any], Any] | None:
    """latents → pixels in about [-1, 1] through the run's VAE (data.vae_dir); None for a pixel model."""
    return frozen.decoder(self.cfg.data)

  @property
  def image_size(self) -> int:
    """Side of the generated images in pixels (after the VAE decodes latents)."""
    return int(self.cfg.data.image_size if frozen.uses_vae(self.cfg.data) else self.model_config.image_size)


def _train_hint(workdir) -> str:
  return f'train a run first: `ecdit train --config=... --workdir={workdir}`'


def load_run_config(workdir: str | Path):
  """The run's ConfigDict from `<workdir>/config.json` (resolved model included, as trained)."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f'--workdir={workdir} is a file, not a training run directory')
  if not workdir.is_dir():
    raise WorkdirError(f'--workdir={workdir} does not exist, so no config.json there ({_train_hint(workdir)})')
  path = workdir / 'config.json'
  if not path.is_file():
    raise WorkdirError(f'--workdir={workdir}: no config.json there (is it a training run directory? '
                       f'{_train_hint(workdir)})')
  try:
    d = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} is unreadable: {e}') from None
  expected = 'expected a JSON object whose model, train and data entries are objects'
  if not isinstance(d, dict):
    raise WorkdirError(f'{path} is not an ecdit run config ({expected})')
  if bad := [k for k in ('model', 'train', 'data') if not isinstance(d.get(k, {}), dict)]:
    raise WorkdirError(f'{path} is not an ecdit run config ({expected}; got {", ".join(bad)})')
  d.pop('resolved_model', None)
  try:
    d = config_lib.with_defaults(d)
    if isinstance(d.get('data', {}).get('latent_shape'), list):
      d['data']['latent_shape'] = tuple(d['data']['latent_shape'])
    return ml_collections.ConfigDict(d)
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise WorkdirError(f'{path} is not an ecdit run config ({type(e).__name__}: {e})') from None


def tokenizer_path(cfg) -> Path | None:
  """The run's sentencepiece model file if it exists (data.tokenizer_path, else the one beside the dataset);
  never trains or prepares anything."""
  try:
    explicit = data_config.option(cfg.data, 'tokenizer_path')
    path = Path(explicit) if explicit else tokenizer.tokenizer_file(prepare.dataset_dir(cfg.data),
                                                                     cfg.data.vocab_size)
  except (ValueError, KeyError, AttributeError):
    return None
  return path if path.is_file() else None


def restore(workdir: str | Path, *, ema: bool = False,
            require: Callable[[Any, ModelConfig], None] | None = None, step: int | None = None) -> Restored:
  """The newest readable checkpoint of a workdir (params, or EMA params with `ema`); checkpoint `step` only
  when given (a WorkdirError lists the steps there are if it is not one of them).

  `require(cfg, model_config)` may raise ValueError to refuse the run before any checkpoint is read.
  Raises WorkdirError for a missing workdir / config.json / checkpoint, ConfigError for an invalid config.
  """

  workdir = Path(workdir)
  cfg = load_run_config(workdir)
  ck_dir = workdir / 'checkpoints'
  if not ck_dir.is_dir() or not any(p.name.isdigit() for p in ck_dir.iterdir()):
    raise WorkdirError(f'--workdir={workdir}: no checkpoint in {ck_dir} ({_train_hint(workdir)})')
  mcfg = config_lib.validate(cfg)
  if require is not None:
    require(cfg, mcfg)
  setup = loop.build(cfg, mcfg)
  # Reading never moves or deletes a file: the run may still be training.
  ck = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints, use_async=False, read_only=True)
  try:
    if step is not None and step not in ck.steps():
      have = ', '.join(map(str, ck.steps())) or 'none'
      raise WorkdirError(f'--step={step}: {ck_dir} has no checkpoint of step {step} (steps there: {have})')
    restored = ck.restore_latest(setup.abstract_state, step=step)
  except ckpt_lib.CheckpointMismatchError as e:   # the model config.json describes is not the one trained
    raise WorkdirError(f'--workdir={workdir}: the checkpoints in {ck_dir} do not match the run\'s config.json '
                       f'(latest step {e.step}: {e.reason}); was config.json edited after training?') from e
  finally:
    ck.close()
  if restored is None:
    raise WorkdirError(f'--workdir={workdir}: no readable checkpoint in {ck_dir}')
  state, data_state, step = restored
  params = nn.unbox(state.ema_params if ema else state.params)
  return Restored(workdir, cfg, mcfg, setup.model, params, int(step), data_state, tokenizer_path(cfg))
