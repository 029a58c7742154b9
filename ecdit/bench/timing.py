"""Timing compiled functions on a shared machine: medians of runs that take turns.

Every benchmark of `ecdit bench` times through `time_interleaved`: the functions compared run one after the
other within each rep, so load from other processes hits all of them alike and their ratios stay
meaningful even when the absolute times drift.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import jax


def time_interleaved(fns: Mapping[str, Callable], args=(), warmup: int = 1, reps: int = 5) -> dict[str, float]:
  """Median milliseconds per call of each fn (compile excluded: `warmup` untimed calls each first); the
  fns take turns within each of the `reps` reps. Each call's result is waited for (`block_until_ready`)."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) * 1e3 for name, t in times.items()}
