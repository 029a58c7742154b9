"""Reading local Hugging Face-layout model folders (diffusers / transformers) without torch.

A folder holds `config.json` and the weights as safetensors, either one file or shards listed in
`<name>.safetensors.index.json`. Weights are placed into a Flax parameter tree by an explicit table of
`Entry(source_name, target_path, transform)` rows that each model module builds from its config; every row
must find its tensor with the expected shape, and every tensor under the model's own prefixes must be used,
so a config that does not describe the weights fails with the name of the first tensor that disagrees.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ecdit import errors


class LoadError(errors.UsageError, ValueError):
  """A model folder that cannot be loaded: missing file, bad config, or weights that do not match it."""


@dataclasses.dataclass(frozen=True)
class Entry:
  source: str                     # tensor name in the safetensors file
  target: tuple[str, ...]         # path in the Flax params tree
  shape: tuple[int, ...]          # shape in the Flax tree (after the transform)
  transform: str = 'none'         # 'none' | 'linear' (out,in -> in,out) | 'conv' (OIHW -> HWIO)


def _transform(name: str, kind: str, value: np.ndarray) -> np.ndarray:
  if kind == 'none':
    return value
  if kind == 'linear':
    if value.ndim == 4 and value.shape[2:] == (1, 1):   # a 1x1 conv stored where a linear is expected
      value = value[:, :, 0, 0]
    if value.ndim != 2:
      raise LoadError(f'tensor {name} has shape {value.shape}; expected a 2-d linear weight')
    return value.T
  if kind == 'conv':
    if value.ndim != 4:
      raise LoadError(f'tensor {name} has shape {value.shape}; expected a 4-d conv kernel (out, in, h, w)')
    return value.transpose(2, 3, 1, 0)
  raise AssertionError(kind)


def require_dir(folder: str | pathlib.Path, what: str) -> pathlib.Path:
  path = pathlib.Path(folder).expanduser()
  if not path.is_dir():
    raise LoadError(f'{what} folder {path} does not exist or is not a directory')
  return path


def read_config(folder: pathlib.Path, name: str = 'config.json') -> dict[str, Any]:
  path = folder / name
  if not path.is_file():
    raise LoadError(f'{path} is missing: a model folder needs its {name} next to the weights')
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise LoadError(f'{path} is not valid JSON ({e.msg}, line {e.lineno})') from None
  if not isinstance(cfg, dict):
    raise LoadError(f'{path} must hold a JSON object')
  return cfg


def config_value(cfg: Mapping[str, Any], key: str, path: pathlib.Path, default: Any = ..., *,
                 kind: type | tuple = (int,)) -> Any:
  """`cfg[key]`, checked to be of `kind`; a missing key without default is an error naming the file."""
  if key not in cfg or cfg[key] is None:
    if default is ...:
      raise LoadError(f'{path / "config.json"} lacks the key "{key}"')
    return default
  value = cfg[key]
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if isinstance(value, bool) and bool not in kinds:
    raise LoadError(f'{path / "config.json"}: "{key}"={value!r} must be of type {kinds}')
  if float in kinds and isinstance(value, int):
    value = float(value)
  if not isinstance(value, kinds):
    raise LoadError(f'{path / "config.json"}: "{key}"={value!r} must be of type {kinds}')
  return value


def read_safetensors(folder: pathlib.Path, filename: str) -> dict[str, np.ndarray]:
  """All tensors of `filename` (or of the shards its `.index.json` lists) as float32 numpy arrays."""
  from safetensors.flax import load_file   # pylint: disable=import-outside-toplevel  (handles bf16/f16)
  single = folder / filename
  index = folder / f'{filename}.index.json'
  if single.is_file():
    files = [single]
  elif index.is_file():
    try:
      weight_map = json.loads(index.read_text())['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError):
      raise LoadError(f'{index} is not a safetensors index (no "weight_map")') from None
    files = [folder / f for f in sorted(set(weight_map.values()))]
    for f in files:
      if not f.is_file():
        raise LoadError(f'weight shard {f} listed in {index} is missing')
  else:
    raise LoadError(f'{single} is missing (nor is there a sharded {index.name}): the folder needs its '
                    'safetensors weights')
  out: dict[str, np.ndarray] = {}
  for f in files:
    try:
      tensors = load_file(str(f))
    except Exception as e:   # safetensors raises its own error types for truncated / corrupt files
      raise LoadError(f'cannot read weights file {f}: {e}') from None
    for k, v in tensors.items():
      out[k] = np.asarray(v, dtype=np.float32)
  return out


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Drops `prefix` from names that have it (checkpoints differ in whether they carry a wrapper prefix)."""
  if any(k.startswith(prefix) for k in tensors):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
  return dict(tensors)


def assemble(table: Sequence[Entry], tensors: Mapping[str, np.ndarray], *, owned: Callable[[str], bool],
             where: pathlib.Path | str, aliases: Mapping[str, Sequence[str]] | None = None) -> dict:
  """The nested params dict described by `table`, filled from `tensors`.

  `owned(name)` says which tensor names belong to this model; an owned tensor the table does not use is an
  error (the weights describe a bigger or different model than the config). `aliases` lists alternative
  source names for an entry (e.g. tied embeddings saved under another name).
  """
  aliases = aliases or {}
  params: dict = {}
  used = set()
  for e in table:
    names = [e.source, *aliases.get(e.source, ())]
    name = next((n for n in names if n in tensors), None)
    if name is None:
      raise LoadError(f'tensor {e.source} is missing from the weights in {where}; the config describes a '
                      'model these weights do not have (check config.json against the weights file)')
    value = _transform(name, e.transform, tensors[name])
    if tuple(value.shape) != tuple(e.shape):
      raise LoadError(f'tensor {name} in {where} has shape {tuple(tensors[name].shape)}, but config.json '
                      f'implies {_source_shape(e)}; config.json and the weights do not match')
    used.update(names)
    node = params
    for part in e.target[:-1]:
      node = node.setdefault(part, {})
    node[e.target[-1]] = value
  extra = sorted(k for k in tensors if owned(k) and k not in used)
  if extra:
    more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
    raise LoadError(f'tensor {extra[0]}{more} in {where} is not part of the model config.json describes; '
                    'config.json and the weights do not match')
  return params


def _source_shape(e: Entry) -> tuple[int, ...]:
  s = tuple(e.shape)
  if e.transform == 'linear':
    return s[::-1]
  if e.transform == 'conv':
    return (s[3], s[2], s[0], s[1])
  return s


def count(tree: Any) -> int:
  import jax   # pylint: disable=import-outside-toplevel
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def check_tree(params: Any, expected: Any, where: str) -> None:
  """Raises if `params` and `expected` (e.g. from jax.eval_shape of init) differ in structure or shapes."""
  import jax   # pylint: disable=import-outside-toplevel
  got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  for k in sorted(set(got) | set(want)):
    if got.get(k) != want.get(k):
      raise LoadError(f'{where}: parameter {k} is {got.get(k)} after loading but the module expects '
                      f'{want.get(k)} (a bug in the name table)')


def names(items: Iterable[str]) -> str:
  return ', '.join(sorted(items))
