"""Adaptive-compute analysis: where an EC-DiT's experts spend their compute, per image token.

With expert-choice routing every expert picks its C favourite tokens, so a token can be processed by 0..E
experts. Each MoE layer sows that count as `moe_stats/experts_per_token [B, S]` (ecdit.layers.moe). This
module collects it and turns it into the numbers and pictures of `ecdit analyze`:

  run = load_run('runs/shapes_tiny')                     # config + newest checkpoint + tokenizer
  results = analyze(run, ['a red circle', 'two squares'], out='analysis/', num_steps=10)

Pieces, usable on their own:
  routing_fn(model)                  jitted (params, x, t, ids, mask) -> (velocity, counts [layers, B, S])
  sample_with_routing(...)           the sampler's ODE, recording counts at every step (conditional half)
  summarize(counts, E)               histogram of experts per token, zero-expert fraction, mean, per layer/step
  token_fraction(mask, patch)        share of each token's pixels that are object pixels
  foreground_background(counts, fg, bg)   mean experts on foreground vs background tokens and their ratio
  drop_token / drop_word + routing_change  the "textual importance" of one text token or word
  heatmap_png(...)                   layers × timesteps grid of count maps, the generated image beside

Counts are recorded at the state the sampler evaluates first in each step (x_t at t = 1, 1 − 1/N, ...),
for the conditional half of the guided batch. With `routing_scope='image'` (the default) a token's count
depends only on its own image; with 'group' or 'batch' scope images share routing groups, so the counts
depend on what else is in the batch (during guided sampling that includes the unconditional copies).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
  from ecdit.train.workdir import Restored   # what load_run returns

# ------------------------------------------------------------------------------------------- loading


def moe_layer_names(mcfg) -> list[str]:
  """Names of the blocks whose FFN is an MoE layer, in depth order ('block_1', 'block_3', ...)."""
  return [f'block_{i}' for i in range(mcfg.depth) if mcfg.is_sparse_block(i)]


def check_has_moe(mcfg, where: str = 'model') -> None:
  if mcfg.routing == 'dense' or not moe_layer_names(mcfg):
    raise ValueError(f'{where} has no MoE layers (model.routing={mcfg.routing!r}, depth={mcfg.depth}, '
                     f'moe_every={mcfg.moe_every}): routing analysis needs an expert-choice or token-choice '
                     'model')


def load_run(workdir, *, ema: bool = True) -> Restored:
  """Loads a training workdir the way `ecdit eval` does (ecdit.train.workdir.restore): config.json, newest
  checkpoint, the run's tokenizer or frozen text encoder (`run.tokenizer`).

  Raises ValueError naming the path for a missing workdir / config / checkpoint, and for a run without MoE
  layers or one trained on latents (its samples cannot be rendered or compared with the shapes world).
  """
  from ecdit.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  def require(cfg, mcfg):
    if cfg.data.get('latent_shape'):
      raise ValueError(f'{Path(workdir) / "config.json"}: the run trains on latents (data.latent_shape); '
                       'routing analysis needs an RGB model (its maps are drawn over the image and compared '
                       'with rendered scenes)')
    check_has_moe(mcfg, f'the model of {workdir}')
  return workdir_lib.restore(workdir, ema=ema, require=require)


# ------------------------------------------------------------------------------------------ collection

def counts_from_stats(moe_stats: dict, layers: Sequence[str]):
  """The sown `experts_per_token` of each named MoE layer, stacked: int32 `[layers, B, S]`."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out = []
  for name in layers:
    try:
      sown = moe_stats[name]['moe']['experts_per_token']
    except KeyError:
      raise ValueError(f'no moe_stats/experts_per_token sown by {name}; sown: {sorted(moe_stats)}') from None
    out.append(sown[0] if isinstance(sown, tuple) else sown)
  return jnp.stack(out).astype(jnp.int32)


