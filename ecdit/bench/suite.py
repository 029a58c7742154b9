"""`ecdit bench suite --suite=quick|full [--json=FILE]`: where the time goes, in one process, in one run.

Every figure is a median over `reps` timed runs after `warmup` untimed runs of an already compiled function
(compile excluded); functions that are compared take turns within each rep (`ecdit.bench.timing`), so
load from other processes hits both sides alike and their ratio stays meaningful on a shared machine.

Train steps are the training code's own: `ecdit.train.loop.build` on a 1-device mesh (flow loss,
value_and_grad, AdamW with global-norm clipping, EMA, the NaN guard; the state donated), initialised as
training initialises it (`Setup.init_state`: `init_params(model, seed)`, seed 0). Inference is one forward
`model.apply(..., train=False)`. Inputs are random batches of the batch contract (`ecdit.data.batch`);
text is precomputed states (`text_encoder='precomputed'`, 32 × 256, as from a frozen encoder), so the
backbone is what is measured.

Keys (see docs/performance.md):
  peak_gflops           jitted float32 2048×2048 @ 2048×2048 matmul, 2·2048³ FLOPs / median time, timed in
                        turns with the main train step (`peak_gflops_start`: the same, alone, at the start).
  achieved_gflops, mfu  bench config (EC, E=8, f_c=2): ecdit.bench.flops.train_step_flops / step time,
                        and that / peak_gflops (`mfu_start`: / peak_gflops_start).
  ec_over_dense_train/_infer, ec_overhead_theory
                        EC f_c=1 (per image) over dense of the same width/depth; theory = forward FLOPs ratio.
  e64_over_e8           EC f_c=2 train step, 64 experts over 8.
  stream_gbps           measured memory bandwidth: jitted, donated `a = 0.5·a + b` over 1 GiB arrays (beyond the last-level cache)
                        (12 bytes per element moved).
  e64_over_e8_floor     the least e64_over_e8 this machine allows at float32: the E=8 step plus the extra bytes
                        E=64 must move (`extra_param_bytes`) at stream_gbps, over the E=8 step.
  gather_over_onehot    {S: {time, memory}} for the MoE FFN alone at group sizes S (ecdit.bench.routing).
  tc_over_ec            token choice top-2 (capacity factor 1, so C = 2·S/E) over EC f_c=2 (C = 2·S/E):
                        equal activated expert compute.
  torch, peak_gflops_blas, mfu_blas
                        PyTorch calibration (ecdit.bench.torch_calibration, when torch is installed): the dense
                        and EC f_c=2 models trained in plain PyTorch (`torch.train_ms`), over the JAX steps
                        (`torch.jax_over_torch_train`), and the 2048² matmul in torch (BLAS), timed in turns in
                        a block of their own after the JAX cases.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ecdit import parallel
from ecdit.parallel import checks
from ecdit.bench import flops as flops_lib
from ecdit.bench import routing as routing_bench
from ecdit.bench import torch_calibration
from ecdit.bench.timing import time_interleaved
from ecdit.config.experiment import base_config
from ecdit.config.model import ModelConfig
from ecdit.models.ecdit import abstract_params, build_model, init_params
from ecdit.train import loop

BENCH_MODEL = dict(image_size=32, in_channels=4, patch_size=2, width=384, depth=12, num_heads=6, mlp_ratio=4,
                   routing='expert_choice', num_experts=8, capacity_factor=2.0, routing_scope='image',
                   moe_backend='gather', text_encoder='precomputed', text_length=32, text_states_dim=256,
                   dtype='float32', param_dtype='float32')

SUITES = {
    # batch, reps, warmup, routing tokens, matmul size
    'full': dict(batch=8, reps=5, warmup=1, routing_tokens=16384, peak_n=2048),
    'quick': dict(batch=2, reps=3, warmup=1, routing_tokens=4096, peak_n=2048),
}


def bench_config(**overrides) -> ModelConfig:
  return ModelConfig(**{**BENCH_MODEL, **overrides}).validate()


def check_bench_experts(experts, flag: str = '--experts', memory: int | None = None) -> None:
  """Expert counts the bench model can train here: at most its tokens per image (each expert picks from one
  image's tokens), and a train state (params, gradients, two moments, EMA: 5 float32 copies of the experts)
  that fits this machine's memory. Raises ValueError naming the flag before anything is allocated."""
  cfg = bench_config()
  tokens = (cfg.image_size // cfg.patch_size) ** 2
  most = max(experts)
  if most > tokens:
    raise ValueError(f'{flag}={most} is invalid: expected at most {tokens}, the tokens per image each expert '
                     'of the bench model chooses from')
  sparse = sum(cfg.is_sparse_block(i) for i in range(cfg.depth))
  short = checks.memory_shortfall(5 * most * sparse * 2 * cfg.width * cfg.mlp_ratio * cfg.width * 4, memory)
  if short:
    raise ValueError(f'{flag}={most} is invalid: the bench model\'s experts and their optimizer state need {short}')


# ---- the compiled functions -----------------------------------------------------------------------------

def train_config(batch: int, **train):
  """The experiment config of the bench's train steps: the defaults, `batch` images, no token masking, and
  the given `train.*` values (e.g. remat, moment_dtype)."""
  c = base_config()
  c.train.batch_size = batch
  c.diffusion.mask_ratio = 0.0
  for key, value in train.items():
    setattr(c.train, key, value)
  return c


def train_setup(cfg: ModelConfig, batch: int, **train) -> loop.Setup:
  """The training code's set-up (`loop.build`) of model `cfg` for `batch` images on a 1-device mesh."""
  return loop.build(train_config(batch, **train), cfg, devices=jax.devices()[:1], strict=True)


@dataclasses.dataclass
class Case:
  name: str
  cfg: ModelConfig
  train: Callable[[], jax.Array]     # one train step (state carried inside), returns the loss
  infer: Callable[[], jax.Array]     # one forward pass
  compile_s: float
  xla_flops: float                   # XLA's cost_analysis of the compiled train step (reference only)
  hlo_text: str = ''                 # the compiled train step's HLO (for `ecdit bench profile`)
  temp_bytes: int = 0                # XLA's memory analysis of the compiled train step: temporaries,
  argument_bytes: int = 0            # and arguments (the state and the batch)


def random_batch(cfg: ModelConfig, batch: int) -> dict:
  """Random step arrays of the batch contract, fixed by seed 0: x0, the text (states for a 'precomputed'
  encoder, token ids for ecdit's own) and text_mask."""
  r = np.random.RandomState(0)
  L = cfg.text_length
  x0 = jnp.asarray(r.normal(size=(batch, cfg.image_size, cfg.image_size, cfg.in_channels)), jnp.float32)
  if cfg.text_encoder == 'precomputed':
    text = jnp.asarray(r.normal(size=(batch, L, cfg.text_states_dim)), jnp.float32)
  else:
    text = jnp.asarray(r.randint(3, cfg.vocab_size, (batch, L)), jnp.int32)   # past the pad / unk / end ids
  return dict(x0=x0, text=text, text_mask=jnp.asarray(np.arange(L)[None, :] < r.randint(L // 2, L + 1, (batch, 1))))


def _param_count(cfg: ModelConfig) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_params(build_model(cfg))))))


def initial_params(cfg: ModelConfig):
  """`(model, params)` of `cfg` as training initialises them from seed 0 (unboxed)."""
  model = build_model(cfg)
  return model, nn.unbox(jax.jit(lambda: init_params(model, 0))())


def torch_train_step(cfg: ModelConfig, batch: int) -> Callable[[], float]:
  """The PyTorch calibration step of `cfg` (ecdit.bench.torch_calibration) on the suite's batch and weights."""
  _, params = initial_params(cfg)
  return torch_calibration.TrainStep(cfg, params, random_batch(cfg, batch), train_config(batch))


def _xla_flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', float('nan')))
  except Exception:  # pylint: disable=broad-except  (cost analysis is optional and backend-dependent)
    return float('nan')


def build_case(name: str, cfg: ModelConfig, batch: int, with_infer: bool = True, **train) -> Case:
  """Compiles the train step (with the given `train.*` values) and the forward of `cfg` for `batch` images."""
  setup = train_setup(cfg, batch, **train)
  state = setup.init_state()
  data = jax.device_put(random_batch(cfg, batch), parallel.batch_sharding(setup.mesh))
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, data).compile()
  t = jnp.full((batch,), 0.5, jnp.float32)
  model = setup.model
  fwd = jax.jit(lambda p, x, tt, s, m: model.apply({'params': p}, x, tt, s, m, train=False))
  infer_params = jax.tree.map(jnp.copy, state.params) if with_infer else None   # the state is donated
  fwd_c = fwd.lower(infer_params, data['x0'], t, data['text'], data['text_mask']).compile() if with_infer else None
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def train_fn():
    holder['state'], metrics = compiled(holder['state'], data)
    return metrics['loss']

  def infer_fn():
    return fwd_c(infer_params, data['x0'], t, data['text'], data['text_mask'])
  mem = compiled.memory_analysis()
  return Case(name, cfg, train_fn, infer_fn, compile_s, _xla_flops(compiled), compiled.as_text(),
              int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes))


