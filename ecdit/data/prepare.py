"""Materialise an experiment's dataset (and its tokenizer) under data.dir (`ecdit prepare`).

The dataset is written into a temporary directory next to its final place and renamed into place only once
complete, so an interrupted or repeated run never leaves a half-written or corrupted dataset behind; an
existing dataset is checked (feature shapes) and reused.
"""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import tempfile
import time

from absl import logging

from ecdit import errors
from ecdit.config import data as config_lib
from ecdit.data import folder_builder, latents, reader, shapes_builder, tokenizer
from ecdit.models.text_pretrained import load_text_encoder
from ecdit.models.vae import load_vae


def _builder(data_cfg, data_dir: pathlib.Path):
  if data_cfg.name == 'shapes':
    return shapes_builder.ShapesBuilder(config=shapes_builder.shapes_config(data_cfg), data_dir=str(data_dir),
                                        file_format='array_record')
  return folder_builder.ImageTextFolderBuilder(config=folder_builder.folder_config(data_cfg),
                                               data_dir=str(data_dir), file_format='array_record')


def _config_name(data_cfg) -> str:
  if data_cfg.name == 'shapes':
    return shapes_builder.shapes_config(data_cfg).name
  return folder_builder.folder_config(data_cfg).name


def imported_dataset_dir(data_cfg) -> pathlib.Path:
  """Where the generated / imported dataset lives, before any VAE or text-encoder precomputation."""
  config_lib.validate_data_config(data_cfg)
  return pathlib.Path(data_cfg.dir).expanduser() / data_cfg.name / _config_name(data_cfg) / '1.0.0'


def _precompute_settings(data_cfg) -> dict | None:
  """The arguments of the latents.precompute pass this config asks for (None: no pass). The same dict
  names the encoded dataset's directory, so the two can never disagree."""
  vae_dir = config_lib.option(data_cfg, 'vae_dir')
  text_dir = config_lib.option(data_cfg, 'text_encoder_dir') if config_lib.option(data_cfg, 'precompute_text') else ''
  if not vae_dir and not text_dir:
    return None
  return dict(vae_dir=vae_dir, text_encoder_dir=text_dir, text_length=data_cfg.text_length,
              sample=config_lib.option(data_cfg, 'sample_latents'), seed=data_cfg.seed,
              text_dtype=config_lib.option(data_cfg, 'text_states_dtype'))


def dataset_dir(data_cfg) -> pathlib.Path:
  """Where the dataset for this config lives (whether or not it exists yet): the imported one, or its
  encoded copy (latents / text states) when data.vae_dir or data.text_encoder_dir asks for one."""
  raw = imported_dataset_dir(data_cfg)
  settings = _precompute_settings(data_cfg)
  if settings is None:
    return raw
  return latents.encoded_dataset_dir_from_paths(raw, **settings)


def check_not_damaged(path: pathlib.Path) -> None:
  """A dataset folder that holds files but no dataset_info.json is a damaged copy (its metadata deleted), not a
  missing one: rebuilding over it would fail on the non-empty folder, so it is a DataError and nothing is
  touched (the user deletes it)."""
  if (path / 'dataset_info.json').is_file() or not path.is_dir() or not any(path.iterdir()):
    return
  raise reader.DataError(f'{path / "dataset_info.json"} is missing but {path} holds other files: the prepared '
                         f'dataset is damaged; {reader.remake_hint(path)}')


def _size_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def describe(path: pathlib.Path) -> str:
  splits = reader.open_builder(path).info.splits
  counts = ', '.join(f'{name} {splits[name].num_examples}' for name in splits)
  return f'{path}: {counts} examples, {_size_bytes(path) / 2**20:.1f} MiB'


def check_dataset(path: pathlib.Path, image_size: int | None = None) -> None:
  """An existing dataset opens, has the image shape asked for and gives a record from every shard of every
  split; else one error (reader.DataError for damaged files) naming the file and the fix."""
  for split in reader.open_builder(path, image_size).info.splits:
    reader.data_source(path, split)


class PrepareError(errors.RunError, RuntimeError):
  """Writing a dataset failed (a full disk, a file system refusing a write); nothing half-written is kept."""


def _write(builder, root: pathlib.Path) -> None:
  """tfds' download_and_prepare; a failed write (tfds wraps the OS error in a RuntimeError) is one line."""
  try:
    builder.download_and_prepare()
  except (OSError, RuntimeError) as e:
    raise PrepareError(f'writing the dataset under data.dir={root} failed ({reader.first_line(e)}); the partial '
                       'copy was removed: free space there or choose another data.dir, then run again') from e