def routing_fn(model) -> Callable:
  """Jitted `(params, x, t, ids, mask) -> (velocity [B,H,W,C], counts int32 [layers, B, S])`; t is `[B]`."""
  import jax  # pylint: disable=import-outside-toplevel
  cfg = model.config
  check_has_moe(cfg)
  layers = moe_layer_names(cfg)

  @jax.jit
  def run(params, x, t, ids, mask):
    v, mut = model.apply({'params': params}, x, t, ids, mask, train=False, mutable=['moe_stats'])
    return v, counts_from_stats(mut['moe_stats'], layers)
  return run


def _batched(fn, params, x, t, ids, mask, batch_size: int) -> np.ndarray:
  """`fn`'s counts for inputs of any length, `batch_size` rows at a time → numpy `[layers, N, S]`."""
  n = x.shape[0]
  out = [np.asarray(fn(params, x[i:i + batch_size], t[i:i + batch_size], ids[i:i + batch_size],
                       mask[i:i + batch_size])[1]) for i in range(0, n, batch_size)]
  return np.concatenate(out, axis=1)


def sample_with_routing(model, params, ids, mask, null_ids, null_mask, *, num_steps: int, cfg_scale: float,
                        method: str = 'euler', seed: int = 0):
  """Runs the sampler's ODE (ecdit.diffusion.sampler: same grid, noise, guidance and update) one step at a
  time and records routing at each step's first model evaluation.

  Returns (images float `[B,H,W,C]` in [-1, 1], ts `[T]` (the recorded times, T = num_steps), states
  `[T, B,H,W,C]` (x_t at those times), counts int32 `[T, layers, B, S]` of the conditional inputs).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ecdit.diffusion import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  if method not in sampler_lib.SAMPLERS:
    raise ValueError(f'sampler={method!r} is invalid: expected one of {list(sampler_lib.SAMPLERS)}')
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps}; expected an integer >= 1')
  cfg = model.config
  check_has_moe(cfg)
  layers = moe_layer_names(cfg)
  b = ids.shape[0]

  def velocity(params, x, t, collect):
    def apply_fn(p, xx, tt, ii, mm):
      v, mut = model.apply({'params': p}, xx, tt, ii, mm, train=False, mutable=['moe_stats'])
      collect.append(counts_from_stats(mut['moe_stats'], layers)[:, :b])   # conditional half comes first
      return v
    return sampler_lib.guided_velocity(apply_fn, params, x, t, ids, mask, null_ids, null_mask, cfg_scale)

  @jax.jit
  def step(params, x, t, t_next, last):
    collect = []
    v = velocity(params, x, t, collect)
    x_euler = x + (t_next - t) * v
    if method == 'heun':   # as in sampler.integrate: the last interval stays an Euler step
      v_next = velocity(params, x_euler, t_next, [])
      x_euler = jnp.where(last, x_euler, x + (t_next - t) * 0.5 * (v + v_next))
    return x_euler, collect[0]

  image_shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
  x = jax.random.normal(jax.random.key(seed), (b,) + image_shape, jnp.float32)
  ts = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  states, counts = [], []
  for i in range(num_steps):
    states.append(np.asarray(x))
    x, c = step(params, x, ts[i], ts[i + 1], jnp.asarray(i == num_steps - 1))
    counts.append(np.asarray(c))
  images = np.clip(np.asarray(x), -1.0, 1.0)
  return images, np.asarray(ts[:-1]), np.stack(states), np.stack(counts)


# ------------------------------------------------------------------------------------------ statistics

def group_totals(counts: np.ndarray, mcfg) -> np.ndarray:
  """Total expert slots used per routing group, from `[..., B, S]` counts → `[..., G]`. With expert choice
  every group's total is E·C exactly (C = mcfg.capacity_for(group length, train=False))."""
  counts = np.asarray(counts)
  lead, (b, s) = counts.shape[:-2], counts.shape[-2:]
  if mcfg.routing_scope == 'image':
    return counts.sum(-1)
  flat = counts.reshape(lead + (b * s,))
  size = b * s if mcfg.routing_scope == 'batch' else mcfg.group_size
  return flat.reshape(lead + (b * s // size, size)).sum(-1)


def histogram(counts: np.ndarray, num_experts: int) -> np.ndarray:
  """Fraction of the tokens in `counts` (any shape) chosen by 0, 1, ..., E experts: `[E + 1]`, sums to 1."""
  counts = np.asarray(counts).ravel()
  return np.bincount(counts, minlength=num_experts + 1)[:num_experts + 1] / max(counts.size, 1)


def summarize(counts: np.ndarray, num_experts: int, layers: Sequence[str], ts: Sequence[float]) -> dict:
  """Summary of counts `[T, layers, B, S]`: per layer the histogram over all steps/images/tokens, the
  zero-expert fraction and the mean per timestep, and the same over everything."""
  counts = np.asarray(counts)
  per_layer = {}
  for k, name in enumerate(layers):
    c = counts[:, k]
    per_layer[name] = {
        'histogram': histogram(c, num_experts).tolist(),
        'zero_fraction': float(np.mean(c == 0)),
        'mean': float(np.mean(c)),
        'zero_fraction_per_t': np.mean(c == 0, axis=(1, 2)).tolist(),
        'mean_per_t': np.mean(c, axis=(1, 2)).tolist(),
        'std_over_tokens': float(np.mean(np.std(c, axis=-1))),
    }
  return {'timesteps': [float(t) for t in ts], 'histogram': histogram(counts, num_experts).tolist(),
          'zero_fraction': float(np.mean(counts == 0)), 'mean': float(np.mean(counts)), 'layers': per_layer}


def token_fraction(pixel_mask: np.ndarray, patch_size: int) -> np.ndarray:
  """Share of each token's pixels that are set in `pixel_mask` (bool `[H, W]`, or `[N, H, W]` object masks,
  merged): float `[S]` in the model's token order (row-major patches, as ecdit.layers.dit.patchify)."""
  m = np.asarray(pixel_mask, bool)
  if m.ndim == 3:
    m = m.any(0)
  h, w = m.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f'mask {h}x{w} is not divisible by patch size {patch_size}')
  g = m.reshape(h // patch_size, patch_size, w // patch_size, patch_size).mean(axis=(1, 3))
  return g.reshape(-1).astype(np.float64)


def fg_bg_tokens(fraction: np.ndarray, min_fg: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(foreground, background) bool `[S]`: foreground = at least `min_fg` of the token's pixels are object
  pixels; background = none are. Tokens on an object's edge (in between) are in neither."""
  fraction = np.asarray(fraction)
  return fraction >= min_fg, fraction == 0


def foreground_background(counts: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> dict:
  """Mean experts per token on foreground vs background tokens. counts `[..., S]`; fg, bg bool, broadcast
  against counts (`[S]` or the full shape). ratio = fg_mean / bg_mean (None when a side is empty or bg is 0)."""
  counts = np.asarray(counts, np.float64)
  fg = np.broadcast_to(np.asarray(fg, bool), counts.shape)
  bg = np.broadcast_to(np.asarray(bg, bool), counts.shape)
  n_fg, n_bg = int(fg.sum()), int(bg.sum())
  fg_mean = float(counts[fg].mean()) if n_fg else None
  bg_mean = float(counts[bg].mean()) if n_bg else None
  ratio = fg_mean / bg_mean if fg_mean is not None and bg_mean else None
  return {'fg_mean': fg_mean, 'bg_mean': bg_mean, 'ratio': ratio, 'fg_tokens': n_fg, 'bg_tokens': n_bg}


def noised(x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
  """The rectified-flow state x_t = t·ε + (1 − t)·x0 (t broadcast over the leading axis)."""
  t = np.asarray(t, np.float32).reshape((-1,) + (1,) * (np.ndim(x0) - 1))
  return (t * noise + (1.0 - t) * x0).astype(np.float32)


# ------------------------------------------------------------------------------------ textual importance

def drop_token(ids: np.ndarray, mask: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
  """Text ids `[L]` (or states `[L, D]`) with position j removed: later positions move left, a padding slot
  (zeros, mask False) is appended. Dropping a padding position therefore returns the same text."""
  ids, mask = np.asarray(ids), np.asarray(mask, bool)
  keep = np.arange(ids.shape[0]) != j
  return (np.concatenate([ids[keep], np.zeros((1,) + ids.shape[1:], ids.dtype)]),
          np.concatenate([mask[keep], np.zeros(1, bool)]))


def drop_word(prompt: str, i: int) -> str:
  words = prompt.split()
  return ' '.join(words[:i] + words[i + 1:])


def routing_change(base: np.ndarray, other: np.ndarray) -> dict:
  """How much routing moved between two count arrays of the same shape `[..., S]`: the mean absolute
  difference in experts per token (`l1`) and the fraction of tokens whose count changed. Both ≥ 0, both 0
  exactly when the counts are equal."""
  base, other = np.asarray(base, np.int64), np.asarray(other, np.int64)
  if base.shape != other.shape:
    raise ValueError(f'routing_change: shapes {base.shape} and {other.shape} differ')
  diff = np.abs(base - other)
  return {'l1': float(diff.mean()), 'changed_fraction': float(np.mean(diff > 0))}


def textual_importance(fn, params, states: np.ndarray, ts: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                       variants: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int = 64) -> list[dict]:
  """Routing change when the text `(ids, mask)` (`[L]`) is replaced by each variant, at fixed image states
  `states [T, H, W, C]` at times `ts [T]`. `fn` is `routing_fn(model)`. Returns per variant
  {'l1', 'changed_fraction', 'l1_per_layer': [...]} (layers first in the count arrays)."""
  t = np.asarray(ts, np.float32)
  n = states.shape[0]

  def counts_for(i, m):
    return _batched(fn, params, states, t, np.repeat(np.asarray(i)[None], n, 0),
                    np.repeat(np.asarray(m, bool)[None], n, 0), batch_size)   # [layers, T, S]

  base = counts_for(ids, mask)
  out = []
  for vi, vm in variants:
    c = counts_for(vi, vm)
    r = routing_change(base, c)
    r['l1_per_layer'] = [routing_change(base[k], c[k])['l1'] for k in range(base.shape[0])]
    out.append(r)
  return out


# -------------------------------------------------------------------------------- prompts → records

_COUNT = {'a': 1, 'an': 1, 'one': 1, 'two': 2, 'three': 3, 'four': 4}
_SINGULAR = {'circle': 'circle', 'square': 'square', 'triangle': 'triangle', 'circles': 'circle',
             'squares': 'square', 'triangles': 'triangle'}
_REL = {'to the left of': 'left of', 'to the right of': 'right of', 'left of': 'left of',
        'right of': 'right of', 'above': 'above', 'below': 'below'}


def _entry(phrase: str) -> dict | None:
  from ecdit.data import shapes  # pylint: disable=import-outside-toplevel
  words = phrase.split()
  if len(words) not in (2, 3) or words[0] not in _COUNT or words[-1] not in _SINGULAR:
    return None
  e = {'class': _SINGULAR[words[-1]], 'count': _COUNT[words[0]]}
  if len(words) == 3:
    if words[1] not in shapes.COLORS:
      return None
    e['color'] = words[1]
  return e


def record_from_prompt(prompt: str) -> dict | None:
  """A GenEval record for a shapes-world caption ("a red circle", "two squares", "a circle and a square",
  "a square to the left of a circle", ...), or None when the prompt is not one the shapes world can render."""
  text = ' '.join(prompt.lower().strip().rstrip('.').split())
  m = re.fullmatch(r'(.+?) (to the left of|to the right of|left of|right of|above|below) (.+)', text)
  if m:
    a, b = _entry(m.group(1)), _entry(m.group(3))
    if not a or not b:
      return None
    b_, a_ = dict(b), dict(a, position=[_REL[m.group(2)], 0])
    return {'tag': 'position', 'prompt': prompt, 'include': [b_, a_]}
  parts = text.split(' and ')
  entries = [_entry(p) for p in parts]
  if len(parts) > 2 or not all(entries):
    return None
  colored = all('color' in e for e in entries)
  if len(entries) == 2:
    tag = 'color_attr' if colored else 'two_object'
  elif entries[0]['count'] > 1:
    tag = 'counting'
  else:
    tag = 'colors' if colored else 'single_object'
  return {'tag': tag, 'prompt': prompt, 'include': entries}


# ------------------------------------------------------------------------------------------- pictures

# A perceptually ordered dark-blue → teal → yellow ramp (viridis-like anchor points).
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
  """Values in [0, vmax] → uint8 RGB via the ramp above."""
  v = np.clip(np.asarray(values, np.float64) / max(vmax, 1e-9), 0.0, 1.0) * (len(_RAMP) - 1)
  lo = np.floor(v).astype(int)
  hi = np.minimum(lo + 1, len(_RAMP) - 1)
  w = (v - lo)[..., None]
  return np.round(_RAMP[lo] * (1 - w) + _RAMP[hi] * w).astype(np.uint8)


def _cell(img: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour upscale of `[h, w, 3]` uint8 to `[size, size, 3]`."""
  h, w = img.shape[:2]
  ys, xs = np.arange(size) * h // size, np.arange(size) * w // size
  return img[ys][:, xs]


def heatmap_png(path, image: np.ndarray | None, maps: np.ndarray, *, num_experts: int,
                row_labels: Sequence[str], col_labels: Sequence[str], title: str = '', cell: int = 64,
                image_label: str = 'sample') -> Path:
  """A PNG grid: one row per MoE layer, one column per timestep, each cell the experts-per-token map
  (`maps [rows, cols, g, g]`) coloured on a fixed 0..E scale; `image` (uint8 `[H, W, 3]`) in the first
  column of every row; a colour bar with the scale underneath."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  maps = np.asarray(maps)
  rows, cols = maps.shape[:2]
  pad, left, top, bottom = 2, 64, 30, 34
  first = 1 if image is not None else 0
  width = left + (cols + first) * (cell + pad) + pad
  height = top + rows * (cell + pad) + pad + bottom
  canvas = Image.new('RGB', (max(width, 260), height), 'white')
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 2), title[:max(20, width // 6)], fill=(0, 0, 0))
  for c, lab in enumerate(col_labels):
    draw.text((left + (c + first) * (cell + pad) + pad, 16), str(lab), fill=(0, 0, 0))
  if image is not None:
    draw.text((left + pad, 16), image_label, fill=(0, 0, 0))
  for r in range(rows):
    y = top + r * (cell + pad) + pad
    draw.text((4, y + cell // 2 - 5), str(row_labels[r]), fill=(0, 0, 0))
    if image is not None:
      im = np.asarray(image)
      im = np.repeat(im, 3, -1) if im.shape[-1] == 1 else im[..., :3]
      canvas.paste(Image.fromarray(_cell(im, cell)), (left + pad, y))
    for c in range(cols):
      canvas.paste(Image.fromarray(_cell(colorize(maps[r, c], num_experts), cell)),
                   (left + (c + first) * (cell + pad) + pad, y))
  # colour bar: one block per possible count 0..E
  y = top + rows * (cell + pad) + 6
  block = 20
  draw.text((4, y + 4), 'experts', fill=(0, 0, 0))
  for k in range(num_experts + 1):
    x = left + k * (block + 4)
    draw.rectangle([x, y, x + block, y + 12], fill=tuple(int(v) for v in colorize(k, num_experts)))
    draw.text((x + 6, y + 13), str(k), fill=(0, 0, 0))
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path


# ---------------------------------------------------------------------------------------------- driver

def _text_array(a) -> np.ndarray:
  """Token ids as int32, text states as float32, masks as bool."""
  a = np.asarray(a)
  if a.dtype == bool:
    return a
  return a.astype(np.int32 if np.issubdtype(a.dtype, np.integer) else np.float32)


def _slug(text: str, n: int = 40) -> str:
  return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')[:n] or 'prompt'


def _write_json(path: Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)


def analyze(run: Restored, prompts: Sequence[str], out, *, num_steps: int | None = None,
            cfg_scale: float | None = None, method: str | None = None, seed: int = 0, scenes: int = 2,
            min_fg: float = 0.5, textual: bool = True, batch_size: int = 64,
            records: Sequence[dict | None] | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
  """The full analysis of `ecdit analyze`; writes PNGs and `analysis.json` under `out` and returns the dict.

  For each prompt: sample it (recording experts per token per MoE layer at each step) and draw the maps;
  render `scenes` ground-truth scenes of its record (from `records`, else parsed from the prompt), noise them
  to every recorded t with a fixed ε, and compare experts on object (fg) vs background tokens; and for each
  word, the routing change at the sample's own trajectory states when that word is dropped.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ecdit.data import shapes  # pylint: disable=import-outside-toplevel
  from ecdit.diffusion import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  from ecdit.eval import shapes_eval  # pylint: disable=import-outside-toplevel

  prompts = [p for p in prompts]
  if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise ValueError(f'prompts must be a non-empty list of non-empty strings, got {prompts!r}')
  if scenes < 0:
    raise ValueError(f'scenes={scenes}; expected an integer >= 0')
  if not 0.0 < min_fg <= 1.0:
    raise ValueError(f'min_fg={min_fg}; expected a fraction in (0, 1]')
  mcfg, s_cfg = run.model_config, run.cfg.sample
  check_has_moe(mcfg)
  num_steps = int(num_steps or s_cfg.num_steps)
  cfg_scale = float(s_cfg.cfg_scale if cfg_scale is None else cfg_scale)
  method = method or s_cfg.sampler
  layers, E = moe_layer_names(mcfg), mcfg.num_experts
  size, patch, grid = mcfg.image_size, mcfg.patch_size, mcfg.grid_size
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tok = run.tokenizer
  if records is None:
    records = [record_from_prompt(p) for p in prompts]

  # 1. sampling, with routing recorded at every step
  log(f'sampling {len(prompts)} prompt(s), {num_steps} {method} steps, guidance {cfg_scale}')
  ids, mask = (_text_array(a) for a in tok.encode_batch(prompts))
  null_ids, null_mask = (_text_array(a) for a in tok.encode_batch(['']))
  images, ts, states, counts = sample_with_routing(
      run.model, run.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(null_ids),
      jnp.asarray(null_mask), num_steps=num_steps,
      cfg_scale=cfg_scale, method=method, seed=seed)
  uint8 = sampler_lib.to_uint8(images)
  fn = routing_fn(run.model)
  col_labels = [f't={t:.2f}' for t in ts]

  results = {
      'workdir': str(run.workdir), 'step': run.step, 'num_experts': E, 'routing': mcfg.routing,
      'routing_scope': mcfg.routing_scope, 'capacity': _capacity(mcfg),
      'tokens': mcfg.num_tokens, 'grid': grid, 'moe_layers': layers, 'sampler': method,
      'num_steps': num_steps, 'cfg_scale': cfg_scale, 'seed': seed, 'timesteps': [float(t) for t in ts],
      'min_fg_fraction': min_fg, 'prompts': [],
  }
  fgbg_all = []   # (counts [layers, T, S] per scene, fg, bg)
  for i, prompt in enumerate(prompts):
    c = counts[:, :, i]                                     # [T, layers, S]
    stem = f'{i:02d}_{_slug(prompt)}'
    maps = c.transpose(1, 0, 2).reshape(len(layers), num_steps, grid, grid)
    sample_png = sampler_lib.save_png(uint8[i], out / f'{stem}_sample.png')
    heat = heatmap_png(out / f'{stem}_routing.png', uint8[i], maps, num_experts=E, row_labels=layers,
                       col_labels=col_labels, title=f'experts per token: "{prompt}" (step {run.step})')
    entry = {'prompt': prompt, 'sample_png': sample_png.name, 'routing_png': heat.name,
             'summary': summarize(c[:, :, None], E, layers, ts),
             'experts_per_token': maps.tolist()}

    # 2. foreground vs background on rendered scenes noised to each recorded t
    rec = records[i]
    if rec is None:
      entry['fg_bg'] = None
      entry['fg_bg_note'] = 'prompt is not a shapes-world caption; no scene to render'
    elif scenes:
      log(f'[{i}] fg/bg on {scenes} rendered scene(s) of "{prompt}"')
      rng = np.random.default_rng([seed, i])
      per_scene, scene_maps, scene_imgs = [], [], []
      for j in range(scenes):
        scene = shapes_eval.scene_from_record(rec, rng, size)
        img = shapes.render_scene(scene, size)
        x0 = img.astype(np.float32) / 127.5 - 1.0
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        xs = noised(np.repeat(x0[None], num_steps, 0), np.repeat(eps[None], num_steps, 0), ts)
        sc = _batched(fn, run.params, jnp.asarray(xs), jnp.asarray(ts, jnp.float32),
                      np.repeat(ids[i:i + 1], num_steps, 0), np.repeat(mask[i:i + 1], num_steps, 0),
                      batch_size)                            # [layers, T, S]
        frac = token_fraction(shapes.object_masks(scene, size), patch)
        fg, bg = fg_bg_tokens(frac, min_fg)
        fgbg_all.append((sc, fg, bg))
        per_scene.append(foreground_background(sc, fg, bg))
        scene_maps.append(sc.mean(1).reshape(len(layers), grid, grid))
        scene_imgs.append(img)
        if j == 0:
          fgmap = np.where(fg, 2.0, np.where(bg, 0.0, 1.0)).reshape(grid, grid) * E / 2
          heatmap_png(out / f'{stem}_scene.png', img,
                      np.stack([np.concatenate([[fgmap], sc[k].reshape(num_steps, grid, grid)])
                                for k in range(len(layers))]),
                      num_experts=E, row_labels=layers, col_labels=['fg mask'] + col_labels,
                      title=f'rendered scene, noised to each t: "{prompt}"', image_label='scene')
      entry['fg_bg'] = _fgbg_summary(fgbg_all[-scenes:], layers, ts)
      entry['fg_bg']['per_scene'] = per_scene
      entry['scene_png'] = f'{stem}_scene.png'

    # 3. textual importance: drop each word, at this sample's own trajectory states
    if textual:
      words = prompt.split()
      variants = [drop_word(prompt, w) for w in range(len(words))]
      vids, vmask = (_text_array(a) for a in tok.encode_batch(variants))
      log(f'[{i}] textual importance of {len(words)} word(s)')
      changes = textual_importance(fn, run.params, states[:, i], ts, ids[i], mask[i],
                                   list(zip(vids, vmask)), batch_size)
      entry['textual_importance'] = [dict(word=w, index=k, **ch) for k, (w, ch) in enumerate(zip(words, changes))]
    results['prompts'].append(entry)

  results['summary'] = summarize(counts, E, layers, ts)
  results['fg_bg'] = _fgbg_summary(fgbg_all, layers, ts) if fgbg_all else None
  _write_json(out / 'analysis.json', results)
  return results


def _capacity(mcfg) -> int | None:
  """Tokens per expert per routing group at sampling time (None for 'batch' scope: it depends on the batch)."""
  if mcfg.routing_scope == 'batch':
    return None
  group = mcfg.num_tokens if mcfg.routing_scope == 'image' else mcfg.group_size
  return mcfg.capacity_for(group, train=False)


def _fgbg_summary(items, layers: Sequence[str], ts) -> dict:
  """fg/bg over a list of (counts [layers, T, S], fg [S], bg [S]): overall, per layer, per timestep."""
  def pooled(sel):
    c = np.concatenate([sel(x).reshape(-1) for x, _, _ in items])
    fg = np.concatenate([np.broadcast_to(f, sel(x).shape).reshape(-1) for x, f, _ in items])
    bg = np.concatenate([np.broadcast_to(b, sel(x).shape).reshape(-1) for x, _, b in items])
    return foreground_background(c, fg, bg)
  out = pooled(lambda x: x)
  out['per_layer'] = {name: pooled(lambda x, k=k: x[k]) for k, name in enumerate(layers)}
  out['per_t'] = [pooled(lambda x, j=j: x[:, j]) for j in range(len(ts))]
  return out