# ---- the measurements -----------------------------------------------------------------------------------

PEAK_CALLS = 4   # matmuls per timed peak call: one 2048² matmul is ~65 ms, too short to time beside a 3 s step


def peak_matmul(n: int = 2048, calls: int = PEAK_CALLS) -> tuple[Callable[[], jax.Array], float]:
  """A no-argument function running `calls` jitted float32 n×n @ n×n matmuls, and its FLOPs."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul).lower(a, b).compile()

  def fn():
    return [mm(a, b) for _ in range(calls)][-1]
  return fn, 2.0 * n ** 3 * calls


def peak_gflops(n: int = 2048, warmup: int = 2, reps: int = 5) -> float:
  fn, flops = peak_matmul(n)
  ms = time_interleaved({'mm': fn}, (), warmup, reps)['mm']
  return flops / (ms * 1e-3) / 1e9


def stream_gbps(mib: int = 1024, warmup: int = 2, reps: int = 5) -> float:
  """Memory bandwidth as the train step's update loops see it: `a ← 0.5·a + b`, a donated (in place)."""
  n = mib * 2 ** 20 // 4
  b = jnp.ones((n,), jnp.float32)
  fn = jax.jit(lambda a, b: 0.5 * a + b, donate_argnums=(0,))
  holder = {'a': jnp.ones((n,), jnp.float32)}

  def step():
    holder['a'] = fn(holder['a'], b)
    return holder['a']
  step()
  ms = time_interleaved({'stream': step}, (), warmup, reps)['stream']
  return 12 * n / (ms * 1e-3) / 1e9


