"""The shapes world: procedural scenes of coloured shapes with compositional captions.

A scene holds 1–4 objects (class, colour, centre, size) on a plain light-grey background. Coordinates are
normalised to [0, 1] (x to the right, y downwards), so one scene renders at any resolution (32×32 default,
64×64 works the same). Rendering is anti-aliased analytically: each pixel's coverage comes from the signed
distance of its centre to the shape's edge.

Every example is one of GenEval's six tags and carries a GenEval metadata record (DESIGN.md §3)::

  single_object  "a circle"                          include [{class, count: 1}]
  two_object     "a circle and a square"             include [{class A, count 1}, {class B, count 1}]
  counting       "three triangles"                   include [{class, count: 2..4}]
  colors         "a blue square"                     include [{class, count 1, color}]
  position       "a square to the left of a circle"  include [{circle, 1}, {square, 1, position: ["left of", 0]}]
  color_attr     "a red circle and a green square"   include [{circle, 1, red}, {square, 1, green}]

Position follows GenEval's convention: an entry `{"position": [rel, k]}` says *this* object is `rel` of the
object described by `include[k]`; the prompt names the positioned object first ("a square to the left of a
circle" puts the square in include[1] with ["left of", 0]). Scenes contain exactly the objects the caption
mentions, so every caption is a complete description of its image (uncounted colours are free).

Held-out combinations: the (class, colour) pairs in `HELD_OUT` never occur in any object of the train or
validation splits; they occur only in the eval-prompts split, where half of the `colors` and `color_attr`
prompts name one of them (their records carry `"held_out": true`).

Everything is a pure function of a `np.random.Generator`; `example_rng(seed, split, index)` gives each
example its own generator, so examples can be made in any order or in parallel and come out identical.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

CLASSES = ('circle', 'square', 'triangle')
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles'}

# Well separated in RGB (smallest pairwise distance about 95) and far from the background.
COLORS = {
    'red': (215, 35, 45),
    'orange': (240, 130, 20),
    'yellow': (245, 225, 45),
    'green': (40, 170, 70),
    'blue': (40, 90, 225),
    'purple': (140, 60, 200),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND = (235, 235, 235)

# (class, colour) pairs that appear only in the eval-prompts split.
HELD_OUT = frozenset({('circle', 'blue'), ('square', 'yellow'), ('triangle', 'red')})

TAGS = ('single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr')
COUNT_WORDS = {1: 'one', 2: 'two', 3: 'three', 4: 'four'}
COUNTS = (2, 3, 4)
RELATIONS = ('left of', 'right of', 'above', 'below')
RELATION_PHRASES = {'left of': 'to the left of', 'right of': 'to the right of', 'above': 'above',
                    'below': 'below'}
SPLIT_IDS = {'train': 0, 'validation': 1, 'eval_prompts': 2}

# Placement, in normalised units (1.0 = image width). At 32 px, 0.1 is 3.2 px. Public: the eval's scenes
# for GenEval records (ecdit.eval.shapes_eval.scene_from_record) follow the same rules.
GAP = 0.08            # least free space between two objects' boxes
MARGIN = 0.03         # least space between an object's box and the image border
SIZE_FEW = (0.12, 0.2)   # half-extent range for scenes of 1–2 objects
SIZE_MANY = (0.1, 0.15)  # for 3–4 objects


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object: `cls` in CLASSES, `color` in COLORS, centre (cx, cy) and half-extent `size`."""
  cls: str
  color: str
  cx: float
  cy: float
  size: float

  @property
  def bbox(self) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in normalised coordinates."""
    return (self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size)

  def pixel_bbox(self, image_size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels, end-exclusive, covering every pixel the object touches."""
    x0, y0, x1, y1 = self.bbox
    lo = lambda v: max(0, int(np.floor(v * image_size)))
    hi = lambda v: min(image_size, int(np.ceil(v * image_size)))
    return lo(x0), lo(y0), hi(x1), hi(y1)

  def to_dict(self) -> dict[str, Any]:
    return {'class': self.cls, 'color': self.color, 'center': [self.cx, self.cy], 'size': self.size,
            'bbox': list(self.bbox)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'ShapeObject':
    return cls(d['class'], d['color'], float(d['center'][0]), float(d['center'][1]), float(d['size']))


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[ShapeObject, ...]

  def to_json(self) -> str:
    return json.dumps({'objects': [o.to_dict() for o in self.objects]})

  @classmethod
  def from_json(cls, text: str | bytes) -> 'Scene':
    return cls(tuple(ShapeObject.from_dict(d) for d in json.loads(text)['objects']))


@dataclasses.dataclass(frozen=True)
class Example:
  scene: Scene
  caption: str
  metadata: dict[str, Any]   # the GenEval record: tag, include, prompt (+ held_out)

  @property
  def tag(self) -> str:
    return self.metadata['tag']


# ----------------------------------------------------------------------------------------------- rendering

def _signed_distance(obj: ShapeObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Signed distance (normalised units, negative inside) from points (x, y) to the object's outline."""
  dx, dy = x - obj.cx, y - obj.cy
  s = obj.size
  if obj.cls == 'circle':
    return np.sqrt(dx * dx + dy * dy) - s
  if obj.cls == 'square':
    qx, qy = np.abs(dx) - s, np.abs(dy) - s
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0)
  if obj.cls == 'triangle':
    # Upright isosceles triangle filling the box: apex (0, -s), base corners (±s, s).
    # Distance as the largest distance to the three edge lines (exact inside, close enough at the edge).
    base = dy - s
    inv = 1.0 / np.sqrt(5.0)   # side normals are (±2, -1)/sqrt(5); lines pass through the apex
    right = (2.0 * dx - (dy + s)) * inv
    left = (-2.0 * dx - (dy + s)) * inv
    return np.maximum(base, np.maximum(left, right))
  raise ValueError(f'unknown class {obj.cls!r}; expected one of {CLASSES}')


def coverage(scene: Scene, image_size: int = 32) -> np.ndarray:
  """Per-object anti-aliased coverage in [0, 1], float32 [N, H, W] (before occlusion; objects don't overlap)."""
  centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
  y, x = np.meshgrid(centres, centres, indexing='ij')
  out = np.zeros((len(scene.objects), image_size, image_size), np.float32)
  for i, obj in enumerate(scene.objects):
    d_px = _signed_distance(obj, x, y) * image_size
    out[i] = np.clip(0.5 - d_px, 0.0, 1.0)
  return out


def render_scene(scene: Scene, image_size: int = 32) -> np.ndarray:
  """The scene as uint8 RGB [image_size, image_size, 3]."""
  if image_size < 8:
    raise ValueError(f'image_size={image_size} is too small; use at least 8 (32 is the default)')
  img = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (image_size, image_size, 3)).copy()
  for obj, alpha in zip(scene.objects, coverage(scene, image_size)):
    a = alpha[..., None]
    img = img * (1.0 - a) + np.asarray(COLORS[obj.color], np.float32) * a
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def object_masks(scene: Scene, image_size: int = 32, threshold: float = 0.5) -> np.ndarray:
  """Boolean [N, H, W]: the pixels each object covers (coverage ≥ threshold); used for fg/bg analysis."""
  return coverage(scene, image_size) >= threshold


