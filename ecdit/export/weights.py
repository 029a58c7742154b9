"""The exported weight format: one safetensors file whose tensor names follow PyTorch conventions.

Name mapping (JAX parameter path → export name; `name_table(cfg)` is the complete, explicit list):

  JAX (Flax linen)                              export name                                 layout
  patch_embed/proj/{kernel,bias}                patch_embed.proj.{weight,bias}              [d, p·p·C]
  t_embed/fc{1,2}/{kernel,bias}                 t_embed.fc{1,2}.{weight,bias}               [d, 256], [d, d]
  text_encoder/token_embed/embedding            text_encoder.token_embed.weight             [V, w_t]
  text_encoder/pos_embed                        text_encoder.pos_embed                      [L, w_t]
  text_encoder/block_i/{norm1,norm2}/{scale,bias}  text_encoder.blocks.i.{norm1,norm2}.{weight,bias}
  text_encoder/block_i/attn/{query,key,value,out}  text_encoder.blocks.i.attn.{query,...}.{weight,bias}
  text_encoder/block_i/{mlp_in,mlp_out}         text_encoder.blocks.i.{mlp_in,mlp_out}.{weight,bias}
  text_encoder/final_norm/{scale,bias}          text_encoder.final_norm.{weight,bias}
  text_proj/{kernel,bias}                       text_proj.{weight,bias}                     [d, w_t]
  block_i/adaln/proj                            blocks.i.adaln.proj.{weight,bias}           [6d, d]
  block_i/{self_attn,cross_attn}/{query,key,value,out}  blocks.i.{self_attn,cross_attn}.{...}.{weight,bias}
  block_i/norm_ca/{scale,bias}                  blocks.i.norm_ca.{weight,bias}
  block_i/ffn/{wi,wo}/{kernel,bias}             blocks.i.ffn.{wi,wo}.{weight,bias}          dense blocks
  block_i/moe/router                            blocks.i.moe.router.weight                  [E, d]
  block_i/moe/wi, bi                            blocks.i.moe.wi.weight [E, 4d, d], blocks.i.moe.wi.bias [E, 4d]
  block_i/moe/wo, bo                            blocks.i.moe.wo.weight [E, d, 4d], blocks.i.moe.wo.bias [E, d]
  final/adaln/proj, final/proj                  final.adaln.proj.*, final.proj.*            [2d, d], [p·p·C, d]

Every dense kernel is stored in PyTorch `nn.Linear` layout `[out, in]` (the Flax kernel transposed); the
router is a bias-free linear `d → E`, so `[E, d]`. Expert tensors are stacked along a leading expert axis, and
each slice `[e]` is itself an `nn.Linear` weight `[out, in]` (Flax stores `[E, in, out]`). LayerNorm scales
are called `weight`. Non-affine LayerNorms (norm_sa, norm_ff, final norm) have no tensors. All transforms are
transposes, so export → import reproduces the parameters bit for bit.

This module imports no JAX at module level (the name table and the files serve PyTorch-only code); the JAX-side
imports live in `export_params` / `import_params`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ecdit import errors, outputs
from ecdit.config.model import ModelConfig

FORMAT = 'ecdit-export'
FORMAT_VERSION = 1
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
README_FILE = 'README.md'
PAD_ID = 0

# How a tensor is laid out in the file relative to the Flax parameter.
COPY = 'copy'                    # unchanged
LINEAR = 'linear'                # Flax [in, out] → PyTorch [out, in]
EXPERT_LINEAR = 'expert_linear'  # Flax [E, in, out] → [E, out, in]
TOP_LEVEL = ('image_size', 'in_channels', 'patch_size', 'text_length', 'vocab_size', 'routing', 'num_experts')


class ExportError(errors.UsageError, ValueError):
  """A bad export directory: missing file, unknown/missing tensor, shape or config mismatch."""


@dataclasses.dataclass(frozen=True)
class Entry:
  jax_path: tuple[str, ...]
  name: str
  kind: str


def name_table(cfg: ModelConfig) -> list[Entry]:
  """Every parameter of the model `cfg` describes, as (JAX path, export name, layout transform)."""
  table: list[Entry] = []

  def linear(path, name, bias=True):
    table.append(Entry(path + ('kernel',), f'{name}.weight', LINEAR))
    if bias:
      table.append(Entry(path + ('bias',), f'{name}.bias', COPY))

  def norm(path, name):
    table.append(Entry(path + ('scale',), f'{name}.weight', COPY))
    table.append(Entry(path + ('bias',), f'{name}.bias', COPY))

  def attention(path, name):
    for proj in ('query', 'key', 'value', 'out'):
      linear(path + (proj,), f'{name}.{proj}')

  linear(('patch_embed', 'proj'), 'patch_embed.proj')
  linear(('t_embed', 'fc1'), 't_embed.fc1')
  linear(('t_embed', 'fc2'), 't_embed.fc2')
  if cfg.text_encoder == 'transformer':
    te = ('text_encoder',)
    table.append(Entry(te + ('token_embed', 'embedding'), 'text_encoder.token_embed.weight', COPY))
    table.append(Entry(te + ('pos_embed',), 'text_encoder.pos_embed', COPY))
    for i in range(cfg.text_depth):
      jp, name = te + (f'block_{i}',), f'text_encoder.blocks.{i}'
      norm(jp + ('norm1',), f'{name}.norm1')
      attention(jp + ('attn',), f'{name}.attn')
      norm(jp + ('norm2',), f'{name}.norm2')
      linear(jp + ('mlp_in',), f'{name}.mlp_in')
      linear(jp + ('mlp_out',), f'{name}.mlp_out')
    norm(te + ('final_norm',), 'text_encoder.final_norm')
  linear(('text_proj',), 'text_proj')
  for i in range(cfg.depth):
    jp, name = (f'block_{i}',), f'blocks.{i}'
    linear(jp + ('adaln', 'proj'), f'{name}.adaln.proj')
    attention(jp + ('self_attn',), f'{name}.self_attn')
    norm(jp + ('norm_ca',), f'{name}.norm_ca')
    attention(jp + ('cross_attn',), f'{name}.cross_attn')
    if cfg.is_sparse_block(i):
      moe = jp + ('moe',)
      table += [Entry(moe + ('router',), f'{name}.moe.router.weight', LINEAR),
                Entry(moe + ('wi',), f'{name}.moe.wi.weight', EXPERT_LINEAR),
                Entry(moe + ('bi',), f'{name}.moe.wi.bias', COPY),
                Entry(moe + ('wo',), f'{name}.moe.wo.weight', EXPERT_LINEAR),
                Entry(moe + ('bo',), f'{name}.moe.wo.bias', COPY)]
    else:
      linear(jp + ('ffn', 'wi'), f'{name}.ffn.wi')
      linear(jp + ('ffn', 'wo'), f'{name}.ffn.wo')
  linear(('final', 'adaln', 'proj'), 'final.adaln.proj')
  linear(('final', 'proj'), 'final.proj')
  return table


def to_export_layout(kind: str, x):
  """Flax layout → file layout (its own inverse: both are transposes of the last two axes)."""
  if kind == COPY:
    return x
  return np.swapaxes(x, -1, -2)


def export_shape(kind: str, shape) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  return shape if kind == COPY else shape[:-2] + (shape[-1], shape[-2])


def _path_str(path) -> str:
  return '/'.join(path)


def export_params(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Flax params (boxed or not, either stack layout) → {export name: numpy array in file layout}. The file
  always names blocks one by one (a scanned stack is unrolled first)."""
  import flax.linen as nn
  from flax import traverse_util

  from ecdit.models import stack
  flat = traverse_util.flatten_dict(stack.to_unrolled(nn.unbox(dict(params)), cfg))
  table = name_table(cfg)
  known = {e.jax_path for e in table}
  extra = sorted(_path_str(p) for p in flat if p not in known)
  if extra:
    raise ExportError(f'parameter(s) {extra} have no export name for this config (routing={cfg.routing!r}, '
                      f'depth={cfg.depth}); is the config the one these params were trained with?')
  out = {}
  for e in table:
    if e.jax_path not in flat:
      raise ExportError(f'parameter {_path_str(e.jax_path)} (export name {e.name!r}) is missing from the params; '
                        'is the config the one these params were trained with?')
    out[e.name] = np.ascontiguousarray(to_export_layout(e.kind, np.asarray(flat[e.jax_path])))
  return out


