"""What a user sees: metrics.jsonl, TensorBoard events, a progress bar and a final summary line."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _finite_or_none(x: float) -> float | None:
  return x if math.isfinite(x) else None


def _to_python(v):
  """A JSON value: bools and ints as they are, floats as Python floats, NaN and ±inf as None."""
  a = np.asarray(v)
  if a.ndim == 0:
    x = a.item()
    return x if isinstance(x, (bool, int)) else _finite_or_none(float(x))
  return [_to_python(x) for x in a.astype(np.float64)]   # vectors (nested lists for more dimensions) of floats


def read_jsonl(path: str | Path) -> list[dict]:
  """The complete records of a metrics.jsonl (a torn last line from a killed run is ignored)."""
  out = []
  path = Path(path)
  if not path.exists():
    return out
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def _import_summary_writer():
  """tensorboardX's SummaryWriter, without letting it import torch (optional there; ~10 s of start-up when
  torch happens to be installed). A torch the process already loaded is left alone."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # makes `import torch` raise ImportError for the duration
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsWriter:
  """Appends one JSON object per logged step (floats at full precision: Python's repr round-trips) and
  mirrors scalars to TensorBoard. The file is strict JSON: a non-finite value (the loss of a skipped step,
  the rate of the first step) is written as null, never as NaN or Infinity. On resume from step S, records after S (logged by the killed run
  after its last checkpoint) are dropped first, so the file reads as one uninterrupted run."""

  def __init__(self, workdir: str | Path, start_step: int = 0, tensorboard: bool = True, enabled: bool = True):
    self.path = Path(workdir) / 'metrics.jsonl'
    self._file, self._tb = None, None
    if not enabled:   # another process than 0 of a multi-process run: write() only formats the record
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_jsonl(self.path) if r.get('step', 0) <= start_step]
    tmp = self.path.with_name('metrics.jsonl.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    tmp.replace(self.path)
    self._file = open(self.path, 'a')
    self._tb = None
    if tensorboard:
      try:
        SummaryWriter = _import_summary_writer()
        self._tb = SummaryWriter(str(Path(workdir) / 'tensorboard'), purge_step=start_step + 1 if start_step else None)
      except Exception as e:  # noqa: BLE001 — TensorBoard is a convenience, never a reason to stop.
        print(f'warning: TensorBoard writer unavailable ({e})', file=sys.stderr)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    if self._file is None:
      return record
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        values = [(k, v)] if not isinstance(v, list) else [(f'{k}/{i}', x) for i, x in enumerate(v)]
        for name, x in values:
          if name != 'step' and isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
            self._tb.add_scalar(name, x, step)
    return record

  def close(self):
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """tqdm bar: step, loss, steps/s and ETA (tqdm's own rate and remaining time)."""

  def __init__(self, start: int, total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm
    self.bar = tqdm(total=total, initial=start, desc=desc, unit='step', dynamic_ncols=True,
                    disable=not enabled, file=sys.stderr, mininterval=1.0, smoothing=0.1)

  def update(self, n: int = 1, loss: float | None = None):
    if loss is not None:
      self.bar.set_postfix_str(f'loss={loss:.4f}', refresh=False)
    self.bar.update(n)

  def close(self):
    self.bar.close()


class Timer:
  def __init__(self):
    self.t0 = time.perf_counter()

  def __call__(self) -> float:
    return time.perf_counter() - self.t0
