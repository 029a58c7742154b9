"""CLIP's text transformer (transformers `CLIPTextModel`) in Flax linen, and its byte-level BPE tokenizer.

Token + learned position embeddings, pre-LN blocks with causal self-attention (plus the padding mask when
one is given), quick-GELU (or GELU) MLP, a final LayerNorm. Outputs the last hidden states `[B, L, d]` and the
pooled state at the end token. The tokenizer reads `vocab.json` + `merges.txt` and reproduces CLIP's rules
(NFC, whitespace collapsed, lower case, the CLIP split pattern, bytes → unicode, BPE with a `</w>` end-of-word
marker, start/end tokens) in plain Python; it needs neither `regex` nor `tokenizers`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import unicodedata
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ecdit.models import hf_loading as hf
from ecdit.models.hf_loading import Entry, LoadError

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_positions: int = 77
  eps: float = 1e-5
  act: str = 'quick_gelu'
  bos_id: int = 49406
  eos_id: int = 49407

  @classmethod
  def from_json(cls, cfg: dict, folder: pathlib.Path) -> 'CLIPTextConfig':
    where = folder / 'config.json'
    if cfg.get('model_type') == 'clip' and isinstance(cfg.get('text_config'), dict):
      cfg = cfg['text_config']   # a whole CLIPModel folder: its text half
    if cfg.get('model_type') not in (None, 'clip_text_model', 'clip'):
      raise LoadError(f'{where}: model_type={cfg.get("model_type")!r} is not a CLIP text model')
    v = functools.partial(hf.config_value, cfg, path=folder)
    act = v('hidden_act', default='quick_gelu', kind=str)
    if act not in ACTIVATIONS:
      raise LoadError(f'{where}: hidden_act={act!r} is not supported; expected one of {sorted(ACTIVATIONS)}')
    c = cls(vocab_size=v('vocab_size'), hidden_size=v('hidden_size'), intermediate_size=v('intermediate_size'),
            num_layers=v('num_hidden_layers'), num_heads=v('num_attention_heads'),
            max_positions=v('max_position_embeddings', default=77),
            eps=v('layer_norm_eps', default=1e-5, kind=float), act=act,
            bos_id=v('bos_token_id', default=49406), eos_id=v('eos_token_id', default=49407))
    if c.hidden_size % c.num_heads:
      raise LoadError(f'{where}: hidden_size={c.hidden_size} is not a multiple of num_attention_heads='
                      f'{c.num_heads}')
    return c


class CLIPLayer(nn.Module):
  cfg: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, allowed):
    c = self.cfg
    b, l, d = x.shape
    hd = d // c.num_heads
    ln = functools.partial(nn.LayerNorm, epsilon=c.eps, use_fast_variance=False, dtype=jnp.float32)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    h = ln(name='layer_norm1')(x)
    split = lambda y: y.reshape(b, l, c.num_heads, hd)
    q = split(dense(d, name='q_proj')(h)) * (hd ** -0.5)
    k, v = split(dense(d, name='k_proj')(h)), split(dense(d, name='v_proj')(h))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    x = x + dense(d, name='out_proj')(jnp.einsum('bhqk,bkhd->bqhd', w, v).reshape(b, l, d))
    h = ln(name='layer_norm2')(x)
    h = dense(d, name='fc2')(ACTIVATIONS[c.act](dense(c.intermediate_size, name='fc1')(h)))
    return x + h


class CLIPTextTransformer(nn.Module):
  """ids int32 [B, L], mask bool [B, L] or None → (last hidden states [B, L, d], pooled [B, d])."""
  cfg: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, mask=None):
    c = self.cfg
    b, l = ids.shape
    x = nn.Embed(c.vocab_size, c.hidden_size, name='token_embedding')(ids)
    pos = self.param('position_embedding', nn.initializers.normal(0.01), (c.max_positions, c.hidden_size))
    x = (x + pos[None, :l]).astype(self.dtype)
    allowed = jnp.tril(jnp.ones((l, l), bool))[None, None]
    if mask is not None:
      allowed = allowed & mask[:, None, None, :]
    for i in range(c.num_layers):
      x = CLIPLayer(c, self.dtype, name=f'layer_{i}')(x, allowed)
    x = nn.LayerNorm(epsilon=c.eps, use_fast_variance=False, dtype=jnp.float32, name='final_layer_norm')(x)
    if c.eos_id == 2:   # old configs: the end token has the largest id
      end = jnp.argmax(ids, axis=-1)
    else:
      end = jnp.argmax((ids == c.eos_id).astype(jnp.int32), axis=-1)
    return x, x[jnp.arange(b), end]


def weight_table(cfg: CLIPTextConfig) -> list[Entry]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  t = [Entry('embeddings.token_embedding.weight', ('token_embedding', 'embedding'), (cfg.vocab_size, d)),
       Entry('embeddings.position_embedding.weight', ('position_embedding',), (cfg.max_positions, d)),
       Entry('final_layer_norm.weight', ('final_layer_norm', 'scale'), (d,)),
       Entry('final_layer_norm.bias', ('final_layer_norm', 'bias'), (d,))]
  for i in range(cfg.num_layers):
    s, p = f'encoder.layers.{i}', (f'layer_{i}',)
    for n in ('layer_norm1', 'layer_norm2'):
      t += [Entry(f'{s}.{n}.weight', p + (n, 'scale'), (d,)), Entry(f'{s}.{n}.bias', p + (n, 'bias'), (d,))]
    for n in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      t += [Entry(f'{s}.self_attn.{n}.weight', p + (n, 'kernel'), (d, d), 'linear'),
            Entry(f'{s}.self_attn.{n}.bias', p + (n, 'bias'), (d,))]
    t += [Entry(f'{s}.mlp.fc1.weight', p + ('fc1', 'kernel'), (d, f), 'linear'),
          Entry(f'{s}.mlp.fc1.bias', p + ('fc1', 'bias'), (f,)),
          Entry(f'{s}.mlp.fc2.weight', p + ('fc2', 'kernel'), (f, d), 'linear'),
          Entry(f'{s}.mlp.fc2.bias', p + ('fc2', 'bias'), (d,))]
  return t


def _owned(name: str) -> bool:
  return name.split('.', 1)[0] in ('embeddings', 'encoder', 'final_layer_norm')


def load_params(folder: pathlib.Path, cfg: CLIPTextConfig) -> dict:
  tensors = hf.read_safetensors(folder, 'model.safetensors')
  # Checkpoints differ: CLIPTextModel from transformers 5 saves without a prefix, older ones (and Stable
  # Diffusion's text_encoder folders) with `text_model.`; a whole CLIPModel also holds vision_model.* etc.
  tensors = hf.strip_prefix(tensors, 'text_model.')
  params = {'params': hf.assemble(weight_table(cfg), tensors, owned=_owned,
                                  where=str(folder / 'model.safetensors'))}
  expected = jax.eval_shape(CLIPTextTransformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  hf.check_tree(params, expected, str(folder))
  return params


# ---- tokenizer ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map of the 256 byte values onto printable unicode characters."""
  keep = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + \
      list(range(ord('®'), ord('ÿ') + 1))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


