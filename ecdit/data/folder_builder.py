"""tfds builder importing a folder of images + captions (see folder.py) into ecdit's feature schema."""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re

import tensorflow_datasets as tfds

from ecdit.config import data as config_lib
from ecdit.data import features as features_lib
from ecdit.data import folder


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  source_dir: str = ''
  image_size: int = 32
  num_validation: int = 0
  on_bad_image: str = 'skip'
  latent_shape: tuple = ()


def folder_config(data_cfg) -> FolderConfig:
  """Builder config; its name carries the folder's name and a hash of its contents and the import settings."""
  c = data_cfg
  on_bad_image = config_lib.option(c, 'on_bad_image')
  latent_shape = tuple(config_lib.option(c, 'latent_shape'))
  src = pathlib.Path(c.source_dir).expanduser()
  if not src.is_dir():
    folder.scan_folder(src)   # raises the clear missing-folder / not-a-folder error
  settings = f'{folder.fingerprint(src)}|{c.image_size}|{c.num_validation_examples}|{on_bad_image}|' \
             f'{latent_shape}'
  digest = hashlib.sha1(settings.encode()).hexdigest()[:10]
  slug = re.sub(r'[^A-Za-z0-9]+', '_', src.resolve().name).strip('_')[:40] or 'folder'
  name = f'{slug}_r{c.image_size}_val{c.num_validation_examples}_{digest}'
  return FolderConfig(name=name, version=ImageTextFolderBuilder.VERSION, source_dir=str(src.resolve()),
                      image_size=c.image_size, num_validation=c.num_validation_examples,
                      on_bad_image=on_bad_image, latent_shape=latent_shape)


def _validation_first(item: folder.Item) -> str:
  return hashlib.sha1(str(item.image).encode()).hexdigest()


class ImageTextFolderBuilder(features_lib.EcditBuilder, skip_registration=True):
  """A user's images and captions, resized and centre-cropped to the configured size."""
  name = 'image_text_folder'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.skipped: list[str] = []   # one reason per skipped image, filled while generating

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description=f'Images and captions imported from {c.source_dir}.',
        features=features_lib.make_features(c.image_size, c.latent_shape), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    items = folder.scan_folder(c.source_dir, c.latent_shape)
    if c.num_validation >= len(items):
      raise ValueError(f'data.num_validation_examples={c.num_validation} leaves no training images: '
                       f'{c.source_dir} has {len(items)}; lower it')
    # A fixed, content-independent choice of validation images: the first by hash of their path.
    held = set(map(id, sorted(items, key=_validation_first)[:c.num_validation]))
    train = [it for it in items if id(it) not in held]
    val = [it for it in items if id(it) in held]
    splits = {'train': self._generate_examples(train, 'train')}
    if val:
      splits['validation'] = self._generate_examples(val, 'validation')
    return splits

  def _generate_examples(self, items, split):
    c = self.builder_config
    kept = 0
    for i, item in enumerate(items):
      try:
        image = folder.load_image(item.image, c.image_size)
      except folder.BadImage as e:
        if c.on_bad_image == 'fail':
          raise ValueError(f'{e} (data.on_bad_image=fail; set it to skip to leave such images out)') from None
        self.skipped.append(str(e))
        continue
      record = {'image': image, 'caption': item.caption, 'metadata': '{}', 'scene': '{}', 'index': i}
      if c.latent_shape:
        record['latent'] = folder.load_latent(item.latent, c.latent_shape)
      kept += 1
      yield i, record
    if kept == 0:
      raise ValueError(f'no usable images for the {split} split of {c.source_dir}: all {len(items)} were '
                       f'skipped, e.g. {self.skipped[:1]}')
