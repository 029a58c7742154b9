"""StableHLO artefacts via `jax.export`: the velocity function and a fixed-step Euler sampler with guidance.

Both are exported with a symbolic batch dimension `b` (any batch size at call time) and the weights baked in as
constants, so an artefact needs no Python model code to run — only `jax.export.deserialize`.

  velocity.jax_exported   v = f(x_t f32[b,H,W,C], t f32[b], text_ids i32[b,L], text_mask bool[b,L]) → f32[b,H,W,C]
  sampler.jax_exported    x0 = f(noise f32[b,H,W,C], text_ids i32[b,L], text_mask bool[b,L],
                                 null_ids i32[1,L], null_mask bool[1,L]) → f32[b,H,W,C] in [-1, 1]

L is model.text_length (pad with id 0 / mask False). The sampler integrates the rectified flow from t=1 to
t=0 in `num_steps` uniform Euler steps with classifier-free guidance v_u + s·(v_c − v_u), the null caption
being the unconditional input (use the tokenizer's encoding of '' — stored in config.json when the export had
a tokenizer), then clips to [-1, 1]. With `text_encoder='precomputed'` the text inputs are float states
`[b, L, text_states_dim]` instead of ids.

`routing_scope='batch'` pools all images into one routing group, so the capacity depends on the batch size; it
cannot have a symbolic batch and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from ecdit.diffusion.sampler import integrate
from ecdit.export.weights import CONFIG_FILE, README_FILE, ExportError, export_config
from ecdit.config.model import ModelConfig
from ecdit.models.ecdit import build_model
from ecdit.models.text import text_states_dim

VELOCITY_FILE = 'velocity.jax_exported'
SAMPLER_FILE = 'sampler.jax_exported'
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')   # what jax.export lowers for


def check_platforms(platforms: Sequence[str]) -> None:
  """At least one platform, each one jax.export can lower for; ExportError names the bad one."""
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ExportError(f'--platforms={",".join(platforms)} is invalid: expected one or more of {list(PLATFORMS)}')


def _text_spec(cfg: ModelConfig, batch):
  if cfg.text_encoder == 'transformer':
    return jax.ShapeDtypeStruct((batch, cfg.text_length), jnp.int32)
  return jax.ShapeDtypeStruct((batch, cfg.text_length, text_states_dim(cfg)), jnp.float32)


def _check(cfg: ModelConfig):
  if cfg.routing != 'dense' and cfg.routing_scope == 'batch':
    raise ExportError("StableHLO export needs a batch-independent routing group: model.routing_scope='batch' "
                      "makes the capacity depend on the batch size; use 'image' or 'group'")


def export_velocity(params, cfg: ModelConfig, platforms: Sequence[str] | None = None) -> jax.export.Exported:
  _check(cfg)
  model = build_model(cfg.for_inference())
  b, = jax.export.symbolic_shape('b')
  image = jax.ShapeDtypeStruct((b, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)

  def velocity(x, t, text, mask):
    return model.apply({'params': params}, x, t, text, mask, train=False)

  return jax.export.export(jax.jit(velocity), platforms=platforms)(
      image, jax.ShapeDtypeStruct((b,), jnp.float32), _text_spec(cfg, b),
      jax.ShapeDtypeStruct((b, cfg.text_length), jnp.bool_))


def export_sampler(params, cfg: ModelConfig, *, num_steps: int, cfg_scale: float,
                   platforms: Sequence[str] | None = None) -> jax.export.Exported:
  _check(cfg)
  if num_steps < 1:
    raise ExportError(f'num_steps={num_steps} is invalid: expected an integer >= 1')
  model = build_model(cfg.for_inference())
  b, = jax.export.symbolic_shape('b')
  image = jax.ShapeDtypeStruct((b, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)

  def apply_fn(p, x, t, text, mask):
    return model.apply({'params': p}, x, t, text, mask, train=False)

  def sample(noise, text, mask, null_text, null_mask):
    x = integrate(apply_fn, params, noise, text, mask, null_text, null_mask, num_steps=num_steps,
                  cfg_scale=float(cfg_scale), method='euler')
    return jnp.clip(x, -1.0, 1.0)

  return jax.export.export(jax.jit(sample), platforms=platforms)(
      image, _text_spec(cfg, b), jax.ShapeDtypeStruct((b, cfg.text_length), jnp.bool_),
      _text_spec(cfg, 1), jax.ShapeDtypeStruct((1, cfg.text_length), jnp.bool_))


def write_stablehlo(out_dir: str | Path, params, cfg: ModelConfig, *, num_steps: int, cfg_scale: float,
                    platforms: Sequence[str] | None = None, null_caption=None, extra_config=None) -> Path:
  """Writes velocity/sampler artefacts, config.json and README.md. `null_caption`: optional (ids, mask) of the
  empty caption `[1, L]`, recorded in config.json for the sampler's unconditional input."""
  import flax.linen as nn
  params = nn.unbox(params)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  vel = export_velocity(params, cfg, platforms)
  smp = export_sampler(params, cfg, num_steps=num_steps, cfg_scale=cfg_scale, platforms=platforms)
  (out / VELOCITY_FILE).write_bytes(vel.serialize())
  (out / SAMPLER_FILE).write_bytes(smp.serialize())
  info = {'velocity': VELOCITY_FILE, 'sampler': SAMPLER_FILE, 'sampler_method': 'euler',
          'num_steps': int(num_steps), 'cfg_scale': float(cfg_scale), 'platforms': list(vel.platforms),
          'batch': 'symbolic'}
  if null_caption is not None:
    ids, mask = null_caption
    info['null_text_ids'] = [[int(v) for v in row] for row in ids]
    info['null_text_mask'] = [[bool(v) for v in row] for row in mask]
  extra = {'stablehlo': info}
  extra.update(dict(extra_config or {}))
  conf = export_config(cfg, tokenizer=False, extra=extra)
  conf['weights'] = None   # baked into the artefacts
  (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True) + '\n')
  (out / README_FILE).write_text('# EC-DiT StableHLO export\n\n' + __doc__.split('\n', 1)[1] +
                                 '\nLoad: `ecdit.export.load_stablehlo(dir)` or '
                                 '`jax.export.deserialize(open(f, "rb").read()).call(...)`.\n')
  return out


