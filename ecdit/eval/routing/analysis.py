"""`ecdit analyze`'s library: where an EC-DiT's experts spend their compute, per image token.

  run = load_run('runs/shapes_tiny')                     # config + newest checkpoint + tokenizer
  results = analyze(run, ['a red circle', 'two squares'], out='analysis/', num_steps=10)

For each prompt: sample it with the library sampler, recording experts per token per MoE layer at each step
(`routing.collect`), and draw the maps (`routing.heatmap`); render scenes of its shapes-world record
(`routing.scenes`), noise them to every recorded t and compare experts on object vs background tokens
(`routing.summary`); and measure each word's textual importance (`routing.textual`). Writes the PNGs and
`analysis.json` under `out`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from ecdit.data import shapes
from ecdit.diffusion import flow
from ecdit.diffusion import sampler as sampler_lib
from ecdit.eval import shapes_eval
from ecdit.eval.routing import collect, scenes as scenes_lib, summary, textual as textual_lib
from ecdit.eval.routing.heatmap import heatmap_png
from ecdit.train import workdir as workdir_lib


def load_run(workdir, *, ema: bool = True) -> workdir_lib.Restored:
  """Loads a training workdir the way `ecdit eval` does (ecdit.train.workdir.restore): config.json, newest
  checkpoint, the run's tokenizer or frozen text encoder (`run.tokenizer`).

  Raises ValueError naming the path for a missing workdir / config / checkpoint, and for a run without MoE
  layers or one trained on latents (its samples cannot be rendered or compared with the shapes world).
  """
  def require(cfg, mcfg):
    if cfg.data.get('latent_shape'):
      raise ValueError(f'{Path(workdir) / "config.json"}: the run trains on latents (data.latent_shape); '
                       'routing analysis needs an RGB model (its maps are drawn over the image and compared '
                       'with rendered scenes)')
    collect.check_has_moe(mcfg, f'the model of {workdir}')
  return workdir_lib.restore(workdir, ema=ema, require=require)


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


@dataclasses.dataclass
class _Analysis:
  """What every per-prompt part of `analyze` reads: the run, the sampled trajectory and the settings."""
  run: Any
  out: Path
  ids: np.ndarray          # [P, L] (or states [P, L, D]) of the prompts
  mask: np.ndarray         # [P, L]
  ts: np.ndarray           # [T] recorded times
  states: np.ndarray       # [T, P, H, W, C] the trajectory's x_t
  fn: Callable             # collect.routing_fn(run.model)
  seed: int
  min_fg: float
  batch_size: int

  @property
  def layers(self) -> list[str]:
    return collect.moe_layer_names(self.run.model_config)

  @property
  def col_labels(self) -> list[str]:
    return [f't={t:.2f}' for t in self.ts]

  def sampled(self, i: int, prompt: str, stem: str, image: np.ndarray, counts: np.ndarray) -> dict:
    """The sample's PNG, its routing heat map and its summary; counts `[T, layers, S]`."""
    mcfg, layers = self.run.model_config, self.layers
    e, grid = mcfg.num_experts, mcfg.grid_size
    maps = counts.transpose(1, 0, 2).reshape(len(layers), len(self.ts), grid, grid)
    sample_png = sampler_lib.save_png(image, self.out / f'{stem}_sample.png')
    heat = heatmap_png(self.out / f'{stem}_routing.png', image, maps, num_experts=e, row_labels=layers,
                       col_labels=self.col_labels, title=f'experts per token: "{prompt}" (step {self.run.step})')
    return {'prompt': prompt, 'sample_png': sample_png.name, 'routing_png': heat.name,
            'summary': summary.summarize(counts[:, :, None], e, layers, self.ts),
            'experts_per_token': maps.tolist()}

  def scene_counts(self, i: int, rec: dict, scenes: int, prompt: str, stem: str, fgbg_all: list) -> dict:
    """fg vs bg on `scenes` rendered scenes of `rec` noised to each recorded t (one fixed ε per scene), with
    the prompt's text and no guidance; appends (counts, fg, bg) of each scene to `fgbg_all`."""
    mcfg, layers = self.run.model_config, self.layers
    e, size, grid, n_t = mcfg.num_experts, mcfg.image_size, mcfg.grid_size, len(self.ts)
    rng = np.random.default_rng([self.seed, i])
    per_scene = []
    for j in range(scenes):
      scene = shapes_eval.scene_from_record(rec, rng, size)
      img = shapes.render_scene(scene, size)
      x0 = img.astype(np.float32) / 127.5 - 1.0
      eps = rng.standard_normal(x0.shape).astype(np.float32)
      xs = flow.interpolate(jnp.asarray(np.repeat(x0[None], n_t, 0)), jnp.asarray(np.repeat(eps[None], n_t, 0)),
                            jnp.asarray(self.ts, jnp.float32))
      sc = collect.batched_counts(self.fn, self.run.params, xs, jnp.asarray(self.ts, jnp.float32),
                                  np.repeat(self.ids[i:i + 1], n_t, 0), np.repeat(self.mask[i:i + 1], n_t, 0),
                                  self.batch_size)                   # [layers, T, S]
      frac = scenes_lib.token_fraction(shapes.object_masks(scene, size), mcfg.patch_size)
      fg, bg = scenes_lib.fg_bg_tokens(frac, self.min_fg)
      fgbg_all.append((sc, fg, bg))
      per_scene.append(summary.foreground_background(sc, fg, bg))
      if j == 0:
        fgmap = np.where(fg, 2.0, np.where(bg, 0.0, 1.0)).reshape(grid, grid) * e / 2
        heatmap_png(self.out / f'{stem}_scene.png', img,
                    np.stack([np.concatenate([[fgmap], sc[k].reshape(n_t, grid, grid)])
                              for k in range(len(layers))]),
                    num_experts=e, row_labels=layers, col_labels=['fg mask'] + self.col_labels,
                    title=f'rendered scene, noised to each t: "{prompt}"', image_label='scene')
    fg_bg = summary.fg_bg_summary(fgbg_all[-scenes:], layers, self.ts)
    fg_bg['per_scene'] = per_scene
    return fg_bg

  def words(self, i: int, prompt: str) -> list[dict]:
    """Each word's textual importance, at this sample's own trajectory states."""
    words = prompt.split()
    variants = [textual_lib.drop_word(prompt, w) for w in range(len(words))]
    vids, vmask = (_text_array(a) for a in self.run.tokenizer.encode_batch(variants))
    changes = textual_lib.textual_importance(self.fn, self.run.params, self.states[:, i], self.ts,
                                             self.ids[i], self.mask[i], list(zip(vids, vmask)), self.batch_size)
    return [dict(word=w, index=k, **ch) for k, (w, ch) in enumerate(zip(words, changes))]


