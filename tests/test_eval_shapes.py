"""The GenEval-style scorer: detector on hand-made scenes, rules on right and wrong renders, bad records."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ecdit import outputs
from ecdit.data import shapes
from ecdit.eval import detect, geneval_rules, shapes_eval

Obj = shapes.ShapeObject


def _detect_scene(objs, size):
  return detect.detect(shapes.render_scene(shapes.Scene(tuple(objs)), size))


def _match(dets, obj, size):
  return min(dets, key=lambda d: (d.center[0] - obj.cx * size) ** 2 + (d.center[1] - obj.cy * size) ** 2)


HAND_MADE = [
    Obj('circle', 'red', 0.2, 0.2, 0.12),
    Obj('square', 'blue', 0.75, 0.22, 0.13),
    Obj('triangle', 'green', 0.22, 0.75, 0.14),
    Obj('square', 'orange', 0.68, 0.72, 0.12),
    Obj('circle', 'purple', 0.82, 0.84, 0.1),     # overlaps the orange square (drawn on top of it)
    Obj('triangle', 'yellow', 0.5, 0.47, 0.1),
]


@pytest.mark.parametrize('size', [32, 64])
def test_detector_exact_on_hand_made_scene(size):
  dets = _detect_scene(HAND_MADE, size)
  assert len(dets) == len(HAND_MADE), [d.to_dict() for d in dets]
  assert sorted((d.cls, d.color) for d in dets) == sorted((o.cls, o.color) for o in HAND_MADE)
  for o in HAND_MADE:
    d = _match(dets, o, size)
    assert (d.cls, d.color) == (o.cls, o.color)
    if o.color in ('orange', 'purple'):
      continue   # occluded pair: boxes are cut where they overlap
    assert np.max(np.abs(np.subtract(d.bbox, o.pixel_bbox(size)))) <= 1, (o, d)


@pytest.mark.parametrize('size', [32, 64])
def test_detector_on_dataset_scenes(size):
  """Every object of 120 training scenes: class, colour and box (within 1 px) recovered from pixels."""
  for i in range(120):
    ex = shapes.sample_example(shapes.example_rng(11, 'train', i), shapes.TAGS[i % 6], held_out='allow')
    dets = detect.detect(shapes.render_scene(ex.scene, size))
    assert len(dets) == len(ex.scene.objects), (i, ex.caption)
    for o in ex.scene.objects:
      d = _match(dets, o, size)
      assert (d.cls, d.color) == (o.cls, o.color), (i, o, d)
      assert np.max(np.abs(np.subtract(d.bbox, o.pixel_bbox(size)))) <= 1, (i, o, d)


def test_detector_empty_noise_and_same_colour_limitation():
  blank = shapes.render_scene(shapes.Scene(()), 32)
  assert detect.detect(blank) == []
  rng = np.random.default_rng(0)
  noisy = np.clip(shapes.render_scene(shapes.Scene(tuple(HAND_MADE)), 64) + rng.normal(0, 8, (64, 64, 3)),
                  0, 255).astype(np.uint8)
  assert sorted((d.cls, d.color) for d in detect.detect(noisy)) == sorted((o.cls, o.color) for o in HAND_MADE)
  # Documented limitation: two touching objects of the same colour are one component.
  touching = [Obj('square', 'red', 0.3, 0.5, 0.15), Obj('square', 'red', 0.6, 0.5, 0.15)]
  assert len(_detect_scene(touching, 32)) == 1
  with pytest.raises(ValueError, match='square RGB image'):
    detect.detect(np.zeros((32, 48, 3), np.uint8))


def test_relative_position_follows_geneval():
  a, b = (0, 10, 8, 18), (20, 10, 28, 18)         # a left of b, same row
  assert geneval_rules.relative_position(a, b) == {'left of'}
  assert geneval_rules.relative_position(b, a) == {'right of'}
  assert geneval_rules.relative_position((0, 0, 8, 8), (20, 20, 28, 28)) == {'left of', 'above'}
  assert geneval_rules.relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()   # inside the dead zone
  # Hand-computed with 2×2 boxes (each axis shrinks by 0.1·(2 + 2) = 0.4, then / |offset|, > 0.5 names it):
  box = lambda x, y: (x, y, x + 2, y + 2)   # noqa: E731
  rel = geneval_rules.relative_position
  assert rel(box(0.7, 0), box(0, 0)) == set()                  # (0.7 − 0.4) / 0.7 = 0.43
  assert rel(box(0.9, 0), box(0, 0)) == {'right of'}           # (0.9 − 0.4) / 0.9 = 0.56
  assert rel(box(-0.9, 0), box(0, 0)) == {'left of'}
  assert rel(box(0, -10), box(0, 0)) == {'above'}              # straight up: no side at all
  assert rel(box(-3, -10), box(0, 0)) == {'above'}             # dx = −2.6 / √109 = −0.25
  assert rel(box(-10, -10), box(0, 0)) == {'left of', 'above'}   # −9.6 / √200 = −0.68 on both
  assert rel(box(0, 10), box(0, 0)) == {'below'}


@pytest.mark.parametrize('size', [32, 64])
def test_ground_truth_scores_at_least_99_percent_per_tag(size):
  records = shapes.eval_prompt_records(360, seed=17)   # 60 per tag; each scene from its own seed
  images = [shapes.render_scene(shapes_eval.scene_from_record(r, np.random.default_rng([size, i]), size), size)
            for i, r in enumerate(records)]
  res = shapes_eval.score_images(records, [im[None] for im in images])
  assert set(res['tags']) == set(shapes.TAGS)
  assert all(res['counts'][t]['images'] >= 60 for t in shapes.TAGS)
  assert all(acc >= 0.99 for acc in res['tags'].values()), res['tags']
  assert res['overall'] == pytest.approx(np.mean(list(res['tags'].values())))


def test_dataset_renders_score_against_their_own_records():
  """The generator's own scenes (and the record's position convention) pass the rules."""
  for i in range(120):
    ex = shapes.sample_example(shapes.example_rng(5, 'validation', i), shapes.TAGS[i % 6])
    ok, why = geneval_rules.evaluate(detect.detect(shapes.render_scene(ex.scene, 32)), ex.metadata)
    assert ok, (ex.caption, why)


# ---------------------------------------------------------------------------------- deliberately wrong

def _swap_positions(objs):
  a, b = objs
  return [dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy)]


def _swap_colors(objs):
  a, b = objs
  return [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)]


def _recolor(objs):
  (o,) = objs
  return [dataclasses.replace(o, color=[c for c in shapes.COLOR_NAMES if c != o.color][0])]


def _reclass(objs):
  (o,) = objs
  return [dataclasses.replace(o, cls=[c for c in shapes.CLASSES if c != o.cls][0])]


def _extra(record, rng):
  more = json.loads(json.dumps(record))
  more['include'][0]['count'] += 1
  return list(shapes_eval.scene_from_record(more, rng, 32).objects)


MUTATIONS = {   # tag -> (mutation, text the failure reason must contain)
    'single_object': (lambda objs, r, rng: _reclass(objs), 'found 0'),
    'two_object': (lambda objs, r, rng: objs[:1], 'found 0'),          # a missing object
    'counting': (lambda objs, r, rng: objs[1:], 'found'),             # one too few
    'colors': (lambda objs, r, rng: _recolor(objs), 'expected'),
    'position': (lambda objs, r, rng: _swap_positions(objs), 'expected'),
    'color_attr': (lambda objs, r, rng: _swap_colors(objs), 'expected'),
}


@pytest.mark.parametrize('tag', shapes.TAGS)
def test_wrong_renders_fail_their_tag(tag):
  mutate, needle = MUTATIONS[tag]
  records = [r for r in shapes.eval_prompt_records(180, seed=3) if r['tag'] == tag]
  for i, rec in enumerate(records):
    rng = np.random.default_rng(i)
    objs = list(shapes_eval.scene_from_record(rec, rng, 32).objects)
    good, _ = geneval_rules.evaluate(_detect_scene(objs, 32), rec)
    bad, why = geneval_rules.evaluate(_detect_scene(mutate(objs, rec, rng), 32), rec)
    assert good and not bad, (rec['prompt'], why)
    assert any(needle in w for w in why), why


def test_record_scenes_follow_the_dataset_placement(monkeypatch):
  """scene_from_record places by the dataset's own rules: widening shapes.GAP / MARGIN widens its scenes."""
  monkeypatch.setattr(shapes, 'GAP', 0.3)
  monkeypatch.setattr(shapes, 'MARGIN', 0.1)
  rec = {'tag': 'position', 'prompt': 'a square to the left of a circle',
         'include': [{'class': 'circle', 'count': 1}, {'class': 'square', 'count': 1, 'position': ['left of', 0]}]}
  two = {'tag': 'two_object', 'prompt': 'a circle and a square',
         'include': [{'class': 'circle', 'count': 1}, {'class': 'square', 'count': 1}]}
  for i in range(20):
    for r in (rec, two):
      a, b = shapes_eval.scene_from_record(r, np.random.default_rng(i), 32).objects
      gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - a.size - b.size
      assert gap >= 0.3 - 1e-12, (r['prompt'], a, b)
      for o in (a, b):
        assert min(o.cx, o.cy, 1 - o.cx, 1 - o.cy) - o.size >= 0.1 - 1e-12, o
    sq, ci = sorted(shapes_eval.scene_from_record(rec, np.random.default_rng(i), 32).objects,
                    key=lambda o: o.cls != 'square')
    assert ci.cx - sq.cx >= sq.size + ci.size + 0.3 - 1e-12


