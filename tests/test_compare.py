"""`ecdit compare` on hand-made workdirs: exact numbers, table cells, the overall CI, the PNG, the errors.

No model and no JAX: the workdirs hold only the files `ecdit train / eval / analyze` would have written.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ecdit.eval import compare
from cli_util import run_cli

FLOW = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]   # final loss = mean of the last 5 = 0.6
COUNTS = {'single_object': {'correct': 8, 'images': 10, 'prompts': 5},
          'position': {'correct': 5, 'images': 20, 'prompts': 10}}


def make_workdir(path, *, routing='expert_choice', name='shapes_small_ec', losses=FLOW, eval_=True,
                 ratio=1.25, torn=True):
  path.mkdir(parents=True)
  model = {'routing': routing, 'num_experts': 1 if routing == 'dense' else 8, 'capacity_factor': 1.0,
           'top_k': 1}
  (path / 'config.json').write_text(json.dumps({'name': name, 'model': model}))
  # `loss` (flow + balance loss) differs from `flow_loss`: the comparison must use flow_loss.
  lines = [json.dumps({'step': 50 * (i + 1), 'loss': v + 0.01, 'flow_loss': v}) for i, v in enumerate(losses)]
  (path / 'metrics.jsonl').write_text('\n'.join(lines) + ('\n{"step": 400, "lo' if torn else '\n'))   # torn last line
  if eval_:
    (path / 'eval').mkdir()
    tags = {t: c['correct'] / c['images'] for t, c in COUNTS.items()}
    result = {'overall': sum(tags.values()) / 2, 'tags': tags, 'counts': COUNTS, 'step': 350,
              'ci95': {t: [0.0, 1.0] for t in tags}}
    (path / 'eval' / 'step_0000350.json').write_text(json.dumps(result))
    (path / 'eval' / 'step_0000050.json').write_text(json.dumps(dict(result, overall=0.0, tags={})))  # older
    (path / 'eval' / 'ground_truth.json').write_text('{}')   # not a step: ignored
  if ratio is not None:
    (path / 'analysis' / 'step_0000350').mkdir(parents=True)
    fg_bg = {'fg_mean': 1.25 * ratio, 'bg_mean': 1.25, 'ratio': ratio, 'per_layer': {}}
    (path / 'analysis' / 'step_0000350' / 'analysis.json').write_text(json.dumps({'fg_bg': fg_bg}))
  return path


def table_rows(table: str) -> list[list[str]]:
  return [[c.strip() for c in line.strip('|').split('|')] for line in table.splitlines()]


def test_overall_interval_hand_computed():
  # p = 0.8 (n=10) and 0.25 (n=20): mean 0.525, var = (0.8·0.2/10 + 0.25·0.75/20) / 2² = 0.00634375
  lo, hi = compare.overall_interval(COUNTS)
  half = 1.959964 * math.sqrt(0.00634375)
  assert lo == pytest.approx(0.525 - half) and hi == pytest.approx(0.525 + half)
  assert (round(lo, 3), round(hi, 3)) == (0.369, 0.681)
  assert compare.overall_interval({'a': {'correct': 3, 'images': 3}}) == (1.0, 1.0)   # Wald collapses at 100%


def test_load_run_and_table_cells(tmp_path):
  ec = compare.load_run(make_workdir(tmp_path / 'ec'))
  dense = compare.load_run(make_workdir(tmp_path / 'dense', routing='dense', name='shapes_small_dense',
                                        eval_=False, ratio=None))
  tc = compare.load_run(make_workdir(tmp_path / 'tc', routing='token_choice', name='shapes_small_tc'), label='TC')
  assert ec.loss_key == 'flow_loss' and ec.steps == 350 and len(ec.curve) == 7
  assert ec.final_loss == pytest.approx(0.6, abs=1e-12)
  assert ec.eval['step'] == 350 and ec.eval['file'].endswith('step_0000350.json')
  assert ec.fg_bg['ratio'] == 1.25 and ec.fg_bg['step'] == 350
  assert dense.eval is None and dense.fg_bg is None

  rows = table_rows(compare.markdown_table([ec, dense, tc]))
  assert rows[0] == ['run', 'routing', 'steps', 'final loss', 'GenEval overall [95% CI]', 'single_object',
                     'position', 'fg/bg experts']
  assert rows[2] == ['shapes_small_ec', 'expert choice (8E, f=1)', '350', '0.6000', '52.5% [36.9, 68.1]',
                     '80.0%', '25.0%', '1.250']
  assert rows[3] == ['shapes_small_dense', 'dense', '350', '0.6000', 'n/a', 'n/a', 'n/a', 'n/a']
  assert rows[4][:2] == ['TC', 'token choice (8E, top-1)']

  js = compare.to_json([ec, dense])
  assert js['runs'][0]['eval']['overall_ci95'] == pytest.approx([0.525 - 1.959964 * math.sqrt(0.00634375),
                                                                 0.525 + 1.959964 * math.sqrt(0.00634375)])
  assert js['runs'][1]['fg_bg'] is None and js['runs'][1]['final_loss'] == pytest.approx(0.6)


def test_analysis_without_fg_bg_is_na(tmp_path):
  wd = make_workdir(tmp_path / 'ec', ratio=None)
  (wd / 'analysis' / 'step_0000350').mkdir(parents=True)
  (wd / 'analysis' / 'step_0000350' / 'analysis.json').write_text('{"fg_bg": null}')   # --scenes=0
  run = compare.load_run(wd)
  assert run.fg_bg is None and table_rows(compare.markdown_table([run]))[2][-1] == 'n/a'


def test_loss_png_size_and_colours(tmp_path):
  runs = [compare.load_run(make_workdir(tmp_path / 'ec')),
          compare.load_run(make_workdir(tmp_path / 'tc', routing='token_choice', name='tc',
                                        losses=[2.0, 1.5, 1.1, 0.9, 0.8, 0.75, 0.7]))]
  png = compare.loss_curves_png(runs, tmp_path / 'out' / 'loss.png')
  img = np.asarray(Image.open(png).convert('RGB'))
  assert img.shape == (560, 900, 3)
  colours = {tuple(c) for c in img.reshape(-1, 3)}
  assert compare.PALETTE[0] in colours and compare.PALETTE[1] in colours   # both runs' lines drawn
  assert len(colours) > 20


def test_log_ticks_cover_a_narrow_range():
  assert compare.log_ticks(0.05, 2.0) == pytest.approx([0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
  assert compare.log_ticks(0.31, 0.75) == pytest.approx([0.4, 0.5, 0.6, 0.7])


def test_command_end_to_end(tmp_path):
  a = make_workdir(tmp_path / 'a', routing='dense', name='shapes_small_dense', eval_=False, ratio=None)
  b = make_workdir(tmp_path / 'b')
  out = tmp_path / 'cmp'
  r = run_cli('compare', f'--workdirs={a},{b}', f'--out={out}', timeout=60)
  assert r.returncode == 0, r.stderr
  assert '| shapes_small_ec | expert choice (8E, f=1) | 350 | 0.6000 | 52.5% [36.9, 68.1]' in r.stdout
  for f in ('loss_curves.png', 'compare.md', 'compare.json'):
    assert (out / f).is_file()
  assert [x['label'] for x in json.loads((out / 'compare.json').read_text())['runs']] == [
      'shapes_small_dense', 'shapes_small_ec']
  # Its own earlier output is replaced; a folder it did not write, or a run's workdir, is refused before reading.
  assert run_cli('compare', f'--workdirs={a}', f'--out={out}', timeout=60).returncode == 0
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'compare.md').write_text('my notes')
  for bad, message in ((tmp_path / 'mine', 'exists and was not written by this command'),
                       (b, f'--out={b} exists and was not written by this command')):   # a workdir
    r = run_cli('compare', f'--workdirs={a}', f'--out={bad}', timeout=60)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count('\n') == 1, r.stderr
  assert (tmp_path / 'mine' / 'compare.md').read_text() == 'my notes' and not (b / 'compare.md').exists()


def test_command_errors(tmp_path):
  good = make_workdir(tmp_path / 'good', torn=False)   # no torn-line warning: stderr is the error line alone
  (tmp_path / 'empty').mkdir()
  cases = [((f'--workdirs={good},{tmp_path / "nope"}',), f'workdir {tmp_path / "nope"} does not exist'),
           ((f'--workdirs={good},{tmp_path / "empty"}',), 'has no metrics.jsonl'),
           ((f'--workdirs={good}', '--labels=a,b'), '--labels has 2 name(s) but --workdirs has 1')]
  for args, message in cases:
    r = run_cli('compare', *args, f'--out={tmp_path / "out"}', timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr


def test_read_curve_skips_null_losses(tmp_path):
  # metrics.jsonl writes a skipped step's non-finite loss as null (ecdit.train.metrics): not a curve point.
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "flow_loss": 0.5}\n{"step": 2, "flow_loss": null}\n{"step": 3, "flow_loss": 0.25}\n')
  assert compare.read_curve(path) == ('flow_loss', [(1, 0.5), (3, 0.25)])


def test_torn_last_line_skipped_with_a_warning(tmp_path, capsys):
  wd = make_workdir(tmp_path / 'ec')
  assert compare.load_run(wd).steps == 350
  assert capsys.readouterr().err == (f'warning: {wd / "metrics.jsonl"} line 8: torn last line skipped '
                                     '(a run killed mid-write?)\n')


GOOD_LINE = '{"step": 1, "flow_loss": 0.5}'


@pytest.mark.parametrize('file, text, message', [
    ('metrics.jsonl', f'5\n{GOOD_LINE}\n',
     'metrics.jsonl line 1: expected a JSON object with an integer "step", got 5'),
    ('metrics.jsonl', f'{GOOD_LINE}\n{{"step": "x"}}\n', 'metrics.jsonl line 2: expected an integer "step", got "x"'),
    ('metrics.jsonl', f'"step"\n{GOOD_LINE}\n', 'metrics.jsonl line 1: expected a JSON object'),
    ('metrics.jsonl', f'{{"step": 1, "lo\n{GOOD_LINE}\n', 'metrics.jsonl line 1: not valid JSON'),   # torn, not last
    ('metrics.jsonl', f'{GOOD_LINE}\n{{"step": 2, "flow_loss": "low"}}\n',
     'metrics.jsonl line 2: expected "flow_loss" to be a number or null, got "low"'),
    ('config.json', '[1, 2]', 'config.json: expected a JSON object, got list [1, 2]'),
    ('config.json', '{"name": "a", "mod', 'config.json: unreadable JSON'),
    ('config.json', '{"model": {"num_experts": "x"}}', 'expected "model.num_experts" to be a non-negative integer'),
    ('config.json', '{"model": 3}', 'expected "model" to be an object, got 3'),
    ('eval/step_0000350.json', '[]', 'step_0000350.json: expected a JSON object, got list []'),
    ('eval/step_0000350.json', '{"tags": {}}', 'step_0000350.json: expected "overall" to be a number, got null'),
    ('eval/step_0000350.json', '{"overall": 0.5, "counts": {"position": {"correct": 1}}}',
     'expected "counts.position" to be an object with integer "correct" and "images"'),
    ('analysis/step_0000350/analysis.json', '{"fg_bg": [1]}', 'expected "fg_bg" to be an object or null'),
])
def test_damaged_files_are_one_compare_error(tmp_path, file, text, message):
  wd = make_workdir(tmp_path / 'ec', torn=False)
  (wd / file).write_text(text)
  with pytest.raises(compare.CompareError) as e:
    compare.load_run(wd)
  assert message in str(e.value) and str(wd / file.split('/')[0]) in str(e.value) and '\n' not in str(e.value)


def test_damaged_metrics_is_one_line_from_the_command(tmp_path):
  good, bad = make_workdir(tmp_path / 'good', torn=False), make_workdir(tmp_path / 'bad', torn=False)
  (bad / 'metrics.jsonl').write_text(f'{GOOD_LINE}\n5\n{GOOD_LINE}\n')
  r = run_cli('compare', f'--workdirs={good},{bad}', f'--out={tmp_path / "out"}', timeout=60)
  assert r.returncode == 2 and r.stderr == (
      f'ecdit: error: {bad / "metrics.jsonl"} line 2: expected a JSON object with an integer "step", got 5\n'), r.stderr
