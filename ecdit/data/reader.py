"""Opening a prepared dataset directory: builder, per-split random-access sources, captions."""
from __future__ import annotations

import pathlib
from typing import Iterator

import tensorflow_datasets as tfds

from ecdit.data import features as features_lib


def open_builder(dataset_dir: str | pathlib.Path, image_size: int | None = None):
  """The read-only tfds builder of a prepared dataset; checks the image shape when image_size is given."""
  path = pathlib.Path(dataset_dir)
  if not (path / 'dataset_info.json').is_file():
    raise FileNotFoundError(f'no prepared dataset at {path} (dataset_info.json missing); run '
                            '`ecdit prepare --config=...` or check data.dir')
  builder = tfds.builder_from_directory(str(path))
  if image_size is not None:
    features_lib.check_features(builder.info.features, image_size, path)
  return builder


def data_source(dataset_dir: str | pathlib.Path, split: str, image_size: int | None = None):
  """Random-access source of a split: `len(src)`, `src[i]` → dict of numpy values (text as bytes)."""
  builder = open_builder(dataset_dir, image_size)
  if split not in builder.info.splits:
    raise ValueError(f'dataset at {dataset_dir} has no split {split!r}; it has {sorted(builder.info.splits)}')
  return builder.as_data_source(split=split)


def captions(dataset_dir: str | pathlib.Path, split: str = 'train', chunk: int = 1024) -> Iterator[str]:
  """Every caption of a split, in stored order."""
  src = data_source(dataset_dir, split)
  for start in range(0, len(src), chunk):
    for rec in src.__getitems__(list(range(start, min(len(src), start + chunk)))):
      yield rec['caption'].decode('utf-8')
