"""tfds builder for the shapes world: train / validation / eval_prompts splits, written as array_record."""
from __future__ import annotations

import dataclasses
import json

import tensorflow_datasets as tfds

from ecdit.data import features as features_lib
from ecdit.data import shapes


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 50_000
  num_validation: int = 1_000
  num_eval_prompts: int = 600
  seed: int = 0


def shapes_config(data_cfg) -> ShapesConfig:
  """The builder config for a data config; its name spells every parameter, so configs never collide."""
  c = data_cfg
  name = (f'r{c.image_size}_train{c.num_train_examples}_val{c.num_validation_examples}'
          f'_eval{c.num_eval_prompts}_seed{c.seed}')
  return ShapesConfig(name=name, version=ShapesBuilder.VERSION, image_size=c.image_size,
                      num_train=c.num_train_examples, num_validation=c.num_validation_examples,
                      num_eval_prompts=c.num_eval_prompts, seed=c.seed)


class ShapesBuilder(features_lib.EcditBuilder, skip_registration=True):
  """Procedural shapes scenes with GenEval-style captions; see ecdit/data/shapes.py."""
  name = 'shapes'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Coloured shapes with compositional captions (GenEval tags); held-out (class, colour) '
                    f'pairs {sorted(shapes.HELD_OUT)} occur only in eval_prompts.',
        features=features_lib.make_features(self.builder_config.image_size),
        disable_shuffling=True)   # stored order = generation order; the input pipeline shuffles

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    splits = {'train': c.num_train, 'validation': c.num_validation, 'eval_prompts': c.num_eval_prompts}
    return {name: self._generate_examples(name, n) for name, n in splits.items() if n > 0}

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    for i in range(num):
      yield i, make_record(c.seed, split, i, c.image_size)


def make_record(seed: int, split: str, index: int, image_size: int) -> dict:
  """One stored example of the shapes dataset."""
  ex = shapes.split_example(seed, split, index)
  return {'image': shapes.render_scene(ex.scene, image_size), 'caption': ex.caption,
          'metadata': json.dumps(ex.metadata), 'scene': ex.scene.to_json(), 'index': index}
