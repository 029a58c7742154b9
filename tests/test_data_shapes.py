"""The shapes world: determinism, caption grammar, and captions checked against the pixels."""
import json
import re

import numpy as np
import pytest
from scipy import ndimage

from ecdit.data import shapes as S

_BG = np.asarray(S.BACKGROUND, np.float32)
_PAL = np.asarray([S.COLORS[c] for c in S.COLOR_NAMES], np.float32)


def find_objects(img):
  """Objects seen in an image, from pixels only: colour, class, centroid (pixels), pixel count.

  Each pixel is explained as background blended with one palette colour (the one whose blend line is
  nearest); pixels at least half covered form 8-connected components, one per object. Class from shape:
  squares fill their bounding box; triangles have far less area in their top half than their bottom half.
  """
  x = img.astype(np.float32) - _BG
  d = _PAL - _BG
  alpha = np.einsum('hwc,kc->hwk', x, d) / np.sum(d * d, -1)
  resid = np.linalg.norm(x[:, :, None, :] - alpha[..., None] * d, axis=-1)
  k = np.argmin(np.where(alpha > 0.05, resid, np.inf), -1)
  a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
  found = []
  for ki, name in enumerate(S.COLOR_NAMES):
    labels, n = ndimage.label((k == ki) & (a >= 0.5), structure=np.ones((3, 3)))
    for j in range(1, n + 1):
      ys, xs = np.nonzero(labels == j)
      fill = len(ys) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
      mid = (ys.min() + ys.max()) / 2
      top_bottom = (ys < mid).sum() / max(1, (ys > mid).sum())
      cls = 'square' if fill >= 0.97 else ('triangle' if top_bottom < 0.58 else 'circle')
      found.append({'color': name, 'class': cls, 'cx': xs.mean(), 'cy': ys.mean(), 'area': len(ys)})
  return found


def relation_holds(a, b, relation):
  """Is object a `relation` of object b, judged from centroids (the dominant axis decides)?"""
  dx, dy = a['cx'] - b['cx'], a['cy'] - b['cy']
  return {'left of': dx < 0 and abs(dx) > abs(dy), 'right of': dx > 0 and abs(dx) > abs(dy),
          'above': dy < 0 and abs(dy) > abs(dx), 'below': dy > 0 and abs(dy) > abs(dx)}[relation]


def check_against_pixels(img, metadata):
  """Asserts the GenEval record is true of the image: counts, classes, colours, relative positions."""
  found = find_objects(img)
  include = metadata['include']
  assert len(found) == sum(e['count'] for e in include), (metadata['prompt'], found)
  matched = []
  for entry in include:
    group = [f for f in found if f['class'] == entry['class']]
    assert len(group) == entry['count'], (metadata['prompt'], entry, found)
    if 'color' in entry:
      assert all(f['color'] == entry['color'] for f in group), (metadata['prompt'], group)
    matched.append(group)
  for entry, group in zip(include, matched):
    if 'position' in entry:
      relation, target = entry['position']
      for obj in group:
        for other in matched[target]:
          assert relation_holds(obj, other, relation), (metadata['prompt'], obj, other)


def test_rendering_is_deterministic_and_seeded():
  a = [S.split_example(3, 'train', i) for i in range(12)]
  b = [S.split_example(3, 'train', i) for i in range(11, -1, -1)][::-1]   # order of making doesn't matter
  for x, y in zip(a, b):
    assert x == y
    assert np.array_equal(S.render_scene(x.scene, 32), S.render_scene(y.scene, 32))
  other = [S.split_example(4, 'train', i) for i in range(12)]
  assert [e.scene for e in other] != [e.scene for e in a]