def analyze(run: workdir_lib.Restored, prompts: Sequence[str], out, *, num_steps: int | None = None,
            cfg_scale: float | None = None, method: str | None = None, seed: int = 0, scenes: int = 2,
            min_fg: float = 0.5, textual: bool = True, batch_size: int = 64,
            records: Sequence[dict | None] | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
  """The full analysis of `ecdit analyze`; writes PNGs and `analysis.json` under `out` and returns the dict.

  For each prompt: sample it (recording experts per token per MoE layer at each step) and draw the maps;
  render `scenes` ground-truth scenes of its record (from `records`, else parsed from the prompt), noise them
  to every recorded t with a fixed ε, and compare experts on object (fg) vs background tokens; and for each
  word, the routing change at the sample's own trajectory states when that word is dropped.
  """
  prompts = [p for p in prompts]
  if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise ValueError(f'prompts must be a non-empty list of non-empty strings, got {prompts!r}')
  if scenes < 0:
    raise ValueError(f'scenes={scenes}; expected an integer >= 0')
  if not 0.0 < min_fg <= 1.0:
    raise ValueError(f'min_fg={min_fg}; expected a fraction in (0, 1]')
  mcfg = run.model_config
  collect.check_has_moe(mcfg)
  num_steps, cfg_scale, method = sampler_lib.settings(run.cfg.sample, num_steps=num_steps, cfg_scale=cfg_scale,
                                                      method=method)
  layers, e = collect.moe_layer_names(mcfg), mcfg.num_experts
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if records is None:
    records = [scenes_lib.record_from_prompt(p) for p in prompts]

  # 1. sampling, with routing recorded at every step
  log(f'sampling {len(prompts)} prompt(s), {num_steps} {method} steps, guidance {cfg_scale}')
  ids, mask = (_text_array(a) for a in run.tokenizer.encode_batch(prompts))
  null_ids, null_mask = (_text_array(a) for a in run.tokenizer.encode_batch(['']))
  images, ts, states, counts = collect.sample_with_routing(
      run.model, run.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(null_ids),
      jnp.asarray(null_mask), num_steps=num_steps, cfg_scale=cfg_scale, method=method, seed=seed)
  uint8 = sampler_lib.to_uint8(images)
  part = _Analysis(run, out, ids, mask, ts, states, collect.routing_fn(run.model), seed, min_fg, batch_size)

  results = {
      'workdir': str(run.workdir), 'step': run.step, 'num_experts': e, 'routing': mcfg.routing,
      'routing_scope': mcfg.routing_scope, 'capacity': summary.capacity(mcfg),
      'tokens': mcfg.num_tokens, 'grid': mcfg.grid_size, 'moe_layers': layers, 'sampler': method,
      'num_steps': num_steps, 'cfg_scale': cfg_scale, 'seed': seed, 'timesteps': [float(t) for t in ts],
      'min_fg_fraction': min_fg, 'prompts': [],
  }
  fgbg_all = []   # (counts [layers, T, S] per scene, fg, bg)
  for i, prompt in enumerate(prompts):
    stem = f'{i:02d}_{_slug(prompt)}'
    entry = part.sampled(i, prompt, stem, uint8[i], counts[:, :, i])
    # 2. foreground vs background on rendered scenes noised to each recorded t
    if records[i] is None:
      entry['fg_bg'] = None
      entry['fg_bg_note'] = 'prompt is not a shapes-world caption; no scene to render'
    elif scenes:
      log(f'[{i}] fg/bg on {scenes} rendered scene(s) of "{prompt}"')
      entry['fg_bg'] = part.scene_counts(i, records[i], scenes, prompt, stem, fgbg_all)
      entry['scene_png'] = f'{stem}_scene.png'
    # 3. textual importance: drop each word, at this sample's own trajectory states
    if textual:
      log(f'[{i}] textual importance of {len(prompt.split())} word(s)')
      entry['textual_importance'] = part.words(i, prompt)
    results['prompts'].append(entry)

  results['summary'] = summary.summarize(counts, e, layers, ts)
  results['fg_bg'] = summary.fg_bg_summary(fgbg_all, layers, ts) if fgbg_all else None
  _write_json(out / 'analysis.json', results)
  return results
