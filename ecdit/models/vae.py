"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) in Flax linen, NHWC, loading local weights.

    vae = load_vae('/path/to/sd-vae')            # folder with config.json + diffusion_pytorch_model.safetensors
    z = vae.encode(images)                       # images [B,H,W,3] in [-1,1] -> scaled latents [B,H/8,W/8,4]
    x = vae.decode(z)                            # scaled latents -> images [B,H,W,3], roughly in [-1,1]

"Scaled" latents are `(mean - shift_factor) * scaling_factor` (SD 1.x/2.x: scale 0.18215, no shift), the
normalisation diffusion models are trained in; `decode` undoes it. `encode(..., rng=key)` samples from the
posterior instead of taking its mean.

Architecture (as in diffusers): encoder = conv_in, per level `layers_per_block` ResNet blocks and (except at
the last level) a stride-2 conv with right/bottom zero padding, a middle block (ResNet, single-head
self-attention, ResNet), GroupNorm + SiLU + conv_out to 2·latent channels (mean, log-variance), then the 1×1
`quant_conv`. Decoder = 1×1 `post_quant_conv`, conv_in, middle block, per level (widest first)
`layers_per_block + 1` ResNet blocks and (except at the last level) nearest 2× upsampling + conv, GroupNorm +
SiLU + conv_out. GroupNorm eps 1e-6 everywhere. The torch → Flax name table is `weight_table(cfg)`.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ecdit.models import hf_loading as hf
from ecdit.models.hf_loading import Entry, LoadError

WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def __post_init__(self):
    if not self.block_out_channels:
      raise ValueError('VAEConfig.block_out_channels must not be empty')
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f'VAEConfig.block_out_channels={self.block_out_channels}: every width must be a '
                         f'multiple of norm_num_groups={self.norm_num_groups}')

  @classmethod
  def from_json(cls, cfg: dict, folder: pathlib.Path) -> 'VAEConfig':
    where = folder / 'config.json'
    cls_name = cfg.get('_class_name')
    if cls_name not in (None, 'AutoencoderKL'):
      raise LoadError(f'{where}: _class_name={cls_name!r}; only AutoencoderKL folders are supported')
    blocks = cfg.get('block_out_channels')
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, int) and b > 0 for b in blocks):
      raise LoadError(f'{where}: "block_out_channels"={blocks!r} must be a non-empty list of positive ints')
    for key, allowed in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
      types = cfg.get(key, [allowed] * len(blocks))
      if list(types) != [allowed] * len(blocks):
        raise LoadError(f'{where}: "{key}"={types!r}; supported: {len(blocks)} × {allowed!r}')
    if cfg.get('act_fn', 'silu') != 'silu':
      raise LoadError(f'{where}: "act_fn"={cfg["act_fn"]!r}; only "silu" is supported')
    v = functools.partial(hf.config_value, cfg, path=folder)
    try:
      return cls(in_channels=v('in_channels', default=3), out_channels=v('out_channels', default=3),
                 block_out_channels=tuple(blocks), layers_per_block=v('layers_per_block', default=1),
                 latent_channels=v('latent_channels', default=4),
                 norm_num_groups=v('norm_num_groups', default=32),
                 scaling_factor=v('scaling_factor', default=0.18215, kind=float),
                 shift_factor=v('shift_factor', default=0.0, kind=float),
                 use_quant_conv=v('use_quant_conv', default=True, kind=bool),
                 use_post_quant_conv=v('use_post_quant_conv', default=True, kind=bool),
                 mid_block_add_attention=v('mid_block_add_attention', default=True, kind=bool))
    except ValueError as e:
      if isinstance(e, LoadError):
        raise
      raise LoadError(f'{where}: {e}') from None


# ---- modules ------------------------------------------------------------------------------------

def _norm(name: str, groups: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False, name=name)


def _conv(features: int, name: str | None, dtype, kernel: int = 3, stride: int = 1,
          padding: Any = 1) -> nn.Conv:
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                 name=name)


