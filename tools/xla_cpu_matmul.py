"""XLA:CPU bfloat16 vs float32 matmul throughput per XLA flag set, one process per flag set (XLA reads its
flags once), 3 rounds in turns, with PyTorch's matmul beside it (docs/performance.md, "bfloat16 on XLA:CPU").

  python tools/xla_cpu_matmul.py      # ~2 minutes on 2 idle cores; prints a markdown table
"""
import json, os, subprocess, sys, time

SHAPES = [(2048, 2048, 2048), (2048, 384, 1536), (2048, 1536, 384)]
FLAGSETS = {
    'default': '',
    'onednn': '--xla_cpu_use_onednn=true',
    'xnnpack': '--xla_cpu_use_xnnpack=true',
    'ynn_dot': '--xla_cpu_experimental_ynn_fusion_type=+dot',
    'onednn_dot_fusion': '--xla_cpu_experimental_onednn_fusion_type=dot',
    'xnn_dot_fusion': '--xla_cpu_experimental_xnn_fusion_type=dot',
}


def child():
  import jax, jax.numpy as jnp, numpy as np
  out = {}
  for (m, k, n) in SHAPES:
    for name, dt, pref in (('f32', jnp.float32, None), ('bf16', jnp.bfloat16, None),
                           ('bf16_acc32', jnp.bfloat16, jnp.float32)):
      a = jnp.asarray(np.random.rand(m, k), dt); b = jnp.asarray(np.random.rand(k, n), dt)
      f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=pref))
      f(a, b).block_until_ready()
      ts = []
      for _ in range(7):
        t = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t)
      out[f'{m}x{k}x{n}:{name}'] = 2 * m * k * n / sorted(ts)[3] / 1e9
  print(json.dumps(out))


def torch_ref():
  import torch
  out = {}
  for (m, k, n) in SHAPES:
    for name, dt in (('f32', torch.float32), ('bf16', torch.bfloat16)):
      a = torch.rand(m, k, dtype=dt); b = torch.rand(k, n, dtype=dt)
      a @ b
      ts = []
      for _ in range(7):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
      out[f'{m}x{k}x{n}:{name}'] = 2 * m * k * n / sorted(ts)[3] / 1e9
  print(json.dumps(out))


if __name__ == '__main__':
  if sys.argv[1:] == ['child']:
    child(); sys.exit()
  if sys.argv[1:] == ['torch']:
    torch_ref(); sys.exit()
  res = {}
  for rnd in range(3):
    for fs, flags in list(FLAGSETS.items()) + [('torch', None)]:
      env = dict(os.environ, XLA_FLAGS=flags or '')
      args = [sys.executable, __file__, 'torch' if flags is None else 'child']
      p = subprocess.run(args, env=env, capture_output=True, text=True)
      if p.returncode:
        res.setdefault(fs, 'ERROR: ' + p.stderr.strip().splitlines()[-1][:160]); continue
      for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items():
        res.setdefault(fs, {}).setdefault(k, []).append(v)
  print(json.dumps(res, indent=1))
  keys = next(v for v in res.values() if isinstance(v, dict)).keys()
  print('| flags | ' + ' | '.join(keys) + ' |')
  for fs, v in res.items():
    if isinstance(v, str):
      print(f'| {fs} | {v} |'); continue
    print(f'| {fs} | ' + ' | '.join(f'{sorted(v.get(k, [0]))[len(v.get(k, [0])) // 2]:.0f}' for k in keys) + ' |')
