"""`load_pipeline(folder)`: an exported diffusers folder as an ECDiTPipeline, built from this package's classes
(no custom code from the folder is executed, so no `trust_remote_code`).

model_index.json names each component as [module, class]; ecdit's own components are resolved here, the
others (FlowMatchEulerDiscreteScheduler, AutoencoderKL, CLIP / T5 text models and tokenizers) from diffusers
or transformers by class name.
"""
from __future__ import annotations

import importlib
import inspect
import types
from pathlib import Path

import torch

from .ecdit_reference import (ExportError, TextEncoder, check_config, check_tensors, check_text_config,
                              expected_shapes, first_line, read_header, read_json_object)
from .pipeline_ecdit import ECDiTPipeline
from .text_encoder_ecdit import ECDiTTextEncoder
from .tokenizer_ecdit import ECDiTTokenizer
from .transformer_ecdit import ECDiTTransformer2DModel

OWN = {c.__name__: c for c in (ECDiTTransformer2DModel, ECDiTTextEncoder, ECDiTTokenizer)}
COMPONENTS = ('transformer', 'scheduler', 'text_encoder', 'tokenizer', 'vae')
REQUIRED = ('transformer', 'scheduler', 'text_encoder', 'tokenizer')   # vae: latent runs only
WEIGHTS = 'diffusion_pytorch_model.safetensors'                          # diffusers' names for a model's weights
WEIGHTS_INDEX = WEIGHTS + '.index.json'                                  # ... when sharded
TEXT_KEYS = ('vocab_size', 'text_length', 'text_width', 'text_depth', 'text_heads')


def _component_class(name: str, entry, where: Path):
  if not isinstance(entry, (list, tuple)) or len(entry) != 2:
    raise ExportError(f'{where}: "{name}" must be [module, class], got {entry!r}')
  library, cls = entry
  if isinstance(cls, str) and cls in OWN:
    return OWN[cls]
  if library in ('diffusers', 'transformers') and isinstance(cls, str):
    found = getattr(importlib.import_module(library), cls, None)
    if found is not None:
      return found
  raise ExportError(f'{where}: component {name}={entry!r} is neither an ecdit_torch class nor a diffusers / '
                    'transformers one')


def weight_files(folder: Path) -> list[Path]:
  """The safetensors files diffusers would read for the model in `folder`: the shards its index lists, or the
  one weights file. ExportError naming what is missing."""
  index = folder / WEIGHTS_INDEX
  if index.is_file():
    weight_map = read_json_object(index).get('weight_map')
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ExportError(f'{index}: expected "weight_map": {{tensor name: shard file}}')
    files = [folder / f for f in sorted(set(weight_map.values()))]
    for f in files:
      if Path(f.name) != Path(f.relative_to(folder)) or not f.is_file():
        raise ExportError(f'{index} lists shard {f.relative_to(folder)}, which is not a file in {folder}; the '
                          'export is incomplete')
    return files
  if not (folder / WEIGHTS).is_file():
    raise ExportError(f'{folder / WEIGHTS} is missing (and no {WEIGHTS_INDEX}): the export is incomplete')
  return [folder / WEIGHTS]


def _model_folder(folder: Path) -> tuple[Path, dict, dict, Path]:
  """(config.json path, its object, the header of the weights, the weights file or index to name in errors)
  of a diffusers model folder."""
  conf_path = folder / 'config.json'
  if not conf_path.is_file():
    raise ExportError(f'{conf_path} is missing: the export is incomplete')
  files = weight_files(folder)
  where = folder / WEIGHTS_INDEX if (folder / WEIGHTS_INDEX).is_file() else files[0]
  return conf_path, read_json_object(conf_path), read_header(files), where


def check_transformer_folder(folder: Path) -> None:
  """ExportError (one line) unless the transformer's config.json is valid and its weights hold exactly the
  tensors it implies — read from the safetensors headers, before the model is allocated from config.json."""
  conf_path, conf, header, where = _model_folder(folder)
  arch = {k: conf[k] for k in inspect.signature(ECDiTTransformer2DModel.__init__).parameters if k in conf}
  check_config(dict(arch, text_encoder='precomputed'), conf_path, '', header, where, text_prefix=None)
  check_tensors(header, expected_shapes(lambda: ECDiTTransformer2DModel(**arch)), where)


def check_text_encoder_folder(folder: Path) -> None:
  """The same for ecdit's own text encoder component (ECDiTTextEncoder)."""
  conf_path, conf, header, where = _model_folder(folder)
  check_text_config(conf, conf_path, '', header, where)
  sizes = types.SimpleNamespace(**{k: conf[k] for k in TEXT_KEYS})
  check_tensors(header, expected_shapes(lambda: TextEncoder(sizes)), where)


def _dtype_kwargs(cls, dtype: torch.dtype) -> dict:
  if not issubclass(cls, torch.nn.Module):
    return {}
  # transformers 5 reads `dtype` (and would otherwise load the checkpoint's own, e.g. float16); diffusers and
  # ecdit_torch models read `torch_dtype`.
  return {'dtype': dtype} if cls.__module__.startswith('transformers.') else {'torch_dtype': dtype}


def load_pipeline(folder: str | Path, torch_dtype: torch.dtype | None = None) -> ECDiTPipeline:
  """torch_dtype: of every model component; default float32, the precision ecdit computes its parity in
  (a float16 CLIP / T5 checkpoint is read as float32, as ecdit reads it).

  Reads only `folder` (local_files_only: never the Hub). Raises ExportError, one line naming the file or
  folder, for an incomplete or inconsistent folder — ecdit's own components checked (config.json against the
  safetensors headers) before any is allocated."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ExportError(f'{folder} is not a folder: expected one written by `ecdit export --format=diffusers`')
  index = folder / 'model_index.json'
  if not index.is_file():
    raise ExportError(f'{index} is missing: not a diffusers folder written by `ecdit export --format=diffusers`')
  conf = read_json_object(index)
  classes = {}
  for name in COMPONENTS:
    entry = conf.get(name)
    if entry is None or entry == [None, None]:
      if name in REQUIRED:
        raise ExportError(f'{index}: no "{name}" component; an ECDiTPipeline needs {", ".join(REQUIRED)}')
      continue
    classes[name] = _component_class(name, entry, index)
    if not (folder / name).is_dir():
      raise ExportError(f'{folder / name} is missing: model_index.json lists {name}={list(entry)}, so the export '
                        'is incomplete')
  check_transformer_folder(folder / 'transformer')
  if classes['text_encoder'] is ECDiTTextEncoder:
    check_text_encoder_folder(folder / 'text_encoder')
  parts = dict.fromkeys(COMPONENTS)
  for name, cls in classes.items():
    try:
      parts[name] = cls.from_pretrained(str(folder / name), local_files_only=True,
                                        **_dtype_kwargs(cls, torch_dtype or torch.float32))
    except (OSError, ValueError) as e:   # diffusers / transformers: a missing or unreadable file
      if isinstance(e, ExportError):
        raise
      raise ExportError(f'{folder / name}: cannot load it as {cls.__name__} ({first_line(e)})') from None
  extras = {k: conf[k] for k in ('text_length', 'text_encoder_uses_mask', 'default_num_inference_steps',
                                 'default_guidance_scale') if k in conf}
  return ECDiTPipeline(**parts, **extras)
