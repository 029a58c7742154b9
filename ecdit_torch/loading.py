"""`load_pipeline(folder)`: an exported diffusers folder as an ECDiTPipeline, built from this package's classes
(no custom code from the folder is executed, so no `trust_remote_code`).

model_index.json names each component as [module, class]; ecdit's own components are resolved here, the
others (FlowMatchEulerDiscreteScheduler, AutoencoderKL, CLIP / T5 text models and tokenizers) from diffusers
or transformers by class name.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import safetensors
import torch

from .pipeline_ecdit import ECDiTPipeline
from .text_encoder_ecdit import ECDiTTextEncoder
from .tokenizer_ecdit import ECDiTTokenizer
from .transformer_ecdit import ECDiTTransformer2DModel

OWN = {c.__name__: c for c in (ECDiTTransformer2DModel, ECDiTTextEncoder, ECDiTTokenizer)}
COMPONENTS = ('transformer', 'scheduler', 'text_encoder', 'tokenizer', 'vae')


def _component_class(name: str, entry, where: Path):
  if not isinstance(entry, (list, tuple)) or len(entry) != 2:
    raise ValueError(f'{where}: "{name}" must be [module, class], got {entry!r}')
  library, cls = entry
  if cls in OWN:
    return OWN[cls]
  if library in ('diffusers', 'transformers'):
    found = getattr(importlib.import_module(library), cls, None)
    if found is not None:
      return found
  raise ValueError(f'{where}: component {name}={entry!r} is neither an ecdit_torch class nor a diffusers / '
                   'transformers one')


def check_transformer_folder(folder: Path) -> None:
  """ValueError, one line, unless the transformer's config.json and its weights agree on depth, width and
  experts — read from the safetensors header, before the model is allocated from config.json."""
  conf_path = folder / 'config.json'
  weights = sorted(folder.glob('*.safetensors'))
  if not conf_path.is_file() or not weights:
    raise ValueError(f'{folder}: expected config.json and a .safetensors file (an ecdit diffusers export)')
  try:
    conf = json.loads(conf_path.read_text())
    header = {}
    for file in weights:   # one file, or the shards of a large model
      with safetensors.safe_open(str(file), framework='pt') as f:
        header.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
  except Exception as e:  # noqa: BLE001 — JSON and safetensors raise several types for a damaged file.
    raise ValueError(f'{folder}: unreadable config.json or weights ({type(e).__name__}: {e})') from None
  blocks = {n.split('.')[1] for n in header if n.startswith('blocks.')}
  found = {'depth': len(blocks), 'width': header.get('patch_embed.proj.weight', (None,))[0]}
  if conf.get('routing', 'expert_choice') != 'dense':
    found['num_experts'] = next((s[0] for n, s in header.items() if n.endswith('.moe.wi.weight')), None)
  for key, value in found.items():
    if not isinstance(conf.get(key), int) or conf[key] != value:
      raise ValueError(f'{conf_path}: {key}={conf.get(key)!r}, but the weights hold {key}={value}; '
                       'do config.json and the weights belong together?')


def _dtype_kwargs(cls, dtype: torch.dtype) -> dict:
  if not issubclass(cls, torch.nn.Module):
    return {}
  # transformers 5 reads `dtype` (and would otherwise load the checkpoint's own, e.g. float16); diffusers and
  # ecdit_torch models read `torch_dtype`.
  return {'dtype': dtype} if cls.__module__.startswith('transformers.') else {'torch_dtype': dtype}


def load_pipeline(folder: str | Path, torch_dtype: torch.dtype | None = None) -> ECDiTPipeline:
  """torch_dtype: of every model component; default float32, the precision ecdit computes its parity in
  (a float16 CLIP / T5 checkpoint is read as float32, as ecdit reads it)."""
  folder = Path(folder)
  index = folder / 'model_index.json'
  if not index.is_file():
    raise FileNotFoundError(f'{index} is missing: not a diffusers folder written by `ecdit export --format=diffusers`')
  try:
    conf = json.loads(index.read_text())
  except ValueError as e:
    raise ValueError(f'{index} is not valid JSON: {e}') from None
  if not isinstance(conf, dict):
    raise ValueError(f'{index}: expected a JSON object naming the pipeline components')
  check_transformer_folder(folder / 'transformer')
  parts = {}
  for name in COMPONENTS:
    entry = conf.get(name)
    if entry is None or entry == [None, None]:
      parts[name] = None
      continue
    cls = _component_class(name, entry, index)
    parts[name] = cls.from_pretrained(folder / name, **_dtype_kwargs(cls, torch_dtype or torch.float32))
  extras = {k: conf[k] for k in ('text_length', 'text_encoder_uses_mask', 'default_num_inference_steps',
                                 'default_guidance_scale') if k in conf}
  return ECDiTPipeline(**parts, **extras)