# Bytes moved per extra float32 parameter per train step, at least: the fused update's overflow check reads 4
# parameter-sized arrays (g, p, m, v), then its four loops read and write 13 (m: g,m→m; v: g,v→v; params:
# p,m,v→p; EMA: e,p→e), and an expert weight is read in the forward and in the backward pass and its
# gradient written once.
UPDATE_ARRAYS_PER_PARAM = 17
EXPERT_WEIGHT_PASSES = 3


def extra_param_bytes(params_small: int, params_large: int) -> int:
  return (params_large - params_small) * 4 * (UPDATE_ARRAYS_PER_PARAM + EXPERT_WEIGHT_PASSES)


def time_cases(cases: list[Case], warmup: int, reps: int, mode: str = 'train', extra: dict | None = None
               ) -> dict[str, float]:
  """Median ms per call, the cases (and the `extra` no-argument fns) taking turns within each rep."""
  fns = {c.name: getattr(c, mode) for c in cases}
  fns.update(extra or {})
  return time_interleaved(fns, (), warmup, reps)


def _settings(suite: str, **given) -> dict:
  """The suite's sizes (`SUITES[suite]`) with the given non-None values instead."""
  if suite not in SUITES:
    raise ValueError(f'--suite={suite!r} is invalid: expected one of {sorted(SUITES)}')
  return {**SUITES[suite], **{k: v for k, v in given.items() if v is not None}}


def _cases(over: dict) -> dict[str, ModelConfig]:
  return {
      'ec_fc2_e8': bench_config(**over),
      'dense': bench_config(**{**over, 'routing': 'dense'}),
      'ec_fc1_e8': bench_config(**{**over, 'capacity_factor': 1.0}),
      'ec_fc2_e64': bench_config(**{**over, 'num_experts': 64}),
      'tc_top2': bench_config(**{**over, 'routing': 'token_choice', 'top_k': 2, 'capacity_factor': 1.0}),
  }


