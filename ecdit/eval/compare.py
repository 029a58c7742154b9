"""Several training runs side by side (issue 6): loss curves, GenEval-style scores, fg/bg expert ratio.

  runs = [load_run(w) for w in workdirs]        # RunSummary per `ecdit train` workdir
  write_report(runs, 'runs/compare')             # loss_curves.png, compare.md, compare.json

A run is read from what the other commands leave in its workdir: `config.json` and `metrics.jsonl`
(`ecdit train`), the newest `eval/step_<N>.json` (`ecdit eval`) and the newest
`analysis/step_<N>/analysis.json` (`ecdit analyze`). Missing eval or analysis results are reported as n/a
(a dense run has no experts, so `ecdit analyze` refuses it).

The loss compared is `flow_loss` when logged, else `loss`: token choice adds its balance loss to `loss`,
which would make it look worse at equal denoising quality.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from ecdit import errors
from ecdit.eval import seeds

FINAL_LOSS_WINDOW = 5    # final loss = mean of the last this-many logged losses (one logged value is noisy)
Z95 = 1.959964


class CompareError(errors.UsageError, ValueError):
  """A workdir cannot be compared (missing, or not a training run); the message names the path."""


@dataclasses.dataclass
class RunSummary:
  label: str
  workdir: str
  name: str
  routing: str
  num_experts: int
  capacity_factor: float | None
  top_k: int | None
  steps: int                                  # last logged step
  loss_key: str
  curve: list[tuple[int, float]]              # (step, loss) per logged step
  final_loss: float
  eval: dict | None = None                    # see geneval_summary()
  fg_bg: dict | None = None                   # {'fg_mean', 'bg_mean', 'ratio', 'step', 'file'}
  seed: int | None = None                     # the config's top-level seed
  config_key: str = ''                        # seeds.config_key: equal for replicas that differ by seed
  step_ms: float | None = None                # 1000 / the last logged steps_per_sec (steady-state step time)


# ------------------------------------------------------------------------------------------- loading

def _newest_step_path(paths) -> Path | None:
  """The path whose name holds the largest `step_<N>` (names without one, e.g. ground_truth.json, skipped)."""
  numbered = [(int(m.group(1)), p) for p in paths if (m := re.match(r'step_(\d+)', p.name))]
  return max(numbered)[1] if numbered else None


def overall_interval(counts: dict, z: float = Z95) -> tuple[float, float]:
  """95% interval of GenEval's overall score, the *mean of the tag accuracies* (not pooled images).

  Normal approximation: tags are independent binomials, so var(mean) = sum_t p_t(1-p_t)/n_t / T² with
  p_t = correct/images of tag t and T the number of tags. Clipped to [0, 1]. Like any Wald interval it
  collapses to a point when every tag is at 0% or 100%; a pooled Wilson interval would be narrower than
  this and describe a different quantity (tags with fewer images weigh more in the mean).
  """
  tags = [c for c in counts.values() if c.get('images')]
  if not tags:
    return 0.0, 1.0
  ps = [c['correct'] / c['images'] for c in tags]
  mean = sum(ps) / len(ps)
  var = sum(p * (1 - p) / c['images'] for p, c in zip(ps, tags)) / len(tags) ** 2
  half = z * math.sqrt(var)
  return max(0.0, mean - half), min(1.0, mean + half)


def geneval_summary(results: dict) -> dict:
  """The numbers compared from an `ecdit eval` results dict: overall with its interval, per-tag accuracy."""
  ci = results.get('overall_ci95')
  method = 'from eval file'
  if ci is None:
    ci, method = overall_interval(results.get('counts', {})), 'normal approx. over per-tag binomials'
  return {'overall': float(results['overall']), 'overall_ci95': [float(ci[0]), float(ci[1])],
          'ci_method': method, 'tags': dict(results.get('tags', {})), 'tag_ci95': dict(results.get('ci95', {})),
          'step': results.get('step')}


def _read_json(path: Path) -> dict:
  """The JSON object in `path`; CompareError (naming the file) when unreadable, malformed or not an object."""
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CompareError(f'{path}: unreadable JSON ({e})') from None
  if not isinstance(value, dict):
    raise CompareError(f'{path}: expected a JSON object, got {type(value).__name__} {_short(value)}')
  return value


def _short(value, limit: int = 40) -> str:
  text = json.dumps(value)
  return text if len(text) <= limit else text[:limit] + '...'


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_records(path: Path) -> list[dict]:
  """The records of a metrics.jsonl, each checked to be an object with an integer "step".

  A last line that is not valid JSON is a write cut short by a killed run: skipped with a warning on stderr.
  Any other malformed line raises CompareError naming the file and the line number."""
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise CompareError(f'{path}: unreadable ({e})') from None
  numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
  records = []
  for i, (n, line) in enumerate(numbered):
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(numbered) - 1:
        print(f'warning: {path} line {n}: torn last line skipped (a run killed mid-write?)', file=sys.stderr)
        break
      raise CompareError(f'{path} line {n}: not valid JSON ({e.msg}); expected one JSON object per line') from None
    if not isinstance(r, dict):
      raise CompareError(f'{path} line {n}: expected a JSON object with an integer "step", got {_short(r)}')
    step = r.get('step')
    if not isinstance(step, int) or isinstance(step, bool):
      raise CompareError(f'{path} line {n}: expected an integer "step", got {_short(step)}')
    for key in ('loss', 'flow_loss'):
      if r.get(key) is not None and not _is_number(r[key]):
        raise CompareError(f'{path} line {n}: expected "{key}" to be a number or null, got {_short(r[key])}')
    records.append(r)
  return records


def read_curve(path: Path, records: list[dict] | None = None) -> tuple[str, list[tuple[int, float]]]:
  """(loss key, [(step, loss)]) from a metrics.jsonl (or its `records`, already read); a torn last line
  (killed run) is skipped with a warning."""
  records = read_records(path) if records is None else records
  key = 'flow_loss' if any('flow_loss' in r for r in records) else 'loss'
  curve = [(r['step'], float(r[key])) for r in records if _is_number(r.get(key)) and math.isfinite(r[key])]
  if not curve:
    raise CompareError(f'{path}: no logged step with a finite "{key}" (has the run logged its first step?)')
  return key, curve


def step_ms(records: list[dict]) -> float | None:
  """1000 / the last logged finite `steps_per_sec` (the loop logs the steady-state mean since step 1)."""
  rates = [r['steps_per_sec'] for r in records
           if _is_number(r.get('steps_per_sec')) and math.isfinite(r['steps_per_sec']) and r['steps_per_sec'] > 0]
  return 1000 / rates[-1] if rates else None


def _expect(ok: bool, path: Path, key: str, expected: str, value) -> None:
  if not ok:
    raise CompareError(f'{path}: expected "{key}" to be {expected}, got {_short(value)}')


def _check_config(cfg: dict, path: Path) -> dict:
  """The `model` section of a run's config.json, with the fields compare reads checked."""
  model = cfg.get('model', {})
  _expect(isinstance(model, dict), path, 'model', 'an object', model)
  _expect(isinstance(cfg.get('name', ''), str), path, 'name', 'a string', cfg.get('name'))
  _expect(isinstance(model.get('routing', 'dense'), str), path, 'model.routing', 'a string', model.get('routing'))
  n = model.get('num_experts')
  _expect(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 0), path, 'model.num_experts',
          'a non-negative integer', n)
  for key in ('capacity_factor', 'top_k'):
    _expect(model.get(key) is None or _is_number(model[key]), path, f'model.{key}', 'a number', model.get(key))
  return model


