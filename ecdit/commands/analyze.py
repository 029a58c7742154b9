"""`ecdit analyze`: where the experts go — experts per image token, per MoE layer and sampling step.

  ecdit analyze --workdir=runs/shapes_tiny --prompts="a red circle;two squares" --steps=10 --out=analysis

For each prompt it writes `NN_<prompt>_routing.png` (rows: MoE layers, columns: sampling timesteps, the
generated image beside), `NN_<prompt>_sample.png`, `NN_<prompt>_scene.png` (a rendered ground-truth scene
noised to each t, with its foreground mask) and one `analysis.json` with the summary statistics:
experts-per-token histogram, zero-expert fraction and mean per layer and step, foreground/background mean
experts and their ratio (on rendered scenes), and each word's textual importance. See docs/analysis.md; the
library is `ecdit.eval.routing.analysis`.

`--prompts` is a ';'-separated list or a GenEval metadata JSONL file; default: the run's sample.prompts.
"""
from __future__ import annotations

import functools
from pathlib import Path

from absl import flags

from ecdit import errors
from ecdit import outputs
from ecdit.commands import flags as cflags
from ecdit.eval import geneval_rules
from ecdit.eval.routing import analysis as routing_analysis

_WORKDIR = cflags.define_workdir('training run directory (config.json + checkpoints/)')
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



def _prompts_and_records(value: str | None, default: str | None):
  """(prompts, records or None) from --prompts: a JSONL file of GenEval records, else ';'-separated text
  (`default` when the flag is not given)."""
  if value and (value.endswith('.jsonl') or Path(value).is_file()):
    records = geneval_rules.read_records(value)
    return [r['prompt'] for r in records], records
  return cflags.prompt_list(_PROMPTS, default), None


def main(argv):
  cflags.no_arguments(argv)
  cflags.require(_WORKDIR)
  cflags.ode_steps(_STEPS)
  cflags.at_least(_BATCH, 1)
  cflags.at_least(_SCENES, 0)
  if not 0.0 < _MIN_FG.value <= 1.0:
    raise errors.UsageError(f'--min_fg={_MIN_FG.value} is invalid: expected a fraction in (0, 1]')
  cflags.at_least(_CFG_SCALE, 0.0)
  cflags.quiet_logging()
  check_out = functools.partial(outputs.check_output, flag='--out', folder=True, run_subdir='analysis',
                                ours=outputs.folder_with('analysis.json', outputs.json_with('prompts', 'summary')))
  if _OUT.value:   # before the run is restored; the default folder (the run's analysis/) once its step is known
    check_out(_OUT.value)
  with cflags.translate():
    if _PROMPTS.value is not None:   # bad or empty prompts fail before the model is loaded
      prompts, records = _prompts_and_records(_PROMPTS.value, None)
    run = routing_analysis.load_run(_WORKDIR.value, ema=_EMA.value)
    if _PROMPTS.value is None:
      prompts, records = _prompts_and_records(None, run.cfg.sample.prompts)
  out = check_out(Path(_OUT.value) if _OUT.value else run.workdir / 'analysis' / f'step_{run.step:07d}')
  with cflags.translate():
    results = routing_analysis.analyze(
        run, prompts, out, num_steps=_STEPS.value, cfg_scale=_CFG_SCALE.value, method=_SAMPLER.value,
        seed=_SEED.value, scenes=_SCENES.value, min_fg=_MIN_FG.value, textual=_TEXTUAL.value,
        batch_size=_BATCH.value, records=records, log=lambda s: print(s, flush=True))
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

