"""The training loop: set-up from a config, resume, step, log, checkpoint, preview, summarise."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ecdit.diffusion import sampler as sampler_lib
from ecdit.train import checkpoint as ckpt_lib
from ecdit.train import config as config_lib
from ecdit.train import mesh_setup, optim
from ecdit.train import state as state_lib
from ecdit.train.metrics import MetricsWriter, Progress, Timer
from ecdit.train.step import jit_train_step, make_train_step


class NonFiniteLossError(RuntimeError):
  pass


def init_params(model, mcfg, seed: int):
  """Parameters from `seed` (a key separate from the per-step keys, which are fold_in(seed, step))."""
  b = 1
  x = jnp.zeros((b, mcfg.image_size, mcfg.image_size, mcfg.in_channels), jnp.float32)
  t = jnp.zeros((b,), jnp.float32)
  ids = jnp.zeros((b, mcfg.text_length), jnp.int32)
  mask = jnp.ones((b, mcfg.text_length), bool)
  key = jax.random.split(jax.random.key(seed))[1]
  return model.init(key, x, t, ids, mask, train=False)['params']


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
      return state_lib.create(init_params(self.model, self.mcfg, self.cfg.seed), self.tx, self.cfg.seed)
    return jax.jit(make, out_shardings=self.state_shardings)()


def build(cfg, mcfg=None, devices=None) -> Setup:
  from ecdit.models.ecdit import build_model
  mcfg = mcfg or config_lib.validate(cfg)
  mesh = mesh_setup.build_mesh(cfg.mesh, devices)
  mesh_setup.check_batch(cfg.train.batch_size, mesh)
  model = build_model(mcfg)
  tx = optim.make_optimizer(cfg.train)
  lr = optim.schedule(cfg.train)
  abstract = jax.eval_shape(
      lambda: state_lib.create(init_params(model, mcfg, cfg.seed), tx, cfg.seed))
  shardings = jax.tree.map(lambda _: mesh_setup.replicated(mesh), abstract)
  step = jit_train_step(make_train_step(model, tx, lr, cfg, mcfg.patch_size), mesh, shardings)
  return Setup(cfg, mcfg, mesh, model, tx, lr, shardings, ckpt_lib.abstract_like(abstract, shardings), step)


def resolved_config(cfg, mcfg) -> dict:
  d = config_lib.to_dict(cfg)
  d['resolved_model'] = mcfg.to_dict()
  return d


def _data(cfg, mesh):
  from ecdit.data import pipeline, prepare, tokenizer
  prepare.prepare(cfg.data)
  tok = tokenizer.load_or_train_tokenizer(cfg.data)
  it = pipeline.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size,
                                    sharding=mesh_setup.batch_sharding(mesh), tokenizer=tok, split='train',
                                    seed=cfg.seed)
  return tok, it


def model_batch(batch) -> dict:
  """The arrays the step consumes; with precomputed latents the model's input is the latent."""
  image = batch['latent'] if 'latent' in batch else batch['image']
  return {'image': image, 'text_ids': batch['text_ids'], 'text_mask': batch['text_mask']}


def preview(setup: Setup, sampler, params, tokenizer, path: Path) -> Path:
  prompts = [p.strip() for p in setup.cfg.sample.prompts.split(';') if p.strip()]
  images = sampler_lib.sample_prompts(sampler, params, tokenizer, prompts, setup.cfg.sample.seed)
  scale = max(1, 128 // setup.mcfg.image_size)
  return sampler_lib.save_png(sampler_lib.make_grid(images, scale=scale), path)


def train(cfg, workdir: str | Path, *, progress: bool = True, data_fn=None) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest readable checkpoint. Returns a summary dict.

  `data_fn(cfg, mesh) -> (tokenizer, iterator)` replaces the data pipeline (tests).
  """
  wall = Timer()
  workdir = Path(workdir)
  mcfg = config_lib.validate(cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  setup = build(cfg, mcfg)
  t = cfg.train
  resolved = resolved_config(cfg, mcfg)
  (workdir / 'config.json').write_text(json.dumps(resolved, indent=2, sort_keys=True) + '\n')

  tokenizer, data_iter = (data_fn or _data)(cfg, setup.mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, use_async=t.async_checkpoints)
  restored = ckpt.restore_latest(setup.abstract_state)
  if restored is None:
    state, start = setup.init_state(), 0
  else:
    state, data_state, start = restored
    data_iter.set_state(data_state)
    print(f'resuming {cfg.name} from checkpoint step {start} in {ckpt.directory}', flush=True)

  writer = MetricsWriter(workdir, start_step=start)
  sampler = sampler_lib.make_sampler(
      setup.model, image_shape=(mcfg.image_size, mcfg.image_size, mcfg.in_channels),
      num_steps=cfg.sample.num_steps, cfg_scale=cfg.sample.cfg_scale, method=cfg.sample.sampler)
  samples_dir = workdir / 'samples'
  last_sample = None

  def do_preview(step):
    params = state.ema_params if cfg.sample.use_ema else state.params
    return preview(setup, sampler, params, tokenizer, samples_dir / f'step_{step:07d}.png')

  bar = Progress(start, t.num_steps, cfg.name, enabled=progress)
  compile_s, steady_t0, steady_from = 0.0, None, start
  last_logged: dict = {}
  compiled = None
  prev_loss = None
  try:
    for i in range(start, t.num_steps):
      batch = model_batch(next(data_iter))
      if compiled is None:
        t0 = time.perf_counter()
        compiled = setup.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
      state, m = compiled(state, batch)
      step = i + 1
      # Keep at most one step in flight: the host never runs far ahead of the device, so the progress
      # bar and steps/s show real progress.
      if prev_loss is not None:
        jax.block_until_ready(prev_loss)
      prev_loss = m['loss']
      if t.nan_policy == 'stop' and not bool(m['finite']):
        raise NonFiniteLossError(
            f'non-finite loss or gradients at step {step} (train.nan_policy=stop); the update was not applied. '
            f'Last checkpoint: {ckpt.steps()[-1] if ckpt.steps() else "none"}')
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
      if step % t.checkpoint_every == 0 or step == t.num_steps:
        ckpt.save(step, state, data_iter.get_state(), resolved)
      if (t.sample_every and step % t.sample_every == 0) or (step == t.num_steps and t.final_sample):
        last_sample = do_preview(step)
  finally:
    bar.close()
    ckpt.close()
    writer.close()

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