def test_counting_is_exact_and_extra_objects_fail():
  rec = {'tag': 'counting', 'prompt': 'two circles', 'include': [{'class': 'circle', 'count': 2}]}
  ok, why = geneval_rules.evaluate(_detect_scene(_extra(rec, np.random.default_rng(0)), 32), rec)
  assert not ok and 'circle<3' in why[0]
  # Colour of a two_object record is free, but the classes are not interchangeable.
  rec2 = {'tag': 'two_object', 'prompt': 'a circle and a square',
          'include': [{'class': 'circle', 'count': 1}, {'class': 'square', 'count': 1}]}
  ok, _ = geneval_rules.evaluate(_detect_scene([Obj('circle', 'red', .25, .5, .15),
                                                Obj('triangle', 'red', .75, .5, .15)], 32), rec2)
  assert not ok


def test_run_eval_writes_json_and_failure_grid(tmp_path):
  records = shapes.eval_prompt_records(12, seed=1)
  blank = lambda prompts, seed: np.full((len(prompts), 32, 32, 3), shapes.BACKGROUND, np.uint8)
  res = shapes_eval.run_eval(records, blank, images_per_prompt=2, out=tmp_path / 'r.json',
                             failures_png=tmp_path / 'f.png', verbose=False)
  saved = json.loads((tmp_path / 'r.json').read_text())
  assert saved['overall'] == 0.0 and set(saved['tags']) == set(shapes.TAGS)
  assert len(saved['records']) == 12 and len(saved['records'][0]['correct']) == 2
  assert (tmp_path / 'f.png').stat().st_size > 0
  assert outputs.png_from_ecdit(tmp_path / 'f.png')   # ecdit's own: `ecdit eval` rerun with this --out replaces it
  with pytest.raises(ValueError, match='uint8'):
    shapes_eval.run_eval(records, lambda p, s: np.zeros((len(p), 32, 32, 3)), verbose=False)


