"""A run's frozen pretrained text encoder (data.text_encoder_dir: T5 or CLIP) as a diffusers pipeline's
`text_encoder/` + `tokenizer/` folders, loaded there by transformers (T5EncoderModel + T5TokenizerFast,
CLIPTextModel + CLIPTokenizer).

    folder = inspect(run.cfg.data)                    # before the checkpoint is read; ValueError (one line)
    write(folder, out / 'text_encoder', out / 'tokenizer', text_length, probes)

`text_encoder/` is the run's folder as transformers reads it: config.json and the safetensors weights, copied
byte for byte, or, when the folder holds more than the encoder (a whole CLIPModel with its vision tower, an
encoder-decoder T5), its config.json's text part and only the encoder's tensors (one model.safetensors, dtypes
kept). Pickled weights (.bin / .pt) are refused: ecdit reads and writes safetensors only. `tokenizer/` holds the
tokenizer files ecdit read (spiece.model, or vocab.json + merges.txt; from the folder or its sibling
`tokenizer/`) and the transformers settings beside them (tokenizer_config.json, special_tokens_map.json,
added_tokens.json, tokenizer.json). The copied tokenizer, loaded by transformers as the pipeline loads it, must
encode the probe texts (the run's sample prompts, the empty caption, a caption longer than the text length)
to the very ids and mask ecdit's own tokenizer gives, or the export fails naming the first text that differs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors
import safetensors.torch
import transformers

from ecdit.config import data as data_config
from ecdit.export.weights import ExportError
from ecdit.models import clip_text, t5_encoder
from ecdit.models import hf_loading as hf
from ecdit.models import text_pretrained as tp

WEIGHTS = 'model.safetensors'
PICKLES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
TOKENIZER_SETTINGS = ('tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json', 'tokenizer.json')
# The same prefixes ecdit's loaders own (clip_text._owned, t5_encoder._owned): what the transformers text model
# keeps. CLIP names may carry the `text_model.` prefix (older saves, Stable Diffusion, a whole CLIPModel).
CLIP_PARTS = ('embeddings', 'encoder', 'final_layer_norm')


@dataclasses.dataclass(frozen=True)
class TextFolder:
  kind: str                 # 't5' | 'clip'
  folder: Path              # data.text_encoder_dir
  tokenizer_dir: Path       # where the tokenizer files are (the folder, or its sibling tokenizer/)
  config: dict              # its config.json
  weights: tuple[Path, ...]   # model.safetensors, or the index and its shards

  @property
  def classes(self) -> tuple[str, str]:
    """The transformers (model, tokenizer) classes the pipeline loads the two folders with."""
    return tp.TRANSFORMERS_CLASSES[self.kind]

  @property
  def uses_mask(self) -> bool:
    """Whether ecdit's encoder (and so the pipeline's) lets attention skip padding."""
    return tp.USES_MASK[self.kind]


def weight_files(folder: Path, filename: str, what: str) -> tuple[Path, ...]:
  """(`filename`,) or (its `.index.json`, the shards it lists) in `folder`, as ecdit's loaders read them;
  ExportError naming `what` (the config key) when neither is there, pickled weights in particular."""
  index = f'{filename}.index.json'
  if (folder / filename).is_file():
    return (folder / filename,)
  if (folder / index).is_file():
    try:
      shards = sorted(set(json.loads((folder / index).read_text())['weight_map'].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
      raise ExportError(f'{folder / index} is not a safetensors index (no "weight_map")') from None
    missing = next((s for s in shards if not (folder / s).is_file()), None)
    if missing:
      raise ExportError(f'weight shard {folder / missing} listed in {folder / index} is missing')
    return (folder / index, *(folder / s for s in shards))
  pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES)
  if pickles:
    raise ExportError(f'{what}={folder} holds only pickled weights ({pickles[0]}); ecdit exports safetensors '
                      f'only: save the model with safe_serialization=True (a {filename}) and export again')
  raise ExportError(f'{what}={folder} has no {filename} (nor {index}): nothing to export')


def inspect(data_cfg) -> TextFolder:
  """The run's text encoder folder, checked without reading weights: kind, safetensors weights, tokenizer files.
  Raises ValueError (ExportError / LoadError) with one line."""
  folder = hf.require_dir(Path(data_config.option(data_cfg, 'text_encoder_dir')), 'data.text_encoder_dir')
  config = hf.read_config(folder)
  kind = tp.folder_kind(config, folder)
  weights = weight_files(folder, WEIGHTS, 'data.text_encoder_dir')
  tok = tp.find_tokenizer_dir(folder, kind)
  missing = next((n for n in tp.TOKENIZER_FILES[kind] if not (tok / n).is_file()), None)
  if missing:
    raise ExportError(f'data.text_encoder_dir={folder}: the tokenizer file {missing} is in neither that folder nor '
                      f'{folder.parent / "tokenizer"}')
  return TextFolder(kind, folder.resolve(), tok.resolve(), config, weights)


def keeps(kind: str, name: str) -> bool:
  """Whether tensor `name` belongs to the transformers text model (T5EncoderModel / CLIPTextModel)."""
  if kind == 't5':
    return name == 'shared.weight' or name.startswith('encoder.')
  name = name[len('text_model.'):] if name.startswith('text_model.') else name
  return name.split('.', 1)[0] in CLIP_PARTS


def _model_config(tf: TextFolder) -> dict | None:
  """The text model's config.json when it differs from the folder's (a whole CLIPModel: its text_config)."""
  if tf.kind == 'clip' and tf.config.get('model_type') == 'clip' and isinstance(tf.config.get('text_config'), dict):
    return dict(tf.config['text_config'], model_type='clip_text_model', architectures=['CLIPTextModel'])
  return None


def write_text_encoder(tf: TextFolder, out: Path) -> None:
  out.mkdir()
  config = _model_config(tf)
  if config is None:
    shutil.copyfile(tf.folder / 'config.json', out / 'config.json')
  else:
    (out / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  files = [f for f in tf.weights if f.suffix == '.safetensors']
  names = {}
  for f in files:
    with safetensors.safe_open(str(f), framework='pt') as s:
      names.update({n: f for n in s.keys()})
  kept = sorted(n for n in names if keeps(tf.kind, n))
  if not kept:
    raise ExportError(f'{tf.folder}: no {tf.kind} text encoder tensors in its weights')
  if len(kept) == len(names):   # the folder is the text model alone: the files as they are
    for f in tf.weights:
      shutil.copyfile(f, out / f.name)
    return
  tensors = {}
  for f in files:
    with safetensors.safe_open(str(f), framework='pt') as s:
      tensors.update({n: s.get_tensor(n) for n in s.keys() if keeps(tf.kind, n)})
  safetensors.torch.save_file(tensors, str(out / WEIGHTS), metadata={'format': 'pt'})


def write_tokenizer(tf: TextFolder, out: Path) -> None:
  out.mkdir()
  for name in tp.TOKENIZER_FILES[tf.kind] + TOKENIZER_SETTINGS:
    if (tf.tokenizer_dir / name).is_file():
      shutil.copyfile(tf.tokenizer_dir / name, out / name)


def ecdit_tokenizer(tf: TextFolder, length: int):
  """The tokenizer ecdit encodes the run's captions and prompts with (encode_batch → ids, mask)."""
  if tf.kind == 't5':
    cfg = t5_encoder.T5Config.from_json(tf.config, tf.folder)
    return t5_encoder.T5Tokenizer(tf.tokenizer_dir / 'spiece.model', length, cfg)
  return clip_text.CLIPTokenizer(tf.tokenizer_dir, length, clip_text.CLIPTextConfig.from_json(tf.config, tf.folder))


