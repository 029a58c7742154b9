"""`ecdit bench mesh`: the cost of the mesh — one train step of an EC config on 1 device vs on a simulated
(data, fsdp, expert, model) mesh of 8 CPU devices, in one process.

The 8 devices are simulated on the host's cores (`--xla_force_host_platform_device_count`, set here when JAX
has not started yet), so they share the CPU with each other: the ratio shows the overhead of partitioning
(collectives, smaller per-device kernels, all_to_all dispatch), not a speed-up. Reported per mesh: compile
time, median ms per step over `reps` timed runs (the meshes take turns within each rep), the ratio to 1
device, and the collectives of the compiled step (counted in its HLO; async pairs once).
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax._src import xla_bridge   # private; only to know whether the device count can still be set

DEVICES = 8
if (not xla_bridge.backends_are_initialized()
    and 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={DEVICES}').strip()

from ecdit.bench.timing import time_interleaved  # noqa: E402  (after the device count)
from ecdit.parallel import batch_sharding  # noqa: E402
from ecdit.train import loop  # noqa: E402

COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')


def count_collectives(hlo: str) -> dict[str, int]:
  return {k: sum(bool(re.search(rf'\s{k}(-start)?\(', line)) for line in hlo.splitlines()) for k in COLLECTIVES}


def _config(experiment: str, mesh: tuple[int, ...]):
  name, _, variant = experiment.partition(':')
  path = Path(__file__).resolve().parents[2] / 'experiments' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'bench_exp_{name}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(variant or None)
  for axis, size in zip(('data', 'fsdp', 'expert', 'model'), mesh):
    cfg.mesh[axis] = size
  return cfg


def _batch(cfg, sharding):
  r = np.random.RandomState(0)
  b, s, length = cfg.train.batch_size, cfg.data.image_size, cfg.data.text_length
  host = dict(x0=r.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),   # the batch contract's step arrays
              text=r.randint(1, cfg.data.vocab_size, (b, length)).astype(np.int32),
              text_mask=np.arange(length)[None, :] < r.randint(2, length, (b, 1)))
  return jax.device_put(host, sharding)


def run(experiment: str = 'shapes_tiny', meshes=((1, 1, 1, 1), (2, 1, 4, 1), (1, 2, 2, 2)), reps: int = 5,
        steps_per_rep: int = 3) -> list[dict]:
  cases = []
  for shape in meshes:
    cfg = _config(experiment, shape)
    n = int(np.prod(shape))
    if n > jax.device_count():
      raise ValueError(f'mesh {shape} needs {n} devices; this process has {jax.device_count()}')
    setup = loop.build(cfg, devices=jax.devices()[:n], strict=True)
    state, batch = setup.init_state(), _batch(cfg, batch_sharding(setup.mesh))
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):   # warm-up
      state, m = compiled(state, batch)
    jax.block_until_ready(m['loss'])
    cases.append(dict(mesh=shape, devices=n, compiled=compiled, state=state, batch=batch, compile_s=compile_s,
                      collectives=count_collectives(compiled.as_text())))

  def steps(c):
    def fn():
      for _ in range(steps_per_rep):
        c['state'], m = c['compiled'](c['state'], c['batch'])
      return m['loss']
    return fn
  per_call = time_interleaved({i: steps(c) for i, c in enumerate(cases)}, (), 0, reps)
  for i, c in enumerate(cases):
    c['ms'] = per_call[i] / steps_per_rep
  base = cases[0]['ms']
  print(f'{experiment}: one train step, batch {cfg.train.batch_size}; {os.cpu_count()} CPU cores shared by '
        f'all simulated devices (overhead, not speed-up)')
  print(f'{"mesh (data,fsdp,expert,model)":>30} {"devices":>7} {"compile s":>9} {"ms/step":>8} {"ratio":>6}  '
        'collectives per step')
  rows = []
  for c in cases:
    ms = c['ms']
    coll = ', '.join(f'{k} {v}' for k, v in c['collectives'].items() if v)
    print(f'{str(c["mesh"]):>30} {c["devices"]:>7} {c["compile_s"]:>9.1f} {ms:>8.1f} {ms / base:>6.2f}  {coll or "-"}')
    rows.append(dict(mesh=c['mesh'], devices=c['devices'], compile_s=c['compile_s'], ms=ms, ratio=ms / base,
                     collectives=c['collectives']))
  return rows


if __name__ == '__main__':
  run(*(sys.argv[1:2] or []))
