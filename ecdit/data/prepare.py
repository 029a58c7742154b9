"""`ecdit prepare --config=...`: materialise an experiment's dataset (and its tokenizer) under data.dir.

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

from absl import flags
from absl import logging
from ml_collections import config_flags

from ecdit.data import config as config_lib


def _builder(data_cfg, data_dir: pathlib.Path):
  if data_cfg.name == 'shapes':
    from ecdit.data import shapes_builder   # pylint: disable=import-outside-toplevel
    return shapes_builder.ShapesBuilder(config=shapes_builder.shapes_config(data_cfg), data_dir=str(data_dir),
                                        file_format='array_record')
  from ecdit.data import folder_builder   # pylint: disable=import-outside-toplevel
  return folder_builder.ImageTextFolderBuilder(config=folder_builder.folder_config(data_cfg),
                                               data_dir=str(data_dir), file_format='array_record')


def _config_name(data_cfg) -> str:
  if data_cfg.name == 'shapes':
    from ecdit.data import shapes_builder   # pylint: disable=import-outside-toplevel
    return shapes_builder.shapes_config(data_cfg).name
  from ecdit.data import folder_builder   # pylint: disable=import-outside-toplevel
  return folder_builder.folder_config(data_cfg).name


def dataset_dir(data_cfg) -> pathlib.Path:
  """Where the dataset for this config lives (whether or not it exists yet)."""
  config_lib.validate_data_config(data_cfg)
  return pathlib.Path(data_cfg.dir).expanduser() / data_cfg.name / _config_name(data_cfg) / '1.0.0'


def _size_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def describe(path: pathlib.Path) -> str:
  from ecdit.data import reader   # pylint: disable=import-outside-toplevel
  splits = reader.open_builder(path).info.splits
  counts = ', '.join(f'{name} {splits[name].num_examples}' for name in splits)
  return f'{path}: {counts} examples, {_size_bytes(path) / 2**20:.1f} MiB'


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
      builder.download_and_prepare()
    else:   # quiet: no progress bars, no tfds banner
      tfds.disable_progress_bar()
      try:
        with contextlib.redirect_stdout(io.StringIO()):
          builder.download_and_prepare()
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
  from ecdit.data import reader, tokenizer   # pylint: disable=import-outside-toplevel
  final = dataset_dir(data_cfg)
  if (final / 'dataset_info.json').is_file():
    reader.open_builder(final, data_cfg.image_size)   # wrong feature shape → clear error
  else:
    _build(data_cfg, final, verbose)
  if not config_lib.option(data_cfg, 'tokenizer_path'):
    tokenizer.ensure_tokenizer(final, data_cfg)
  if verbose:
    print(describe(final))
  return final


# `ecdit prepare --config=...`. The training command imports this module for `prepare()` and has its own
# --config: ours is defined only if none exists yet, and may be overridden by a later definition.
if 'config' not in flags.FLAGS:
  config_flags.DEFINE_config_file('config', None, 'experiment config file (its `data` section is used); '
                                  'without it, ecdit.data.default_data_config()', allow_override=True)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f'ecdit prepare: unexpected arguments {argv[1:]}')
  cfg = flags.FLAGS.config
  data_cfg = config_lib.default_data_config() if cfg is None else (cfg.data if 'data' in cfg else cfg)
  logging.set_verbosity(logging.WARNING)
  try:
    prepare(data_cfg)
  except (ValueError, FileNotFoundError, NotADirectoryError) as e:
    raise SystemExit(f'ecdit prepare: {e}') from None