def check_tokenizer(tokenizer, reference, texts: Sequence[str], where: Path) -> None:
  """ExportError unless the pipeline's tokenizer call (padding to the text length, truncation) gives
  `reference.encode_batch`'s ids and mask for every text."""
  texts = list(texts)
  enc = tokenizer(texts, padding='max_length', max_length=reference.length, truncation=True, return_tensors='np')
  got_ids, got_mask = np.asarray(enc['input_ids']), np.asarray(enc['attention_mask']).astype(bool)
  ids, mask = reference.encode_batch(texts)
  for text, a, m, b, n in zip(texts, got_ids, got_mask, ids, mask):
    if a.shape != b.shape or not (np.array_equal(a, b) and np.array_equal(m, n)):
      raise ExportError(f'the transformers {type(tokenizer).__name__} in {where} encodes {text!r} as ids '
                        f'{a.tolist()} ({int(m.sum())} unmasked), ecdit\'s tokenizer as {b.tolist()} ({int(n.sum())} '
                        'unmasked): the pipeline could not encode prompts as the run did')


def probe_texts(prompts: str, length: int) -> list[str]:
  """The run's sample prompts, the empty caption (guidance), mixed case and punctuation, and a caption
  longer than the text length (truncation keeps the end token)."""
  return [p for p in prompts.split(';') if p.strip()] + ['', 'A Red  CUBE, left of the sphere!',
                                                        ' '.join(['a photo of two cats'] * length)]


def write(tf: TextFolder, encoder_dir: Path, tokenizer_dir: Path, length: int, probes: Sequence[str]) -> None:
  """Writes both folders, then checks the copied tokenizer, loaded as the pipeline loads it, against ecdit's."""
  write_text_encoder(tf, encoder_dir)
  write_tokenizer(tf, tokenizer_dir)
  tokenizer = getattr(transformers, tf.classes[1]).from_pretrained(str(tokenizer_dir))
  check_tokenizer(tokenizer, ecdit_tokenizer(tf, length), probes, tf.tokenizer_dir)
