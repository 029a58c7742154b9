"""Numbers from experts-per-token counts (numpy only): histograms, zero-expert share, per-group totals,
foreground vs background means, and how far routing moved between two runs."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def group_totals(counts: np.ndarray, mcfg) -> np.ndarray:
  """Total expert slots used per routing group, from `[..., B, S]` counts → `[..., G]`. With expert choice
  every group's total is E·C exactly (C = mcfg.capacity_for(group length, train=False))."""
  counts = np.asarray(counts)
  lead, (b, s) = counts.shape[:-2], counts.shape[-2:]
  mcfg = mcfg.for_inference()   # the counts come from sampling / evaluation calls
  if mcfg.routing_scope == 'image':
    return counts.sum(-1)
  flat = counts.reshape(lead + (b * s,))
  size = b * s if mcfg.routing_scope == 'batch' else mcfg.group_size
  return flat.reshape(lead + (b * s // size, size)).sum(-1)


def capacity(mcfg) -> int | None:
  """Tokens per expert per routing group at sampling time (None for 'batch' scope: it depends on the batch)."""
  mcfg = mcfg.for_inference()
  if mcfg.routing_scope == 'batch':
    return None
  group = mcfg.num_tokens if mcfg.routing_scope == 'image' else mcfg.group_size
  return mcfg.capacity_for(group, train=False)


def histogram(counts: np.ndarray, num_experts: int) -> np.ndarray:
  """Fraction of the tokens in `counts` (any shape) chosen by 0, 1, ..., E experts: `[E + 1]`, sums to 1."""
  counts = np.asarray(counts).ravel()
  return np.bincount(counts, minlength=num_experts + 1)[:num_experts + 1] / max(counts.size, 1)


def summarize(counts: np.ndarray, num_experts: int, layers: Sequence[str], ts: Sequence[float]) -> dict:
  """Summary of counts `[T, layers, B, S]`: per layer the histogram over all steps/images/tokens, the
  zero-expert fraction and the mean per timestep, and the same over everything."""
  counts = np.asarray(counts)
  per_layer = {}
  for k, name in enumerate(layers):
    c = counts[:, k]
    per_layer[name] = {
        'histogram': histogram(c, num_experts).tolist(),
        'zero_fraction': float(np.mean(c == 0)),
        'mean': float(np.mean(c)),
        'zero_fraction_per_t': np.mean(c == 0, axis=(1, 2)).tolist(),
        'mean_per_t': np.mean(c, axis=(1, 2)).tolist(),
        'std_over_tokens': float(np.mean(np.std(c, axis=-1))),
    }
  return {'timesteps': [float(t) for t in ts], 'histogram': histogram(counts, num_experts).tolist(),
          'zero_fraction': float(np.mean(counts == 0)), 'mean': float(np.mean(counts)), 'layers': per_layer}


def foreground_background(counts: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> dict:
  """Mean experts per token on foreground vs background tokens. counts `[..., S]`; fg, bg bool, broadcast
  against counts (`[S]` or the full shape). ratio = fg_mean / bg_mean (None when a side is empty or bg is 0)."""
  counts = np.asarray(counts, np.float64)
  fg = np.broadcast_to(np.asarray(fg, bool), counts.shape)
  bg = np.broadcast_to(np.asarray(bg, bool), counts.shape)
  n_fg, n_bg = int(fg.sum()), int(bg.sum())
  fg_mean = float(counts[fg].mean()) if n_fg else None
  bg_mean = float(counts[bg].mean()) if n_bg else None
  ratio = fg_mean / bg_mean if fg_mean is not None and bg_mean else None
  return {'fg_mean': fg_mean, 'bg_mean': bg_mean, 'ratio': ratio, 'fg_tokens': n_fg, 'bg_tokens': n_bg}


def fg_bg_summary(items, layers: Sequence[str], ts) -> dict:
  """fg/bg over a list of (counts [layers, T, S], fg [S], bg [S]): overall, per layer, per timestep."""
  def pooled(sel):
    c = np.concatenate([sel(x).reshape(-1) for x, _, _ in items])
    fg = np.concatenate([np.broadcast_to(f, sel(x).shape).reshape(-1) for x, f, _ in items])
    bg = np.concatenate([np.broadcast_to(b, sel(x).shape).reshape(-1) for x, _, b in items])
    return foreground_background(c, fg, bg)
  out = pooled(lambda x: x)
  out['per_layer'] = {name: pooled(lambda x, k=k: x[k]) for k, name in enumerate(layers)}
  out['per_t'] = [pooled(lambda x, j=j: x[:, j]) for j in range(len(ts))]
  return out


def routing_change(base: np.ndarray, other: np.ndarray) -> dict:
  """How much routing moved between two count arrays of the same shape `[..., S]`: the mean absolute
  difference in experts per token (`l1`) and the fraction of tokens whose count changed. Both ≥ 0, both 0
  exactly when the counts are equal."""
  base, other = np.asarray(base, np.int64), np.asarray(other, np.int64)
  if base.shape != other.shape:
    raise ValueError(f'routing_change: shapes {base.shape} and {other.shape} differ')
  diff = np.abs(base - other)
  return {'l1': float(diff.mean()), 'changed_fraction': float(np.mean(diff > 0))}