# ------------------------------------------------------------------------------------------------- sampling

def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator for one example; independent of every other example's."""
  return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def _allowed_colors(cls: str, held_out: str) -> list[str]:
  if held_out == 'exclude':
    return [c for c in COLOR_NAMES if (cls, c) not in HELD_OUT]
  if held_out == 'only':
    return [c for c in COLOR_NAMES if (cls, c) in HELD_OUT]
  return list(COLOR_NAMES)


def _a(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
  return items[int(rng.integers(len(items)))]


def separated(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
  """Two (cx, cy, size) boxes at least GAP apart along x or y."""
  (ax, ay, asz), (bx, by, bsz) = a, b
  need = asz + bsz + GAP
  return abs(ax - bx) >= need or abs(ay - by) >= need


def relation_holds(p, q, relation: str) -> bool:
  """(cx, cy, size) box p is clearly `relation` of box q: along the relation's axis the boxes are GAP
  apart; across it the centres differ by at most half the along-axis distance, so the stated relation is
  the dominant one."""
  axis = 0 if relation in ('left of', 'right of') else 1
  sign = -1.0 if relation in ('left of', 'above') else 1.0   # p minus q, along axis
  along = (p[axis] - q[axis]) * sign
  return along >= p[2] + q[2] + GAP and abs(p[1 - axis] - q[1 - axis]) <= 0.5 * along


def _place(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
  """n non-overlapping (cx, cy, size) triples, by rejection sampling."""
  lo, hi = SIZE_FEW if n <= 2 else SIZE_MANY
  while True:
    sizes = rng.uniform(lo, hi, size=n)
    for _ in range(100):
      placed = []
      for s in sizes:
        c = rng.uniform(s + MARGIN, 1.0 - s - MARGIN, size=2)
        cand = (float(c[0]), float(c[1]), float(s))
        if not all(separated(cand, p) for p in placed):
          break
        placed.append(cand)
      if len(placed) == n:
        return placed
    hi = max(lo, hi * 0.9)   # crowded: try smaller objects


def _place_related(rng: np.random.Generator, relation: str) -> tuple[tuple, tuple]:
  """(anchor, positioned) such that `positioned` is clearly `relation` of `anchor` (`relation_holds`)."""
  lo, hi = SIZE_FEW
  while True:
    sa, sb = rng.uniform(lo, hi, size=2)
    a = rng.uniform(sa + MARGIN, 1.0 - sa - MARGIN, size=2)
    b = rng.uniform(sb + MARGIN, 1.0 - sb - MARGIN, size=2)
    anchor, positioned = (float(a[0]), float(a[1]), float(sa)), (float(b[0]), float(b[1]), float(sb))
    if relation_holds(positioned, anchor, relation):
      return anchor, positioned


def sample_example(rng: np.random.Generator, tag: str, *, held_out: str = 'exclude') -> Example:
  """One scene with its caption and GenEval record.

  held_out: 'exclude' (train/validation: no object has a HELD_OUT pair), 'allow' (any pair), or 'only'
  (colors / color_attr: the first described object has a held-out pair; the other's pair is free).
  """
  if tag not in TAGS:
    raise ValueError(f'unknown tag {tag!r}; expected one of {TAGS}')
  if held_out not in ('exclude', 'allow', 'only'):
    raise ValueError(f"held_out={held_out!r}; expected 'exclude', 'allow' or 'only'")
  if held_out == 'only' and tag not in ('colors', 'color_attr'):
    raise ValueError(f"held_out='only' needs a tag that names colours (colors, color_attr), got {tag!r}")
  free = 'allow' if held_out == 'allow' else 'exclude'

  def color_for(cls, mode=free):
    return _pick(rng, _allowed_colors(cls, mode))

  def two_classes():
    i, j = rng.choice(len(CLASSES), size=2, replace=False)
    return CLASSES[int(i)], CLASSES[int(j)]

  if tag in ('single_object', 'colors'):
    cls = _pick(rng, CLASSES)
    color = color_for(cls, held_out)
    (cx, cy, s), = _place(rng, 1)
    objects = [ShapeObject(cls, color, cx, cy, s)]
    if tag == 'single_object':
      include, caption = [{'class': cls, 'count': 1}], f'a {cls}'
    else:
      include, caption = [{'class': cls, 'count': 1, 'color': color}], f'{_a(color)} {color} {cls}'
  elif tag in ('two_object', 'color_attr'):
    a, b = two_classes()
    ca = color_for(a, held_out)
    cb = color_for(b)
    if tag == 'color_attr':
      while cb == ca:
        cb = color_for(b)
    pa, pb = _place(rng, 2)
    objects = [ShapeObject(a, ca, *pa), ShapeObject(b, cb, *pb)]
    if tag == 'two_object':
      include, caption = [{'class': a, 'count': 1}, {'class': b, 'count': 1}], f'a {a} and a {b}'
    else:
      include = [{'class': a, 'count': 1, 'color': ca}, {'class': b, 'count': 1, 'color': cb}]
      caption = f'{_a(ca)} {ca} {a} and {_a(cb)} {cb} {b}'
  elif tag == 'counting':
    cls = _pick(rng, CLASSES)
    n = int(_pick(rng, COUNTS))
    objects = [ShapeObject(cls, color_for(cls), *p) for p in _place(rng, n)]
    include, caption = [{'class': cls, 'count': n}], f'{COUNT_WORDS[n]} {PLURALS[cls]}'
  else:  # position
    anchor, positioned = two_classes()
    relation = _pick(rng, RELATIONS)
    pa, pb = _place_related(rng, relation)
    objects = [ShapeObject(anchor, color_for(anchor), *pa), ShapeObject(positioned, color_for(positioned), *pb)]
    include = [{'class': anchor, 'count': 1},
               {'class': positioned, 'count': 1, 'position': [relation, 0]}]
    caption = f'a {positioned} {RELATION_PHRASES[relation]} a {anchor}'

  order = rng.permutation(len(objects))   # drawing order carries no information
  scene = Scene(tuple(objects[int(i)] for i in order))
  named = any((e['class'], e['color']) in HELD_OUT for e in include if 'color' in e)
  metadata = {'tag': tag, 'include': include, 'prompt': caption, 'held_out': bool(named)}
  return Example(scene, caption, metadata)


# --------------------------------------------------------------------------------------------------- splits

def split_example(seed: int, split: str, index: int) -> Example:
  """Example `index` of a split. Train/validation: tags in turn, no held-out pairs anywhere.

  eval_prompts: tags in turn; every other `colors` / `color_attr` prompt names a held-out pair.
  """
  if split not in SPLIT_IDS:
    raise ValueError(f'unknown split {split!r}; expected one of {tuple(SPLIT_IDS)}')
  rng = example_rng(seed, split, index)
  tag = TAGS[index % len(TAGS)]
  if split != 'eval_prompts':
    return sample_example(rng, tag, held_out='exclude')
  if tag in ('colors', 'color_attr'):
    return sample_example(rng, tag, held_out='only' if (index // len(TAGS)) % 2 == 0 else 'exclude')
  return sample_example(rng, tag, held_out='allow')


def eval_prompt_records(num: int, seed: int = 0) -> list[dict[str, Any]]:
  """The first `num` eval prompts as GenEval metadata records (same as the eval_prompts split's)."""
  return [split_example(seed, 'eval_prompts', i).metadata for i in range(num)]


def write_eval_prompts(path, num: int, seed: int = 0) -> None:
  """Writes `eval_prompt_records(num, seed)` as JSONL (one GenEval record per line)."""
  with open(path, 'w') as f:
    for rec in eval_prompt_records(num, seed):
      f.write(json.dumps(rec) + '\n')
