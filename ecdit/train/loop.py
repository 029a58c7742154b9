"""The training loop: set-up from a config, resume, step, log, checkpoint, preview, summarise."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import flax.linen as nn
import numpy as np
from absl import logging

from ecdit import outputs
from ecdit import parallel
from ecdit.parallel import checks
from ecdit.config import experiment as config_lib
from ecdit.data import batch as batch_lib
from ecdit.data import pipeline, prepare
from ecdit.diffusion import flow
from ecdit.diffusion import sampler as sampler_lib
from ecdit.models import ecdit as ecdit_model
from ecdit.train import checkpoint as ckpt_lib
from ecdit.train import frozen
from ecdit.train import optim
from ecdit.train import state as state_lib
from ecdit.train.metrics import MetricsWriter, Progress, Timer
from ecdit.train.skips import NonFiniteLossError, SkipGuard  # noqa: F401 (the error loop.train raises)
from ecdit.train.step import jit_train_step, make_train_step


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step."""
  cfg: Any
  mcfg: Any
  mesh: Any
  model: Any
  tx: Any
  lr_schedule: Callable
  state_shardings: Any
  abstract_state: Any
  train_step: Callable  # jitted

  def init_state(self):
    def make():
      params = nn.unbox(ecdit_model.init_params(self.model, self.cfg.seed))
      return state_lib.create(params, self.tx, self.cfg.seed)
    return jax.jit(make, out_shardings=self.state_shardings)()


def state_shardings(abstract_state, boxed_params, mesh):
  """Shardings of a TrainState on `mesh`: parameters, EMA and the optimizer's parameter-shaped moments from
  the rules table; counters and the key replicated."""
  param_sh = parallel.param_shardings(boxed_params, mesh)
  rep = parallel.replicated(mesh)
  return state_lib.TrainState(
      step=rep, params=param_sh, opt_state=parallel.opt_state_shardings(abstract_state.opt_state, param_sh, mesh),
      ema_params=param_sh, rng=rep, skipped=rep)


def build(cfg, mcfg=None, devices=None, *, strict: bool = False) -> Setup:
  """Model, optimizer, mesh, shardings and the jitted step for `cfg`.

  strict (training): the mesh is `cfg.mesh` over `devices` (default: every process's devices) exactly, and
  the model and global batch must divide over it — errors name the numbers, before anything compiles.
  Otherwise (restoring a run to sample, evaluate or export) `parallel.fit_mesh` adapts the run's mesh to the
  devices at hand; the checkpoint is resharded onto it."""
  mcfg = mcfg or config_lib.validate(cfg)
  frozen.check(cfg, mcfg)   # the VAE / text encoder folders agree with the model (config.json only)
  mesh = parallel.make_mesh(cfg.mesh, devices) if strict else parallel.fit_mesh(cfg.mesh, devices)
  ecdit_model.check_fits(mcfg, mesh, cfg.train.batch_size if strict else None, flow.routed_tokens(cfg, mcfg))
  model = ecdit_model.build_model(mcfg, cfg.train.remat)
  tx = optim.make_optimizer(cfg.train)
  lr = optim.schedule(cfg.train)
  boxed = jax.eval_shape(lambda: ecdit_model.init_params(model, cfg.seed))
  abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, cfg.seed), nn.unbox(boxed))
  shardings = state_shardings(abstract, boxed, mesh)
  step = jit_train_step(make_train_step(model, tx, lr, cfg, mcfg.patch_size), mesh, shardings)
  return Setup(cfg, mcfg, mesh, model, tx, lr, shardings, ckpt_lib.abstract_like(abstract, shardings), step)


def resolved_config(cfg, mcfg) -> dict:
  """What a run's config.json holds: the experiment config, with its data.dir absolute (so commands started
  elsewhere read the same dataset and tokenizer), and the model config it resolved to."""
  d = config_lib.to_dict(cfg)
  if '://' not in str(d['data'].get('dir', '://')):   # a local path; cloud URLs stay as given
    d['data']['dir'] = str(Path(d['data']['dir']).absolute())
  d['resolved_model'] = mcfg.to_dict()
  return d


