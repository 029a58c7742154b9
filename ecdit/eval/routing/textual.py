"""Textual importance: how much routing moves, at fixed image states, when one text token or one word of
the prompt is dropped."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ecdit.eval.routing.collect import batched_counts
from ecdit.eval.routing.summary import routing_change


def drop_token(ids: np.ndarray, mask: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
  """Text ids `[L]` (or states `[L, D]`) with position j removed: later positions move left, a padding slot
  (zeros, mask False) is appended. Dropping a padding position therefore returns the same text."""
  ids, mask = np.asarray(ids), np.asarray(mask, bool)
  keep = np.arange(ids.shape[0]) != j
  return (np.concatenate([ids[keep], np.zeros((1,) + ids.shape[1:], ids.dtype)]),
          np.concatenate([mask[keep], np.zeros(1, bool)]))


def drop_word(prompt: str, i: int) -> str:
  words = prompt.split()
  return ' '.join(words[:i] + words[i + 1:])


def textual_importance(fn, params, states: np.ndarray, ts: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                       variants: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int = 64) -> list[dict]:
  """Routing change when the text `(ids, mask)` (`[L]`) is replaced by each variant, at fixed image states
  `states [T, H, W, C]` at times `ts [T]`. `fn` is `collect.routing_fn(model)`. Returns per variant
  {'l1', 'changed_fraction', 'l1_per_layer': [...]} (layers first in the count arrays)."""
  t = np.asarray(ts, np.float32)
  n = states.shape[0]

  def counts_for(i, m):
    return batched_counts(fn, params, states, t, np.repeat(np.asarray(i)[None], n, 0),
                          np.repeat(np.asarray(m, bool)[None], n, 0), batch_size)   # [layers, T, S]

  base = counts_for(ids, mask)
  out = []
  for vi, vm in variants:
    c = counts_for(vi, vm)
    r = routing_change(base, c)
    r['l1_per_layer'] = [routing_change(base[k], c[k])['l1'] for k in range(base.shape[0])]
    out.append(r)
  return out
