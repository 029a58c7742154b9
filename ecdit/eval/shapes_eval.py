"""GenEval-style scoring of text-to-image models on the shapes world.

  records = geneval_rules.read_records('prompts.jsonl')      # GenEval metadata, one record per line
  results = run_eval(records, generate, images_per_prompt=4, out='eval/run.json')

`generate(prompts: list[str], seed: int) -> uint8 [B, H, W, 3]` is any image source: a trained model
(`model_generator(workdir)`) or the shapes world itself (`ground_truth_generator(records)`, which measures
the scorer). Each image is scored by detecting its objects from the pixels (`detect.detect`) and applying
GenEval's rules for the record (`geneval_rules.evaluate`). As in GenEval, a tag's accuracy is the fraction
of its images judged correct and `overall` is the mean of the tag accuracies (over the tags present; with
all six, GenEval's overall score).
"""
from __future__ import annotations

import json
import math
import textwrap
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ecdit.data import shapes
from ecdit.diffusion import sampler as sampler_lib
from ecdit.eval import detect as detect_lib
from ecdit.eval import geneval_rules
from ecdit.train import workdir as workdir_lib

Generator = Callable[[list, int], np.ndarray]

# Scenes built from records follow the dataset's placement rules (shapes.GAP, MARGIN, SIZE_FEW/MANY), with
# one floor of their own:
_MIN_SIZE_PX = 3.0   # smaller shapes are not reliably told apart from their pixels


# ------------------------------------------------------------------------------------------ ground truth

def scene_from_record(record: dict, rng: np.random.Generator, image_size: int = 32) -> shapes.Scene:
  """A scene that satisfies `record`: exactly the counted objects, named colours, stated relations.

  Objects without a named colour get a random palette colour. Placement is by rejection sampling; a record
  whose constraints cannot be met (e.g. A left of B and B left of A) raises ValueError.
  """
  geneval_rules.validate_record(record)
  owners, colors = [], []
  for j, e in enumerate(record['include']):
    for _ in range(e.get('count', 1)):
      owners.append(j)
      colors.append(e.get('color') or shapes.COLOR_NAMES[int(rng.integers(len(shapes.COLOR_NAMES)))])
  n = len(owners)
  pairs = []   # (object a, object b, rel): a must be rel of b
  for j, e in enumerate(record['include']):
    if 'position' in e:
      rel, k = e['position']
      pairs += [(a, b, rel) for a in range(n) if owners[a] == j for b in range(n) if owners[b] == k]
  lo, hi = shapes.SIZE_FEW if n <= 2 else shapes.SIZE_MANY
  lo = max(lo, _MIN_SIZE_PX / image_size)
  for _ in range(60):
    hi = max(lo, hi)
    for _ in range(200):
      sizes = rng.uniform(lo, hi, size=n)
      placed = [tuple(rng.uniform(s + shapes.MARGIN, 1.0 - s - shapes.MARGIN, size=2)) + (float(s),)
                for s in sizes]
      if (all(shapes.separated(placed[a], placed[b]) for a in range(n) for b in range(a))
          and all(shapes.relation_holds(placed[a], placed[b], rel) for a, b, rel in pairs)):
        objects = [shapes.ShapeObject(record['include'][owners[i]]['class'], colors[i], float(p[0]),
                                      float(p[1]), float(p[2])) for i, p in enumerate(placed)]
        order = rng.permutation(n)
        return shapes.Scene(tuple(objects[int(i)] for i in order))
    hi *= 0.9   # crowded: smaller objects
  raise ValueError(f'cannot place a scene for record {record.get("prompt")!r} at {image_size}px '
                   f'({n} objects, relations {[(a, b, r) for a, b, r in pairs]})')


def ground_truth_generator(records: Sequence[dict], image_size: int = 32) -> Generator:
  """`generate(prompts, seed)` that renders each prompt's record with the shapes world (no model).

  Prompts are looked up in `records` (the first record with that prompt); each image gets its own scene
  from (seed, position in the batch, prompt), so repeated prompts give different scenes.
  """
  by_prompt = {}
  for r in records:
    by_prompt.setdefault(r['prompt'], r)

  def generate(prompts, seed):
    out = []
    for i, p in enumerate(prompts):
      if p not in by_prompt:
        raise ValueError(f'ground-truth generator has no record for prompt {p!r}')
      rng = np.random.default_rng([int(seed), i, zlib.crc32(p.encode())])
      out.append(shapes.render_scene(scene_from_record(by_prompt[p], rng, image_size), image_size))
    return np.stack(out)

  return generate


# ------------------------------------------------------------------------------------------------ model