def _build(data_cfg, final: pathlib.Path, verbose: bool) -> None:
  import tensorflow_datasets as tfds   # pylint: disable=import-outside-toplevel
  root = pathlib.Path(data_cfg.dir).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.incomplete-{data_cfg.name}-', dir=root))
  try:
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)   # tfds warns that our builder configs are "custom"; they all are
    try:
      builder = _builder(data_cfg, tmp)
    finally:
      logging.set_verbosity(level)
    start = time.perf_counter()
    if verbose:
      _write(builder, root)
    else:   # quiet: no progress bars, no tfds banner
      tfds.disable_progress_bar()
      try:
        with contextlib.redirect_stdout(io.StringIO()):
          _write(builder, root)
      finally:
        tfds.enable_progress_bar()
    skipped = getattr(builder, 'skipped', [])
    if skipped:
      print(f'skipped {len(skipped)} unusable image(s) (data.on_bad_image=skip), e.g.:')
      for reason in skipped[:5]:
        print(f'  {reason}')
    built = pathlib.Path(str(builder.data_path))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.rename(built, final)
    except OSError:
      if not (final / 'dataset_info.json').is_file():   # not someone else's finished copy: a real failure
        raise
    if verbose:
      print(f'wrote {data_cfg.name} in {time.perf_counter() - start:.1f} s')
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def prepare(data_cfg, *, verbose: bool = True) -> pathlib.Path:
  """Makes sure the dataset and its tokenizer exist; returns the dataset directory. Idempotent."""
  final = imported_dataset_dir(data_cfg)
  check_not_damaged(final)
  if (final / 'dataset_info.json').is_file():
    check_dataset(final, data_cfg.image_size)   # wrong feature shape, damaged files → one clear error
  else:
    _build(data_cfg, final, verbose)
  settings = _precompute_settings(data_cfg)
  if settings is not None:
    final = _precompute(data_cfg, final, settings, verbose)
  if not config_lib.option(data_cfg, 'tokenizer_path') and not config_lib.option(data_cfg, 'text_encoder_dir'):
    # A pretrained text encoder brings its own tokenizer; ours is trained once, and loaded to check it.
    path = tokenizer.ensure_tokenizer(final, data_cfg)
    tokenizer.load_tokenizer(path, data_cfg.vocab_size, data_cfg.text_length, tokenizer.DATASET_FIX)
  if verbose:
    print(describe(final))
  return final


def load_or_train_tokenizer(data_cfg) -> tokenizer.Tokenizer:
  """The tokenizer for a data config: data.tokenizer_path if set, else the one next to the dataset
  (materialising the dataset and training the tokenizer first if needed)."""
  config_lib.validate_data_config(data_cfg)
  explicit = config_lib.option(data_cfg, 'tokenizer_path')
  if explicit:
    return tokenizer.load_tokenizer(explicit, data_cfg.vocab_size, data_cfg.text_length)
  dataset_dir = prepare(data_cfg, verbose=False)
  path = tokenizer.ensure_tokenizer(dataset_dir, data_cfg)
  return tokenizer.load_tokenizer(path, data_cfg.vocab_size, data_cfg.text_length, tokenizer.DATASET_FIX)


def _precompute(data_cfg, imported: pathlib.Path, settings: dict, verbose: bool) -> pathlib.Path:
  """Encodes the imported dataset's images (VAE) and/or captions (text encoder) into its encoded copy."""
  expected = dataset_dir(data_cfg)
  check_not_damaged(expected)
  if (expected / 'dataset_info.json').is_file():
    check_dataset(expected)
    return expected   # done before: do not even load the weights
  vae = text_encoder = None
  if settings['vae_dir']:
    vae = load_vae(settings['vae_dir'])
  if settings['text_encoder_dir']:
    text_encoder = load_text_encoder(settings['text_encoder_dir'], length=settings['text_length'])
  start = time.perf_counter()
  out = latents.precompute(imported, vae=vae, text_encoder=text_encoder, sample=settings['sample'],
                           seed=settings['seed'], text_dtype=settings['text_dtype'], progress=verbose)
  if out != expected:   # the name from the folders alone must match the one from the loaded models
    raise RuntimeError(f'encoded dataset written to {out} but expected at {expected}')
  if verbose:
    print(f'encoded {", ".join(k for k in ("vae_dir", "text_encoder_dir") if settings[k])} into {out} '
          f'in {time.perf_counter() - start:.1f} s')
  return out