def _time_jax(cfgs: dict, B: int, warmup: int, reps: int, peak_fn, peak_flops: float, log) -> dict:
  """The JAX train (and EC-vs-dense inference) steps, in three pairs; returns their ms, compile times, XLA
  FLOPs and the peak matmul timed beside the main case."""
  # Cases are built, timed and freed in small groups: the E=64 state alone (params, Adam moments, EMA) is
  # several GB, and all five at once do not fit a small machine.
  train_ms, infer_ms, compile_s, xla_flops = {}, {}, {}, {}

  def measure_group(names, infer=False, extra=None):
    cases = []
    for name in names:
      cases.append(build_case(name, cfgs[name], B, with_infer=infer))
      compile_s[name], xla_flops[name] = cases[-1].compile_s, cases[-1].xla_flops
      log(f'  compiled {name}: {cases[-1].compile_s:.1f} s')
    ms = time_cases(cases, warmup, reps, 'train', extra)
    log('  train ms: ' + ', '.join(f'{k} {v:.1f}' for k, v in ms.items()))
    if infer:
      ims = time_cases(cases, warmup, reps, 'infer')
      log('  infer ms: ' + ', '.join(f'{k} {v:.1f}' for k, v in ims.items()))
      infer_ms.update(ims)
    return ms

  train_ms.update(measure_group(['ec_fc1_e8', 'dense'], infer=True))
  train_ms.update(measure_group(['ec_fc2_e8', 'ec_fc2_e64']))
  # The peak matmul takes turns with the main case (and TC, of the same size), so mfu is a ratio of two times
  # measured side by side: the peak alone drifts by ±6% between runs on these shared cores, and a hot loop of
  # matmuls reads 10-25% above the same matmul run between train steps (docs/performance.md).
  pair_tc = measure_group(['ec_fc2_e8', 'tc_top2'], extra={'peak_matmul': peak_fn})
  peak = peak_flops / (pair_tc.pop('peak_matmul') * 1e-3) / 1e9
  log(f'  peak beside the train steps: {peak:.1f} GFLOP/s')
  train_ms['tc_top2'] = pair_tc['tc_top2']
  train_ms['ec_fc2_e8_beside_tc'] = pair_tc['ec_fc2_e8']
  return dict(train_ms=train_ms, infer_ms=infer_ms, compile_s=compile_s, xla_flops=xla_flops, peak=peak,
              tc_over_ec=pair_tc['tc_top2'] / pair_tc['ec_fc2_e8'])


def _time_torch(cfgs: dict, B: int, peak_n: int, warmup: int, reps: int, log) -> tuple[dict, float]:
  """(PyTorch train ms of dense and EC f_c=2, the torch/BLAS peak GFLOP/s), in turns with each other."""
  # A block of their own: a JAX step timed right after a PyTorch step ran 10-35% slower (the allocator's and
  # the caches' state, not thread spinning: a pause does not help), so torch does not join the JAX turns.
  blas_fn, blas_flops = torch_calibration.peak_matmul(peak_n)
  torch_ms = time_interleaved({'dense': torch_train_step(cfgs['dense'], B),
                               'ec_fc2_e8': torch_train_step(cfgs['ec_fc2_e8'], B),
                               'peak_matmul_blas': blas_fn}, (), warmup, reps)
  peak_blas = blas_flops / (torch_ms.pop('peak_matmul_blas') * 1e-3) / 1e9
  log('  PyTorch train ms: ' + ', '.join(f'{k} {v:.1f}' for k, v in torch_ms.items())
      + f'; peak (torch/BLAS) {peak_blas:.1f} GFLOP/s')
  return torch_ms, peak_blas


def _torch_result(torch_ms: dict, train_ms: dict, model_flops: dict) -> dict:
  import torch as torch_lib  # pylint: disable=import-outside-toplevel  (optional extra)
  jax_ms = {'dense': train_ms['dense'], 'ec_fc2_e8': train_ms['ec_fc2_e8_beside_tc']}
  return dict(version=torch_lib.__version__, threads=torch_lib.get_num_threads(), train_ms=torch_ms,
              achieved_gflops={k: model_flops[k] / (v * 1e-3) / 1e9 for k, v in torch_ms.items()},
              jax_over_torch_train={k: jax_ms[k] / torch_ms[k] for k in torch_ms})