def model_generator(workdir, *, num_steps: int | None = None, cfg_scale: float | None = None,
                    sampler: str | None = None, ema: bool = True, step: int | None = None) -> tuple[Generator, dict]:
  """`generate(prompts, seed)` sampling a training workdir's newest checkpoint (or checkpoint `step`), and info about it
  ({'step', 'image_size', 'workdir'}). Settings default to the run's `sample.*` config. A run with a frozen
  text encoder (data.text_encoder_dir) encodes prompts with it; one on latents (data.vae_dir) decodes the
  samples with its VAE, so scoring always sees RGB pixels.

  Raises ValueError (ecdit.train.workdir.WorkdirError) naming the path when the workdir, its config.json or
  its checkpoints are missing.
  """
  try:
    run = workdir_lib.restore(workdir, ema=ema, step=step)
  except workdir_lib.WorkdirError as e:
    raise workdir_lib.WorkdirError(f'{e}; model-based eval needs a trained workdir (or pass --ground_truth '
                                   'to score the shapes world itself)') from None
  generate = sampler_lib.sampler_for_run(run, num_steps=num_steps, cfg_scale=cfg_scale, method=sampler)
  return generate, {'step': run.step, 'image_size': run.image_size, 'workdir': str(run.workdir)}


# -------------------------------------------------------------------------------------------- scoring

def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval for k successes in n trials."""
  if n == 0:
    return 0.0, 1.0
  p = k / n
  den = 1 + z * z / n
  mid = (p + z * z / (2 * n)) / den
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
  return max(0.0, mid - half), min(1.0, mid + half)


def score_images(records: Sequence[dict], images_per_record: Sequence[np.ndarray], *,
                 detect_kwargs: dict | None = None) -> dict:
  """Scores images against their records. `images_per_record[i]` is uint8 [N, H, W, 3] for records[i].

  Returns {'overall', 'tags': {tag: accuracy}, 'ci95': {tag: [lo, hi]}, 'counts': {tag: {'correct',
  'images', 'prompts'}}, 'held_out': {...} (colour tags on held-out pairs vs the rest), 'records': [...]}.
  """
  if len(records) != len(images_per_record):
    raise ValueError(f'{len(records)} records but {len(images_per_record)} image sets')
  counts = {}
  held = {True: [0, 0], False: [0, 0]}
  per_record = []
  for i, (rec, images) in enumerate(zip(records, images_per_record)):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'record {i}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}')
    oks, reasons, dets = [], [], []
    for img in images:
      found = detect_lib.detect(img, **(detect_kwargs or {}))
      ok, why = geneval_rules.evaluate(found, rec)
      oks.append(bool(ok))
      reasons.append(why)
      dets.append([d.to_dict() for d in found])
    c = counts.setdefault(rec['tag'], {'correct': 0, 'images': 0, 'prompts': 0})
    c['correct'] += sum(oks)
    c['images'] += len(oks)
    c['prompts'] += 1
    if rec['tag'] in ('colors', 'color_attr'):
      h = held[bool(rec.get('held_out', False))]
      h[0] += sum(oks)
      h[1] += len(oks)
    per_record.append({'index': i, 'prompt': rec['prompt'], 'tag': rec['tag'],
                       'held_out': bool(rec.get('held_out', False)), 'correct': oks, 'reasons': reasons,
                       'detections': dets})
  tags = {t: counts[t]['correct'] / counts[t]['images'] for t in shapes.TAGS if t in counts and counts[t]['images']}
  results = {
      'overall': float(np.mean(list(tags.values()))) if tags else 0.0,
      'tags': tags,
      'ci95': {t: list(wilson_interval(counts[t]['correct'], counts[t]['images'])) for t in tags},
      'counts': {t: counts[t] for t in shapes.TAGS if t in counts},
      'held_out': {('held_out' if k else 'seen'): {'accuracy': v[0] / v[1], 'images': v[1]}
                   for k, v in held.items() if v[1]},
      'records': per_record,
  }
  return results


def format_table(results: dict) -> str:
  rows = [f'{"tag":<15} {"prompts":>7} {"images":>7} {"accuracy":>9}  95% CI']
  for t, acc in results['tags'].items():
    c, (lo, hi) = results['counts'][t], results['ci95'][t]
    rows.append(f'{t:<15} {c["prompts"]:>7} {c["images"]:>7} {100 * acc:>8.2f}%  [{100 * lo:.1f}, {100 * hi:.1f}]')
  for name, h in results.get('held_out', {}).items():
    rows.append(f'{"colour " + name:<15} {"":>7} {h["images"]:>7} {100 * h["accuracy"]:>8.2f}%')
  rows.append(f'{"overall":<15} {"":>7} {"":>7} {100 * results["overall"]:>8.2f}%  (mean over tags)')
  return '\n'.join(rows)


def failure_grid(records, images_per_record, results, path, *, max_images: int = 48, cell: int = 128):
  """PNG of failed images with their prompt and first reason underneath; returns the path or None."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  failed = [(r['index'], j, r['reasons'][j]) for r in results['records'] for j, ok in enumerate(r['correct'])
            if not ok][:max_images]
  if not failed:
    return None
  cols = min(8, len(failed))
  rows = math.ceil(len(failed) / cols)
  text_h = 48   # two lines of prompt, two of reason
  canvas = Image.new('RGB', (cols * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), 'white')
  draw = ImageDraw.Draw(canvas)
  width = max(8, cell // 6)
  for n, (i, j, why) in enumerate(failed):
    r, c = divmod(n, cols)
    x, y = 4 + c * (cell + 4), 4 + r * (cell + text_h + 4)
    img = Image.fromarray(np.asarray(images_per_record[i])[j]).resize((cell, cell), Image.NEAREST)
    canvas.paste(img, (x, y))
    lines = [(t, (0, 0, 0)) for t in textwrap.wrap(records[i]['prompt'], width)[:2]]
    lines += [(t, (180, 0, 0)) for t in textwrap.wrap(why[0] if why else '', width)[:4 - len(lines)]]
    for k, (t, color) in enumerate(lines):
      draw.text((x, y + cell + 1 + 11 * k), t, fill=color)
  # Marked as ecdit's (sampler.save_png), so a rerun with the same --out may replace it.
  return sampler_lib.save_png(np.asarray(canvas), path)


def generate_images(records: Sequence[dict], generate: Generator, *, images_per_prompt: int = 4,
                    seed: int = 0, batch_size: int = 64) -> list[np.ndarray]:
  """Calls `generate` on batches of prompts (each repeated `images_per_prompt` times; batch b uses seed
  `seed + b`) and returns uint8 [N, H, W, 3] per record."""
  if images_per_prompt < 1:
    raise ValueError(f'images_per_prompt={images_per_prompt}; expected an integer >= 1')
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}; expected an integer >= 1')
  jobs = [(i, r['prompt']) for i, r in enumerate(records) for _ in range(images_per_prompt)]
  out = []
  for b, start in enumerate(range(0, len(jobs), batch_size)):
    prompts = [p for _, p in jobs[start:start + batch_size]]
    images = np.asarray(generate(prompts, seed + b))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(prompts) or images.shape[-1] != 3:
      raise ValueError(f'generator returned {images.dtype} {images.shape} for {len(prompts)} prompts; '
                       'expected uint8 [B, H, W, 3]')
    out.append(images)
  flat = np.concatenate(out)
  return [flat[i * images_per_prompt:(i + 1) * images_per_prompt] for i in range(len(records))]


