"""ecdit's sentencepiece caption tokenizer as a pipeline component (from_pretrained / save_pretrained / call).

    tok = ECDiTTokenizer.from_pretrained('folder/tokenizer')     # tokenizer.model + tokenizer_config.json
    enc = tok(['a red circle', ''])                             # {'input_ids': int64 [B, L], 'attention_mask': bool}

The encoding rule is ecdit.data.tokenizer's: the caption's pieces, cut to L − 1, then the end id; padding id 0
with mask False. So the empty caption (the classifier-free-guidance input) is one real token. L is
`model_max_length` (the run's text_length). Imports torch, numpy and sentencepiece only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm
import torch

MODEL_FILE = 'tokenizer.model'
CONFIG_FILE = 'tokenizer_config.json'
PAD_ID = 0


class ECDiTTokenizer:
  def __init__(self, model_proto: bytes, model_max_length: int):
    self._proto = bytes(model_proto)
    self.model_max_length = int(model_max_length)
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)
    if self._sp.pad_id() != PAD_ID or self._sp.eos_id() < 0:
      raise ValueError(f'ECDiTTokenizer needs padding id {PAD_ID} and an end id; this sentencepiece model has '
                       f'padding id {self._sp.pad_id()} and end id {self._sp.eos_id()}')
    self.eos_token_id, self.pad_token_id = self._sp.eos_id(), PAD_ID

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike, **_loading_kwargs) -> 'ECDiTTokenizer':
    folder = Path(folder)
    for name in (MODEL_FILE, CONFIG_FILE):
      if not (folder / name).is_file():
        raise FileNotFoundError(f'{folder / name} is missing: an ECDiTTokenizer folder holds {MODEL_FILE} and '
                                f'{CONFIG_FILE}')
    try:
      conf = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as e:
      raise ValueError(f'{folder / CONFIG_FILE} is not valid JSON: {e}') from None
    length = conf.get('model_max_length') if isinstance(conf, dict) else None
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
      raise ValueError(f'{folder / CONFIG_FILE}: expected "model_max_length" to be a positive integer, got {length!r}')
    try:
      return cls((folder / MODEL_FILE).read_bytes(), length)
    except RuntimeError as e:   # sentencepiece: not a model proto
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f'{folder / MODEL_FILE} is not a sentencepiece model ({reason})') from None

  def save_pretrained(self, folder: str | os.PathLike, **_kwargs) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(self._proto)
    conf = {'tokenizer_class': type(self).__name__, 'model_max_length': self.model_max_length,
            'pad_token_id': PAD_ID, 'eos_token_id': self.eos_token_id}
    (folder / CONFIG_FILE).write_text(json.dumps(conf, indent=2) + '\n')

  def encode_batch(self, texts: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [B, L], mask bool [B, L]) as numpy."""
    length = self.model_max_length if length is None else int(length)
    ids = np.zeros((len(texts), length), np.int64)
    mask = np.zeros((len(texts), length), bool)
    for row, pieces in enumerate(self._sp.encode(list(texts)) if len(texts) else []):
      pieces = pieces[:length - 1] + [self.eos_token_id]
      ids[row, :len(pieces)] = pieces
      mask[row, :len(pieces)] = True
    return ids, mask

  def __call__(self, text: str | Sequence[str], max_length: int | None = None, return_tensors: str | None = 'pt',
               **_hf_style_kwargs) -> dict:
    """HF-tokenizer-like call; padding is always to `max_length` (default model_max_length), truncation on."""
    texts = [text] if isinstance(text, str) else list(text)
    ids, mask = self.encode_batch(texts, max_length)
    if return_tensors == 'pt':
      return {'input_ids': torch.from_numpy(ids), 'attention_mask': torch.from_numpy(mask)}
    return {'input_ids': ids, 'attention_mask': mask}