class ResnetBlock(nn.Module):
  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_norm('norm1', self.groups)(x))
    h = _conv(self.features, 'conv1', self.dtype)(h)
    h = nn.silu(_norm('norm2', self.groups)(h))
    h = _conv(self.features, 'conv2', self.dtype)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 'conv_shortcut', self.dtype, kernel=1, padding=0)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H·W positions, with a residual connection."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _norm('group_norm', self.groups)(x).reshape(b, h * w, c)
    dense = functools.partial(nn.Dense, c, dtype=self.dtype)
    q, k, v = dense(name='to_q')(y), dense(name='to_k')(y), dense(name='to_v')(y)
    logits = jnp.einsum('bqc,bkc->bqk', q, k).astype(jnp.float32) / np.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = dense(name='to_out')(jnp.einsum('bqk,bkc->bqc', weights, v))
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  features: int
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.features, self.groups, self.dtype, name='res_0')(x)
    if self.attention:
      x = AttentionBlock(self.groups, self.dtype, name='attn')(x)
    return ResnetBlock(self.features, self.groups, self.dtype, name='res_1')(x)


class Encoder(nn.Module):
  cfg: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, g = self.cfg, self.cfg.norm_num_groups
    x = _conv(cfg.block_out_channels[0], 'conv_in', self.dtype)(x)
    for i, ch in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(ch, g, self.dtype, name=f'down_{i}_res_{j}')(x)
      if i < len(cfg.block_out_channels) - 1:   # stride-2 conv, zero padding on the right/bottom only
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = _conv(ch, f'down_{i}_downsample', self.dtype, stride=2, padding=0)(x)
    x = MidBlock(cfg.block_out_channels[-1], g, cfg.mid_block_add_attention, self.dtype, name='mid')(x)
    x = nn.silu(_norm('conv_norm_out', g)(x))
    return _conv(2 * cfg.latent_channels, 'conv_out', self.dtype)(x)


class Decoder(nn.Module):
  cfg: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, g = self.cfg, self.cfg.norm_num_groups
    widths = cfg.block_out_channels[::-1]
    x = _conv(widths[0], 'conv_in', self.dtype)(z)
    x = MidBlock(widths[0], g, cfg.mid_block_add_attention, self.dtype, name='mid')(x)
    for i, ch in enumerate(widths):
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(ch, g, self.dtype, name=f'up_{i}_res_{j}')(x)
      if i < len(widths) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)   # nearest-neighbour 2×
        x = _conv(ch, f'up_{i}_upsample', self.dtype)(x)
    x = nn.silu(_norm('conv_norm_out', g)(x))
    return _conv(cfg.out_channels, 'conv_out', self.dtype)(x)


class AutoencoderKL(nn.Module):
  """`encode` → (mean, logvar) of the unscaled posterior; `decode` unscaled latents → images."""
  cfg: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.cfg
    self.encoder = Encoder(c, self.dtype)
    self.decoder = Decoder(c, self.dtype)
    if c.use_quant_conv:
      self.quant_conv = _conv(2 * c.latent_channels, None, self.dtype, kernel=1, padding=0)
    if c.use_post_quant_conv:
      self.post_quant_conv = _conv(c.latent_channels, None, self.dtype, kernel=1, padding=0)

  def encode(self, x):
    moments = self.encoder(x)
    if self.cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    if self.cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)


# ---- torch name table ---------------------------------------------------------------------------

def _conv_entries(src: str, dst: tuple[str, ...], cin: int, cout: int, k: int = 3) -> list[Entry]:
  return [Entry(f'{src}.weight', dst + ('kernel',), (k, k, cin, cout), 'conv'),
          Entry(f'{src}.bias', dst + ('bias',), (cout,))]


def _norm_entries(src: str, dst: tuple[str, ...], c: int) -> list[Entry]:
  return [Entry(f'{src}.weight', dst + ('scale',), (c,)), Entry(f'{src}.bias', dst + ('bias',), (c,))]


def _resnet_entries(src: str, dst: tuple[str, ...], cin: int, cout: int) -> list[Entry]:
  out = _norm_entries(f'{src}.norm1', dst + ('norm1',), cin)
  out += _conv_entries(f'{src}.conv1', dst + ('conv1',), cin, cout)
  out += _norm_entries(f'{src}.norm2', dst + ('norm2',), cout)
  out += _conv_entries(f'{src}.conv2', dst + ('conv2',), cout, cout)
  if cin != cout:
    out += _conv_entries(f'{src}.conv_shortcut', dst + ('conv_shortcut',), cin, cout, k=1)
  return out


