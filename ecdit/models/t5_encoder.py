"""The T5 encoder (transformers `T5EncoderModel`) in Flax linen, loading a local transformers-layout folder.

Pre-norm blocks with RMS layer norms (no bias, no mean subtraction), unscaled dot-product attention with a
learned relative-position bias (computed once from the first block's bucket table and shared by all blocks),
and a ReLU or gated-GELU feed-forward (T5 v1.0 vs v1.1 / Flan-T5). Output: the final-norm hidden states.
The torch → Flax name table is `weight_table(cfg)`; the tokenizer is sentencepiece `spiece.model`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ecdit.models import hf_loading as hf
from ecdit.models.hf_loading import Entry, LoadError

ACTIVATIONS = {
    'relu': jax.nn.relu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'silu': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  act: str = 'relu'
  gated: bool = False
  pad_id: int = 0
  eos_id: int = 1

  @classmethod
  def from_json(cls, cfg: dict, folder: pathlib.Path) -> 'T5Config':
    where = folder / 'config.json'
    if cfg.get('model_type') not in (None, 't5', 'umt5', 'mt5'):
      raise LoadError(f'{where}: model_type={cfg.get("model_type")!r} is not a T5 model')
    v = functools.partial(hf.config_value, cfg, path=folder)
    proj = v('feed_forward_proj', default='relu', kind=str)
    parts = proj.split('-')
    gated = parts[0] == 'gated'
    act = cfg.get('dense_act_fn') or parts[-1]
    if act == 'gelu' and gated and 'dense_act_fn' not in cfg:
      act = 'gelu_new'   # transformers maps "gated-gelu" to the tanh approximation
    if act not in ACTIVATIONS or len(parts) > 2 or (len(parts) == 2 and not gated):
      raise LoadError(f'{where}: feed_forward_proj={proj!r} / dense_act_fn={act!r} is not supported; '
                      f'activations: {sorted(ACTIVATIONS)}')
    return cls(vocab_size=v('vocab_size'), d_model=v('d_model'), d_kv=v('d_kv'), d_ff=v('d_ff'),
               num_layers=v('num_layers'), num_heads=v('num_heads'),
               num_buckets=v('relative_attention_num_buckets', default=32),
               max_distance=v('relative_attention_max_distance', default=128),
               eps=v('layer_norm_epsilon', default=1e-6, kind=float), act=act,
               gated=bool(cfg.get('is_gated_act', gated)), pad_id=v('pad_token_id', default=0),
               eos_id=v('eos_token_id', default=1))


def relative_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of every (query, key) offset: half the buckets per direction, exact for small
  offsets and logarithmic up to max_distance."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  out = (rel > 0).astype(np.int64) * half
  n = np.abs(rel)
  exact = half // 2
  with np.errstate(divide='ignore'):
    large = exact + (np.log(np.maximum(n, 1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return out + np.where(n < exact, n, large)


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale * y).astype(x.dtype)


class T5Block(nn.Module):
  cfg: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    c = self.cfg
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    b, l, _ = x.shape
    h = RMSNorm(c.eps, name='attn_norm')(x)
    split = lambda y: y.reshape(b, l, c.num_heads, c.d_kv)
    q = split(dense(c.num_heads * c.d_kv, name='q')(h))
    k = split(dense(c.num_heads * c.d_kv, name='k')(h))
    v = split(dense(c.num_heads * c.d_kv, name='v')(h))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) + bias   # T5: no 1/sqrt(d) scaling
    w = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum('bhqk,bkhd->bqhd', w, v).reshape(b, l, c.num_heads * c.d_kv)
    x = x + dense(c.d_model, name='o')(y)
    h = RMSNorm(c.eps, name='ffn_norm')(x)
    act = ACTIVATIONS[c.act]
    if c.gated:
      h = act(dense(c.d_ff, name='wi_0')(h)) * dense(c.d_ff, name='wi_1')(h)
    else:
      h = act(dense(c.d_ff, name='wi')(h))
    return x + dense(c.d_model, name='wo')(h)


class T5Encoder(nn.Module):
  """ids int32 [B, L], mask bool [B, L] → hidden states float32 [B, L, d_model]."""
  cfg: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, mask):
    c = self.cfg
    x = nn.Embed(c.vocab_size, c.d_model, name='shared')(ids).astype(self.dtype)
    l = ids.shape[1]
    buckets = jnp.asarray(relative_buckets(l, l, c.num_buckets, c.max_distance))
    table = nn.Embed(c.num_buckets, c.num_heads, name='relative_attention_bias')(buckets)   # [q, k, H]
    bias = table.transpose(2, 0, 1)[None].astype(jnp.float32)
    bias = jnp.where(mask[:, None, None, :], bias, jnp.finfo(jnp.float32).min)
    for i in range(c.num_layers):
      x = T5Block(c, self.dtype, name=f'block_{i}')(x, bias)
    return RMSNorm(c.eps, name='final_layer_norm')(x).astype(jnp.float32)


def weight_table(cfg: T5Config) -> list[Entry]:
  inner = cfg.num_heads * cfg.d_kv
  t = [Entry('shared.weight', ('shared', 'embedding'), (cfg.vocab_size, cfg.d_model)),
       Entry('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
             ('relative_attention_bias', 'embedding'), (cfg.num_buckets, cfg.num_heads)),
       Entry('encoder.final_layer_norm.weight', ('final_layer_norm', 'scale'), (cfg.d_model,))]
  for i in range(cfg.num_layers):
    s, d = f'encoder.block.{i}.layer', (f'block_{i}',)
    t.append(Entry(f'{s}.0.layer_norm.weight', d + ('attn_norm', 'scale'), (cfg.d_model,)))
    for n in 'qkv':
      t.append(Entry(f'{s}.0.SelfAttention.{n}.weight', d + (n, 'kernel'), (cfg.d_model, inner), 'linear'))
    t.append(Entry(f'{s}.0.SelfAttention.o.weight', d + ('o', 'kernel'), (inner, cfg.d_model), 'linear'))
    t.append(Entry(f'{s}.1.layer_norm.weight', d + ('ffn_norm', 'scale'), (cfg.d_model,)))
    for n in (('wi_0', 'wi_1') if cfg.gated else ('wi',)):
      t.append(Entry(f'{s}.1.DenseReluDense.{n}.weight', d + (n, 'kernel'), (cfg.d_model, cfg.d_ff), 'linear'))
    t.append(Entry(f'{s}.1.DenseReluDense.wo.weight', d + ('wo', 'kernel'), (cfg.d_ff, cfg.d_model), 'linear'))
  return t


def _owned(name: str) -> bool:
  # An encoder-decoder checkpoint also holds decoder.* and lm_head.*; those are not ours to check.
  return name == 'shared.weight' or (name.startswith('encoder.') and name != 'encoder.embed_tokens.weight')


def load_params(folder: pathlib.Path, cfg: T5Config) -> dict:
  tensors = hf.read_safetensors(folder, 'model.safetensors')
  if 'shared.weight' not in tensors and 'encoder.embed_tokens.weight' in tensors:
    tensors['shared.weight'] = tensors['encoder.embed_tokens.weight']
  params = {'params': hf.assemble(weight_table(cfg), tensors, owned=_owned,
                                  where=str(folder / 'model.safetensors'))}
  expected = jax.eval_shape(T5Encoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32),
                            jnp.ones((1, 2), bool))
  hf.check_tree(params, expected, str(folder))
  return params


class T5Tokenizer:
  """sentencepiece `spiece.model`: pieces, then the end token; truncated / padded to `length`. Picklable
  (grain worker processes): it ships the model bytes."""

  def __init__(self, path: pathlib.Path, length: int, cfg: T5Config):
    if not path.is_file():
      raise LoadError(f'tokenizer file {path} is missing (a T5 folder needs its sentencepiece spiece.model)')
    self.path, self._proto = path, path.read_bytes()
    self.length, self.eos_id, self.pad_id = int(length), cfg.eos_id, cfg.pad_id
    self.sp = self._load()
    n = self.sp.get_piece_size()
    if n > cfg.vocab_size:
      raise LoadError(f'tokenizer {path} has {n} pieces but the model config.json has vocab_size='
                      f'{cfg.vocab_size}; the tokenizer does not belong to these weights')
    for what, i in (('eos_token_id', cfg.eos_id), ('pad_token_id', cfg.pad_id)):
      if not 0 <= i < n:
        raise LoadError(f'config.json {what}={i} is outside the vocabulary of {path} ({n} pieces)')

  def _load(self):
    import sentencepiece as spm   # pylint: disable=import-outside-toplevel
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(self._proto)
    except (OSError, RuntimeError) as e:
      raise LoadError(f'{self.path} is not a sentencepiece model: {e}') from None
    return sp

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != 'sp'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.sp = self._load()

  def encode_batch(self, texts):
    """list of str → (ids int32 [N, length], mask bool [N, length]); the end token counts as real."""
    ids = np.full((len(texts), self.length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.length), bool)
    for r, pieces in enumerate(self.sp.encode([str(t) for t in texts])):
      row = list(pieces)[:self.length - 1] + [self.eos_id]
      ids[r, :len(row)] = row
      mask[r, :len(row)] = True
    return ids, mask