# ---- files ---------------------------------------------------------------------------------------------

def export_config(cfg: ModelConfig, *, tokenizer: bool, extra: Mapping[str, Any] | None = None) -> dict:
  d = {k: getattr(cfg, k) for k in TOP_LEVEL}
  d.update({
      'format': FORMAT, 'format_version': FORMAT_VERSION,
      'model': cfg.for_inference().to_dict(),   # an export is for inference: its routing group size
      'weights': WEIGHTS_FILE,
      'tokenizer': TOKENIZER_FILE if tokenizer else None,
      'pad_id': PAD_ID,
      'layout': {'images': 'NHWC', 'time': 't in [0, 1], t=1 is pure noise',
                 'linear_weight': '[out, in]', 'expert_weight': '[E, out, in]', 'expert_bias': '[E, out]'},
  })
  d.update(dict(extra or {}))
  return d


def readme_text(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], title: str = 'EC-DiT export') -> str:
  lines = [f'# {title}', '',
           f'Files: `{WEIGHTS_FILE}` (weights), `{CONFIG_FILE}` (the full model config under `model`; the main '
           f'fields repeated at the top level), `{TOKENIZER_FILE}` (sentencepiece; pad id {PAD_ID}) if present.', '',
           '## Model call', '',
           '`velocity = f(x_t, t, text_ids, text_mask)`: `x_t` float32 `[B, H, W, C]` (NHWC, channels last, as in '
           'JAX), `t` float32 `[B]` in [0, 1] (1 = pure noise, rectified flow), `text_ids` int `[B, L]` '
           f'(L <= {cfg.text_length}), `text_mask` bool `[B, L]` (True = real token; default `text_ids != '
           f'{PAD_ID}`). Returns the velocity `[B, H, W, C]`. Sampling integrates x from t=1 to t=0 along it.', '',
           'PyTorch: `ecdit.export.torch_reference.load_model(dir)`; JAX: `ecdit.export.load_jax(dir)`.', '',
           '## Tensor layout', '',
           '- Every linear weight is PyTorch `nn.Linear` layout `[out, in]`, bias `[out]`.',
           '- Expert tensors are stacked along a leading expert axis: `moe.wi.weight [E, hidden, d]`, '
           '`moe.wi.bias [E, hidden]`, `moe.wo.weight [E, d, hidden]`, `moe.wo.bias [E, d]`; slice `[e]` is '
           'expert e as an `nn.Linear` weight. `moe.router.weight [E, d]` is a bias-free linear (float32).',
           '- LayerNorm `weight`/`bias` are the affine scale/shift (eps 1e-5 in the text encoder, 1e-6 in the '
           'DiT blocks); norm_sa, norm_ff and final.norm have no parameters.',
           '- `blocks.i.adaln.proj` outputs [shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff] (6·d); '
           '`final.adaln.proj` outputs [shift, scale].',
           '- GeLU is the tanh approximation everywhere. Positions: fixed 2-D sin-cos (not stored).', '',
           f'## Tensors ({len(tensors)})', '', '| name | shape | dtype | JAX parameter |', '| --- | --- | --- | --- |']
  for e in name_table(cfg):
    a = tensors[e.name]
    lines.append(f'| `{e.name}` | {list(a.shape)} | {a.dtype} | `{_path_str(e.jax_path)}` |')
  return '\n'.join(lines) + '\n'