def write_run_config(workdir: Path, resolved: dict) -> None:
  """Makes `workdir` a run: its marker first (a run killed before config.json is still known as one), then
  config.json."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / outputs.RUN_MARKER).write_text(outputs.run_marker(resolved['resolved_model']))
  (workdir / 'config.json').write_text(json.dumps(resolved, indent=2, sort_keys=True) + '\n')


def _data(cfg, mesh):
  if jax.process_count() > 1:   # process 0 builds the dataset and tokenizer; the others then find them
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      prepare.prepare(cfg.data)
      frozen.pipeline_tokenizer(cfg.data)
    multihost_utils.sync_global_devices('ecdit: dataset prepared')
  prepare.prepare(cfg.data)
  tok = frozen.pipeline_tokenizer(cfg.data)   # None when the dataset holds a frozen encoder's text states
  it = pipeline.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size,
                                    sharding=parallel.batch_sharding(mesh), tokenizer=tok, split='train',
                                    seed=cfg.seed)
  return tok, it


def preview(setup: Setup, sampler, params, tokenizer, path: Path, decode=None) -> Path | None:
  """A grid of samples, written by process 0 (the others only help gather the parameters)."""
  prompts = [p.strip() for p in setup.cfg.sample.prompts.split(';') if p.strip()]
  if jax.process_count() > 1:   # the parameters span processes: gather a whole copy, sample on process 0
    params = jax.jit(lambda p: p, out_shardings=parallel.replicated(setup.mesh))(params)
    if jax.process_index() != 0:
      return None
    params = jax.tree.map(lambda a: a.addressable_data(0), params)
  images = sampler_lib.sample_prompts(sampler, params, tokenizer, prompts, setup.cfg.sample.seed, decode=decode)
  scale = max(1, 128 // images.shape[1])
  return sampler_lib.save_png(sampler_lib.make_grid(images, scale=scale), path)


def startup_line(setup: Setup, workdir: Path) -> str:
  """What the run is about to use, said once before the dataset and the compile: backend, devices, processes,
  mesh and parameter count (so a job that silently fell back to CPU, or got the wrong mesh, shows it)."""
  devices = setup.mesh.devices.ravel()
  kinds = sorted({d.device_kind for d in devices})
  mesh = ' '.join(f'{k}={v}' for k, v in setup.mesh.shape.items())
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(setup.abstract_state.params))
  return (f'{setup.cfg.name}: {len(devices)} {devices[0].platform} device(s) ({", ".join(kinds)}) in '
          f'{jax.process_count()} process(es); mesh {mesh}; {count / 1e6:.2f}M parameters; '
          f'scan_layers={setup.mcfg.scan_layers} remat={setup.cfg.train.remat}; workdir {workdir}')


def check_layout_matches_run(workdir: Path, mcfg, train_cfg=None) -> None:
  """A workdir's checkpoints hold the stack in the layout its run was trained with (model.scan_layers), and
  (with `train_cfg`) the optimizer moments in its train.moment_dtype: resuming with another is refused before
  anything is read or written (Orbax would otherwise cast the moments silently, or fail on the layout)."""
  previous = workdir / 'config.json'
  steps = (workdir / 'checkpoints').glob('[0-9]*')
  if not previous.is_file() or not any(p.is_dir() for p in steps):
    return
  model = outputs.previous_model(workdir)
  if model is None:
    return   # an unreadable config.json: the checkpoint restore reports what is wrong
  was = bool(model.get('scan_layers', False))
  if was != mcfg.scan_layers:
    raise config_lib.ConfigError(
        f'model.scan_layers={mcfg.scan_layers} does not match the checkpoints in {workdir} (trained with '
        f'model.scan_layers={was}); resume with --config.model.scan_layers={was}, or use a new workdir')
  if train_cfg is None:
    return
  # Runs from before the key stored float32 moments (or the parameters' dtype: the same default).
  was = (outputs.previous_model(workdir, 'train') or {}).get('moment_dtype', 'float32')
  if was != train_cfg.moment_dtype:
    raise config_lib.ConfigError(
        f'train.moment_dtype={train_cfg.moment_dtype!r} does not match the checkpoints in {workdir} (trained '
        f'with train.moment_dtype={was!r}); resume with --config.train.moment_dtype={was}, or use a new workdir')


def check_resume_within_num_steps(workdir: Path, num_steps: int) -> None:
  """A run resumes from its latest checkpoint; one already past train.num_steps would train nothing and leave
  config.json saying fewer steps than the checkpoints hold: refused before anything is read or written."""
  directory = workdir / 'checkpoints'
  steps = [int(p.name) for p in directory.glob('[0-9]*') if p.name.isdigit() and p.is_dir()]
  if steps and max(steps) > num_steps:
    raise config_lib.ConfigError(
        f'train.num_steps={num_steps} is below the latest checkpoint step {max(steps)} in {directory}; resume '
        f'with --config.train.num_steps={max(steps)} or more, or use a new workdir')


def check_batch_fits_host(cfg, mcfg, processes: int = 1, memory: int | None = None) -> None:
  """One process's share of train.batch_size, as the float32 `x0` and the text arrays of one batch (the
  least the pipeline holds on the host), must fit in the host's physical memory: a larger one would only hang
  or be killed in the pipeline or the compile. ConfigError naming the key, the bytes and the limit."""
  memory = checks.host_memory_bytes() if memory is None else memory
  if not memory:
    return
  per_process = -(-cfg.train.batch_size // max(1, processes))
  text = mcfg.text_length * (4 * (mcfg.text_states_dim if mcfg.text_encoder == 'precomputed' else 1) + 1)
  example = mcfg.image_size ** 2 * mcfg.in_channels * 4 + text
  need = per_process * example
  if need > memory:
    raise config_lib.ConfigError(
        f'train.batch_size={cfg.train.batch_size} is too large: one batch of {per_process} examples per process '
        f'needs {need / 2**30:.1f} GiB of host memory for its arrays alone ({example} bytes each), more than '
        f'this machine\'s {memory / 2**30:.1f} GiB; expected at most {memory // example} per process')


def train(cfg, workdir: str | Path, *, progress: bool = True, data_fn=None, devices=None) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest readable checkpoint. Returns a summary dict.

  `data_fn(cfg, mesh) -> (tokenizer, iterator)` replaces the data pipeline (tests). `devices`: the mesh's
  devices (default: all of every process's). With several processes every one runs this function; only
  process 0 writes config.json, metrics, TensorBoard and samples, and all of them save checkpoints.
  """
  wall = Timer()
  workdir = Path(workdir)
  mcfg = config_lib.validate(cfg)
  check_batch_fits_host(cfg, mcfg, jax.process_count())
  resolved = resolved_config(cfg, mcfg)
  # Nothing is written before the workdir is known to be new, empty or a run of this very model.
  check_layout_matches_run(workdir, mcfg, cfg.train)
  outputs.check_train_workdir(workdir, resolved['resolved_model'])
  check_resume_within_num_steps(workdir, cfg.train.num_steps)
  outputs.check_data_dir(cfg.data.dir)
  try:
    setup = build(cfg, mcfg, devices, strict=True)
  except ValueError as e:   # the mesh does not fit the devices, or does not divide the model or batch
    raise config_lib.ConfigError(str(e).splitlines()[0]) from None
  t = cfg.train
  main_process = jax.process_index() == 0
  if main_process:
    print(startup_line(setup, workdir), flush=True)
  # The dataset, tokenizer and frozen models are opened (and a first batch read) before anything is written
  # into the workdir: a damaged one (reader.DataError, ...) stops here in one line, the workdir as it was.
  tokenizer, data_iter = (data_fn or _data)(cfg, setup.mesh)
  prompts_tok = frozen.prompt_tokenizer(cfg.data, fallback=tokenizer)   # a pretrained encoder's states, if any
  decode = frozen.decoder(cfg.data)   # latents -> pixels for previews (data.vae_dir)
  encode_text = frozen.text_step(cfg.data, setup.mesh)   # data.precompute_text=False: encoder in the loop
  workdir.mkdir(parents=True, exist_ok=True)   # every process saves its checkpoint shards here
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, use_async=t.async_checkpoints)

  def check_data(data_state, step):   # a bad data-iterator state makes its checkpoint unreadable (fallback)
    data_iter.set_state(data_state)
    consumed = getattr(data_iter, 'step', step)   # batches consumed: one per train step
    if consumed != step:
      raise ValueError(f'the data-iterator state is at batch {consumed}, the checkpoint at step {step}')

  try:
    restored = ckpt.restore_latest(setup.abstract_state, check_data=check_data)
    if restored is None:
      state, start = setup.init_state(), 0
    else:
      state, data_state, start = restored
      data_iter.set_state(data_state)
      print(f'resuming {cfg.name} from checkpoint step {start} in {ckpt.directory}', flush=True)
    if main_process:   # only once a checkpoint restored (or there was none): all damaged leaves it as it was
      write_run_config(workdir, resolved)
    writer = MetricsWriter(workdir, start_step=start, enabled=main_process)
    sampler = sampler_lib.from_config(setup.model, cfg.sample, clip=decode is None)
  except BaseException:
    ckpt.close()   # a failed resume too: Orbax's background threads must not outlive the manager
    raise
  samples_dir = workdir / 'samples'
  last_sample = None

  def do_preview(step):
    params = state.ema_params if cfg.sample.use_ema else state.params
    return preview(setup, sampler, params, prompts_tok, samples_dir / f'step_{step:07d}.png', decode=decode)

  bar = Progress(start, t.num_steps, cfg.name, enabled=progress and main_process)
  compile_s, steady_t0, steady_from = 0.0, None, start
  last_logged: dict = {}
  compiled = None
  guard = SkipGuard(t.nan_policy, t.max_skipped_steps, lambda: (ckpt.steps() or [None])[-1],
                    run=ckpt.loop_state.get('consecutive_skips', 0))   # continued from the checkpoint
  pending = None   # (step, finite flag) of the step in flight
  saved_at = -1   # the step whose checkpoint was last started
  try:
    for i in range(start, t.num_steps):
      batch = batch_lib.step_inputs(next(data_iter))
      if encode_text is not None:
        batch = encode_text(batch)
      if compiled is None:
        t0 = time.perf_counter()
        compiled = setup.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
      state, m = compiled(state, batch)
      step = i + 1
      # Keep at most one step in flight: the host never runs far ahead of the device, so the progress
      # bar and steps/s show real progress. Waiting for the previous step is reading its finite flag.
      if pending is not None:
        guard(pending[0], bool(pending[1]))
      pending = (step, m['finite'])
      # The step after a save waits for it, while this step computes: a save that failed in the background
      # stops the run here, before a later step is logged or saved, at the cost of the write's time beyond one
      # step, once per checkpoint. Any other step only reads the flag (free).
      if step == saved_at + 1:
        ckpt.wait()
      else:
        ckpt.check()
      save_now = step % t.checkpoint_every == 0 or step == t.num_steps
      if guard.stop_at_first or save_now:   # 'stop' at once; a step about to be saved is counted first
        guard(step, bool(m['finite']))
        pending = None
      if steady_t0 is None:
        jax.block_until_ready(m['loss'])
        steady_t0, steady_from = time.perf_counter(), step
      log_now = step % t.log_every == 0 or step == t.num_steps
      if log_now:
        elapsed = time.perf_counter() - steady_t0
        rate = (step - steady_from) / elapsed if elapsed > 0 and step > steady_from else float('nan')
        record = {k: v for k, v in m.items() if k != 'finite'}
        record['steps_per_sec'] = rate
        last_logged = writer.write(step, record)
        if last_logged.get('skipped'):
          logging.warning('%d update(s) skipped so far for non-finite loss', last_logged['skipped'])
      bar.update(1, loss=last_logged.get('loss') if log_now else None)
      if save_now:
        ckpt.save(step, state, data_iter.get_state(), resolved, loop={'consecutive_skips': guard.run})
        saved_at = step
      if (t.sample_every and step % t.sample_every == 0) or (step == t.num_steps and t.final_sample):
        last_sample = do_preview(step)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
    batch = None   # may hold grain's shared memory (a worker's batch, read without a copy)
    if hasattr(data_iter, 'close'):   # grain's worker processes end with the run, an error's too
      data_iter.close()

  steady = time.perf_counter() - steady_t0 if steady_t0 else 0.0
  n_steady = t.num_steps - steady_from
  summary = {
      'name': cfg.name, 'workdir': str(workdir), 'start_step': start, 'steps': t.num_steps,
      'final_loss': last_logged.get('loss'), 'skipped': int(np.asarray(state.skipped)),
      'compile_s': compile_s, 'steps_per_sec': n_steady / steady if steady > 0 and n_steady > 0 else None,
      'wall_s': wall(), 'last_checkpoint': ckpt.steps()[-1] if ckpt.steps() else None,
      'last_sample': str(last_sample) if last_sample else None,
  }
  return summary


def summary_line(s: dict) -> str:
  rate = s['steps_per_sec']
  rate_s = f'{rate:.2f} steps/s, {1000 / rate:.0f} ms/step' if rate else 'n/a steps/s'
  loss = f"{s['final_loss']:.4f}" if isinstance(s['final_loss'], float) else 'n/a'
  return (f"done: {s['name']} trained to step {s['steps']} (from {s['start_step']}) in {s['wall_s']:.1f}s "
          f"[{rate_s}, compile {s['compile_s']:.1f}s]; final loss {loss}; skipped {s['skipped']}; "
          f"checkpoint {s['workdir']}/checkpoints/{s['last_checkpoint']}; samples {s['last_sample']}")