class StableHLOModel:
  """`.velocity(x_t, t, text_ids, text_mask)`, `.sample(noise, text_ids, text_mask, null_ids, null_mask)`;
  `.config` is the export's config.json; `.velocity_exported` / `.sampler_exported` the jax.export objects."""

  def __init__(self, directory: Path, config: dict, velocity, sampler):
    self.directory, self.config = directory, config
    self.velocity_exported, self.sampler_exported = velocity, sampler

  def velocity(self, x_t, t, text_ids, text_mask):
    return self.velocity_exported.call(jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32),
                                       jnp.asarray(text_ids), jnp.asarray(text_mask, bool))

  def sample(self, noise, text_ids, text_mask, null_ids=None, null_mask=None):
    info = self.config.get('stablehlo', {})
    if null_ids is None:
      if 'null_text_ids' not in info:
        raise ExportError('this export has no stored null caption (no tokenizer at export time); pass null_ids '
                          'and null_mask [1, L] (the tokenised empty caption)')
      null_ids, null_mask = info['null_text_ids'], info['null_text_mask']
    return self.sampler_exported.call(jnp.asarray(noise, jnp.float32), jnp.asarray(text_ids),
                                      jnp.asarray(text_mask, bool), jnp.asarray(null_ids),
                                      jnp.asarray(null_mask, bool))


def load_stablehlo(export_dir: str | Path) -> StableHLOModel:
  d = Path(export_dir)
  for name in (CONFIG_FILE, VELOCITY_FILE, SAMPLER_FILE):
    if not (d / name).is_file():
      raise ExportError(f'{d / name} is missing: a StableHLO export holds {CONFIG_FILE}, {VELOCITY_FILE} and '
                        f'{SAMPLER_FILE} (written by `ecdit export --format=stablehlo`)')
  config = json.loads((d / CONFIG_FILE).read_text())
  try:
    vel = jax.export.deserialize(bytearray((d / VELOCITY_FILE).read_bytes()))
    smp = jax.export.deserialize(bytearray((d / SAMPLER_FILE).read_bytes()))
  except Exception as e:  # noqa: BLE001 — any deserialisation failure is a bad artefact.
    raise ExportError(f'{d}: cannot deserialise the StableHLO artefacts ({type(e).__name__}: {e})') from None
  return StableHLOModel(d, config, vel, smp)