def _mid_entries(src: str, dst: tuple[str, ...], c: int, attention: bool) -> list[Entry]:
  out = _resnet_entries(f'{src}.resnets.0', dst + ('res_0',), c, c)
  if attention:
    a, d = f'{src}.attentions.0', dst + ('attn',)
    out += _norm_entries(f'{a}.group_norm', d + ('group_norm',), c)
    for t, f in (('to_q', 'to_q'), ('to_k', 'to_k'), ('to_v', 'to_v'), ('to_out.0', 'to_out')):
      out += [Entry(f'{a}.{t}.weight', d + (f, 'kernel'), (c, c), 'linear'),
              Entry(f'{a}.{t}.bias', d + (f, 'bias'), (c,))]
  out += _resnet_entries(f'{src}.resnets.1', dst + ('res_1',), c, c)
  return out


# Names older checkpoints (e.g. the original SD VAE converted before diffusers' attention refactor) use.
_LEGACY_ATTENTION = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def weight_table(cfg: VAEConfig) -> list[Entry]:
  """Every parameter: (diffusers tensor name, Flax path, Flax shape, transform)."""
  chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
  t = _conv_entries('encoder.conv_in', ('encoder', 'conv_in'), cfg.in_channels, chans[0])
  cin = chans[0]
  for i, ch in enumerate(chans):
    for j in range(cfg.layers_per_block):
      t += _resnet_entries(f'encoder.down_blocks.{i}.resnets.{j}', ('encoder', f'down_{i}_res_{j}'), cin, ch)
      cin = ch
    if i < n - 1:
      t += _conv_entries(f'encoder.down_blocks.{i}.downsamplers.0.conv', ('encoder', f'down_{i}_downsample'),
                         ch, ch)
  t += _mid_entries('encoder.mid_block', ('encoder', 'mid'), chans[-1], cfg.mid_block_add_attention)
  t += _norm_entries('encoder.conv_norm_out', ('encoder', 'conv_norm_out'), chans[-1])
  t += _conv_entries('encoder.conv_out', ('encoder', 'conv_out'), chans[-1], 2 * cfg.latent_channels)
  if cfg.use_quant_conv:
    t += _conv_entries('quant_conv', ('quant_conv',), 2 * cfg.latent_channels, 2 * cfg.latent_channels, k=1)
  if cfg.use_post_quant_conv:
    t += _conv_entries('post_quant_conv', ('post_quant_conv',), cfg.latent_channels, cfg.latent_channels, k=1)
  widths = chans[::-1]
  t += _conv_entries('decoder.conv_in', ('decoder', 'conv_in'), cfg.latent_channels, widths[0])
  t += _mid_entries('decoder.mid_block', ('decoder', 'mid'), widths[0], cfg.mid_block_add_attention)
  cin = widths[0]
  for i, ch in enumerate(widths):
    for j in range(cfg.layers_per_block + 1):
      t += _resnet_entries(f'decoder.up_blocks.{i}.resnets.{j}', ('decoder', f'up_{i}_res_{j}'), cin, ch)
      cin = ch
    if i < n - 1:
      t += _conv_entries(f'decoder.up_blocks.{i}.upsamplers.0.conv', ('decoder', f'up_{i}_upsample'), ch, ch)
  t += _norm_entries('decoder.conv_norm_out', ('decoder', 'conv_norm_out'), widths[-1])
  t += _conv_entries('decoder.conv_out', ('decoder', 'conv_out'), widths[-1], cfg.out_channels)
  return t


def _aliases(table: Sequence[Entry]) -> dict[str, list[str]]:
  out = {}
  for e in table:
    for new, old in _LEGACY_ATTENTION.items():
      marker = f'.attentions.0.{new}.'
      if marker in e.source:
        out[e.source] = [e.source.replace(marker, f'.attentions.0.{old}.')]
  return out


