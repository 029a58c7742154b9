"""The frozen pretrained models around EC-DiT when a config names them: the VAE (data.vae_dir) and the T5 /
CLIP text encoder (data.text_encoder_dir).

Training reads latents (and, with data.precompute_text, text states) that `ecdit prepare` stored in the
dataset; with data.precompute_text=False the text encoder runs inside the jitted train step on the tokens the
pipeline produces with the encoder's own tokenizer, its parameters passed beside the train state (never
updated, gradients stopped). Previews and `ecdit sample` encode prompts with the text encoder and decode the
generated latents with the VAE.

`check(cfg, mcfg)` compares the model config with the folders' config.json files (no weights read);
`text_encoder(data_cfg)` / `vae(data_cfg)` load the weights once per process.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ecdit import parallel
from ecdit.config import data as data_config
from ecdit.config.experiment import ConfigError
from ecdit.data.prepare import load_or_train_tokenizer
from ecdit.models import clip_text, hf_loading as hf, t5_encoder
from ecdit.models.text_pretrained import folder_kind, load_text_encoder
from ecdit.models.vae import VAEConfig, load_vae


def _opt(data_cfg, key: str):
  return data_config.option(data_cfg, key)


def uses_text_encoder(data_cfg) -> bool:
  return bool(_opt(data_cfg, 'text_encoder_dir'))


def text_on_the_fly(data_cfg) -> bool:
  """True when the text encoder runs in the train step (data.precompute_text=False)."""
  return uses_text_encoder(data_cfg) and not _opt(data_cfg, 'precompute_text')


def uses_vae(data_cfg) -> bool:
  return bool(_opt(data_cfg, 'vae_dir'))


def _text_states_dim(folder: pathlib.Path) -> tuple[str, int, int | None]:
  """(kind, states width, max positions or None) of a text encoder folder, from config.json only."""
  raw = hf.read_config(hf.require_dir(folder, 'text encoder'))
  if folder_kind(raw, folder) == 't5':
    return 't5', t5_encoder.T5Config.from_json(raw, folder).d_model, None
  c = clip_text.CLIPTextConfig.from_json(raw, folder)
  return 'clip', c.hidden_size, c.max_positions


def check(cfg, mcfg) -> None:
  """Raises ConfigError when the model cannot read what the configured VAE / text encoder produce."""
  d = cfg.data
  try:
    if uses_text_encoder(d):
      folder = pathlib.Path(_opt(d, 'text_encoder_dir')).expanduser()
      kind, dim, positions = _text_states_dim(folder)
      if mcfg.text_states_dim != dim:
        raise ConfigError(f'model.text_states_dim={mcfg.text_states_dim} is invalid: the {kind} text encoder '
                          f'in data.text_encoder_dir={str(folder)!r} gives {dim}-wide states (they must match)')
      if positions is not None and d.text_length > positions:
        raise ConfigError(f'data.text_length={d.text_length} is invalid: the CLIP text encoder in '
                          f'{str(folder)!r} has {positions} positions')
    if uses_vae(d):
      folder = hf.require_dir(pathlib.Path(_opt(d, 'vae_dir')).expanduser(), 'VAE')
      vcfg = VAEConfig.from_json(hf.read_config(folder), folder)
      f = vcfg.downsample_factor
      if d.image_size % f:
        raise ConfigError(f'data.image_size={d.image_size} is invalid: the VAE in {str(folder)!r} '
                          f'downsamples {f}×, so it must be a multiple of {f}')
      for key, want, what in (('image_size', d.image_size // f, f'data.image_size / {f}'),
                              ('in_channels', vcfg.latent_channels, "the VAE's latent channels")):
        if getattr(mcfg, key) != want:
          raise ConfigError(f'model.{key}={getattr(mcfg, key)} is invalid: expected {want} ({what}; the model '
                            'works on the latents of data.vae_dir)')
  except hf.LoadError as e:
    raise ConfigError(str(e).splitlines()[0]) from None


@functools.lru_cache(maxsize=2)
def _load_text(folder: str, length: int):
  return load_text_encoder(folder, length=length)


@functools.lru_cache(maxsize=2)
def _load_vae(folder: str):
  return load_vae(folder)


def text_encoder(data_cfg):
  """The configured PretrainedTextEncoder (loaded once per process), or None."""
  if not uses_text_encoder(data_cfg):
    return None
  return _load_text(str(_opt(data_cfg, 'text_encoder_dir')), int(data_cfg.text_length))


def vae(data_cfg):
  """The configured VAE (loaded once per process), or None."""
  return _load_vae(str(_opt(data_cfg, 'vae_dir'))) if uses_vae(data_cfg) else None


def pipeline_tokenizer(data_cfg):
  """What the input pipeline tokenises captions with: None (the dataset holds text states), the
  pretrained encoder's tokenizer (encoding on the fly), or ecdit's sentencepiece tokenizer."""
  if uses_text_encoder(data_cfg):
    return text_encoder(data_cfg).tokenizer if text_on_the_fly(data_cfg) else None
  return load_or_train_tokenizer(data_cfg)


class PromptEncoder:
  """Tokenizer-like (`encode_batch(texts) -> (states f32 [B,L,D], mask bool [B,L])`, `.length`) over a
  pretrained text encoder, for samplers that condition on prompts; '' gives the unconditional states."""

  def __init__(self, encoder):
    self.encoder = encoder
    self.length = encoder.length

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return self.encoder.encode_texts(list(texts))


def prompt_tokenizer(data_cfg, fallback=None):
  """What samplers encode prompts with: a PromptEncoder when a text encoder is configured, else `fallback`
  (or ecdit's tokenizer when no fallback is given)."""
  if uses_text_encoder(data_cfg):
    return PromptEncoder(text_encoder(data_cfg))
  if fallback is not None:
    return fallback
  return load_or_train_tokenizer(data_cfg)


def decoder(data_cfg) -> Callable[[Any], np.ndarray] | None:
  """latents → images in about [-1, 1] through the configured VAE, or None (the model makes pixels)."""
  v = vae(data_cfg)
  if v is None:
    return None
  return lambda latents: np.asarray(v.decode(np.asarray(latents, np.float32)))


def text_step(data_cfg, mesh) -> Callable[[dict], dict] | None:
  """With data.precompute_text=False: `batch -> batch` replacing the token ids in 'text' by the frozen
  encoder's states, jitted on `mesh` (parameters replicated, outside the train state, gradients stopped).
  None otherwise."""
  if not text_on_the_fly(data_cfg):
    return None
  enc = text_encoder(data_cfg)
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.device_put(enc.params, rep)

  @functools.partial(jax.jit, in_shardings=(rep, rows, rows), out_shardings=rows)
  def encode(p, ids, mask):
    return jax.lax.stop_gradient(enc.apply(p, ids, mask))

  def step(batch: dict) -> dict:
    return {**batch, 'text': encode(params, batch['text'], batch['text_mask'])}
  return step
