"""Sentencepiece tokenizer: trained on a dataset's training captions, stored next to the dataset.

Ids of the models trained here: 0 = padding (never produced for text), 1 = unknown, 2 = end of caption. (A
model given through data.tokenizer_path needs padding at 0 and some end id.) Every encoded caption ends with
the end id, so the empty caption (used for classifier-free guidance) is one real token, not an all-padding
row; the mask is True exactly on the caption's tokens and the end id. Captions longer than the configured
length keep their first `length - 1` pieces.
"""
from __future__ import annotations

import io
import os
import pathlib
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from ecdit import outputs
from ecdit.config.experiment import ConfigError
from ecdit.data import reader

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
EXPLICIT_FIX = 'point data.tokenizer_path at a sentencepiece .model file'
DATASET_FIX = ('it is the tokenizer trained beside the dataset: delete it and run `ecdit prepare` with the same '
               'config to train it again')


def run_fix(config_path) -> str:
  """What the error of a trained run's unreadable data.tokenizer_path tells the user to do (`config_path`: the
  run's config.json; its model was trained with that tokenizer, so data.vocab_size cannot change)."""
  return f'point data.tokenizer_path in {config_path} at the sentencepiece .model the run was trained with'


class Tokenizer:
  """Fixed-length encoder/decoder around a sentencepiece model."""

  def __init__(self, model_path: str | pathlib.Path, length: int, fix: str = EXPLICIT_FIX):
    """`fix`: what the error of an unreadable file tells the user to do (the default: a file they chose)."""
    self.model_path = pathlib.Path(model_path)
    if not self.model_path.is_file():
      raise reader.DataError(f'tokenizer model {self.model_path} does not exist; train one with '
                             '`ecdit prepare --config=...` or fix data.tokenizer_path')
    self._proto = self.model_path.read_bytes()
    self.length = int(length)
    self._sp = self._load(self._proto, fix)

  def _load(self, proto: bytes, fix: str = EXPLICIT_FIX) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
      reason = ' '.join(str(e).split())[:200] or type(e).__name__
      raise reader.DataError(f'{self.model_path} is not a sentencepiece model ({len(proto)} bytes: {reason}); '
                             f'{fix}') from e
    if sp.pad_id() != PAD_ID or sp.eos_id() < 0:
      raise reader.DataError(f'{self.model_path}: ecdit needs a sentencepiece model with padding id {PAD_ID} '
                             f'and an end id; this one has padding id {sp.pad_id()} and end id {sp.eos_id()}')
    self.eos_id = sp.eos_id()
    return sp

  # Picklable for grain worker processes: ship the model bytes, not the C++ object.
  def __getstate__(self):
    return {'model_path': self.model_path, 'proto': self._proto, 'length': self.length}

  def __setstate__(self, state):
    self.model_path, self._proto, self.length = state['model_path'], state['proto'], state['length']
    self._sp = self._load(self._proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, length], mask bool [B, length]); padding is PAD_ID with mask False."""
    pieces = self._sp.encode(list(captions)) if len(captions) else []
    ids = np.zeros((len(captions), self.length), np.int32)
    lengths = np.empty(len(captions), np.int64)
    for row, p in enumerate(pieces):
      p = p[:self.length - 1] + [self.eos_id]
      ids[row, :len(p)] = p
      lengths[row] = len(p)
    mask = np.arange(self.length)[None, :] < lengths[:, None]
    return ids, mask

  def encode(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self.encode_batch([caption])
    return ids[0], mask[0]

  def decode(self, ids) -> str | list[str]:
    """Text of one id row ([L]) or of a batch ([B, L]); stops at the end id, ignores padding."""
    arr = np.asarray(ids)
    if arr.ndim == 2:
      return [self.decode(row) for row in arr]
    out = []
    for i in arr.tolist():
      if i == self.eos_id:
        break
      if i != PAD_ID:
        out.append(int(i))
    return self._sp.decode(out)


def train_sentencepiece(captions: Iterable[str], vocab_size: int, path: str | pathlib.Path) -> pathlib.Path:
  """Trains a BPE model on `captions` and writes it atomically to `path`.

  Raises ConfigError if the corpus cannot support `vocab_size` pieces, naming the largest size it can, and
  DataError if there are no captions.
  """
  path = pathlib.Path(path)
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=buf, vocab_size=int(vocab_size), model_type='bpe',
        pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, character_coverage=1.0,
        input_sentence_size=1_000_000, shuffle_input_sentence=True, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    m = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', str(e))
    if m:
      raise ConfigError(f'data.vocab_size={vocab_size} is too large for the training captions: they support at '
                        f'most {m.group(2)} pieces; set data.vocab_size <= {m.group(2)}') from None
    if 'empty' in str(e).lower() or 'no sentence' in str(e).lower():
      raise reader.DataError('cannot train a tokenizer: the training captions are empty') from None
    raise
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tokenizer-', dir=path.parent)
  with os.fdopen(fd, 'wb') as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)
  outputs.follow_umask(path)   # mkstemp writes 0600: a shared dataset's tokenizer must be readable
  return path


def tokenizer_file(dataset_dir: str | pathlib.Path, vocab_size: int) -> pathlib.Path:
  """Where the tokenizer for a dataset and vocabulary size lives: inside the dataset's directory."""
  return pathlib.Path(dataset_dir) / f'tokenizer_bpe{int(vocab_size)}.model'


def load_tokenizer(path: str | pathlib.Path, vocab_size: int, length: int, fix: str = EXPLICIT_FIX) -> Tokenizer:
  """Loads a model file, checking it has `vocab_size` pieces; `fix` as for `Tokenizer`. Every failure is a
  DataError naming the file."""
  tok = Tokenizer(path, length, fix)
  if tok.vocab_size != vocab_size:
    # For a file the user chose for a new run, data.vocab_size may follow it instead; not for one beside a
    # dataset (its name holds the size) or a trained run's (the model's embedding does).
    if fix == EXPLICIT_FIX:
      fix = (f'set data.vocab_size={tok.vocab_size}, or point data.tokenizer_path at a sentencepiece .model of '
             f'{vocab_size} pieces')
    raise reader.DataError(f'tokenizer {tok.model_path} has {tok.vocab_size} pieces but data.vocab_size='
                           f'{vocab_size}; {fix}')
  return tok


def ensure_tokenizer(dataset_dir: str | pathlib.Path, data_cfg) -> pathlib.Path:
  """The dataset's tokenizer file for data_cfg.vocab_size, training it from the train captions if missing."""
  path = tokenizer_file(dataset_dir, data_cfg.vocab_size)
  if not path.is_file():
    train_sentencepiece(reader.captions(dataset_dir, 'train'), data_cfg.vocab_size, path)
  return path