def _owned(name: str) -> bool:
  return name.split('.', 1)[0] in ('encoder', 'decoder', 'quant_conv', 'post_quant_conv')


def params_from_tensors(cfg: VAEConfig, tensors: dict[str, np.ndarray], where: str) -> dict:
  table = weight_table(cfg)
  return {'params': hf.assemble(table, tensors, owned=_owned, where=where, aliases=_aliases(table))}


# ---- user-facing wrapper ------------------------------------------------------------------------

class VAE:
  """A frozen AutoencoderKL with its weights; `encode` / `decode` are jitted per input shape."""

  def __init__(self, cfg: VAEConfig, params, dtype: str = 'float32', folder: pathlib.Path | None = None):
    self.cfg = cfg
    self.params = params
    self.folder = folder   # where the weights came from (None: random)
    self.module = AutoencoderKL(cfg, jnp.dtype(dtype))
    self._encode = jax.jit(functools.partial(_encode_fn, self.module, cfg))
    self._decode = jax.jit(functools.partial(_decode_fn, self.module, cfg))

  @classmethod
  def random(cls, cfg: VAEConfig, seed: int = 0, dtype: str = 'float32') -> 'VAE':
    """Random weights (benchmarks, tests)."""
    f = cfg.downsample_factor
    x = jnp.zeros((1, 2 * f, 2 * f, cfg.in_channels), jnp.float32)
    params = jax.jit(AutoencoderKL(cfg).init)(jax.random.PRNGKey(seed), x)
    return cls(cfg, params, dtype)

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    f = self.cfg.downsample_factor
    return (image_size // f, image_size // f, self.cfg.latent_channels)

  def check_images(self, images) -> None:
    f, c = self.cfg.downsample_factor, self.cfg.in_channels
    if images.ndim != 4 or images.shape[-1] != c or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f'VAE.encode: images have shape {tuple(images.shape)}; expected [B, H, W, {c}] with H '
                       f'and W multiples of {f}, values in [-1, 1]')

  def encode(self, images, rng: jax.Array | None = None):
    """images [B,H,W,C] in [-1,1] → scaled latents [B,H/f,W/f,latent]: the posterior mean, or a sample."""
    self.check_images(images)
    return self._encode(self.params, jnp.asarray(images, jnp.float32), rng)

  def decode(self, latents):
    """Scaled latents [B,h,w,latent] → images [B,h·f,w·f,C] (not clipped)."""
    c = self.cfg.latent_channels
    if latents.ndim != 4 or latents.shape[-1] != c:
      raise ValueError(f'VAE.decode: latents have shape {tuple(latents.shape)}; expected [B, h, w, {c}]')
    return self._decode(self.params, jnp.asarray(latents, jnp.float32))


def _encode_fn(module, cfg, params, images, rng):
  mean, logvar = module.apply(params, images, method=AutoencoderKL.encode)
  z = mean
  if rng is not None:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
  return (z - cfg.shift_factor) * cfg.scaling_factor


def _decode_fn(module, cfg, params, latents):
  z = latents / cfg.scaling_factor + cfg.shift_factor
  return module.apply(params, z, method=AutoencoderKL.decode)


def load_vae(folder: str | pathlib.Path, dtype: str = 'float32', subfolder: str = '') -> VAE:
  """A diffusers AutoencoderKL folder (`config.json` + `diffusion_pytorch_model.safetensors`).

  `subfolder` selects e.g. 'vae' inside a whole pipeline folder. Raises LoadError (a ValueError) naming the
  missing file or the first tensor that does not match the config.
  """
  path = hf.require_dir(pathlib.Path(folder).expanduser() / subfolder, 'VAE')
  cfg = VAEConfig.from_json(hf.read_config(path), path)
  tensors = hf.read_safetensors(path, WEIGHTS_FILE)
  params = params_from_tensors(cfg, tensors, str(path / WEIGHTS_FILE))
  expected = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 2 * cfg.downsample_factor, 2 * cfg.downsample_factor,
                                       cfg.in_channels)))
  hf.check_tree(params, expected, str(path))
  return VAE(cfg, jax.tree_util.tree_map(jnp.asarray, params), dtype, folder=path.resolve())