def _time_routing(over: dict, group_sizes, tokens: int, warmup: int, reps: int, log) -> list:
  rows = []
  width = over.get('width', BENCH_MODEL['width'])
  for g in group_sizes:
    if tokens % g:
      continue
    r = routing_bench.measure(over.get('num_experts', 8), g, tokens, width, warmup, reps)
    rows.append(r)
    log(f'  routing S={g}: gather {r.ms["gather"]:.1f} ms, onehot {r.ms["onehot"]:.1f} ms')
  return rows


def run(suite: str = 'quick', json_path: str | None = None, *, batch: int | None = None, reps: int | None = None,
        warmup: int | None = None, routing_tokens: int | None = None, group_sizes=(256, 1024, 4096),
        peak_n: int | None = None, model_overrides: dict | None = None, torch: bool = True, log=print) -> dict:
  """Runs the whole suite; prints a table through `log`, writes `json_path` if given, returns the dict.
  `torch`: also time the PyTorch calibration (when torch is installed)."""
  s = _settings(suite, batch=batch, reps=reps, warmup=warmup, routing_tokens=routing_tokens, peak_n=peak_n)
  over = dict(model_overrides or {})
  B, reps, warmup = s['batch'], s['reps'], s['warmup']
  t_start = time.perf_counter()
  log(f'bench suite --suite={suite}: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax '
      f'{jax.__version__}, {os.cpu_count()} CPU cores; batch {B}, median of {reps} after {warmup} warm-up'
      + (' (quick: smaller batch and routing token count, fewer reps than full: batch 8, 5 reps, 16384 tokens)'
         if suite == 'quick' else ''))

  peak_start = peak_gflops(s['peak_n'], warmup=max(2, warmup), reps=max(5, reps))
  log(f'  peak at start: {peak_start:.1f} GFLOP/s ({s["peak_n"]}² f32 matmul)')
  peak_fn, peak_flops = peak_matmul(s['peak_n'])
  stream = stream_gbps(warmup=max(2, warmup), reps=max(5, reps))
  log(f'  stream: {stream:.1f} GB/s')

  cfgs = _cases(over)
  with_torch = torch and torch_calibration.available()
  if torch and not with_torch:
    log('  torch is not installed: no PyTorch calibration (pip install -e \'.[torch]\')')
  j = _time_jax(cfgs, B, warmup, reps, peak_fn, peak_flops, log)
  train_ms, infer_ms, peak = j['train_ms'], j['infer_ms'], j['peak']
  torch_ms, peak_blas = _time_torch(cfgs, B, s['peak_n'], warmup, reps, log) if with_torch else ({}, None)

  model_flops = {k: flops_lib.train_step_flops(c, B) for k, c in cfgs.items()}
  n_params = {k: _param_count(c) for k, c in cfgs.items()}
  extra_bytes = extra_param_bytes(n_params['ec_fc2_e8'], n_params['ec_fc2_e64'])
  e64_floor = 1 + extra_bytes / (stream * 1e9) / (train_ms['ec_fc2_e8'] * 1e-3)
  main = 'ec_fc2_e8'
  # The EC step timed in turns with the peak matmul (the same compiled step as in the E=64 pair).
  achieved = model_flops[main] / (train_ms['ec_fc2_e8_beside_tc'] * 1e-3) / 1e9
  theory = flops_lib.forward_flops(cfgs['ec_fc1_e8'], B) / flops_lib.forward_flops(cfgs['dense'], B)
  torch_result = _torch_result(torch_ms, train_ms, model_flops) if with_torch else None
  rows = _time_routing(over, group_sizes, s['routing_tokens'], warmup, reps, log)
  gather_over_onehot = {str(r.group): dict(time=r.ms['gather'] / r.ms['onehot'],
                                           memory=r.temp_mib['gather'] / r.temp_mib['onehot']) for r in rows}

  result = dict(
      suite=suite, device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
      cpu_count=os.cpu_count(), batch=B, reps=reps, warmup=warmup,
      model=dict(cfgs[main].to_dict()),
      peak_gflops=peak, peak_gflops_start=peak_start,
      mfu=achieved / peak, mfu_start=achieved / peak_start,
      peak_gflops_blas=peak_blas, mfu_blas=None if peak_blas is None else achieved / peak_blas,
      torch=torch_result,
      achieved_gflops=achieved,
      ec_over_dense_train=train_ms['ec_fc1_e8'] / train_ms['dense'],
      ec_over_dense_infer=infer_ms['ec_fc1_e8'] / infer_ms['dense'],
      ec_overhead_theory=theory,
      e64_over_e8=train_ms['ec_fc2_e64'] / train_ms['ec_fc2_e8'],
      stream_gbps=stream, e64_over_e8_floor=e64_floor, extra_param_bytes=extra_bytes, params=n_params,
      gather_over_onehot=gather_over_onehot,
      tc_over_ec=j['tc_over_ec'],
      train_ms=train_ms, infer_ms=infer_ms,
      model_flops_per_train_step=model_flops,
      xla_flops_per_train_step=j['xla_flops'], compile_s=j['compile_s'],
      routing=[dict(experts=r.experts, group=r.group, groups=r.groups, capacity=r.capacity, ms=r.ms,
                    temp_mib=r.temp_mib) for r in rows],
      routing_tokens=s['routing_tokens'],
      wall_s=time.perf_counter() - t_start,
  )
  log(format_table(result))
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    log(f'wrote {json_path}')
  return result


