"""The ground truth of the foreground/background statistics: which shapes-world scene a prompt describes
(`record_from_prompt`, a GenEval record that `ecdit.eval.shapes_eval.scene_from_record` renders), and which
image tokens cover its objects (`token_fraction`, `fg_bg_tokens`)."""
from __future__ import annotations

import re

import numpy as np

from ecdit.data import shapes

_COUNT = {'a': 1, 'an': 1, 'one': 1, 'two': 2, 'three': 3, 'four': 4}
_SINGULAR = {'circle': 'circle', 'square': 'square', 'triangle': 'triangle', 'circles': 'circle',
             'squares': 'square', 'triangles': 'triangle'}
_REL = {'to the left of': 'left of', 'to the right of': 'right of', 'left of': 'left of',
        'right of': 'right of', 'above': 'above', 'below': 'below'}


def _entry(phrase: str) -> dict | None:
  words = phrase.split()
  if len(words) not in (2, 3) or words[0] not in _COUNT or words[-1] not in _SINGULAR:
    return None
  e = {'class': _SINGULAR[words[-1]], 'count': _COUNT[words[0]]}
  if len(words) == 3:
    if words[1] not in shapes.COLORS:
      return None
    e['color'] = words[1]
  return e


def record_from_prompt(prompt: str) -> dict | None:
  """A GenEval record for a shapes-world caption ("a red circle", "two squares", "a circle and a square",
  "a square to the left of a circle", ...), or None when the prompt is not one the shapes world can render."""
  text = ' '.join(prompt.lower().strip().rstrip('.').split())
  m = re.fullmatch(r'(.+?) (to the left of|to the right of|left of|right of|above|below) (.+)', text)
  if m:
    a, b = _entry(m.group(1)), _entry(m.group(3))
    if not a or not b:
      return None
    b_, a_ = dict(b), dict(a, position=[_REL[m.group(2)], 0])
    return {'tag': 'position', 'prompt': prompt, 'include': [b_, a_]}
  parts = text.split(' and ')
  entries = [_entry(p) for p in parts]
  if len(parts) > 2 or not all(entries):
    return None
  colored = all('color' in e for e in entries)
  if len(entries) == 2:
    tag = 'color_attr' if colored else 'two_object'
  elif entries[0]['count'] > 1:
    tag = 'counting'
  else:
    tag = 'colors' if colored else 'single_object'
  return {'tag': tag, 'prompt': prompt, 'include': entries}


def token_fraction(pixel_mask: np.ndarray, patch_size: int) -> np.ndarray:
  """Share of each token's pixels that are set in `pixel_mask` (bool `[H, W]`, or `[N, H, W]` object masks,
  merged): float `[S]` in the model's token order (row-major patches, as ecdit.layers.dit.patchify)."""
  m = np.asarray(pixel_mask, bool)
  if m.ndim == 3:
    m = m.any(0)
  h, w = m.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f'mask {h}x{w} is not divisible by patch size {patch_size}')
  g = m.reshape(h // patch_size, patch_size, w // patch_size, patch_size).mean(axis=(1, 3))
  return g.reshape(-1).astype(np.float64)


def fg_bg_tokens(fraction: np.ndarray, min_fg: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(foreground, background) bool `[S]`: foreground = at least `min_fg` of the token's pixels are object
  pixels; background = none are. Tokens on an object's edge (in between) are in neither."""
  fraction = np.asarray(fraction)
  return fraction >= min_fg, fraction == 0
