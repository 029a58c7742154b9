"""Precomputing VAE latents and frozen-text-encoder states into a prepared dataset, once.

    from ecdit.data import latents
    from ecdit.models.vae import load_vae
    from ecdit.models.text_pretrained import load_text_encoder
    new_dir = latents.precompute(old_dir, vae=load_vae(vae_dir), text_encoder=load_text_encoder(t5_dir))

The result is a *new* dataset directory beside the old one (`<config>_enc_<hash>/1.0.0` next to
`<config>/1.0.0`; the hash covers the source dataset, the model folders and the settings), holding every
feature of the old one plus
  latent       float32 [H/f, W/f, C]  scaled VAE latents (posterior mean, or a sample with sample=True)
  text_states  float16/32 [L, D]      the text encoder's output for the caption (if a text encoder is given)
  text_mask    bool [L]               True = real token
and a file `null_text.npz` (`states` [L, D] float32, `mask` [L]) holding the states of the empty caption, which
the input pipeline substitutes for dropped captions (classifier-free guidance).

The old dataset is only read. Work is done in batches with a progress bar, and every finished batch is saved
at once under `<new dir>/../.partial-*/`, so an interrupted run resumes where it stopped; the tfds dataset is
then written into a temporary directory and renamed into place only when complete. Calling it again when the
dataset exists returns its directory without work.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any

import numpy as np

from ecdit.data import features as features_lib
from ecdit.data import reader
from ecdit.config.data import TEXT_DTYPES
from ecdit.models import text_pretrained

NULL_TEXT_FILE = 'null_text.npz'


def _fingerprints(vae, text_encoder) -> tuple[str, str]:
  vae_fp = text_fp = ''
  if vae is not None:
    if getattr(vae, 'folder', None) is not None:
      vae_fp = text_pretrained.fingerprint_folder(vae.folder)
    else:   # random weights (tests, benchmarks): the weights themselves decide
      vae_fp = repr(vae.cfg) + _params_hash(vae.params)
  if text_encoder is not None:
    text_fp = text_encoder.fingerprint()
  return vae_fp, text_fp


def _params_hash(params) -> str:
  import jax   # pylint: disable=import-outside-toplevel
  h = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(params):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:10]


def _dir_from(src: pathlib.Path, vae_fp: str, text_fp: str, sample: bool, seed: int,
              text_dtype: str) -> pathlib.Path:
  parts = [str(src.resolve()), f'sample={sample}', f'seed={seed}', text_dtype, 'vae:' + vae_fp, 'text:' + text_fp]
  digest = hashlib.sha1('|'.join(parts).encode()).hexdigest()[:10]
  return src.parent.parent / f'{src.parent.name}_enc_{digest}' / src.name


def encoded_dataset_dir(src_dir, *, vae=None, text_encoder=None, sample: bool = False, seed: int = 0,
                        text_dtype: str = 'float16') -> pathlib.Path:
  """Where `precompute` writes (or has written) the encoded copy of the dataset at `src_dir`."""
  vae_fp, text_fp = _fingerprints(vae, text_encoder)
  return _dir_from(pathlib.Path(src_dir), vae_fp, text_fp, sample, seed, text_dtype)


def encoded_dataset_dir_from_paths(src_dir, *, vae_dir: str = '', text_encoder_dir: str = '',
                                   text_length: int | None = None, sample: bool = False, seed: int = 0,
                                   text_dtype: str = 'float16') -> pathlib.Path:
  """The same directory as `encoded_dataset_dir`, from the model folders alone (no weights are read), for
  the training pipeline to find a dataset `ecdit prepare` encoded. `text_length` as given to
  `load_text_encoder` (None there means its default: pass the same value)."""
  vae_fp = text_pretrained.fingerprint_folder(pathlib.Path(vae_dir).expanduser().resolve()) if vae_dir else ''
  text_fp = ''
  if text_encoder_dir:
    folder = pathlib.Path(text_encoder_dir).expanduser().resolve()
    text_fp = text_pretrained.fingerprint_folder(folder, f'text|{text_length}')
  return _dir_from(pathlib.Path(src_dir), vae_fp, text_fp, sample, seed, text_dtype)


def read_null_text(dataset_dir) -> tuple[np.ndarray, np.ndarray]:
  """(states float32 [L, D], mask bool [L]) of the empty caption, saved with the precomputed text states."""
  path = pathlib.Path(dataset_dir) / NULL_TEXT_FILE
  if not path.is_file():
    raise reader.DataError(f'{path} is missing: the dataset at {dataset_dir} has no precomputed text states '
                           '(run ecdit.data.latents.precompute with a text encoder)')
  try:
    with np.load(path) as f:
      return f['states'].astype(np.float32), f['mask'].astype(bool)
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise reader.DataError(f'{path} is not the empty caption\'s text states ({type(e).__name__}: '
                           f'{" ".join(str(e).split())[:200]}): the prepared dataset is damaged; delete '
                           f'{dataset_dir} and run `ecdit prepare` with the same config to encode it again') from e


def _check_inputs(src: pathlib.Path, builder, vae, text_encoder, text_dtype: str) -> int:
  if vae is None and text_encoder is None:
    raise ValueError('precompute needs a vae, a text_encoder, or both')
  if text_dtype not in TEXT_DTYPES:
    raise ValueError(f'text_dtype={text_dtype!r}: expected one of {TEXT_DTYPES}')
  feats = builder.info.features
  if 'image' not in feats.keys() or 'caption' not in feats.keys():
    raise ValueError(f'dataset at {src} lacks an "image" or "caption" feature; it was not written by ecdit')
  size = int(feats['image'].shape[0])
  if vae is not None:
    f = vae.cfg.downsample_factor
    if size % f:
      raise ValueError(f'dataset at {src} has {size}px images, which the VAE (downsampling {f}×) cannot '
                       f'encode: the image size must be a multiple of {f}')
    if feats['image'].shape[-1] != vae.cfg.in_channels:
      raise ValueError(f'dataset at {src} has {feats["image"].shape[-1]}-channel images; the VAE takes '
                       f'{vae.cfg.in_channels}')
  return size


def _encode_chunk(records, vae, text_encoder, rng) -> dict[str, np.ndarray]:
  out = {}
  if vae is not None:
    images = np.stack([r['image'] for r in records]).astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    out['latent'] = np.asarray(vae.encode(images, rng), np.float32)
  if text_encoder is not None:
    states, mask = text_encoder.encode_texts([r['caption'].decode('utf-8') for r in records])
    out['text_states'], out['text_mask'] = states, mask
  return out


def _save_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  fd, tmp = tempfile.mkstemp(prefix='.chunk-', suffix='.npz', dir=path.parent)
  with os.fdopen(fd, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _encode_split(source, split: str, cache: pathlib.Path, batch_size: int, vae, text_encoder, sample: bool,
                  seed: int, progress: bool) -> list[pathlib.Path]:
  import jax   # pylint: disable=import-outside-toplevel
  from tqdm import tqdm   # pylint: disable=import-outside-toplevel
  cache.mkdir(parents=True, exist_ok=True)
  n = len(source)
  starts = list(range(0, n, batch_size))
  paths = [cache / f'{s:010d}.npz' for s in starts]
  done = sum(p.is_file() for p in paths)
  bar = tqdm(total=n, initial=min(n, done * batch_size), desc=f'encoding {split}', unit='img',
             disable=not progress)
  with bar:
    for start, path in zip(starts, paths):
      if path.is_file():
        continue
      stop = min(n, start + batch_size)
      records = source.__getitems__(list(range(start, stop)))
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), start) if sample else None
      _save_atomic(path, _encode_chunk(records, vae, text_encoder, rng))
      bar.update(stop - start)
  return paths


def precompute(src_dir, *, vae=None, text_encoder=None, batch_size: int = 16, sample: bool = False,
               seed: int = 0, text_dtype: str = 'float16', progress: bool = True,
               dst_dir=None) -> pathlib.Path:
  """Writes the encoded copy of the prepared dataset at `src_dir`; returns its directory (see module doc).

  vae: an `ecdit.models.vae.VAE` (or None); text_encoder: an `ecdit.models.text_pretrained.
  PretrainedTextEncoder` (or None). sample: store posterior samples (seeded per batch) instead of means.
  text_dtype: storage type of text_states ('float16' halves the size; the pipeline casts back to float32).
  """
  import tensorflow_datasets as tfds   # pylint: disable=import-outside-toplevel
  src = pathlib.Path(src_dir)
  builder = reader.open_builder(src)
  _check_inputs(src, builder, vae, text_encoder, text_dtype)
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}: expected >= 1')
  dst = pathlib.Path(dst_dir) if dst_dir else encoded_dataset_dir(
      src, vae=vae, text_encoder=text_encoder, sample=sample, seed=seed, text_dtype=text_dtype)
  if (dst / 'dataset_info.json').is_file():
    return dst
  if dst.resolve() == src.resolve():
    raise ValueError(f'dst_dir {dst} is the source dataset; the encoded copy must be written elsewhere')
  partial = dst.parent / f'.partial-b{batch_size}'
  splits = list(builder.info.splits.keys())
  chunks = {}
  for split in splits:
    source = reader.Source(builder.as_data_source(split=split), src, split)   # a damaged file: DataError
    chunks[split] = _encode_split(source, split, partial / split, batch_size, vae, text_encoder, sample,
                                  seed, progress)

  # Feature specs, from the first chunk's arrays.
  first = next((c[0] for c in chunks.values() if c), None)
  if first is None:
    raise ValueError(f'dataset at {src} has no examples')
  with np.load(first) as f:
    shapes = {k: f[k].shape[1:] for k in f.files}
  feats = builder.info.features
  new = {k: feats[k] for k in feats.keys() if k not in ('latent', 'text_states', 'text_mask')}
  if 'latent' in shapes:
    new['latent'] = tfds.features.Tensor(shape=shapes['latent'], dtype=np.float32)
  elif 'latent' in feats.keys():
    new['latent'] = feats['latent']
  if 'text_states' in shapes:
    new['text_states'] = tfds.features.Tensor(shape=shapes['text_states'], dtype=np.dtype(text_dtype))
    new['text_mask'] = tfds.features.Tensor(shape=shapes['text_mask'], dtype=np.bool_)

  root = dst.parent.parent
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='.incomplete-encoded-', dir=root))
  try:
    out = _EncodedBuilder(source_dir=src, chunks=chunks, features=new, text_dtype=text_dtype,
                          data_dir=str(tmp), file_format='array_record')
    with contextlib.redirect_stdout(io.StringIO()):
      tfds.disable_progress_bar()
      try:
        out.download_and_prepare()
      finally:
        tfds.enable_progress_bar()
    built = pathlib.Path(str(out.data_path))
    if text_encoder is not None:
      states, mask = text_encoder.encode_texts([''])
      np.savez(built / NULL_TEXT_FILE, states=states[0].astype(np.float32), mask=mask[0])
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.rename(built, dst)
    except OSError:
      if not (dst / 'dataset_info.json').is_file():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  shutil.rmtree(partial, ignore_errors=True)
  return dst


class _EncodedBuilder(features_lib.EcditBuilder, skip_registration=True):
  """Copies a prepared dataset's records and adds the encoded arrays saved in the chunk files."""
  name = 'ecdit_encoded'
  VERSION = '1.0.0'
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, *, source_dir: pathlib.Path, chunks: dict[str, list[pathlib.Path]], features,
               text_dtype: str, **kwargs: Any):
    self._source_dir, self._chunks, self._features, self._text_dtype = source_dir, chunks, features, text_dtype
    super().__init__(**kwargs)

  def _info(self):
    import tensorflow_datasets as tfds   # pylint: disable=import-outside-toplevel
    return tfds.core.DatasetInfo(builder=self, description=f'{self._source_dir} with precomputed encodings.',
                                 features=tfds.features.FeaturesDict(self._features), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._chunks}

  def _generate_examples(self, split):
    source = reader.data_source(self._source_dir, split)
    keys = list(self._features.keys())
    position = 0
    for path in self._chunks[split]:
      with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
      n = len(next(iter(arrays.values())))
      records = source.__getitems__(list(range(position, position + n)))
      for i, rec in enumerate(records):
        row = {k: rec[k] for k in keys if k in rec and k not in arrays}
        for k, v in arrays.items():
          row[k] = v[i].astype(self._text_dtype) if k == 'text_states' else v[i]
        yield position + i, row
      position += n