def _check_eval(results: dict, path: Path) -> dict:
  """An `ecdit eval` results dict with the fields geneval_summary reads checked."""
  _expect(_is_number(results.get('overall')), path, 'overall', 'a number', results.get('overall'))
  ci = results.get('overall_ci95')
  _expect(ci is None or (isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci))), path,
          'overall_ci95', 'a list [lo, hi] of two numbers', ci)
  for key in ('tags', 'ci95', 'counts'):
    _expect(isinstance(results.get(key, {}), dict), path, key, 'an object', results.get(key))
  for tag, acc in results.get('tags', {}).items():
    _expect(acc is None or _is_number(acc), path, f'tags.{tag}', 'a number', acc)
  for tag, c in results.get('counts', {}).items():
    _expect(isinstance(c, dict) and all(isinstance(c.get(k), int) and not isinstance(c.get(k), bool)
                                        for k in ('correct', 'images')),
            path, f'counts.{tag}', 'an object with integer "correct" and "images"', c)
  step = results.get('step')
  _expect(step is None or (isinstance(step, int) and not isinstance(step, bool)), path, 'step', 'an integer', step)
  return results


def load_run(workdir, label: str | None = None) -> RunSummary:
  """A RunSummary of one `ecdit train` workdir. Raises CompareError for a missing workdir, config.json or
  metrics.jsonl, and for a malformed one (or a malformed eval / analysis file), naming the file; missing eval /
  analysis results leave `eval` / `fg_bg` None."""
  wd = Path(workdir)
  if not wd.is_dir():
    raise CompareError(f'workdir {wd} does not exist')
  for f in ('metrics.jsonl', 'config.json'):
    if not (wd / f).is_file():
      raise CompareError(f'workdir {wd} has no {f} (is it an `ecdit train` run directory?)')
  cfg = _read_json(wd / 'config.json')
  model = _check_config(cfg, wd / 'config.json')
  routing = model.get('routing', 'dense')
  records = read_records(wd / 'metrics.jsonl')
  key, curve = read_curve(wd / 'metrics.jsonl', records)
  last = [loss for _, loss in curve[-FINAL_LOSS_WINDOW:]]
  run = RunSummary(
      label=label or cfg.get('name') or wd.name, workdir=str(wd), name=cfg.get('name', wd.name),
      routing=routing, num_experts=int(model.get('num_experts') or 1),
      capacity_factor=model.get('capacity_factor') if routing == 'expert_choice' else None,
      top_k=model.get('top_k') if routing == 'token_choice' else None,
      steps=curve[-1][0], loss_key=key, curve=curve, final_loss=sum(last) / len(last),
      seed=cfg['seed'] if isinstance(cfg.get('seed'), int) else None, config_key=seeds.config_key(cfg),
      step_ms=step_ms(records))

  eval_path = _newest_step_path((wd / 'eval').glob('step_*.json'))
  if eval_path:
    run.eval = dict(geneval_summary(_check_eval(_read_json(eval_path), eval_path)), file=str(eval_path))
  analysis_dir = _newest_step_path(p for p in (wd / 'analysis').glob('step_*') if (p / 'analysis.json').is_file())
  if analysis_dir:
    path = analysis_dir / 'analysis.json'
    fb = _read_json(path).get('fg_bg') or {}   # None when run with --scenes=0
    _expect(isinstance(fb, dict), path, 'fg_bg', 'an object or null', fb)
    if fb.get('ratio') is not None:
      for k in ('fg_mean', 'bg_mean', 'ratio'):
        _expect(_is_number(fb.get(k)), path, f'fg_bg.{k}', 'a number', fb.get(k))
      run.fg_bg = {'fg_mean': fb['fg_mean'], 'bg_mean': fb['bg_mean'], 'ratio': fb['ratio'],
                   'step': int(analysis_dir.name.split('_')[1]), 'file': str(path)}
  return run