def test_render_sizes_and_antialiasing():
  ex = S.split_example(0, 'train', 2)
  for size in (32, 64):
    img = S.render_scene(ex.scene, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(colours) > len(ex.scene.objects) + 1   # blended edge pixels, not just flat colours
  with pytest.raises(ValueError, match='image_size'):
    S.render_scene(ex.scene, 4)


def test_grammar_covers_all_six_tags():
  patterns = {
      'single_object': r'^a (circle|square|triangle)$',
      'two_object': r'^a (\w+) and a (\w+)$',
      'counting': r'^(two|three|four) (circles|squares|triangles)$',
      'colors': r'^an? (red|orange|yellow|green|blue|purple) (circle|square|triangle)$',
      'position': r'^a \w+ (to the left of|to the right of|above|below) a \w+$',
      'color_attr': r'^an? \w+ \w+ and an? \w+ \w+$',
  }
  seen = set()
  for i in range(60):
    ex = S.split_example(0, 'train', i)
    seen.add(ex.tag)
    assert re.match(patterns[ex.tag], ex.caption), ex.caption
    assert ex.metadata['prompt'] == ex.caption
  assert seen == set(S.TAGS)
  with pytest.raises(ValueError, match='unknown tag'):
    S.sample_example(np.random.default_rng(0), 'texture')


@pytest.mark.parametrize('size', [32, 64])
def test_metadata_agrees_with_pixels(size):
  n = 150 if size == 32 else 36
  for i in range(n):
    ex = S.split_example(7, 'train', i)
    check_against_pixels(S.render_scene(ex.scene, size), ex.metadata)
  for i in range(24):   # eval prompts, including held-out colour–class pairs
    ex = S.split_example(7, 'eval_prompts', i)
    check_against_pixels(S.render_scene(ex.scene, size), ex.metadata)


def test_position_record_follows_geneval_convention():
  ex = next(e for e in (S.split_example(0, 'train', i) for i in range(4, 200, 6)))
  assert ex.tag == 'position'
  anchor, positioned = ex.metadata['include']
  relation, target = positioned['position']
  assert target == 0
  assert ex.caption == f'a {positioned["class"]} {S.RELATION_PHRASES[relation]} a {anchor["class"]}'


def test_held_out_pairs_only_in_eval_prompts():
  for split in ('train', 'validation'):
    for i in range(300):
      ex = S.split_example(0, split, i)
      assert not any((o.cls, o.color) in S.HELD_OUT for o in ex.scene.objects), (split, i)
      assert not ex.metadata['held_out']
  records = S.eval_prompt_records(120, seed=0)
  held = [r for r in records if r['held_out']]
  assert held and all(r['tag'] in ('colors', 'color_attr') for r in held)
  named = {(e['class'], e['color']) for r in held for e in r['include'] if 'color' in e}
  assert named & S.HELD_OUT == S.HELD_OUT   # every held-out pair is asked for
  assert any(not r['held_out'] for r in records if r['tag'] == 'colors')   # and in-distribution ones too


def test_eval_prompt_records_are_geneval_jsonl(tmp_path):
  path = tmp_path / 'prompts.jsonl'
  S.write_eval_prompts(path, 12, seed=1)
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  assert lines == S.eval_prompt_records(12, seed=1)
  assert {l['tag'] for l in lines} == set(S.TAGS)
  for rec in lines:
    assert set(rec) >= {'tag', 'include', 'prompt'}
    for entry in rec['include']:
      assert entry['class'] in S.CLASSES and entry['count'] >= 1
      assert set(entry) <= {'class', 'count', 'color', 'position'}


def test_object_masks_and_scene_json():
  ex = S.split_example(0, 'train', 8)   # counting: several objects
  masks = S.object_masks(ex.scene, 32)
  img = S.render_scene(ex.scene, 32)
  assert masks.shape == (len(ex.scene.objects), 32, 32)
  assert masks.sum(0).max() == 1   # disjoint
  for obj, mask in zip(ex.scene.objects, masks):
    assert mask.any()
    assert np.abs(img[mask].astype(int) - S.COLORS[obj.color]).max() < 100
    x0, y0, x1, y1 = obj.pixel_bbox(32)
    ys, xs = np.nonzero(mask)
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
  assert S.Scene.from_json(ex.scene.to_json()) == ex.scene
