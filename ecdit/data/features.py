"""What every ecdit dataset shares: the feature schema, a builder base class, and the check that an
existing dataset matches a config.

Images are uint8 `Tensor`s (zlib-compressed on disk), not `tfds.features.Image`, which needs TensorFlow to
encode. Text fields are `Text` (they read back as bytes); `metadata` and `scene` are JSON strings.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds


def make_features(image_size: int, latent_shape: Sequence[int] = ()) -> tfds.features.FeaturesDict:
  feats = {
      'image': tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.ZLIB),
      'caption': tfds.features.Text(),
      'metadata': tfds.features.Text(),   # GenEval record as JSON ('{}' when unknown, e.g. folder imports)
      'scene': tfds.features.Text(),      # structured scene as JSON ('{}' for folder imports)
      'index': np.int64,                  # position in generation order
  }
  if latent_shape:
    feats['latent'] = tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32)
  return tfds.features.FeaturesDict(feats)


def check_features(features, image_size: int, path: pathlib.Path | str) -> None:
  """Raises ValueError if an existing dataset's image feature is not [image_size, image_size, 3] uint8."""
  spec = features['image'] if 'image' in features.keys() else None
  if spec is None:
    raise ValueError(f'dataset at {path} has no "image" feature (features.json); it was not written by ecdit')
  want = (image_size, image_size, 3)
  if tuple(spec.shape) != want or np.dtype(spec.np_dtype) != np.uint8:
    raise ValueError(f'dataset at {path} stores images of shape {tuple(spec.shape)} {np.dtype(spec.np_dtype)} '
                     f'(features.json) but data.image_size={image_size} needs {want} uint8; '
                     'set data.image_size to match or point data.dir elsewhere')
  for key in ('caption', 'metadata', 'index'):
    if key not in features.keys():
      raise ValueError(f'dataset at {path} lacks the "{key}" feature (features.json); re-create it')


class EcditBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for ecdit's builders: nothing to download, no checksums file to look up.

  (tfds looks for a checksums file next to the builder's module through `importlib_resources`, which is not
  installed without TensorFlow's extras; these builders download nothing, so there is nothing to check.)
  """
  code_path = None
