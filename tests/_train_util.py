"""Shared helpers for the training tests: a tiny config and a synthetic in-memory batch source."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_experiment(name: str, variant=None):
  spec = importlib.util.spec_from_file_location(f'exp_{name}', REPO / 'experiments' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def tiny_config(**train):
  """shapes_tiny shrunk to compile and step in well under a second on one CPU device."""
  c = load_experiment('shapes_tiny')
  m = c.model
  m.width, m.depth, m.num_heads, m.num_experts = 32, 2, 2, 4
  m.text_width, m.text_depth, m.text_heads, m.image_size, m.patch_size = 32, 1, 2, 16, 4
  c.data.image_size = 16
  c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 8, 20, 0
  c.train.log_every, c.train.checkpoint_every, c.train.sample_every = 1, 10, 0
  c.train.final_sample = False
  c.train.async_checkpoints = False
  c.sample.num_steps = 2
  c.mesh.data = 1
  for k, v in train.items():
    c.train[k] = v
  return c


class Tokens:
  """Stands in for the sentencepiece tokenizer where a test needs only encode_batch."""
  vocab_size = 128

  def __init__(self, length=32):
    self.length = length

  def encode_batch(self, texts):
    ids = np.zeros((len(texts), self.length), np.int32)
    mask = np.zeros((len(texts), self.length), bool)
    for i, s in enumerate(texts):
      for j, ch in enumerate(s[: self.length]):
        ids[i, j], mask[i, j] = ord(ch) % 127 + 1, True
    return ids, mask


class Batches:
  """Deterministic synthetic batches (a coloured square on black) with get_state/set_state. `nan_at`: the
  1-based batch number (or numbers: any collection, e.g. a range) whose first pixel is NaN."""

  def __init__(self, cfg, sharding, nan_at=None):
    self.b, self.size, self.length = cfg.train.batch_size, cfg.data.image_size, cfg.data.text_length
    self.sharding, self.i = sharding, 0
    self.nan_at = set() if nan_at is None else {nan_at} if isinstance(nan_at, int) else set(nan_at)

  def __iter__(self):
    return self

  def __next__(self):
    r = np.random.RandomState(self.i)
    self.i += 1
    s = self.size
    img = -np.ones((self.b, s, s, 3), np.float32)
    for k in range(self.b):
      x, y = r.randint(0, s // 2, 2)
      img[k, y:y + s // 2, x:x + s // 2, r.randint(3)] = 1.0
    if self.i in self.nan_at:
      img[0, 0, 0, 0] = np.nan
    ids = r.randint(1, 128, (self.b, self.length)).astype(np.int32)
    mask = np.arange(self.length)[None, :] < r.randint(2, self.length, (self.b, 1))
    return {k: jax.device_put(v, self.sharding) for k, v in
            dict(x0=img, text=ids, text_mask=mask).items()}   # the ecdit.data.batch step arrays

  @property
  def step(self):   # batches consumed, as the real pipeline's TrainIterator.step
    return self.i

  def get_state(self):
    return {'i': self.i}

  def set_state(self, state):
    self.i = int(state['i'])


def data_fn(nan_at=None):
  from ecdit.parallel import batch_sharding

  def make(cfg, mesh):
    return Tokens(cfg.data.text_length), Batches(cfg, batch_sharding(mesh), nan_at)
  return make


def saved_workdir(workdir, cfg, *, step: int = 5, seed: int = 3):
  """A workdir as `ecdit train` leaves it (config.json + one checkpoint at `step`), without training: the
  step-0 state with every param perturbed (so each layer computes something non-trivial) and EMA = 0.5·params.
  Returns (model config, unboxed params, unboxed EMA params)."""
  import json
  import flax.linen as nn
  from ecdit.config import experiment as config_lib
  from ecdit.train import checkpoint as ckpt_lib
  from ecdit.train import loop
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mcfg = config_lib.validate(cfg)
  state = loop.build(cfg, mcfg).init_state()
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  state = state.replace(params=params, ema_params=jax.tree.map(lambda p: 0.5 * p, params))
  resolved = loop.resolved_config(cfg, mcfg)
  (workdir / 'config.json').write_text(json.dumps(resolved, indent=2, sort_keys=True) + '\n')
  ck = ckpt_lib.Checkpointer(workdir, use_async=False)
  ck.save(step, state.replace(step=state.step + step), {'version': 1, 'step': step}, resolved)
  ck.close()
  return mcfg, nn.unbox(params), nn.unbox(state.ema_params)