_SPECIAL = ('<|startoftext|>', '<|endoftext|>')
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _category(ch: str) -> str:
  if ch.isspace():
    return 's'
  cat = unicodedata.category(ch)[0]
  return cat if cat in 'LN' else 'p'


def split_words(text: str) -> list[str]:
  """CLIP's pre-tokenisation pattern (special tokens | contractions | letter runs | single digits | runs of
  other non-space characters), evaluated by hand with unicode categories."""
  out, i, n = [], 0, len(text)
  while i < n:
    ch = text[i]
    kind = _category(ch)
    if kind == 's':
      i += 1
      continue
    special = next((s for s in _SPECIAL if text.startswith(s, i)), None)
    if special:
      out.append(special)
      i += len(special)
      continue
    contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
    if contraction:
      out.append(contraction)
      i += len(contraction)
      continue
    if kind == 'N':
      out.append(ch)
      i += 1
      continue
    j = i + 1
    while j < n and _category(text[j]) == kind:
      j += 1
    out.append(text[i:j])
    i = j
  return out


class CLIPTokenizer:
  """Byte-level BPE from `vocab.json` + `merges.txt`: <start> pieces… <end>, padded to `length`."""

  def __init__(self, folder: pathlib.Path, length: int, cfg: CLIPTextConfig):
    vocab_path, merges_path = folder / 'vocab.json', folder / 'merges.txt'
    for p in (vocab_path, merges_path):
      if not p.is_file():
        raise LoadError(f'tokenizer file {p} is missing (a CLIP folder needs vocab.json and merges.txt)')
    try:
      self.vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
      raise LoadError(f'{vocab_path} is not valid JSON ({e.msg})') from None
    lines = merges_path.read_text(encoding='utf-8').splitlines()
    pairs = [tuple(l.split()) for l in lines if l.strip() and not l.startswith('#version')]
    bad = next((p for p in pairs if len(p) != 2), None)
    if bad is not None:
      raise LoadError(f'{merges_path}: line {" ".join(bad)!r} is not a pair of symbols')
    self.ranks = {p: r for r, p in enumerate(pairs)}
    size = max(self.vocab.values()) + 1
    if size > cfg.vocab_size:
      raise LoadError(f'tokenizer {vocab_path} has ids up to {size - 1} but the model config.json has '
                      f'vocab_size={cfg.vocab_size}; the tokenizer does not belong to these weights')
    special = _read_special(folder)
    for name, default in (('bos_token', '<|startoftext|>'), ('eos_token', '<|endoftext|>'),
                          ('pad_token', '<|endoftext|>'), ('unk_token', '<|endoftext|>')):
      token = special.get(name, default)
      if token not in self.vocab:
        raise LoadError(f'{vocab_path} lacks the {name} {token!r}')
      setattr(self, name.replace('_token', '_id'), self.vocab[token])
    self.length = length
    self.byte_map = bytes_to_unicode()
    self._cache: dict[str, list[int]] = {}

  def _bpe(self, word: str) -> list[int]:
    if word in self._cache:
      return self._cache[word]
    symbols = [self.byte_map[b] for b in word.encode('utf-8')]
    symbols[-1] += '</w>'
    while len(symbols) > 1:
      ranked = [(self.ranks.get(pair, np.inf), k) for k, pair in enumerate(zip(symbols, symbols[1:]))]
      rank, pair = min(ranked)
      if rank == np.inf:
        break
      first, second = symbols[pair], symbols[pair + 1]
      merged, k = [], 0
      while k < len(symbols):   # merge every occurrence of this pair, left to right
        if k < len(symbols) - 1 and symbols[k] == first and symbols[k + 1] == second:
          merged.append(first + second)
          k += 2
        else:
          merged.append(symbols[k])
          k += 1
      symbols = merged
    ids = [self.vocab.get(s, self.unk_id) for s in symbols]
    self._cache[word] = ids
    return ids

  def tokenize(self, text: str) -> list[int]:
    """Piece ids of one text, without start/end tokens."""
    text = ' '.join(unicodedata.normalize('NFC', text).split()).lower()
    ids = []
    for word in split_words(text):
      ids += [self.vocab[word]] if word in _SPECIAL and word in self.vocab else self._bpe(word)
    return ids

  def encode_batch(self, texts):
    """list of str → (ids int32 [N, length], mask bool [N, length]); start and end tokens count as real."""
    ids = np.full((len(texts), self.length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.length), bool)
    for r, text in enumerate(texts):
      row = [self.bos_id] + self.tokenize(str(text))[:self.length - 2] + [self.eos_id]
      ids[r, :len(row)] = row
      mask[r, :len(row)] = True
    return ids, mask


def _read_special(folder: pathlib.Path) -> dict[str, str]:
  """Special tokens from tokenizer_config.json / special_tokens_map.json when present."""
  out: dict[str, str] = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    path = folder / name
    if not path.is_file():
      continue
    try:
      data = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
      raise LoadError(f'{path} is not valid JSON ({e.msg})') from None
    for key in ('bos_token', 'eos_token', 'pad_token', 'unk_token'):
      value = data.get(key)
      if isinstance(value, dict):
        value = value.get('content')
      if isinstance(value, str):
        out[key] = value
  return out