def format_table(r: dict) -> str:
  lines = ['| key | value | note |', '|---|---|---|',
           f'| peak_gflops | {r["peak_gflops"]:.1f} | f32 2048² matmul, in turns with the train step '
           f'({r["peak_gflops_start"]:.1f} alone at the start) |',
           f'| achieved_gflops | {r["achieved_gflops"]:.1f} | EC E=8 f_c=2, batch {r["batch"]}, '
           f'{r["model_flops_per_train_step"]["ec_fc2_e8"] / 1e9:.1f} GFLOP/step in '
           f'{r["train_ms"]["ec_fc2_e8_beside_tc"]:.0f} ms |',
           f'| mfu | {r["mfu"]:.3f} | achieved / peak ({r["mfu_start"]:.3f} against the peak alone at the start) |',
           f'| ec_over_dense_train | {r["ec_over_dense_train"]:.3f} | EC f_c=1 {r["train_ms"]["ec_fc1_e8"]:.0f} ms '
           f'/ dense {r["train_ms"]["dense"]:.0f} ms |',
           f'| ec_over_dense_infer | {r["ec_over_dense_infer"]:.3f} | EC f_c=1 {r["infer_ms"]["ec_fc1_e8"]:.0f} ms '
           f'/ dense {r["infer_ms"]["dense"]:.0f} ms |',
           f'| ec_overhead_theory | {r["ec_overhead_theory"]:.3f} | activated forward FLOPs ratio |',
           f'| e64_over_e8 | {r["e64_over_e8"]:.3f} | EC f_c=2 train step, {r["train_ms"]["ec_fc2_e64"]:.0f} / '
           f'{r["train_ms"]["ec_fc2_e8"]:.0f} ms |',
           f'| e64_over_e8_floor | {r["e64_over_e8_floor"]:.3f} | E=8 step + {r["extra_param_bytes"] / 1e9:.1f} GB '
           f'more traffic at {r["stream_gbps"]:.1f} GB/s |',
           f'| tc_over_ec | {r["tc_over_ec"]:.3f} | token choice top-2 (f=1) / EC f_c=2, '
           f'{r["train_ms"]["tc_top2"]:.0f} / {r["train_ms"]["ec_fc2_e8_beside_tc"]:.0f} ms |']
  if r.get('torch'):
    t = r['torch']
    lines.append(f'| peak_gflops_blas | {r["peak_gflops_blas"]:.1f} | the same matmul in torch {t["version"]} '
                 f'(BLAS), beside the PyTorch steps; mfu against it: {r["mfu_blas"]:.3f} |')
    for k, label in (('dense', 'dense'), ('ec_fc2_e8', 'EC E=8 f_c=2')):
      lines.append(f'| torch.jax_over_torch_train[{k}] | {t["jax_over_torch_train"][k]:.3f} | {label}: PyTorch '
                   f'{t["train_ms"][k]:.0f} ms ({t["achieved_gflops"][k]:.1f} GFLOP/s), same model and batch |')
  for g, v in r['gather_over_onehot'].items():
    lines.append(f'| gather_over_onehot[{g}] | time {v["time"]:.3f}, memory {v["memory"]:.3f} | MoE FFN fwd+bwd, '
                 f'{r["routing_tokens"]} tokens |')
  return '\n'.join(lines)
