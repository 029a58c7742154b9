"""`ecdit bench routing`: the MoE layer's `gather` vs `onehot` dispatch, forward + backward.

For each expert count E and routing-group size S, one MoE FFN (d=384, hidden 4d, f_c=2, expert choice,
float32) runs a jitted `value_and_grad` w.r.t. params and input over a fixed number of tokens N, cut into
N/S groups — so the expert FLOPs are the same in every row and only the dispatch cost changes with S:
the one-hot path builds a `[G, E, C, S]` tensor (f_c·S² entries per group), the gather path `[G, E, C]`
indices.

Reported per row:
  - time: median wall time of the compiled step over `reps` runs after `warmup` runs (compile excluded),
    the backends taking turns within each rep (ecdit.bench.timing);
  - temp: `compiled.memory_analysis().temp_size_in_bytes`, the scratch buffers XLA allocates for the whole
    step (activations kept for the backward pass, intermediates, gradients before they are returned) —
    excluding the arguments (params, x) and outputs, which are the same for both backends. It is XLA's
    planned peak of live temporaries, not a measurement of process RSS.
Ratios are onehot / gather from the same run, the number to trust on a noisy shared machine.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from ecdit.bench.timing import time_interleaved
from ecdit.config.model import ModelConfig
from ecdit.layers import moe
from ecdit.parallel import checks

IMAGE_TOKENS = 256  # a 32×32 latent with 2×2 patches; groups of S > 256 span S/256 images


@dataclasses.dataclass
class Row:
  experts: int
  group: int
  groups: int
  capacity: int
  ms: dict          # backend -> median milliseconds
  temp_mib: dict    # backend -> compiled temp MiB


def _config(experts: int, group: int, backend: str, width: int) -> ModelConfig:
  scope = dict(routing_scope='image') if group == IMAGE_TOKENS else dict(routing_scope='group', group_size=group)
  return ModelConfig(width=width, num_heads=width // 64, mlp_ratio=4, num_experts=experts, capacity_factor=2.0,
                     moe_backend=backend, **scope).validate()


def check_args(tokens: int, reps: int, warmup: int, experts: Sequence[int], groups: Sequence[int],
               width: int = 384, memory: int | None = None) -> None:
  """The flags of `ecdit bench routing`, each named with what it must be. An expert count is bounded by the
  smallest routing group (each expert chooses its C = S·f_c/E tokens within a group of S: more experts than
  tokens leaves them empty-handed) and by host memory (`memory`, default this machine's: the experts' float32
  weights and their gradients), before anything is allocated."""
  if tokens < IMAGE_TOKENS or tokens % IMAGE_TOKENS:
    raise ValueError(f'--tokens={tokens} is invalid: expected a positive multiple of {IMAGE_TOKENS}')
  if reps < 1 or warmup < 0:
    raise ValueError(f'--reps={reps} --warmup={warmup} is invalid: expected reps >= 1 and warmup >= 0')
  if not experts or min(experts) < 1:
    raise ValueError(f'--experts={",".join(map(str, experts))} is invalid: expected positive integers')
  bad = [s for s in groups if s < 1 or s % IMAGE_TOKENS or tokens % s]
  if bad or not groups:
    raise ValueError(f'--group_sizes={",".join(map(str, groups))} is invalid: expected multiples of '
                     f'{IMAGE_TOKENS} dividing --tokens={tokens}')
  most = max(experts)
  if most > min(groups):
    raise ValueError(f'--experts={most} is invalid: expected at most {min(groups)}, the tokens of the smallest '
                     f'routing group (--group_sizes={",".join(map(str, groups))}) each expert chooses from')
  # w_in and w_out of every expert, float32, and their gradients
  short = checks.memory_shortfall(2 * most * 2 * width * 4 * width * 4, memory)
  if short:
    raise ValueError(f'--experts={most} is invalid: its expert weights and gradients at d={width} need {short}')


def measure(experts: int, group: int, tokens: int, width: int, warmup: int, reps: int,
            backends: Sequence[str] = ('gather', 'onehot')) -> Row:
  """One table row: the same params, input and cotangent through each backend."""
  if tokens % group or group % IMAGE_TOKENS:
    raise ValueError(f'bench routing: group size {group} must be a multiple of {IMAGE_TOKENS} and divide '
                     f'tokens={tokens}')
  x = jax.random.normal(jax.random.key(0), (tokens // IMAGE_TOKENS, IMAGE_TOKENS, width), jnp.float32)
  cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
  # Parameter shapes do not depend on the routing scope; init on one image.
  layer = moe.MoEFFN(_config(experts, IMAGE_TOKENS, 'gather', width))
  params = jax.jit(lambda key: layer.init(key, x[:1], train=True))(jax.random.key(2))['params']
  compiled_fns, temp = {}, {}
  for backend in backends:
    layer = moe.MoEFFN(_config(experts, group, backend, width))

    def loss(p, xx, ct, layer=layer):
      return jnp.sum(layer.apply({'params': p}, xx, train=True) * ct)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x, cotangent).compile()
    stats = compiled.memory_analysis()
    temp[backend] = stats.temp_size_in_bytes / 2**20 if stats is not None else float('nan')
    compiled_fns[backend] = compiled
  ms = time_interleaved(compiled_fns, (params, x, cotangent), warmup, reps)
  cfg = _config(experts, group, 'gather', width)
  return Row(experts, group, tokens // group, cfg.capacity_for(group, True), ms, temp)


def format_table(rows: Sequence[Row]) -> str:
  header = ('| E | group S | groups | C | gather ms | onehot ms | time onehot/gather '
            '| gather temp MiB | onehot temp MiB | temp onehot/gather |')
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  for r in rows:
    lines.append(f'| {r.experts} | {r.group} | {r.groups} | {r.capacity} '
                 f'| {r.ms["gather"]:.1f} | {r.ms["onehot"]:.1f} | {r.ms["onehot"] / r.ms["gather"]:.2f} '
                 f'| {r.temp_mib["gather"]:.1f} | {r.temp_mib["onehot"]:.1f} '
                 f'| {r.temp_mib["onehot"] / r.temp_mib["gather"]:.2f} |')
  return '\n'.join(lines)


def run(quick: bool = False, tokens: int | None = None, reps: int | None = None, warmup: int = 1,
        experts: Sequence[int] = (8, 64), groups: Sequence[int] = (256, 1024, 4096), width: int = 384,
        log=print) -> list[Row]:
  """Measures every (E, S) row and prints the table through `log`; returns the rows. Bad arguments raise
  ValueError (check_args) before anything is measured."""
  tokens = (4096 if quick else 16384) if tokens is None else tokens
  reps = 5 if reps is None else reps
  check_args(tokens, reps, warmup, experts, groups, width)
  log(f'bench routing: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; '
      f'{tokens} tokens per step, d={width}, hidden={4 * width}, f_c=2, float32, expert choice; '
      f'fwd+bwd median of {reps} after {warmup} warm-up')
  rows = []
  for e in experts:
    for s in groups:
      rows.append(measure(e, s, tokens, width, warmup, reps))
      r = rows[-1]
      log(f'  E={e} S={s}: gather {r.ms["gather"]:.1f} ms, onehot {r.ms["onehot"]:.1f} ms')
  log(format_table(rows))
  return rows
