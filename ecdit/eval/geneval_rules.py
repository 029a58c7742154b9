"""GenEval's metadata records and its per-image rules, applied to our detections.

A record (one JSON object per line, DESIGN.md §3)::

  {"tag": "position", "prompt": "a square to the left of a circle",
   "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]}

`{"position": [rel, k]}` says *this* entry's object is `rel` of the objects matched for `include[k]`
(GenEval's convention; the prompt names the positioned object first). Optional `exclude` entries
`{"class", "count"}` fail the image when at least `count` objects of that class are found.

The rules follow GenEval's `evaluate` (geneval/evaluation/evaluate_images.py):
- each include entry takes the first `count` detections of its class (ours are ordered by fit score, as
  GenEval's by detector confidence); fewer than `count` fails;
- `color`: all of those must have the colour (GenEval classifies the crop's colour with CLIP; we use the
  colour the detector segmented);
- `position`: every taken object must stand in the relation to every object taken for the target entry,
  by GenEval's `relative_position` on box centres with a 0.1 × (sum of box sizes) dead zone;
- `counting` asks for an exact count: GenEval writes `exclude: [{class, count + 1}]` for it; a counting
  record without `exclude` gets that implicit one here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ecdit.data import shapes

RELATIONS = ('left of', 'right of', 'above', 'below')
POSITION_THRESHOLD = 0.1   # GenEval's dead zone, as a fraction of the two boxes' summed extent


def _check_entry(e: Any, where: str, index: int, kind: str, previous: int) -> None:
  if not isinstance(e, dict):
    raise ValueError(f'{where}: {kind}[{index}] must be an object, got {e!r}')
  cls = e.get('class')
  if cls not in shapes.CLASSES:
    raise ValueError(f'{where}: {kind}[{index}] has unknown class {cls!r}; expected one of {shapes.CLASSES}')
  count = e.get('count', 1)
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f'{where}: {kind}[{index}] count={count!r}; expected an integer >= 1')
  if kind == 'exclude':
    return
  if 'color' in e and e['color'] not in shapes.COLORS:
    raise ValueError(f'{where}: include[{index}] has unknown color {e["color"]!r}; '
                     f'expected one of {shapes.COLOR_NAMES}')
  if 'position' in e:
    pos = e['position']
    if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
        or isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < previous):
      raise ValueError(f'{where}: include[{index}] position={pos!r}; expected [relation, k] with relation in '
                       f'{RELATIONS} and k the index of an earlier include entry (0..{previous - 1})')


def validate_record(rec: Any, where: str = 'record') -> dict:
  """Checks one record; raises ValueError naming `where` (e.g. 'prompts.jsonl line 3') and the field."""
  if not isinstance(rec, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(rec).__name__}')
  tag = rec.get('tag')
  if tag not in shapes.TAGS:
    raise ValueError(f'{where}: unknown tag {tag!r}; expected one of {shapes.TAGS}')
  if not isinstance(rec.get('prompt'), str) or not rec['prompt'].strip():
    raise ValueError(f'{where}: missing or empty "prompt"')
  include = rec.get('include')
  if not isinstance(include, list) or not include:
    raise ValueError(f'{where}: "include" must be a non-empty list of {{class, count, ...}} entries')
  for i, e in enumerate(include):
    _check_entry(e, where, i, 'include', i)
  if tag in ('colors', 'color_attr') and not all('color' in e for e in include):
    raise ValueError(f'{where}: a {tag!r} record needs a "color" on every include entry')
  if tag == 'position' and not any('position' in e for e in include):
    raise ValueError(f'{where}: a "position" record needs an include entry with "position": [relation, k]')
  exclude = rec.get('exclude', [])
  if not isinstance(exclude, list):
    raise ValueError(f'{where}: "exclude" must be a list')
  for i, e in enumerate(exclude):
    _check_entry(e, where, i, 'exclude', 0)
  return rec


def read_records(path: str | Path) -> list[dict]:
  """Reads a GenEval metadata JSONL file; blank lines are skipped, any bad line is a ValueError naming it."""
  path = Path(path)
  if path.is_dir():
    raise ValueError(f'prompts file {path} is a directory: expected a GenEval metadata JSONL file')
  if not path.is_file():
    raise ValueError(f'prompts file {path} does not exist')
  records = []
  for n, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    where = f'{path} line {n}'
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None
    records.append(validate_record(rec, where))
  if not records:
    raise ValueError(f'prompts file {path} holds no records')
  return records


def box_center_dims(bbox: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  x0, y0, x1, y1 = (float(v) for v in bbox)
  return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), np.array([x1 - x0, y1 - y0])


def relative_position(bbox_a: Sequence[float], bbox_b: Sequence[float]) -> set[str]:
  """The relations of box A to box B (GenEval's rule): the centre offset, shrunk on each axis by
  0.1 × (A's + B's extent) toward zero, normalised by the offset's length; > 0.5 on an axis names it."""
  ca, da = box_center_dims(bbox_a)
  cb, db = box_center_dims(bbox_b)
  offset = ca - cb
  revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (da + db), 0.0) * np.sign(offset)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(offset)
  rels = set()
  if dx < -0.5:
    rels.add('left of')
  if dx > 0.5:
    rels.add('right of')
  if dy < -0.5:
    rels.add('above')
  if dy > 0.5:
    rels.add('below')
  return rels


def evaluate(detections: Iterable, record: dict) -> tuple[bool, list[str]]:
  """(correct, reasons) for one image's detections (best first; each has .cls, .color, .bbox)."""
  by_class: dict[str, list] = {}
  for d in detections:
    by_class.setdefault(d.cls, []).append(d)
  correct, reasons, groups = True, [], []
  for req in record['include']:
    cls, count = req['class'], req.get('count', 1)
    found = by_class.get(cls, [])[:count]
    matched = True
    if len(found) < count:
      matched = False
      reasons.append(f'expected {cls}>={count}, found {len(found)}')
    else:
      if 'color' in req:
        colors = [d.color for d in found]
        if colors.count(req['color']) < count:
          matched = False
          reasons.append(f'expected {req["color"]} {cls}>={count}, found {colors}')
      if 'position' in req and matched:
        rel, target = req['position']
        if groups[target] is None:
          matched = False
          reasons.append(f'no target for {cls} to be {rel}')
        else:
          for d in found:
            for t in groups[target]:
              actual = relative_position(d.bbox, t.bbox)
              if rel not in actual:
                matched = False
                reasons.append(f'expected {cls} {rel} target {t.cls}, found {sorted(actual) or "none"}')
                break
            if not matched:
              break
    correct &= matched
    groups.append(found if matched else None)
  exclude = record.get('exclude')
  if exclude is None and record['tag'] == 'counting':
    exclude = [{'class': r['class'], 'count': r.get('count', 1) + 1} for r in record['include']]
  for req in exclude or []:
    n = len(by_class.get(req['class'], []))
    if n >= req['count']:
      correct = False
      reasons.append(f'expected {req["class"]}<{req["count"]}, found {n}')
  return correct, reasons
