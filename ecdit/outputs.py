"""Where commands may write (stdlib only): a run's marker, the training workdir guard and the output guard.

A training run's workdir holds `ecdit_run.json` (written before anything else; older runs are recognised by a
config.json with a `resolved_model` section). Training refuses a non-empty directory that is not a run; every
other output (`--out`, `--json`) is checked before the work starts: not inside a run's workdir (bar the run's
own output folder, e.g. samples/), not over a file or folder ecdit did not write, and writable — tried by
creating and removing an empty probe file in the directory the command would write into (`can_create_in`);
nothing else here creates, moves or deletes anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ecdit import errors

RUN_MARKER = 'ecdit_run.json'
RUN_FORMAT_VERSION = 1
PNG_MARK = ('Software', 'ecdit')   # a tEXt chunk sampler.save_png writes: how a PNG is known to be ours


class WorkdirError(errors.UsageError, ValueError):
  """The workdir, its config.json or its checkpoints are missing, unreadable or not this run's."""


class OutputError(errors.UsageError, ValueError):
  """An output path a command was given would overwrite something it did not write, or is not writable."""


# ---- runs --------------------------------------------------------------------------------------------------

def _json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def model_hash(resolved_model: dict) -> str:
  return hashlib.sha256(json.dumps(resolved_model, sort_keys=True).encode()).hexdigest()


def run_marker(resolved_model: dict) -> str:
  """The text of `<workdir>/ecdit_run.json`."""
  return json.dumps({'format': 'ecdit-run', 'format_version': RUN_FORMAT_VERSION,
                     'model_sha256': model_hash(resolved_model)}, indent=2) + '\n'


def previous_model(workdir: Path, section: str = 'resolved_model') -> dict | None:
  """The resolved model config a run's config.json records, or another of its sections ('train'); None:
  none, or unreadable."""
  d = _json(workdir / 'config.json')
  model = d.get(section) if isinstance(d, dict) else None
  return model if isinstance(model, dict) else None


def is_run(path: Path) -> bool:
  """An ecdit training workdir: the marker, or (runs from before it) a config.json with `resolved_model`."""
  return path.is_dir() and ((path / RUN_MARKER).is_file() or previous_model(path) is not None)


def enclosing_run(path: Path) -> Path | None:
  """The run whose workdir is `path` or holds it."""
  path = Path(path).absolute()
  return next((p for p in (path, *path.parents) if is_run(p)), None)


def first_difference(old: dict, new: dict) -> tuple[str, Any, Any] | None:
  """(key, old, new) of the first model key the two configs give different values (sorted order). A key the
  old config lacks is skipped: it comes from a newer schema, and the old run had its default."""
  new = json.loads(json.dumps(new))   # tuples -> lists, as the old one was read back from JSON
  for k in sorted(new):
    if k in old and old[k] != new[k]:
      return k, old[k], new[k]
  return None


def check_train_workdir(workdir: Path, resolved_model: dict) -> None:
  """Training may write `workdir`: it does not exist yet, is empty, or is a run of the same model."""
  workdir = Path(workdir)
  if not workdir.exists():
    if (run := enclosing_run(workdir)) is not None:
      raise WorkdirError(f'--workdir={workdir} is inside the ecdit run {run}; '
                         'train into a directory outside other runs')
    if _writable_from(workdir) is None:
      raise WorkdirError(f'--workdir={workdir} cannot be created: no writable directory above it')
    return
  if not workdir.is_dir():
    raise WorkdirError(f'--workdir={workdir} exists and is not a directory')
  if not can_create_in(workdir):
    raise WorkdirError(f'--workdir={workdir} is not writable')
  if not is_run(workdir):
    if any(workdir.iterdir()):
      raise WorkdirError(f'--workdir={workdir} is not empty and is not an ecdit run (no {RUN_MARKER}); '
                         'train into a new or empty directory')
    return
  old = previous_model(workdir)
  if old is None:   # config.json missing or damaged: the marker's hash still says which model the run is
    marker = _json(workdir / RUN_MARKER)
    recorded = marker.get('model_sha256') if isinstance(marker, dict) else None
    if isinstance(recorded, str) and recorded != model_hash(resolved_model):
      raise WorkdirError(f'--workdir={workdir} is a run of a different model: its {RUN_MARKER} records another '
                         'model than this config\'s (and its config.json, which would name the difference, is '
                         'missing or unreadable); resume with the run\'s model config, or use a new workdir')
    return
  diff = first_difference(old, resolved_model)
  if diff is not None:
    k, was, now = diff
    raise WorkdirError(f'--workdir={workdir} is a run of a different model: model.{k}={was!r} there, '
                       f'{now!r} now; resume with --config.model.{k}={was!r}, or use a new workdir')