def write_export(out_dir: str | Path, params, cfg: ModelConfig, *, tokenizer_path: str | Path | None = None,
                 extra_config: Mapping[str, Any] | None = None) -> Path:
  """Writes model.safetensors, config.json, README.md (and tokenizer.model) into `out_dir`."""
  import safetensors.numpy
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors = export_params(params, cfg)
  safetensors.numpy.save_file(tensors, str(out / WEIGHTS_FILE),
                              metadata={'format': 'pt', 'ecdit_format_version': str(FORMAT_VERSION)})
  outputs.follow_umask(out / WEIGHTS_FILE)
  has_tok = tokenizer_path is not None and Path(tokenizer_path).is_file()
  if has_tok:
    (out / TOKENIZER_FILE).write_bytes(Path(tokenizer_path).read_bytes())
  conf = export_config(cfg, tokenizer=has_tok, extra=extra_config)
  (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True) + '\n')
  (out / README_FILE).write_text(readme_text(cfg, tensors))
  return out


def read_config(export_dir: str | Path) -> tuple[dict, ModelConfig]:
  """config.json of an export → (the raw dict, the validated ModelConfig); ExportError for a bad one."""
  path = Path(export_dir) / CONFIG_FILE
  if not Path(export_dir).is_dir():
    raise ExportError(f'export directory {export_dir} does not exist')
  if not path.is_file():
    raise ExportError(f'{path} is missing: an export directory holds {CONFIG_FILE} and {WEIGHTS_FILE} '
                      '(written by `ecdit export`)')
  try:
    d = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ExportError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(d, dict) or not isinstance(d.get('model'), dict):
    raise ExportError(f'{path}: no "model" section (the full model config); not an ecdit export?')
  try:
    cfg = ModelConfig.from_dict(d['model'])
  except (TypeError, ValueError) as e:
    raise ExportError(f'{path}: {e}') from None
  for k in TOP_LEVEL:
    if k in d and d[k] != getattr(cfg, k):
      raise ExportError(f'{path}: top-level {k}={d[k]!r} disagrees with model.{k}={getattr(cfg, k)!r}')
  return d, cfg


def read_tensors(export_dir: str | Path, file: str = WEIGHTS_FILE) -> dict[str, np.ndarray]:
  import safetensors.numpy
  path = Path(export_dir) / file
  if not path.is_file():
    raise ExportError(f'{path} is missing: an export directory holds {CONFIG_FILE} and {WEIGHTS_FILE}')
  try:
    return safetensors.numpy.load_file(str(path))
  except Exception as e:  # noqa: BLE001 — the library raises several types for a damaged file.
    raise ExportError(f'{path} is not a readable safetensors file: {e}') from None