# Images one evaluation generates and keeps for scoring (records x images per prompt): held in memory at once.
MAX_IMAGES = 65536


def check_image_count(prompts: int, images_per_prompt: int, what: str | None = None) -> None:
  """ValueError unless prompts x images_per_prompt stays within MAX_IMAGES (before any prompt is generated or
  checkpoint read); `what` names where the prompt count came from (default --num_prompts)."""
  if prompts * images_per_prompt > MAX_IMAGES:
    raise ValueError(f'{what or f"--num_prompts={prompts}"} with --images_per_prompt={images_per_prompt} asks for '
                     f'{prompts * images_per_prompt} images: expected at most {MAX_IMAGES} per evaluation')


def run_eval(records: Sequence[dict], generate: Generator, *, images_per_prompt: int = 4, seed: int = 0,
             batch_size: int = 64, out: str | Path | None = None, failures_png: str | Path | None = None,
             max_failures: int = 48, extra: dict | None = None, verbose: bool = True) -> dict:
  """Generates, scores, and (if `out`) writes the results JSON and a PNG grid of failures; prints a table."""
  images = generate_images(records, generate, images_per_prompt=images_per_prompt, seed=seed,
                           batch_size=batch_size)
  results = score_images(records, images)
  results['images_per_prompt'] = images_per_prompt
  results['seed'] = seed
  results.update(extra or {})
  if failures_png and max_failures > 0:
    png = failure_grid(records, images, results, failures_png, max_images=max_failures)
    results['failures_png'] = str(png) if png else None
  if out:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + '.tmp')
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
  if verbose:
    print(format_table(results), flush=True)
  return results