def check_data_dir(data_dir) -> None:
  """`data.dir` (a local path) can hold datasets: a directory, or creatable. A read-only one is fine for data
  already prepared there, so that is left to the dataset code."""
  if data_dir is None or '://' in str(data_dir):
    return
  path = Path(data_dir)
  if path.exists() and not path.is_dir():
    raise OutputError(f'--config.data.dir={path} exists and is not a directory')
  if not path.exists() and _writable_from(path) is None:
    raise OutputError(f'--config.data.dir={path} cannot be created: no writable directory above it')


def check_run_name(name: str) -> None:
  """`runs/<config.name>` must stay a folder of ./runs: a plain directory name."""
  if not name or name in ('.', '..') or '/' in name or os.sep in name or (os.altsep and os.altsep in name):
    raise errors.UsageError(f'config.name={name!r} is invalid as the default workdir runs/<name>: expected a '
                            'plain directory name (or pass --workdir)')


# ---- outputs -----------------------------------------------------------------------------------------------

def png_from_ecdit(path: Path) -> bool:
  """A PNG written by sampler.save_png (its tEXt chunk sits before the image data)."""
  key, value = PNG_MARK
  try:
    with open(path, 'rb') as f:
      head = f.read(1 << 12)
  except OSError:
    return False
  return head.startswith(b'\x89PNG') and b'tEXt' + key.encode() + b'\0' + value.encode() in head


def json_with(*keys: str) -> Callable[[Path], bool]:
  """Recognises a JSON file (a results file ecdit wrote) by the top-level keys it always holds."""
  def ours(path: Path) -> bool:
    d = _json(path)
    return isinstance(d, dict) and all(k in d for k in keys)
  return ours


def folder_with(name: str, ours: Callable[[Path], bool]) -> Callable[[Path], bool]:
  """Recognises an output folder ecdit wrote by one file in it."""
  return lambda path: ours(path / name)


def can_create_in(directory: Path) -> bool:
  """Whether a file can be created in `directory`, found by creating one (a hidden, uniquely named empty file,
  removed at once): permission bits and os.access do not tell (root, read-only or pseudo file systems such
  as /sys, quotas)."""
  try:
    fd, probe = tempfile.mkstemp(prefix='.ecdit-write-probe-', dir=directory)
  except OSError:
    return False
  os.close(fd)
  try:
    os.unlink(probe)
  except OSError:
    pass
  return True


def _writable_from(path: Path) -> Path | None:
  """The nearest existing ancestor of a path not yet there, if it is a directory we can create entries in (the
  directory the command would create the path in anyway)."""
  for p in path.parents:
    if p.exists():
      return p if p.is_dir() and can_create_in(p) else None
  return None


def check_output(path, flag: str, *, folder: bool = False, ours: Callable[[Path], bool] | None = None,
                 run_subdir: str | None = None) -> Path:
  """Refuses, before any work, an output path (`folder`: a directory the command fills) that lies inside a
  run's workdir (unless under that run's `run_subdir`), that exists as the wrong kind, that holds something
  `ours` does not recognise as this command's earlier output, or that cannot be written. Returns the path."""
  path = Path(path)
  shown = f'{flag}={path}'
  run = enclosing_run(path)
  in_own_folder = run is not None and run_subdir is not None and \
      path.absolute().is_relative_to(run / run_subdir)
  if run is not None and not in_own_folder:
    raise OutputError(f'{shown} is inside the ecdit run {run}; write outputs outside a training run\'s workdir')
  if path.exists():
    if folder and not path.is_dir():
      raise OutputError(f'{shown} exists and is not a directory')
    if not folder and path.is_dir():
      raise OutputError(f'{shown} is a directory; expected a file path')
    non_empty = not folder or any(path.iterdir())
    if non_empty and not in_own_folder and (ours is None or not ours(path)):
      raise OutputError(f'{shown} exists and was not written by this command; choose a new path '
                        '(nothing was changed)')
    # Created in: the folder the command fills, or the file's own directory (written or replaced there).
    if not os.access(path, os.W_OK) or not can_create_in(path if folder else path.absolute().parent):
      raise OutputError(f'{shown} is not writable')
  elif _writable_from(path) is None:
    raise OutputError(f'{shown} cannot be created: no writable directory above it')
  return path


def follow_umask(*paths: Path) -> None:
  """Gives files (and directories, with what is under them) the permissions a plain open() or mkdir() would:
  safetensors and tempfile write 0600 / 0700, which would leave an export unreadable to others."""
  umask = os.umask(0)
  os.umask(umask)   # reading the umask means setting it; restored at once
  for path in paths:
    for p in [path, *(path.rglob('*') if path.is_dir() else ())]:
      if not p.is_symlink():
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