# --------------------------------------------------------------------------------------------- tables

def routing_text(run: RunSummary) -> str:
  if run.routing == 'expert_choice':
    f = 'n/a' if run.capacity_factor is None else f'{run.capacity_factor:g}'
    return f'expert choice ({run.num_experts}E, f={f})'
  if run.routing == 'token_choice':
    return f'token choice ({run.num_experts}E, top-{"n/a" if run.top_k is None else run.top_k})'
  return run.routing


def _pct(x) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def all_tags(runs) -> list[str]:
  """Every tag any run was scored on, in first-seen order (eval files list them in GenEval's order)."""
  return list(dict.fromkeys(t for r in runs if r.eval for t in r.eval['tags']))


def markdown_table(runs) -> str:
  tags = all_tags(runs)
  head = ['run', 'routing', 'steps', 'final loss', 'GenEval overall [95% CI]'] + tags + ['fg/bg experts']
  rows = [head, ['---'] * len(head)]
  for r in runs:
    if r.eval:
      lo, hi = r.eval['overall_ci95']
      overall = f'{_pct(r.eval["overall"])} [{100 * lo:.1f}, {100 * hi:.1f}]'
    else:
      overall = 'n/a'
    tag_cells = [_pct(r.eval['tags'].get(t)) if r.eval else 'n/a' for t in tags]
    ratio = f'{r.fg_bg["ratio"]:.3f}' if r.fg_bg else 'n/a'
    rows.append([r.label, routing_text(r), str(r.steps), f'{r.final_loss:.4f}', overall] + tag_cells + [ratio])
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


