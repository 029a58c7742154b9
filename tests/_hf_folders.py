"""Tiny random-weight model folders in the Hugging Face layouts (CLIP text, T5 encoder, diffusers AutoencoderKL),
written with numpy and safetensors.numpy only, so the tests that merely need *a* folder run without torch.

Tensor names and shapes come from each loader's weight table (`Entry.source` in the torch layout); whether those
names are the ones transformers / diffusers write is what the torch parity tests check. Weights are drawn like
a fresh network's: fan-in scaled normals for matrices and kernels, norm scales near 1, small biases.
"""
from __future__ import annotations

import collections
import json
import pathlib

import numpy as np

from ecdit.models import clip_text, hf_loading, t5_encoder
from ecdit.models import vae as vae_lib


CORPUS = ['a red cube left of a blue sphere', 'two green cats', "it's the dog's toy!!", 'numbers 12 and 345'] * 5


def write_spiece(folder: pathlib.Path, vocab_size=40):
  """Trains a tiny unigram sentencepiece model on CORPUS into folder/spiece.model (T5's tokenizer file)."""
  import sentencepiece as spm   # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  extra = [' '.join(''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), 5)) for _ in range(8))
           for _ in range(50)] if vocab_size > 40 else []
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4 + extra), model_prefix=str(folder / 'spiece'),
                                 vocab_size=vocab_size, model_type='unigram', pad_id=0, eos_id=1, unk_id=2,
                                 bos_id=-1, hard_vocab_limit=False, minloglevel=2)


def write_clip_bpe(folder: pathlib.Path, num_merges=40) -> int:
  """Writes vocab.json + merges.txt of a tiny byte-level BPE learnt from CORPUS; returns the vocab size."""
  byte_map = clip_text.bytes_to_unicode()
  vocab = list(byte_map.values()) + [c + '</w>' for c in byte_map.values()]
  words = collections.Counter()
  for text in CORPUS:
    for w in text.lower().split():
      syms = [byte_map[b] for b in w.encode()]
      syms[-1] += '</w>'
      words[tuple(syms)] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, n in words.items():
      for p in zip(w, w[1:]):
        pairs[p] += n
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    vocab.append(best[0] + best[1])
    merged = collections.Counter()
    for w, n in words.items():
      out, i = [], 0
      while i < len(w):
        if i < len(w) - 1 and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      merged[tuple(out)] += n
    words = merged
  vocab += ['<|startoftext|>', '<|endoftext|>']
  (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges) + '\n')
  return len(vocab)


def _tensors(table, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  out = {}
  for e in table:
    shape = hf_loading._source_shape(e)   # pylint: disable=protected-access
    if len(shape) >= 2:                   # [out, in, ...]: fan-in = prod(shape[1:])
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
    elif e.source.endswith('.weight'):    # norm scales
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    out[e.source] = value.astype(np.float32)
  return out


def _write(folder: pathlib.Path, config: dict, table, weights_file: str, seed: int) -> None:
  from safetensors.numpy import save_file   # pylint: disable=import-outside-toplevel
  (folder / 'config.json').write_text(json.dumps(config))
  save_file(_tensors(table, seed), str(folder / weights_file))


def write_clip(folder: pathlib.Path, *, hidden: int = 16, intermediate: int = 32, layers: int = 1, heads: int = 2,
               positions: int = 12, seed: int = 0) -> pathlib.Path:
  """A CLIP text model folder (config.json, model.safetensors, a BPE vocab.json + merges.txt)."""
  folder.mkdir(parents=True)
  vocab = write_clip_bpe(folder)
  cfg = clip_text.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                 num_layers=layers, num_heads=heads, max_positions=positions, bos_id=vocab - 2,
                                 eos_id=vocab - 1)
  _write(folder, {'model_type': 'clip_text_model', 'vocab_size': vocab, 'hidden_size': hidden,
                  'intermediate_size': intermediate, 'num_hidden_layers': layers, 'num_attention_heads': heads,
                  'max_position_embeddings': positions, 'bos_token_id': vocab - 2, 'eos_token_id': vocab - 1},
         clip_text.weight_table(cfg), 'model.safetensors', seed)
  return folder


def write_t5(folder: pathlib.Path, *, vocab: int = 48, d_model: int = 32, d_kv: int = 8, d_ff: int = 48,
             layers: int = 2, heads: int = 4, buckets: int = 8, max_distance: int = 20,
             seed: int = 0) -> pathlib.Path:
  """A gated-GeLU T5 encoder folder (config.json, model.safetensors, a unigram spiece.model)."""
  folder.mkdir(parents=True)
  cfg = t5_encoder.T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                            num_heads=heads, num_buckets=buckets, max_distance=max_distance, act='gelu_new',
                            gated=True)
  _write(folder, {'model_type': 't5', 'vocab_size': vocab, 'd_model': d_model, 'd_kv': d_kv, 'd_ff': d_ff,
                  'num_layers': layers, 'num_heads': heads, 'feed_forward_proj': 'gated-gelu',
                  'relative_attention_num_buckets': buckets, 'relative_attention_max_distance': max_distance},
         t5_encoder.weight_table(cfg), 'model.safetensors', seed)
  write_spiece(folder)
  return folder


def write_vae(folder: pathlib.Path, cfg: vae_lib.VAEConfig, *, seed: int = 0) -> pathlib.Path:
  """A diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors) for `cfg`."""
  folder.mkdir(parents=True)
  n = len(cfg.block_out_channels)
  _write(folder, {'_class_name': 'AutoencoderKL', 'in_channels': cfg.in_channels,
                  'out_channels': cfg.out_channels, 'block_out_channels': list(cfg.block_out_channels),
                  'down_block_types': ['DownEncoderBlock2D'] * n, 'up_block_types': ['UpDecoderBlock2D'] * n,
                  'layers_per_block': cfg.layers_per_block, 'latent_channels': cfg.latent_channels,
                  'norm_num_groups': cfg.norm_num_groups, 'act_fn': 'silu', 'scaling_factor': cfg.scaling_factor,
                  'shift_factor': cfg.shift_factor, 'use_quant_conv': cfg.use_quant_conv,
                  'use_post_quant_conv': cfg.use_post_quant_conv,
                  'mid_block_add_attention': cfg.mid_block_add_attention},
         vae_lib.weight_table(cfg), vae_lib.WEIGHTS_FILE, seed)
  return folder
