"""Frozen pretrained text encoders (T5 encoder, CLIP text transformer) from local transformers-layout folders.

    enc = load_text_encoder('/path/to/t5-v1_1-xl', length=120)   # config.json, model.safetensors, spiece.model
    states, mask = enc.encode_texts(['a red cube', ''])           # float32 [2, 120, d], bool [2, 120]

The folder kind is read from config.json (`model_type` t5 / clip_text_model / clip). The tokenizer files are
looked up in the folder itself, else in a sibling `tokenizer/` folder (Stable Diffusion pipeline layout:
`text_encoder/` + `tokenizer/`), or where `tokenizer_dir` says. Nothing here imports torch or transformers.

Use with EC-DiT: `model.text_encoder='precomputed'`, `model.text_states_dim=enc.states_dim`,
`model.text_length=enc.length`, and feed `(states, mask)` as `(text, text_mask)`. Either precompute the
states into the dataset once (`ecdit.data.latents`), or call the pure `enc.apply(enc.params, ids, mask)`
inside the jitted train step on the ids from `enc.tokenizer.encode_batch` (the tokenizer has the same
`encode_batch(captions) -> (ids, mask)` / `.length` interface as ecdit's own, so the input pipeline can use it),
wrapping the result in `jax.lax.stop_gradient` — the encoder stays frozen because its params are not part of
the train state.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ecdit.models import clip_text, t5_encoder
from ecdit.models import hf_loading as hf
from ecdit.models.hf_loading import LoadError

KINDS = ('t5', 'clip')


@dataclasses.dataclass
class PretrainedTextEncoder:
  kind: str                          # 't5' | 'clip'
  cfg: Any                           # T5Config | CLIPTextConfig
  params: Any
  tokenizer: Any                     # encode_batch(texts) -> (ids, mask); .length
  apply: Callable                    # pure: apply(params, ids, mask) -> states float32 [B, L, states_dim]
  folder: pathlib.Path
  requested_length: int | None = None   # the `length` given to load_text_encoder (None: the default)

  @property
  def length(self) -> int:
    return self.tokenizer.length

  @property
  def states_dim(self) -> int:
    return self.cfg.d_model if self.kind == 't5' else self.cfg.hidden_size

  @functools.cached_property
  def _jitted(self):
    return jax.jit(self.apply)

  def encode(self, ids, mask) -> jax.Array:
    """ids int32 [B, L], mask bool [B, L] → states float32 [B, L, states_dim]."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or np.asarray(mask).shape != ids.shape:
      raise ValueError(f'text encoder: ids {ids.shape} and mask {np.asarray(mask).shape} must both be [B, L]')
    vocab = self.cfg.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f'text encoder: token id {int(ids.max())} is outside the vocabulary ({vocab})')
    return self._jitted(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))

  def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise and encode: (states float32 [N, length, states_dim], mask bool [N, length])."""
    ids, mask = self.tokenizer.encode_batch(list(texts))
    return np.asarray(self.encode(ids, mask)), mask

  def fingerprint(self) -> str:
    """Identifies the weights + settings (for naming precomputed datasets)."""
    return fingerprint_folder(self.folder, f'text|{self.requested_length}')


def fingerprint_folder(folder: pathlib.Path, extra: str = '') -> str:
  """A hash of config.json's text and the weight files' names and sizes (cheap: the weights are not read)."""
  h = hashlib.sha1(extra.encode())
  cfg = folder / 'config.json'
  if cfg.is_file():
    h.update(cfg.read_bytes())
  for p in sorted(folder.glob('*.safetensors')):
    h.update(f'{p.name}:{p.stat().st_size}'.encode())
  return h.hexdigest()[:10]


# What each kind needs: the tokenizer files ecdit reads, the transformers classes that run the same model
# (the diffusers export names them), and whether attention skips padding by default.
TOKENIZER_FILES = {'t5': ('spiece.model',), 'clip': ('vocab.json', 'merges.txt')}
TRANSFORMERS_CLASSES = {'t5': ('T5EncoderModel', 'T5TokenizerFast'), 'clip': ('CLIPTextModel', 'CLIPTokenizer')}
USES_MASK = {'t5': True, 'clip': False}   # CLIP runs as Stable Diffusion runs it: causal attention only


def folder_kind(raw: dict, path: pathlib.Path) -> str:
  """'t5' | 'clip' from a text encoder folder's config.json contents; LoadError for any other model_type."""
  model_type = raw.get('model_type')
  if model_type in ('t5', 'mt5', 'umt5'):
    return 't5'
  if model_type in ('clip_text_model', 'clip'):
    return 'clip'
  raise LoadError(f'{path / "config.json"}: model_type={model_type!r}; supported text encoders: '
                  't5 (T5EncoderModel / T5 checkpoints) and clip_text_model / clip')


def find_tokenizer_dir(folder: pathlib.Path, kind: str, explicit=None) -> pathlib.Path:
  """Where the tokenizer files of a text encoder folder are: `explicit`, else the folder itself, else a sibling
  `tokenizer/` (Stable Diffusion's layout); the folder when neither has them (the tokenizer then names the
  missing file)."""
  if explicit:
    return pathlib.Path(explicit).expanduser()
  needed = TOKENIZER_FILES[kind]
  if all((folder / n).is_file() for n in needed):
    return folder
  sibling = folder.parent / 'tokenizer'
  if all((sibling / n).is_file() for n in needed):
    return sibling
  return folder


def load_text_encoder(folder: str | pathlib.Path, length: int | None = None, *, dtype: str = 'float32',
                      tokenizer_dir: str | pathlib.Path | None = None, use_mask: bool | None = None,
                      ) -> PretrainedTextEncoder:
  """Loads a T5 encoder or CLIP text model folder and its tokenizer.

  length: tokens per caption (default: 77 for CLIP = its position table, 120 for T5).
  use_mask: whether attention skips padding. Default True for T5; False for CLIP, which is how Stable
    Diffusion runs it (causal attention only; padding states then still depend on the text only).
  Raises LoadError (a ValueError) naming the missing file or mismatching tensor.
  """
  path = hf.require_dir(folder, 'text encoder')
  requested = length
  raw = hf.read_config(path)
  kind = folder_kind(raw, path)
  compute = jnp.dtype(dtype)
  masked = USES_MASK[kind] if use_mask is None else use_mask
  tok_dir = find_tokenizer_dir(path, kind, tokenizer_dir)
  if kind == 't5':
    cfg = t5_encoder.T5Config.from_json(raw, path)
    params = t5_encoder.load_params(path, cfg)
    tokenizer = t5_encoder.T5Tokenizer(tok_dir / 'spiece.model', length or 120, cfg)
    module = t5_encoder.T5Encoder(cfg, compute)

    def apply(p, ids, mask):
      return module.apply(p, ids, mask if masked else jnp.ones_like(mask))
  else:
    cfg = clip_text.CLIPTextConfig.from_json(raw, path)
    length = length or cfg.max_positions
    if length > cfg.max_positions:
      raise ValueError(f'text length {length} exceeds the CLIP model\'s {cfg.max_positions} positions '
                       f'({path / "config.json"} max_position_embeddings)')
    params = clip_text.load_params(path, cfg)
    tokenizer = clip_text.CLIPTokenizer(tok_dir, length, cfg)
    module = clip_text.CLIPTextTransformer(cfg, compute)

    def apply(p, ids, mask):
      return module.apply(p, ids, mask if masked else None)[0]
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return PretrainedTextEncoder(kind=kind, cfg=cfg, params=params, tokenizer=tokenizer, apply=apply,
                               folder=path.resolve(), requested_length=requested)
