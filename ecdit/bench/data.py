"""Data benchmark: shapes examples/s for `prepare` and input-pipeline batches/s.

    python -m ecdit.bench.data [--num_examples=5000] [--batch_size=256] [--num_batches=40]

Prepares a shapes dataset of `num_examples` training examples at 32×32 in a temporary directory (generation,
tfds array_record writing, tokenizer training), reports examples/s and the time that rate implies for the
default 50k, then times the grain pipeline (shuffle, decode, caption dropout, tokenisation, scaling) at the
given batch size, as host numpy batches and as global jax.Arrays sharded over all local devices.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax

from ecdit import errors
from ecdit.config import data as config_lib
from ecdit.data import pipeline, prepare, shapes_builder


def _rate(fn, count: int) -> float:
  start = time.perf_counter()
  fn()
  return count / (time.perf_counter() - start)


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one UsageError line (exit 2 at the `ecdit` boundary), not a usage dump."""

  def error(self, message):
    raise errors.UsageError(f'{self.prog}: {message}')


_LEAST = {'num_examples': 1, 'batch_size': 1, 'num_batches': 1, 'image_size': 8}


def run(argv=None) -> dict:
  parser = _Parser(prog='ecdit bench data', allow_abbrev=False)   # --batch is not --batch_size
  parser.add_argument('--num_examples', type=int, default=5000)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--num_batches', type=int, default=40)
  parser.add_argument('--image_size', type=int, default=32)
  args = parser.parse_args(argv)
  for name, least in _LEAST.items():
    if getattr(args, name) < least:
      raise errors.UsageError(f'--{name}={getattr(args, name)} is invalid: expected an integer >= {least}')

  results = {'device_count': jax.device_count(), 'image_size': args.image_size}
  n = args.num_examples
  results['generate_examples_per_s'] = _rate(
      lambda: [shapes_builder.make_record(0, 'train', i, args.image_size) for i in range(n)], n)

  with tempfile.TemporaryDirectory() as root:
    cfg = config_lib.default_data_config()
    cfg.dir, cfg.image_size = root, args.image_size
    cfg.num_train_examples, cfg.num_validation_examples, cfg.num_eval_prompts = n, 0, 0
    results['prepare_examples_per_s'] = _rate(lambda: prepare.prepare(cfg, verbose=False), n)
    results['prepare_50k_estimate_s'] = 50_000 / results['prepare_examples_per_s']
    tok = prepare.load_or_train_tokenizer(cfg)

    mesh = jax.make_mesh((jax.device_count(),), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    for name, shard in (('host_numpy', None), ('global_jax_array', sharding)):
      it = pipeline.make_train_iterator(cfg, global_batch_size=args.batch_size, sharding=shard, tokenizer=tok,
                                        seed=0)
      next(it)   # start-up (open files, first prefetch)

      def consume(it=it):
        for _ in range(args.num_batches):
          batch = next(it)
        jax.block_until_ready(batch['x0'])
      results[f'pipeline_batches_per_s_{name}'] = _rate(consume, args.num_batches)
  results['batch_size'] = args.batch_size
  results['num_examples_measured'] = n
  print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}, indent=1))
  return results


if __name__ == '__main__':
  run()