# ------------------------------------------------------------------------------------------- bad input

GOOD = {'tag': 'colors', 'prompt': 'a red circle', 'include': [{'class': 'circle', 'count': 1, 'color': 'red'}]}


@pytest.mark.parametrize('line,needle', [
    ('{"tag": "colors", ', 'not valid JSON'),
    ('[1, 2]', 'JSON object'),
    (json.dumps(dict(GOOD, tag='shape_count')), "unknown tag 'shape_count'"),
    (json.dumps(dict(GOOD, include=[{'class': 'clock', 'count': 1, 'color': 'red'}])), "unknown class 'clock'"),
    (json.dumps(dict(GOOD, include=[{'class': 'circle', 'count': 1, 'color': 'pink'}])), "unknown color 'pink'"),
    (json.dumps(dict(GOOD, include=[{'class': 'circle', 'count': 0, 'color': 'red'}])), 'count=0'),
    (json.dumps(dict(GOOD, include=[])), 'include'),
    (json.dumps({k: v for k, v in GOOD.items() if k != 'prompt'}), 'prompt'),
    (json.dumps({'tag': 'position', 'prompt': 'p', 'include': [
        {'class': 'circle', 'count': 1}, {'class': 'square', 'count': 1, 'position': ['near', 0]}]}), 'position='),
    (json.dumps({'tag': 'position', 'prompt': 'p', 'include': [
        {'class': 'circle', 'count': 1, 'position': ['above', 0]}]}), 'position='),
])
def test_malformed_lines_name_the_line(tmp_path, line, needle):
  path = tmp_path / 'p.jsonl'
  path.write_text(json.dumps(GOOD) + '\n\n' + line + '\n')
  with pytest.raises(ValueError, match='line 3') as e:
    geneval_rules.read_records(path)
  assert needle in str(e.value)


def test_missing_or_empty_files_and_workdirs(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    geneval_rules.read_records(tmp_path / 'nope.jsonl')
  with pytest.raises(ValueError, match=f'^prompts file {tmp_path} is a directory: expected a GenEval metadata JSONL'):
    geneval_rules.read_records(tmp_path)
  (tmp_path / 'empty.jsonl').write_text('\n')
  with pytest.raises(ValueError, match='no records'):
    geneval_rules.read_records(tmp_path / 'empty.jsonl')
  with pytest.raises(ValueError, match='does not exist'):
    shapes_eval.model_generator(tmp_path / 'no_run')
  with pytest.raises(ValueError, match='config.json'):
    shapes_eval.model_generator(tmp_path)
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match='no checkpoint'):
    shapes_eval.model_generator(tmp_path)
  # Four objects in a left-to-right chain do not fit at the least object size: a clear error, not a hang.
  chain = [{'class': 'circle', 'count': 1}] + [
      {'class': c, 'count': 1, 'position': ['left of', k]} for k, c in enumerate(['square', 'triangle', 'circle'])]
  with pytest.raises(ValueError, match='cannot place'):
    shapes_eval.scene_from_record({'tag': 'position', 'prompt': 'p', 'include': chain}, np.random.default_rng(0))
