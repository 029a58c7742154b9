"""The PNG of `ecdit analyze`: a grid of experts-per-token maps (rows: MoE layers, columns: timesteps) on
a fixed 0..E colour scale, the image they belong to beside them, drawn with PIL."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# A perceptually ordered dark-blue → teal → yellow ramp (viridis-like anchor points).
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
  """Values in [0, vmax] → uint8 RGB via the ramp above."""
  v = np.clip(np.asarray(values, np.float64) / max(vmax, 1e-9), 0.0, 1.0) * (len(_RAMP) - 1)
  lo = np.floor(v).astype(int)
  hi = np.minimum(lo + 1, len(_RAMP) - 1)
  w = (v - lo)[..., None]
  return np.round(_RAMP[lo] * (1 - w) + _RAMP[hi] * w).astype(np.uint8)


def _cell(img: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour upscale of `[h, w, 3]` uint8 to `[size, size, 3]`."""
  h, w = img.shape[:2]
  ys, xs = np.arange(size) * h // size, np.arange(size) * w // size
  return img[ys][:, xs]


def heatmap_png(path, image: np.ndarray | None, maps: np.ndarray, *, num_experts: int,
                row_labels: Sequence[str], col_labels: Sequence[str], title: str = '', cell: int = 64,
                image_label: str = 'sample') -> Path:
  """A PNG grid: one row per MoE layer, one column per timestep, each cell the experts-per-token map
  (`maps [rows, cols, g, g]`) coloured on a fixed 0..E scale; `image` (uint8 `[H, W, 3]`) in the first
  column of every row; a colour bar with the scale underneath."""
  maps = np.asarray(maps)
  rows, cols = maps.shape[:2]
  pad, left, top, bottom = 2, 64, 30, 34
  first = 1 if image is not None else 0
  width = left + (cols + first) * (cell + pad) + pad
  height = top + rows * (cell + pad) + pad + bottom
  canvas = Image.new('RGB', (max(width, 260), height), 'white')
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 2), title[:max(20, width // 6)], fill=(0, 0, 0))
  for c, lab in enumerate(col_labels):
    draw.text((left + (c + first) * (cell + pad) + pad, 16), str(lab), fill=(0, 0, 0))
  if image is not None:
    draw.text((left + pad, 16), image_label, fill=(0, 0, 0))
  for r in range(rows):
    y = top + r * (cell + pad) + pad
    draw.text((4, y + cell // 2 - 5), str(row_labels[r]), fill=(0, 0, 0))
    if image is not None:
      im = np.asarray(image)
      im = np.repeat(im, 3, -1) if im.shape[-1] == 1 else im[..., :3]
      canvas.paste(Image.fromarray(_cell(im, cell)), (left + pad, y))
    for c in range(cols):
      canvas.paste(Image.fromarray(_cell(colorize(maps[r, c], num_experts), cell)),
                   (left + (c + first) * (cell + pad) + pad, y))
  # colour bar: one block per possible count 0..E
  y = top + rows * (cell + pad) + 6
  block = 20
  draw.text((4, y + 4), 'experts', fill=(0, 0, 0))
  for k in range(num_experts + 1):
    x = left + k * (block + 4)
    draw.rectangle([x, y, x + block, y + 12], fill=tuple(int(v) for v in colorize(k, num_experts)))
    draw.text((x + 6, y + 13), str(k), fill=(0, 0, 0))
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path
