"""The one prepared accelerator check of issue 15: the bench model trained in bfloat16 on whatever chip JAX sees.

Run it where a GPU (or TPU) is lent, in one go, from the repository root (install first:
`pip install -e '.[cuda12]'`, see README "On GPUs and TPUs"):

  python tools/gpu_check.py --json=$OUT/gpu_check.json          # ~3-5 minutes on an H100/H200
  python tools/gpu_check.py --smoke                              # a 2-block model: checks the script on CPU

It prints and writes: the device, compile time and step time of the bench model's train step (float32 and
bfloat16 compute, batches 8 and 64), model FLOPs per step (ecdit.bench.flops), MFU against the chip's peak
dense bfloat16 rate (ecdit.bench.chips; float32 steps are held against the same peak), and whether
`lax.top_k` keeps the lower-position-first order among tied values on this backend — the tie rule
expert-choice routing relies on (ecdit.layers.routing). The figures go into docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ecdit.bench import chips, flops, suite  # noqa: E402

_KINDS = {'H100': 'H100', 'H200': 'H200', 'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v5': 'v5p',
          'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e'}


def chip_of(kind: str):
  """The chips-table entry whose name the device kind contains (e.g. 'NVIDIA H200' → H200), or None."""
  for key, name in _KINDS.items():
    if key.lower() in kind.lower():
      return chips.chip(name)
  return None


def top_k_ties() -> dict:
  """Does `lax.top_k` pick the lowest indices first among equal values, on this backend (as on CPU)?"""
  x = jnp.asarray(np.array([[0.5, 0.2, 0.5, 0.5, 0.1, 0.5, 0.2, 0.5]] * 4, np.float32))
  _, idx = jax.jit(lambda a: jax.lax.top_k(a, 3))(x)
  got = np.asarray(idx)[0].tolist()
  big = jnp.zeros((2, 4096), jnp.float32)                       # all tied, a long row
  _, idx_big = jax.jit(lambda a: jax.lax.top_k(a, 64))(big)
  return dict(small=got, small_ok=got == [0, 2, 3],
              long_ok=bool((np.asarray(idx_big) == np.arange(64)[None]).all()))


def measure(cfg, batch: int, reps: int) -> dict:
  case = suite.build_case(f'b{batch}', cfg, batch, with_infer=False)
  ms = suite.time_cases([case], warmup=2, reps=reps)[case.name]
  return dict(batch=batch, dtype=cfg.dtype, compile_s=case.compile_s, ms=ms,
              model_flops=flops.train_step_flops(cfg, batch), temp_mib=case.temp_bytes / 2 ** 20)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--json', default=None, help='write the results here')
  p.add_argument('--smoke', action='store_true', help='a 2-block model and batch 2 (checks the script on CPU)')
  p.add_argument('--reps', type=int, default=10)
  a = p.parse_args(argv)
  dev = jax.devices()[0]
  chip = chip_of(dev.device_kind)
  out = dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
             chip=chip.name if chip else None, top_k=top_k_ties(), runs=[])
  print(f'{dev.device_kind} ({jax.default_backend()}), chip table: {out["chip"]}; top_k ties: {out["top_k"]}')
  small = dict(depth=2, width=64, num_heads=2) if a.smoke else {}
  batches = (2,) if a.smoke else (8, 64)
  for dtype in ('float32', 'bfloat16'):
    for batch in batches:
      r = measure(suite.bench_config(dtype=dtype, **small), batch, 2 if a.smoke else a.reps)
      r['tflops'] = r['model_flops'] / (r['ms'] / 1e3) / 1e12
      r['mfu_bf16_peak'] = r['tflops'] * 1e12 / chip.bf16_flops if chip else None
      out['runs'].append(r)
      mfu = f', MFU {r["mfu_bf16_peak"]:.3f} of the bf16 peak' if chip else ''
      print(f'{dtype:9s} batch {batch:3d}: compile {r["compile_s"]:6.1f} s, {r["ms"]:8.2f} ms/step, '
            f'{r["tflops"]:7.2f} TFLOP/s{mfu}, temporaries {r["temp_mib"]:.0f} MiB')
  if a.json:
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f'wrote {a.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
