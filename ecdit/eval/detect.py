"""Object detection from pixels for the shapes world: colour segmentation, components, shape fitting.

Works on uint8 RGB images of any square size (32 and 64 are the ones we use), ground-truth renders and
model samples alike. Steps:

1. **Colour matting.** Every pixel is explained as a mix of the background and one palette colour:
   p ≈ bg + a·(c − bg). For each palette colour we project the pixel on that line, which gives a coverage
   `a` in [0, 1] and a residual (RGB distance to the line). Anti-aliased edges of the shapes world lie on
   these lines, so the residual there is rounding noise. A pixel takes the colour with the smallest
   residual (if below `max_residual`) and is "solid" when that colour's a ≥ 0.5. Pixels that fit no colour (odd hues, mixes of two
   object colours where objects overlap) belong to nothing.
2. **Components.** Solid pixels of one colour are labelled with 8-connectivity (scipy.ndimage); blobs
   smaller than `min_area_frac` of the image are noise. Objects of different colours that touch or overlap
   are therefore separated by colour. Limitation: two objects of the *same* colour that touch form one
   component and are detected as one object (its fit error is large, so its score is low).
3. **Shape fitting.** The component's soft coverage (its colour's `a`, over the component grown by one
   pixel) gives an area m and a centroid. For each class we place the template that has this area and
   centroid (circle: m = πs², square: 4s², upright triangle: 2s², centroid s/3 below the box centre),
   render it with the shapes world's own rasteriser (also Gaussian-softened, for blurry samples) and
   measure the L1 difference on the component's pixels; the best fit wins. This is exact on ground truth
   at any resolution and degrades gracefully on noisy or blurry samples.

Coordinates are pixels, x to the right and y down; boxes are (x0, y0, x1, y1), end-exclusive.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from ecdit.data import shapes

PALETTE = np.asarray([shapes.COLORS[c] for c in shapes.COLOR_NAMES], np.float32)   # [K, 3]
BACKGROUND = np.asarray(shapes.BACKGROUND, np.float32)

_EIGHT = np.ones((3, 3), bool)
BLURS = (0.0, 0.5, 0.8, 1.2)   # template softening tried when fitting shapes (pixels)


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object. `bbox` in pixels (end-exclusive) from its coverage ≥ 0.25 pixels;
  `center`/`size` (pixels) are the fitted template's; `score` in [0, 1] is the template fit quality."""
  cls: str
  color: str
  bbox: tuple[int, int, int, int]
  center: tuple[float, float]
  size: float
  area: float
  score: float

  def to_dict(self) -> dict:
    return {'class': self.cls, 'color': self.color, 'bbox': list(self.bbox),
            'center': [round(self.center[0], 3), round(self.center[1], 3)], 'size': round(self.size, 3),
            'area': round(self.area, 2), 'score': round(self.score, 4)}


def color_matting(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per pixel and palette colour: coverage `a` [H, W, K] in [0, 1] and residual [H, W, K] (RGB units)."""
  p = np.asarray(image, np.float32)[..., :3] - BACKGROUND            # [H, W, 3]
  d = PALETTE - BACKGROUND                                           # [K, 3]
  a = np.clip(np.einsum('hwc,kc->hwk', p, d) / np.sum(d * d, -1), 0.0, 1.0)
  fit = a[..., None] * d                                             # [H, W, K, 3]
  residual = np.linalg.norm(p[:, :, None, :] - fit, axis=-1)
  return a, residual


def _template(cls: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
  """Coverage [H, W] of one shape given in pixels, via the shapes world's rasteriser."""
  obj = shapes.ShapeObject(cls, shapes.COLOR_NAMES[0], cx / size, cy / size, s / size)
  return shapes.coverage(shapes.Scene((obj,)), size)[0]


def fit_shape(alpha: np.ndarray, region: np.ndarray | None = None,
              blurs: tuple[float, ...] = BLURS) -> tuple[str, float, float, float, float]:
  """Best class for a soft coverage map [H, W] of one object: (cls, cx, cy, s, score), pixels.

  Each class's template is also tried blurred (Gaussian σ in `blurs`, pixels) so that soft samples from a
  model are compared with equally soft templates; only pixels in `region` (default: all) are compared.
  """
  size = alpha.shape[0]
  region = np.ones(alpha.shape, bool) if region is None else region
  m = float(alpha.sum())
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  mx, my = float((alpha * xs).sum() / m), float((alpha * ys).sum() / m)
  best = None
  for cls in shapes.CLASSES:
    if cls == 'circle':
      s, cx, cy = math.sqrt(m / math.pi), mx, my
    elif cls == 'square':
      s, cx, cy = math.sqrt(m / 4.0), mx, my
    else:   # upright triangle: apex (cx, cy - s), base y = cy + s; centroid at cy + s/3
      s = math.sqrt(m / 2.0)
      cx, cy = mx, my - s / 3.0
    sharp = _template(cls, cx, cy, s, size)
    for sigma in blurs:
      t = ndimage.gaussian_filter(sharp, sigma, mode='constant') if sigma > 0 else sharp
      err = float(np.abs(t - alpha)[region].sum()) / (2.0 * m)   # 0 = exact, 1 = disjoint
      if best is None or err < best[4]:
        best = (cls, cx, cy, s, err)
  cls, cx, cy, s, err = best
  return cls, cx, cy, s, float(max(0.0, 1.0 - err))


def detect(image: np.ndarray, *, max_residual: float = 50.0, min_area_frac: float = 0.004) -> list[Detection]:
  """The objects in one uint8 RGB image [H, W, 3] (H == W), ordered by score (best first)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] < 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f'expected a square RGB image [H, H, 3], got shape {image.shape}')
  size = image.shape[0]
  a, residual = color_matting(image)
  # Each pixel takes the colour whose line explains it best; it is solid when that colour covers half of it.
  best = np.argmin(residual, axis=-1)                                # [H, W] colour index
  fits = np.take_along_axis(residual, best[..., None], -1)[..., 0] <= max_residual
  solid = fits & (np.take_along_axis(a, best[..., None], -1)[..., 0] >= 0.5)
  min_area = max(2.0, min_area_frac * size * size)
  found = []
  for k, name in enumerate(shapes.COLOR_NAMES):
    labels, n = ndimage.label(solid & (best == k), structure=_EIGHT)
    if n == 0:
      continue
    others = solid & (best != k)
    soft_k = np.where(fits & (best == k), a[..., k], 0.0)
    for i in range(1, n + 1):
      comp = labels == i
      if comp.sum() < min_area:
        continue
      # Grow by one pixel to take in the anti-aliased rim, but never into another colour's or blob's pixels.
      region = ndimage.binary_dilation(comp, _EIGHT) & ~others & ~((labels > 0) & ~comp)
      alpha = np.where(region, soft_k, 0.0).astype(np.float32)
      cls, cx, cy, s, score = fit_shape(alpha, region)
      rows = np.flatnonzero((alpha >= 0.25).any(1))
      cols = np.flatnonzero((alpha >= 0.25).any(0))
      bbox = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
      found.append(Detection(cls, name, bbox, (cx, cy), s, float(alpha.sum()), score))
  found.sort(key=lambda d: -d.score)
  return found
