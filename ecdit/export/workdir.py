"""Reading a training workdir (`ecdit train` output): resolved config, newest checkpoint, tokenizer file.

`<workdir>/config.json` is the resolved experiment config; `<workdir>/checkpoints/` the Orbax checkpoints
(ecdit.train.checkpoint). The restore target is built from that config, as `ecdit sample` does.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn

from ecdit.models.config import ModelConfig


class WorkdirError(ValueError):
  pass


@dataclasses.dataclass
class Restored:
  cfg: Any                 # ml_collections.ConfigDict of the run
  model_config: ModelConfig
  params: Any              # unboxed Flax params (EMA ones if asked)
  step: int
  data_state: Any
  tokenizer_path: Path | None


def load_run_config(workdir: str | Path):
  """The run's ConfigDict from `<workdir>/config.json`."""
  import ml_collections
  path = Path(workdir) / 'config.json'
  if not path.is_file():
    raise WorkdirError(f'--workdir={workdir}: no config.json there (is it a training run directory?)')
  d = json.loads(path.read_text())
  d.pop('resolved_model', None)
  if isinstance(d.get('data', {}).get('latent_shape'), list):
    d['data']['latent_shape'] = tuple(d['data']['latent_shape'])
  return ml_collections.ConfigDict(d)


def tokenizer_path(cfg) -> Path | None:
  """The run's sentencepiece model file if it exists (data.tokenizer_path, else the one beside the dataset);
  never trains or prepares anything."""
  from ecdit.data import config as data_config
  from ecdit.data import prepare, tokenizer
  try:
    explicit = data_config.option(cfg.data, 'tokenizer_path')
    path = Path(explicit) if explicit else tokenizer.tokenizer_file(prepare.dataset_dir(cfg.data),
                                                                     cfg.data.vocab_size)
  except (ValueError, KeyError, AttributeError):
    return None
  return path if path.is_file() else None


def restore(workdir: str | Path, *, ema: bool = False) -> Restored:
  """The newest readable checkpoint of a workdir (params, or EMA params with `ema`)."""
  from ecdit.train import checkpoint as ckpt_lib
  from ecdit.train import config as config_lib
  from ecdit.train import loop
  workdir = Path(workdir)
  cfg = load_run_config(workdir)
  mcfg = config_lib.validate(cfg)
  setup = loop.build(cfg, mcfg)
  ck = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints, use_async=False)
  try:
    restored = ck.restore_latest(setup.abstract_state)
  finally:
    ck.close()
  if restored is None:
    raise WorkdirError(f'--workdir={workdir}: no checkpoint in {workdir / "checkpoints"}')
  state, data_state, step = restored
  params = nn.unbox(state.ema_params if ema else state.params)
  return Restored(cfg, mcfg, params, int(step), data_state, tokenizer_path(cfg))