def to_json(runs) -> dict:
  return {'final_loss_window': FINAL_LOSS_WINDOW,
          'runs': [dict(dataclasses.asdict(r), routing_text=routing_text(r)) for r in runs]}


# ---------------------------------------------------------------------------------------------- plot

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def nice_linear_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
  """Round ticks (1, 2, 5 × 10^k apart) covering [lo, hi]."""
  span = max(hi - lo, 1e-12)
  raw = span / target
  step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
  first = math.ceil(lo / step) * step
  return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
  """1, 2, 5 × 10^k in [lo, hi]; every digit 1..9 when that gives fewer than three (a narrow loss range)."""
  for mantissas in ((1, 2, 5), tuple(range(1, 10))):
    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in mantissas if lo <= m * 10.0 ** k <= hi]
    if len(ticks) >= 3:
      return ticks
  return ticks


def loss_curves_png(runs, path, *, size=(900, 560), smoothing: float = 0.6, groups=None) -> Path:
  """One line per run (EMA-smoothed, raw values faint behind), x = step, y = loss on a log scale.

  `groups` (seeds.Group list): the runs of a group share a colour and one legend entry."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  w, h = size
  left, right, top, bottom = 70, 20, 36, 50
  img = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(img)
  try:
    font = ImageFont.load_default(size=13)
  except TypeError:   # Pillow < 10.1: the bitmap font, no size
    font = ImageFont.load_default()
  losses = [v for r in runs for _, v in r.curve if v > 0]
  steps = [s for r in runs for s, _ in r.curve]
  if not losses:
    raise CompareError('no positive loss to draw on a log scale')
  y_lo, y_hi = math.log10(min(losses)), math.log10(max(losses))
  pad = max(0.05 * (y_hi - y_lo), 0.01)
  y_lo, y_hi = y_lo - pad, y_hi + pad
  x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)

  def px(step, loss):
    return (left + (step - x_lo) / (x_hi - x_lo) * (w - left - right),
            top + (y_hi - math.log10(loss)) / (y_hi - y_lo) * (h - top - bottom))

  grid, axis = (225, 225, 225), (60, 60, 60)
  for v in log_ticks(10 ** y_lo, 10 ** y_hi):
    y = px(x_lo, v)[1]
    draw.line([(left, y), (w - right, y)], fill=grid)
    draw.text((left - 6, y), f'{v:g}', fill=axis, font=font, anchor='rm')
  for s in nice_linear_ticks(x_lo, x_hi):
    x = px(s, 10 ** y_lo)[0]
    draw.line([(x, top), (x, h - bottom)], fill=grid)
    draw.text((x, h - bottom + 6), f'{s:g}', fill=axis, font=font, anchor='mt')
  draw.rectangle([left, top, w - right, h - bottom], outline=axis)
  draw.text((left + (w - left - right) / 2, h - 8), 'step', fill=axis, font=font, anchor='md')
  keys = '/'.join(sorted({r.loss_key for r in runs}))
  draw.text((left, top / 2), f'training loss ({keys}, log scale; EMA {smoothing:g})',
            fill=axis, font=font, anchor='lm')

  groups = groups or [seeds.Group(r.label, [r]) for r in runs]
  colour_of = {id(r): PALETTE[i % len(PALETTE)] for i, g in enumerate(groups) for r in g.runs}
  for r in runs:
    color = colour_of[id(r)]
    faint = tuple(int(c + 0.75 * (255 - c)) for c in color)
    pts = [(s, v) for s, v in r.curve if v > 0]
    smooth = seeds.ema([v for _, v in pts], smoothing)
    for values, fill, width in (([v for _, v in pts], faint, 1), (smooth, color, 2)):
      line = [px(s, v) for (s, _), v in zip(pts, values)]
      if len(line) > 1:
        draw.line(line, fill=fill, width=width)
      else:
        draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=fill)

  # Legend, top right inside the axes (losses fall, so that corner is usually empty).
  rows = [(g.label + (f' ({len(g.runs)} seeds)' if len(g.runs) > 1 else ''), PALETTE[i % len(PALETTE)])
          for i, g in enumerate(groups)]
  box_w = 34 + max(draw.textlength(label, font=font) for label, _ in rows)
  x0, y0 = w - right - box_w - 8, top + 8
  draw.rectangle([x0, y0, x0 + box_w, y0 + 18 * len(rows) + 6], fill='white', outline=axis)
  for k, (label, color) in enumerate(rows):
    y = y0 + 12 + 18 * k
    draw.line([(x0 + 6, y), (x0 + 26, y)], fill=color, width=3)
    draw.text((x0 + 30, y), label, fill=(0, 0, 0), font=font, anchor='lm')

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path)
  return path


# -------------------------------------------------------------------------------------------- report

def write_report(runs, out, *, group_by: str = 'config', target_loss: float | None = None) -> dict:
  """Writes `out`/loss_curves.png, compare.md and compare.json; returns {'png', 'md', 'json', 'table',
  'seeds_table'}. Runs that `group_by` puts together (replicas of one config over seeds, by default) also
  get a table of means and 95% intervals over their seeds (`seeds_table`, None when every group is one run)."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  groups = seeds.group_runs(runs, group_by)
  grouped = any(len(g.runs) > 1 for g in groups)
  png = loss_curves_png(runs, out / 'loss_curves.png', groups=groups if grouped else None)
  table = markdown_table(runs)
  target = seeds.common_target_loss(runs) if target_loss is None else float(target_loss)
  rows = [seeds.summarize(g, target) for g in groups]
  seeds_table = seeds.markdown_groups(rows) if grouped else None
  notes = [f'- final loss: mean `{runs[0].loss_key}` of the last {FINAL_LOSS_WINDOW} logged steps.',
           '- GenEval overall: mean of the tag accuracies; 95% CI by a normal approximation over the per-tag '
           'binomials unless the eval file gives one.',
           '- fg/bg experts: mean experts per foreground token / per background token (`ecdit analyze`); '
           'n/a without an analysis (dense runs have no experts).']
  seed_section = [] if not grouped else [
      '## Over seeds', '', seeds_table, '',
      f'- runs grouped by {group_by} ({"config.json without seed and bookkeeping keys" if group_by == "config" else "label"}); '
      'each cell is the mean over a group\'s runs ± the half-width of its 95% Student-t interval over seeds '
      '(GenEval: [interval]; each seed\'s score carries its own image noise, so the spread covers both).',
      f'- steps to loss {target:.4f}: the first logged step whose smoothed loss (the plot\'s EMA) is at or '
      'below it; ' + ('given by --target_loss.' if target_loss is not None else
                      'the highest of the runs\' lowest smoothed losses, so every run reaches it.'),
      '- ms/step: 1000 / the last logged steady-state steps_per_sec (a run\'s own machine and load).', '']
  sources = [f'- {r.label}: `{r.workdir}`' + (f', eval `{r.eval["file"]}`' if r.eval else '') +
             (f', analysis `{r.fg_bg["file"]}`' if r.fg_bg else '') for r in runs]
  md = out / 'compare.md'
  md.write_text('\n'.join(['# Run comparison', '', table, '', '![training loss](loss_curves.png)', '',
                           *notes, '', *seed_section, 'Sources:', '', *sources, '']))
  js = out / 'compare.json'
  js.write_text(json.dumps(dict(to_json(runs), group_by=group_by, target_loss=target, groups=rows),
                           indent=1) + '\n')
  return {'png': png, 'md': md, 'json': js, 'table': table, 'seeds_table': seeds_table}
