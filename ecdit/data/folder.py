"""Reading a user's folder of images and captions (no tfds here; folder_builder.py writes the dataset).

Layout: images anywhere under the folder (*.png, *.jpg, *.jpeg, *.webp, *.bmp, *.gif, *.tif, *.tiff; hidden
files and folders are ignored), captioned either by one `captions.jsonl` at the top, one JSON object per line
`{"file": "relative/path.png", "caption": "..."}` ("image"/"file_name" and "text" are accepted too), or by a
side-car `<stem>.txt` next to each image. With `latent_shape` set, every image also needs a `<stem>.npy`
holding a float array of that shape (precomputed VAE latents).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from ecdit import errors

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
CAPTIONS_FILE = 'captions.jsonl'
_FILE_KEYS = ('file', 'image', 'file_name')
_TEXT_KEYS = ('caption', 'text')


class BadImage(errors.RunError, ValueError):
  """An individual image that cannot be used (unreadable, not an image, too small)."""


@dataclasses.dataclass(frozen=True)
class Item:
  image: pathlib.Path
  caption: str
  latent: pathlib.Path | None = None


def _visible_files(root: pathlib.Path) -> list[pathlib.Path]:
  out = []
  for p in sorted(root.rglob('*')):
    rel = p.relative_to(root)
    if p.is_file() and not any(part.startswith('.') for part in rel.parts):
      out.append(p)
  return out


def _examples_of(paths: Sequence[pathlib.Path], root: pathlib.Path, n: int = 3) -> str:
  shown = ', '.join(str(p.relative_to(root)) for p in paths[:n])
  return shown + (f' (and {len(paths) - n} more)' if len(paths) > n else '')


def _read_captions_jsonl(root: pathlib.Path, images: list[pathlib.Path]) -> dict[pathlib.Path, str]:
  path = root / CAPTIONS_FILE
  captions: dict[pathlib.Path, str] = {}
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e.msg})') from None
      if not isinstance(rec, dict):
        raise ValueError(f'{where}: expected a JSON object like {{"file": "a.png", "caption": "..."}}')
      file_key = next((k for k in _FILE_KEYS if k in rec), None)
      text_key = next((k for k in _TEXT_KEYS if k in rec), None)
      if file_key is None or text_key is None:
        raise ValueError(f'{where}: needs a "file" and a "caption" key, got keys {sorted(rec)}')
      image = (root / str(rec[file_key])).resolve()
      if not image.is_file():
        raise ValueError(f'{where}: image {rec[file_key]!r} named in {CAPTIONS_FILE} does not exist in {root}')
      if image in captions:
        raise ValueError(f'{where}: image {rec[file_key]!r} is captioned twice')
      captions[image] = str(rec[text_key]).strip()
  uncaptioned = [p for p in images if p.resolve() not in captions]
  if uncaptioned:
    raise ValueError(f'{path} does not match the images: {len(uncaptioned)} image(s) have no caption line, '
                     f'e.g. {_examples_of(uncaptioned, root)}')
  return captions


def scan_folder(source_dir: str | pathlib.Path, latent_shape: Sequence[int] = ()) -> list[Item]:
  """Every captioned image under `source_dir`, sorted by path; raises ValueError on a mismatched layout."""
  root = pathlib.Path(source_dir).expanduser()
  if not root.exists():
    raise FileNotFoundError(f'data.source_dir={str(source_dir)!r}: folder does not exist')
  if not root.is_dir():
    raise NotADirectoryError(f'data.source_dir={str(source_dir)!r} is a file, not a folder')
  root = root.resolve()
  files = _visible_files(root)
  images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
  jsonl = root / CAPTIONS_FILE
  if jsonl.is_file():
    captions = _read_captions_jsonl(root, images)
    # captions.jsonl may name files with other extensions; those go through decoding (and its error policy).
    items_paths = sorted(captions)
  else:
    if not images:
      raise ValueError(f'no images in {root} (looked for {", ".join("*" + e for e in IMAGE_EXTENSIONS)})')
    missing = [p for p in images if not p.with_suffix('.txt').is_file()]
    if missing:
      raise ValueError(f'{len(missing)} image(s) in {root} have neither a side-car <stem>.txt caption nor an '
                       f'entry in a {CAPTIONS_FILE}, e.g. {_examples_of(missing, root)}')
    captions = {p: p.with_suffix('.txt').read_text(encoding='utf-8').strip() for p in images}
    items_paths = images
  if not items_paths:
    raise ValueError(f'no images in {root}: {CAPTIONS_FILE} lists none')
  items = []
  for p in items_paths:
    latent = None
    if latent_shape:
      latent = p.with_suffix('.npy')
      if not latent.is_file():
        raise ValueError(f'data.latent_shape={tuple(latent_shape)} but latent file {latent} is missing')
    items.append(Item(p, captions[p], latent))
  return items


def fingerprint(source_dir: str | pathlib.Path) -> str:
  """A short hash of the folder's file names, sizes and modification times (changes → a new import)."""
  root = pathlib.Path(source_dir).expanduser().resolve()
  h = hashlib.sha1(str(root).encode())
  for p in _visible_files(root):
    st = p.stat()
    h.update(f'{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:10]


def load_image(path: pathlib.Path, image_size: int) -> np.ndarray:
  """The image as uint8 RGB [image_size, image_size, 3]: shorter side resized to image_size, centre-cropped.

  Raises BadImage if the file cannot be decoded or is smaller than image_size on either side.
  """
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        rgba = im.convert('RGBA')
        im = Image.new('RGB', rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel('A'))
      else:
        im = im.convert('RGB')
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImage(f'{path}: not a readable image ({type(e).__name__}: {e})') from None
  w, h = im.size
  if min(w, h) < image_size:
    raise BadImage(f'{path}: {w}x{h} is smaller than the target size {image_size}x{image_size}')
  scale = image_size / min(w, h)
  rw, rh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
  if (rw, rh) != (w, h):
    im = im.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
  left, top = (rw - image_size) // 2, (rh - image_size) // 2
  im = im.crop((left, top, left + image_size, top + image_size))
  return np.asarray(im, dtype=np.uint8)


def load_latent(path: pathlib.Path, latent_shape: Sequence[int]) -> np.ndarray:
  try:
    arr = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable .npy latent ({e})') from None
  if tuple(arr.shape) != tuple(latent_shape):
    raise ValueError(f'{path}: latent has shape {tuple(arr.shape)} but data.latent_shape={tuple(latent_shape)}')
  return arr.astype(np.float32)
