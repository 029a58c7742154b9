"""`ecdit analyze`: where the experts go — experts per image token, per MoE layer and sampling step.

  ecdit analyze --workdir=runs/shapes_tiny --prompts="a red circle;two squares" --steps=10 --out=analysis

For each prompt it writes `NN_<prompt>_routing.png` (rows: MoE layers, columns: sampling timesteps, the
generated image beside), `NN_<prompt>_sample.png`, `NN_<prompt>_scene.png` (a rendered ground-truth scene
noised to each t, with its foreground mask) and one `analysis.json` with the summary statistics:
experts-per-token histogram, zero-expert fraction and mean per layer and step, foreground/background mean
experts and their ratio (on rendered scenes), and each word's textual importance. See docs/analysis.md.

`--prompts` is a ';'-separated list or a GenEval metadata JSONL file; default: the run's sample.prompts.
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'training run directory (config.json + checkpoints/)')
_PROMPTS = flags.DEFINE_string('prompts', None, "';'-separated prompts or a GenEval JSONL file "
                               "(default: the run's sample.prompts)")
_OUT = flags.DEFINE_string('out', None, 'output directory (default <workdir>/analysis/step_<N>)')
_STEPS = flags.DEFINE_integer('steps', None, "ODE steps = recorded timesteps (default: sample.num_steps)")
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, "guidance scale (default: the run's sample.cfg_scale)")
_SAMPLER = flags.DEFINE_enum('sampler', None, ['euler', 'heun'], 'ODE solver (default: sample.sampler)')
_SEED = flags.DEFINE_integer('seed', 0, 'noise seed of the samples and of the rendered scenes')
_SCENES = flags.DEFINE_integer('scenes', 2, 'rendered scenes per prompt for the fg/bg statistics (0: none)')
_MIN_FG = flags.DEFINE_float('min_fg', 0.5, 'a token is foreground when at least this share of its pixels '
                             'is object pixels (background: none)')
_TEXTUAL = flags.DEFINE_bool('textual', True, 'measure each word\'s textual importance')
_EMA = flags.DEFINE_bool('ema', True, 'use the EMA weights')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'images per model call in the fg/bg and textual passes')


def _fail(msg: str):
  print(f'ecdit: error: {msg}', file=sys.stderr, flush=True)
  sys.exit(2)


def _prompts_and_records(value: str | None, default: str):
  """(prompts, records or None) from --prompts: a JSONL file of GenEval records, else ';'-separated text."""
  from ecdit.eval import geneval_rules  # pylint: disable=import-outside-toplevel
  if value and (value.endswith('.jsonl') or Path(value).is_file()):
    records = geneval_rules.read_records(value)
    return [r['prompt'] for r in records], records
  prompts = [p.strip() for p in (value or default).split(';') if p.strip()]
  if not prompts:
    raise ValueError(f'--prompts={value!r} holds no prompt')
  return prompts, None


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}')
  if not _WORKDIR.value:
    _fail('--workdir is required')
  for f in (_STEPS, _BATCH):
    if f.value is not None and f.value < 1:
      _fail(f'--{f.name}={f.value} is invalid: expected an integer >= 1')
  if _SCENES.value < 0:
    _fail(f'--scenes={_SCENES.value} is invalid: expected an integer >= 0')
  if not 0.0 < _MIN_FG.value <= 1.0:
    _fail(f'--min_fg={_MIN_FG.value} is invalid: expected a fraction in (0, 1]')
  if _CFG_SCALE.value is not None and _CFG_SCALE.value < 0:
    _fail(f'--cfg_scale={_CFG_SCALE.value} is invalid: expected a number >= 0')
  from absl import logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)

  from ecdit.eval import routing_stats  # pylint: disable=import-outside-toplevel
  try:
    if _PROMPTS.value:   # a bad prompts file fails before the model is loaded
      prompts, records = _prompts_and_records(_PROMPTS.value, '')
    run = routing_stats.load_run(_WORKDIR.value, ema=_EMA.value)
    if not _PROMPTS.value:
      prompts, records = _prompts_and_records(None, run.cfg.sample.prompts)
  except ValueError as e:
    _fail(str(e))
  out = Path(_OUT.value) if _OUT.value else run.workdir / 'analysis' / f'step_{run.step:07d}'
  try:
    results = routing_stats.analyze(
        run, prompts, out, num_steps=_STEPS.value, cfg_scale=_CFG_SCALE.value, method=_SAMPLER.value,
        seed=_SEED.value, scenes=_SCENES.value, min_fg=_MIN_FG.value, textual=_TEXTUAL.value,
        batch_size=_BATCH.value, records=records, log=lambda s: print(s, flush=True))
  except ValueError as e:
    _fail(str(e))
  print(format_summary(results), flush=True)
  print(f'wrote {out / "analysis.json"} and {3 * len(prompts)} PNGs under {out}', flush=True)


def format_summary(results: dict) -> str:
  """A few lines for the screen: per layer mean experts, zero-expert share, fg/bg ratio."""
  e = results['num_experts']
  rows = [f'{"layer":<10} {"mean":>6} {"zero":>7}  histogram 0..{e} experts', ]
  for name, s in results['summary']['layers'].items():
    hist = ' '.join(f'{h:.2f}' for h in s['histogram'])
    rows.append(f'{name:<10} {s["mean"]:>6.2f} {100 * s["zero_fraction"]:>6.1f}%  {hist}')
  fb = results.get('fg_bg')
  if fb and fb.get('ratio') is not None:
    rows.append(f'foreground {fb["fg_mean"]:.3f} vs background {fb["bg_mean"]:.3f} experts/token: '
                f'ratio {fb["ratio"]:.3f}')
  for p in results['prompts']:
    ti = p.get('textual_importance')
    if ti:
      top = sorted(ti, key=lambda r: -r['l1'])[:3]
      rows.append(f'"{p["prompt"]}": most routing-relevant words ' +
                  ', '.join(f'{r["word"]} ({r["l1"]:.3f})' for r in top))
  return '\n'.join(rows)


if __name__ == '__main__':
  app.run(main)