def check_tensors(tensors: Mapping[str, Any], expected: Mapping[str, tuple[tuple[int, ...], str]],
                  where: str) -> None:
  """Every expected tensor present with its shape (and dtype); no unknown ones. `expected`:
  {name: (shape, dtype name)}. Raises ExportError naming the first offending tensor."""
  for name, (shape, dtype) in expected.items():
    if name not in tensors:
      raise ExportError(f'{where}: missing tensor {name!r} (shape {list(shape)}), which config.json requires')
    got = tuple(tensors[name].shape)
    if got != tuple(shape):
      raise ExportError(f'{where}: tensor {name!r} has shape {list(got)}, but config.json implies '
                        f'{list(shape)}; do config.json and the weights belong together?')
    got_dtype = str(tensors[name].dtype).replace('torch.', '')
    if dtype is not None and got_dtype != dtype:
      raise ExportError(f'{where}: tensor {name!r} has dtype {got_dtype}, expected {dtype} '
                        '(model.param_dtype; the router is always float32)')
  unknown = sorted(set(tensors) - set(expected))
  if unknown:
    raise ExportError(f'{where}: unexpected tensor(s) {unknown[:5]}{" ..." if len(unknown) > 5 else ""} that a model '
                      'with this config.json does not have; do config.json and the weights belong together?')


def import_params(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, where: str = WEIGHTS_FILE) -> dict:
  """{export name: array} → unboxed Flax params (nested dict of jax arrays), checked against `cfg`."""
  import flax.linen as nn
  import jax.numpy as jnp
  from flax import traverse_util

  from ecdit.models import stack
  from ecdit.models.ecdit import abstract_params, build_model
  abstract = traverse_util.flatten_dict(stack.to_unrolled(nn.unbox(abstract_params(build_model(cfg))), cfg))
  table = name_table(cfg)
  expected = {e.name: (export_shape(e.kind, abstract[e.jax_path].shape), str(abstract[e.jax_path].dtype))
              for e in table}
  check_tensors(tensors, expected, where)
  flat = {e.jax_path: jnp.asarray(np.ascontiguousarray(to_export_layout(e.kind, np.asarray(tensors[e.name]))))
          for e in table}
  return stack.to_scanned(traverse_util.unflatten_dict(flat), cfg) if cfg.scan_layers else \
      traverse_util.unflatten_dict(flat)


def read_header(export_dir: str | Path, file: str = WEIGHTS_FILE) -> dict[str, tuple[int, ...]]:
  """{tensor name: shape} from a safetensors file's header, without reading any tensor."""
  import safetensors
  path = Path(export_dir) / file
  if not path.is_file():
    raise ExportError(f'{path} is missing: an export directory holds {CONFIG_FILE} and {WEIGHTS_FILE}')
  try:
    with safetensors.safe_open(str(path), framework='numpy') as f:
      return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
  except Exception as e:  # noqa: BLE001 — the library raises several types for a damaged file.
    raise ExportError(f'{path} is not a readable safetensors file: {e}') from None


def check_header(cfg: ModelConfig, header: Mapping[str, tuple[int, ...]], where: str) -> None:
  """The sizes that set how much a model allocates — depth, width, experts — agree between config.json and the
  weights file, checked on the header before a model is built (a config.json saying depth=200000 or
  width=32768 would otherwise be traced or allocated first)."""
  blocks = {int(n.split('.')[1]) for n in header if n.startswith('blocks.') and n.split('.')[1].isdigit()}
  found = {'depth': len(blocks)}
  if 'patch_embed.proj.weight' in header:
    found['width'] = header['patch_embed.proj.weight'][0]          # [width, patch_dim]
  expert_weights = [shape for n, shape in header.items() if n.endswith('.moe.wi.weight')]
  if cfg.routing != 'dense':
    found['num_experts'] = expert_weights[0][0] if expert_weights else 0   # [E, mlp, width]
  for key, value in found.items():
    if value != getattr(cfg, key):
      raise ExportError(f'{where}: config.json says model.{key}={getattr(cfg, key)}, but the weights hold '
                        f'{key}={value}; do config.json and the weights belong together?')


def load_params(export_dir: str | Path) -> tuple[dict, ModelConfig]:
  """(unboxed Flax params, ModelConfig) from an export directory, fully checked: the header's sizes against
  config.json first, then every tensor's name, shape and dtype."""
  _, cfg = read_config(export_dir)
  where = str(Path(export_dir) / WEIGHTS_FILE)
  check_header(cfg, read_header(export_dir), where)
  return import_params(read_tensors(export_dir), cfg, where), cfg
