"""`ecdit eval`: GenEval-style alignment scores on the shapes world.

  ecdit eval --workdir=runs/shapes_tiny                           # the run's newest checkpoint
  ecdit eval --prompts=prompts.jsonl --ground_truth --out=gt.json # score the shapes world itself

`--prompts` is a GenEval metadata JSONL file (DESIGN.md §3); without it, `--num_prompts` records of the
shapes world's eval-prompts split are written to a temporary file and used. Results (overall, per-tag
accuracy, counts, per-record verdicts) go to `--out` (default `<workdir or .>/eval/<name>.json`), a PNG grid
of failed images next to it, and a table to the screen. The library is `ecdit.eval.shapes_eval`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from absl import flags

from ecdit import errors
from ecdit import outputs
from ecdit.commands import flags as cflags
from ecdit.data import shapes
from ecdit.eval import geneval_rules, shapes_eval

_PROMPTS = flags.DEFINE_string('prompts', None, 'GenEval metadata JSONL (default: the shapes eval prompts)')
_OUT = flags.DEFINE_string('out', None, 'results JSON (default <workdir or .>/eval/<step_N|ground_truth>.json)')
_GROUND_TRUTH = flags.DEFINE_bool('ground_truth', False, 'render the prompts with the shapes world, no model')
_WORKDIR = cflags.define_workdir('training run directory (needed unless --ground_truth)')
_N = flags.DEFINE_integer('images_per_prompt', 4, 'images generated and scored per prompt (prompts x images at '
                          f'most {shapes_eval.MAX_IMAGES})')
_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 120, 'prompts to generate when --prompts is not given')
_PROMPT_SEED = flags.DEFINE_integer('prompt_seed', 0, 'seed of the generated prompts (without --prompts)')
_SEED = flags.DEFINE_integer('seed', 0, 'image seed (batch b uses seed + b)')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'images per generator call')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'render size for --ground_truth')
_STEPS = flags.DEFINE_integer('steps', None, "ODE steps (default: the run's sample.num_steps)")
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, "guidance scale (default: the run's sample.cfg_scale)")
_SAMPLER = flags.DEFINE_enum('sampler', None, ['euler', 'heun'], "ODE solver (default: sample.sampler)")
_EMA = flags.DEFINE_bool('ema', True, 'use the EMA weights')
_STEP = flags.DEFINE_integer('step', None, 'the checkpoint step to evaluate (default: the newest readable one)')
_MAX_FAILURES = flags.DEFINE_integer('max_failures', 48, 'failed images in the PNG grid (0: no grid)')


def _records() -> list[dict]:
  """The GenEval records to score: --prompts, or --num_prompts generated shapes eval prompts."""
  with tempfile.TemporaryDirectory() as tmp:
    prompts = _PROMPTS.value
    if not prompts:
      prompts = str(Path(tmp) / 'eval_prompts.jsonl')
      shapes.write_eval_prompts(prompts, _NUM_PROMPTS.value, seed=_PROMPT_SEED.value)
    with cflags.translate():
      return geneval_rules.read_records(prompts)


def _check_outputs(out: Path) -> Path:
  """--out and the failures PNG beside it may be written (the run's eval/ folder is its own); returns the PNG."""
  outputs.check_output(out, '--out', ours=outputs.json_with('overall', 'records'), run_subdir='eval')
  png = out.with_name(out.stem + '_failures.png')
  outputs.check_output(png, '--out (failures PNG)', ours=outputs.png_from_ecdit, run_subdir='eval')
  return png


def main(argv):
  cflags.quiet_logging()
  cflags.no_arguments(argv)
  for f in (_N, _NUM_PROMPTS, _BATCH, _STEP):
    cflags.at_least(f, 1)
  cflags.ode_steps(_STEPS)
  cflags.at_least(_MAX_FAILURES, 0)
  cflags.at_least(_CFG_SCALE, 0.0)
  if _IMAGE_SIZE.value < 8:
    raise errors.UsageError(f'--image_size={_IMAGE_SIZE.value} is invalid: expected at least 8')
  if not _GROUND_TRUTH.value:
    cflags.require(_WORKDIR, why=' to evaluate a model (or pass --ground_truth to score the shapes world)')
  base = Path(_WORKDIR.value or '.') / 'eval'
  if _OUT.value:   # the default name needs the run's step: checked once it is known, before any sampling
    _check_outputs(Path(_OUT.value))
  with cflags.translate():   # every image is kept for scoring: a bounded count, before prompts or a restore
    if not _PROMPTS.value:
      shapes_eval.check_image_count(_NUM_PROMPTS.value, _N.value)
    records = _records()
    if _PROMPTS.value:
      shapes_eval.check_image_count(len(records), _N.value, f'{len(records)} records in --prompts={_PROMPTS.value}')

  extra = {'prompts': _PROMPTS.value or f'shapes eval_prompts (num={_NUM_PROMPTS.value}, '
                                         f'seed={_PROMPT_SEED.value})'}
  if _GROUND_TRUTH.value:
    with cflags.translate():
      for i, r in enumerate(records):   # fail early on records no scene can satisfy
        shapes_eval.scene_from_record(r, np.random.default_rng(i), _IMAGE_SIZE.value)
    generate = shapes_eval.ground_truth_generator(records, _IMAGE_SIZE.value)
    name = 'ground_truth'
    extra.update(source='ground_truth', image_size=_IMAGE_SIZE.value)
  else:
    with cflags.translate():
      generate, info = shapes_eval.model_generator(
          _WORKDIR.value, num_steps=_STEPS.value, cfg_scale=_CFG_SCALE.value, sampler=_SAMPLER.value,
          ema=_EMA.value, step=_STEP.value)
    name = f'step_{info["step"]:07d}'
    extra.update(source='model', ema=_EMA.value, **info)

  out = Path(_OUT.value) if _OUT.value else base / f'{name}.json'
  png = _check_outputs(out)
  results = shapes_eval.run_eval(records, generate, images_per_prompt=_N.value, seed=_SEED.value,
                                 batch_size=_BATCH.value, out=out, failures_png=png,
                                 max_failures=_MAX_FAILURES.value, extra=extra)
  failed = sum(not ok for r in results['records'] for ok in r['correct'])
  print(f'wrote {out}' + (f' and {png} ({failed} failed images)' if results.get('failures_png') else ''),
        flush=True)
