"""Opening a prepared dataset directory: builder, per-split random-access sources, captions.

A damaged dataset (a file missing, truncated or overwritten) is one `DataError` line naming the file and the
fix, whether it shows when the folder is opened, when a split is first read (`data_source` reads a record of
every shard) or at any later read; nothing on disk is touched.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterator, Sequence

import tensorflow_datasets as tfds
from google.protobuf import json_format

from ecdit import errors
from ecdit.data import features as features_lib

# The JSON files tfds writes beside the records; builder_from_directory needs both.
METADATA_FILES = ('dataset_info.json', 'features.json')


class DataError(errors.RunError, ValueError):
  """A prepared dataset or tokenizer file that cannot be read; the message names the file and how to fix it."""


def remake_hint(path: pathlib.Path | None = None) -> str:
  """How to rebuild a damaged prepared dataset (`path`: its folder; None: the one the message names)."""
  return f'delete {path or "that folder"} and run `ecdit prepare` with the same config to rebuild it'


def first_line(e: BaseException) -> str:
  """An error's first line (its type's name when it has no message), at most 200 characters."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def open_builder(dataset_dir: str | pathlib.Path, image_size: int | None = None):
  """The read-only tfds builder of a prepared dataset; checks the image shape when image_size is given. A
  folder that is no prepared dataset (dataset_info.json missing) is a DataError like any damage."""
  path = pathlib.Path(dataset_dir)
  if not (path / 'dataset_info.json').is_file():
    raise DataError(f'no prepared dataset at {path} (dataset_info.json missing); run `ecdit prepare --config=...` '
                    'or check data.dir')
  for name in METADATA_FILES:   # tfds would fail on these with a protobuf / JSON traceback
    file = path / name
    if not file.is_file():
      raise DataError(f'{file} is missing: the prepared dataset is incomplete; {remake_hint(path)}')
    try:
      json.loads(file.read_text('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f'{file} is not valid JSON ({first_line(e)}): the prepared dataset is damaged; '
                      f'{remake_hint(path)}') from e
  try:
    builder = tfds.builder_from_directory(str(path))
  except (json_format.ParseError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError(f'{path} is not a readable tfds dataset ({type(e).__name__}: {first_line(e)}); '
                    f'{remake_hint(path)}') from e
  if image_size is not None:
    features_lib.check_features(builder.info.features, image_size, path)
  return builder


# What reading a damaged record raises: array_record / riegeli (RuntimeError, OSError) for a corrupt or missing
# file, tfds (ValueError) when a truncated shard hands back no bytes for a record it still lists.
_UNREADABLE = (RuntimeError, OSError, ValueError)


class Source:
  """A split's records (`len(src)`, `src[i]`, `src.__getitems__(keys)` → dicts of numpy values, text as bytes);
  a read the files refuse (truncated, overwritten, missing) raises DataError naming the dataset. Picklable,
  for grain's worker processes."""

  def __init__(self, inner, dataset_dir: pathlib.Path, split: str):
    self._inner, self.dataset_dir, self.split = inner, pathlib.Path(dataset_dir), split

  def __len__(self) -> int:
    return len(self._inner)

  def _damaged(self, e: BaseException, what: str) -> DataError:
    return DataError(f'{self.dataset_dir}: the prepared dataset is damaged: {what} of split {self.split!r} cannot '
                     f'be read ({first_line(e)}); {remake_hint()}')

  def __getitem__(self, key):
    try:
      return self._inner[key]
    except _UNREADABLE as e:   # array_record / riegeli / tfds: truncated, corrupt or missing file
      raise self._damaged(e, f'record {key}') from e

  def __getitems__(self, keys: Sequence[int]):
    try:
      return self._inner.__getitems__(keys)
    except _UNREADABLE as e:
      raise self._damaged(e, f'records {min(keys)} to {max(keys)}' if len(keys) else 'a record') from e

  def check(self) -> None:
    """Reads the first record of every shard file and the last record: a damaged file says so here, before
    the work that reads it later (a model compile, minutes of training)."""
    builder_split = self._inner.dataset_info.splits[self.split]
    starts, at = [], 0
    for n in builder_split.shard_lengths:
      if n:
        starts.append(at)
      at += n
    if not len(self):
      return
    try:
      self._inner.__getitems__(sorted(set(starts) | {len(self) - 1}))
    except _UNREADABLE as e:
      raise self._damaged(e, 'a shard file') from e


_CHECKED: set[tuple[str, str]] = set()   # (dataset folder, split) whose shards this process has read


def data_source(dataset_dir: str | pathlib.Path, split: str, image_size: int | None = None) -> Source:
  """Random-access source of a split, its shards checked readable (`Source.check`, once per process)."""
  builder = open_builder(dataset_dir, image_size)
  if split not in builder.info.splits:
    raise DataError(f'dataset at {dataset_dir} has no split {split!r}; it has {sorted(builder.info.splits)}')
  source = Source(builder.as_data_source(split=split), pathlib.Path(dataset_dir), split)
  key = (str(pathlib.Path(dataset_dir).absolute()), split)
  if key not in _CHECKED:
    source.check()
    _CHECKED.add(key)
  return source


def captions(dataset_dir: str | pathlib.Path, split: str = 'train', chunk: int = 1024) -> Iterator[str]:
  """Every caption of a split, in stored order."""
  src = data_source(dataset_dir, split)
  for start in range(0, len(src), chunk):
    for rec in src.__getitems__(list(range(start, min(len(src), start + chunk)))):
      yield rec['caption'].decode('utf-8')
