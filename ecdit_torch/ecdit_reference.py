"""EC-DiT in plain PyTorch: a reference implementation that reads an `ecdit export` directory.

    model = load_model('export_dir')            # torch.nn.Module in eval mode, float32
    v = model(x_t, t, text_ids, text_mask)      # velocity

Inputs follow the JAX model exactly: `x_t` float `[B, H, W, C]` (NHWC, channels last — not PyTorch's usual
NCHW), `t` float `[B]` in [0, 1] (t = 1 is pure noise), `text_ids` int `[B, L]` with L <= text_length (or, for
`text_encoder='precomputed'`, float states `[B, L, text_states_dim]`), `text_mask` bool `[B, L]` (True = real
token; when omitted: `text_ids != 0`, the pad id, or all True for precomputed states). Returns the velocity
`[B, H, W, C]`. This file depends on torch and safetensors only (no JAX), so it can be copied out on its own.

The math mirrors ecdit/models and ecdit/layers (written separately here):
- LayerNorm as Flax computes it: var = max(E[x²] − E[x]², 0); eps 1e-6 in DiT blocks, 1e-5 in the text
  encoder. GeLU is the tanh approximation everywhere.
- DiT block: adaLN-Zero self-attention (grouped key/value heads), a plain-residual cross-attention to the
  projected text states (affine LN, no modulation), then a dense FFN or an MoE FFN, adaLN-gated.
- MoE: float32 router softmax over experts, routing groups per `routing_scope` ('image': one image,
  'group': `group_size` consecutive tokens across the batch, 'batch': everything). Expert choice: each expert
  takes its top-C tokens by probability, ties broken by lower token position (a stable sort, because
  `torch.topk` does not promise an order for ties). Token choice: each token asks for its top-k experts (ties:
  lower expert id), requests are served all first choices in position order, then all second choices, …,
  until an expert's C slots are full. Output = Σ gate·expert(token) over the slots holding the token; gates are
  the raw router probabilities (not renormalised). Capacity C = clip(floor(S·f/E), 1, S), f·k for token
  choice, with the eval capacity factor (inference).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

TIME_SCALE = 1000.0
TIME_FREQ_DIM = 256
BLOCK_LN_EPS = 1e-6
TEXT_LN_EPS = 1e-5
PAD_ID = 0
_FLOOR_SLACK = 1e-9


class ExportError(ValueError):
  """A bad export folder (`ecdit export` or `--format=diffusers`): a missing file or folder, an invalid
  config.json, tensors that do not match it. The message is one line naming the file and the key or tensor."""


class Config:
  """The `model` section of config.json as attributes, plus the derived sizes."""

  def __init__(self, d: Mapping[str, Any]):
    self.__dict__.update(dict(d))
    self.kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    self.head_dim = self.width // self.num_heads
    self.grid_size = self.image_size // self.patch_size
    self.num_tokens = self.grid_size ** 2
    self.patch_dim = self.patch_size ** 2 * self.in_channels
    self.text_dim = self.text_width if self.text_encoder == 'transformer' else self.text_states_dim

  def is_sparse_block(self, i: int) -> bool:
    return self.routing != 'dense' and (i + 1) % self.moe_every == 0

  def capacity(self, group_tokens: int) -> int:
    f = self.capacity_factor if self.eval_capacity_factor is None else self.eval_capacity_factor
    k = self.top_k if self.routing == 'token_choice' else 1
    c = math.floor(group_tokens * float(f * k) / self.num_experts + _FLOOR_SLACK)
    return int(min(max(c, 1), group_tokens))


# ---- primitives -----------------------------------------------------------------------------------------

def gelu(x):
  return F.gelu(x, approximate='tanh')


class LayerNorm(nn.Module):
  def __init__(self, dim: int, eps: float, affine: bool):
    super().__init__()
    self.eps = eps
    if affine:
      self.weight = nn.Parameter(torch.ones(dim))
      self.bias = nn.Parameter(torch.zeros(dim))
    else:
      self.weight = self.bias = None

  def forward(self, x):
    mean = x.mean(-1, keepdim=True)
    var = torch.clamp((x * x).mean(-1, keepdim=True) - mean * mean, min=0.0)
    mul = torch.rsqrt(var + self.eps)
    if self.weight is not None:
      mul = mul * self.weight
    y = (x - mean) * mul
    return y + self.bias if self.bias is not None else y


def modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
  """Multi-head attention with `kv_heads` shared key/value heads; float32 softmax; all-masked rows → 0."""

  def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, context_dim: int | None = None):
    super().__init__()
    context_dim = context_dim or dim
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
    self.query = nn.Linear(dim, heads * head_dim)
    self.key = nn.Linear(context_dim, kv_heads * head_dim)
    self.value = nn.Linear(context_dim, kv_heads * head_dim)
    self.out = nn.Linear(heads * head_dim, dim)

  def forward(self, x, context=None, key_mask=None):
    ctx = x if context is None else context
    b, lq, _ = x.shape
    lk = ctx.shape[1]
    kv, hd = self.kv_heads, self.head_dim
    groups = self.heads // kv
    q = self.query(x).reshape(b, lq, kv, groups, hd)
    k = self.key(ctx).reshape(b, lk, kv, hd)
    v = self.value(ctx).reshape(b, lk, kv, hd)
    logits = torch.einsum('bqkgd,bskd->bkgqs', q, k) / torch.sqrt(torch.tensor(float(hd), dtype=q.dtype))
    if key_mask is not None:
      m = key_mask[:, None, None, None, :]
      logits = torch.where(m, logits, torch.tensor(torch.finfo(logits.dtype).min, dtype=logits.dtype))
    probs = torch.softmax(logits, dim=-1)
    if key_mask is not None:
      probs = probs * key_mask.any(-1)[:, None, None, None, None].to(probs.dtype)
    out = torch.einsum('bkgqs,bskd->bqkgd', probs, v).reshape(b, lq, self.heads * hd)
    return self.out(out)


# ---- embeddings -----------------------------------------------------------------------------------------

def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
  """Fixed `[grid², dim]` table: first half of the channels encodes the row, second half the column."""
  def one_axis(d, pos):
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
  r = torch.arange(grid, dtype=torch.float64)
  rows, cols = torch.meshgrid(r, r, indexing='ij')
  return torch.cat([one_axis(dim // 2, rows), one_axis(dim // 2, cols)], dim=1).to(torch.float32)


def timestep_embedding(t, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0):
  """Sinusoid of t·1000, float32 `[B, dim]`, `[cos, sin]` order."""
  half = dim // 2
  log_period = torch.log(torch.tensor(max_period, dtype=torch.float32))
  freqs = torch.exp(-log_period * torch.arange(half, dtype=torch.float32) / half)
  args = (t.to(torch.float32) * TIME_SCALE)[:, None] * freqs[None, :]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


class TimestepEmbedder(nn.Module):
  def __init__(self, width: int):
    super().__init__()
    self.fc1 = nn.Linear(TIME_FREQ_DIM, width)
    self.fc2 = nn.Linear(width, width)

  def forward(self, t):
    return self.fc2(F.silu(self.fc1(timestep_embedding(t))))


class PatchEmbed(nn.Module):
  def __init__(self, patch_dim: int, width: int):
    super().__init__()
    self.proj = nn.Linear(patch_dim, width)

  def forward(self, tokens):
    return self.proj(tokens)


def patchify(x, p: int):
  """NHWC `[B, H, W, C]` → `[B, (H/p)(W/p), p·p·C]`, patches row-major, each flattened (row, col, channel)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p: int, grid: int, channels: int):
  b = tokens.shape[0]
  x = tokens.reshape(b, grid, grid, p, p, channels).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * p, grid * p, channels)


class AdaLN(nn.Module):
  """SiLU(c) → linear → `chunks` vectors of the model width."""

  def __init__(self, width: int, chunks: int):
    super().__init__()
    self.chunks = chunks
    self.proj = nn.Linear(width, chunks * width)

  def forward(self, c):
    return self.proj(F.silu(c)).chunk(self.chunks, dim=-1)


# ---- text encoder ---------------------------------------------------------------------------------------

class TextBlock(nn.Module):
  def __init__(self, width: int, heads: int):
    super().__init__()
    self.norm1 = LayerNorm(width, TEXT_LN_EPS, affine=True)
    self.attn = Attention(width, heads, heads, width // heads)
    self.norm2 = LayerNorm(width, TEXT_LN_EPS, affine=True)
    self.mlp_in = nn.Linear(width, 4 * width)
    self.mlp_out = nn.Linear(4 * width, width)

  def forward(self, x, mask):
    x = x + self.attn(self.norm1(x), key_mask=mask)
    return x + self.mlp_out(gelu(self.mlp_in(self.norm2(x))))


class TextEncoder(nn.Module):
  def __init__(self, cfg: Config):
    super().__init__()
    self.token_embed = nn.Embedding(cfg.vocab_size, cfg.text_width)
    self.pos_embed = nn.Parameter(torch.zeros(cfg.text_length, cfg.text_width))
    self.blocks = nn.ModuleList([TextBlock(cfg.text_width, cfg.text_heads) for _ in range(cfg.text_depth)])
    self.final_norm = LayerNorm(cfg.text_width, TEXT_LN_EPS, affine=True)

  def forward(self, ids, mask):
    x = self.token_embed(ids.long()) + self.pos_embed[None, :ids.shape[1]]
    for block in self.blocks:
      x = block(x, mask)
    return self.final_norm(x)


# ---- feed-forward layers --------------------------------------------------------------------------------

class DenseFFN(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.wi = nn.Linear(width, hidden)
    self.wo = nn.Linear(hidden, width)

  def forward(self, x):
    return self.wo(gelu(self.wi(x)))


class StackedLinear(nn.Module):
  """E linear layers in one tensor: weight `[E, out, in]`, bias `[E, out]`."""

  def __init__(self, experts: int, fan_in: int, fan_out: int):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(experts, fan_out, fan_in))
    self.bias = nn.Parameter(torch.zeros(experts, fan_out))

  def forward(self, x):  # x [G, E, C, in]
    return torch.einsum('geci,eoi->geco', x, self.weight) + self.bias[None, :, None, :]


def stable_descending(scores, dim: int):
  """Indices sorting `scores` high to low along `dim`, equal scores in increasing index order."""
  return torch.sort(scores, dim=dim, descending=True, stable=True).indices


def expert_choice_plan(probs, capacity: int):
  """probs `[G, S, E]` → (gate, index) `[G, E, C]`: each expert's top-C tokens, ties to lower positions."""
  per_expert = probs.transpose(1, 2)                                  # [G, E, S]
  index = stable_descending(per_expert, -1)[..., :capacity]
  return torch.gather(per_expert, -1, index), index


def token_choice_plan(probs, k: int, capacity: int):
  """probs `[G, S, E]` → (gate, index, valid) `[G, E, C]`, slots filled in priority order (rank, position)."""
  g, s, e = probs.shape
  choice = stable_descending(probs, -1)[..., :k]                      # [G, S, k] experts, best first
  expert = choice.transpose(1, 2).reshape(g, k * s)                   # requests in priority order
  position = torch.arange(s).repeat(k)[None].expand(g, k * s)
  onehot = F.one_hot(expert, e)                                       # [G, k·S, E]
  slot = ((torch.cumsum(onehot, dim=1) - 1) * onehot).sum(-1)         # slot each request would take
  keep = slot < capacity
  group = torch.arange(g)[:, None].expand(g, k * s)
  index = torch.zeros(g, e, capacity, dtype=torch.long)
  valid = torch.zeros(g, e, capacity, dtype=torch.bool)
  index[group[keep], expert[keep], slot[keep]] = position[keep]
  valid[group[keep], expert[keep], slot[keep]] = True
  gate = torch.where(valid, torch.gather(probs.transpose(1, 2), -1, index), torch.zeros((), dtype=probs.dtype))
  return gate, index, valid


class MoEFFN(nn.Module):
  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    hidden = cfg.mlp_ratio * cfg.width
    self.router = nn.Linear(cfg.width, cfg.num_experts, bias=False)
    self.wi = StackedLinear(cfg.num_experts, cfg.width, hidden)
    self.wo = StackedLinear(cfg.num_experts, hidden, cfg.width)

  def group(self, x):
    b, s, d = x.shape
    scope = self.cfg.routing_scope
    if scope == 'image':
      return x
    if scope == 'batch':
      return x.reshape(1, b * s, d)
    if (b * s) % self.cfg.group_size:
      raise ValueError(f'model.group_size={self.cfg.group_size} must divide batch·tokens = {b}·{s}')
    return x.reshape(b * s // self.cfg.group_size, self.cfg.group_size, d)

  def forward(self, x):
    cfg = self.cfg
    b, s, d = x.shape
    xg = self.group(x)
    g, sg, _ = xg.shape
    probs = torch.softmax(torch.einsum('gsd,ed->gse', xg.float(), self.router.weight.float()), dim=-1)
    cap = cfg.capacity(sg)
    if cfg.routing == 'expert_choice':
      gate, index = expert_choice_plan(probs, cap)
    else:
      gate, index, _ = token_choice_plan(probs, cfg.top_k, cap)
    xe = torch.gather(xg[:, None].expand(g, cfg.num_experts, sg, d), 2,
                      index[..., None].expand(*index.shape, d))        # [G, E, C, d]
    ye = self.wo(gelu(self.wi(xe))) * gate[..., None].to(xg.dtype)
    out = torch.zeros_like(xg)
    out.scatter_add_(1, index.reshape(g, -1)[..., None].expand(g, index.shape[1] * cap, d),
                     ye.reshape(g, -1, d))
    return out.reshape(b, s, d)


# ---- the model ------------------------------------------------------------------------------------------

class DiTBlock(nn.Module):
  def __init__(self, cfg: Config, index: int):
    super().__init__()
    d = cfg.width
    self.adaln = AdaLN(d, 6)
    self.norm_sa = LayerNorm(d, BLOCK_LN_EPS, affine=False)
    self.self_attn = Attention(d, cfg.num_heads, cfg.kv_heads, cfg.head_dim)
    self.norm_ca = LayerNorm(d, BLOCK_LN_EPS, affine=True)
    self.cross_attn = Attention(d, cfg.num_heads, cfg.kv_heads, cfg.head_dim)
    self.norm_ff = LayerNorm(d, BLOCK_LN_EPS, affine=False)
    self.sparse = cfg.is_sparse_block(index)
    if self.sparse:
      self.moe = MoEFFN(cfg)
    else:
      self.ffn = DenseFFN(d, cfg.mlp_ratio * d)

  def forward(self, x, c, text, text_mask):
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = self.adaln(c)
    x = x + gate_sa[:, None, :] * self.self_attn(modulate(self.norm_sa(x), shift_sa, scale_sa))
    x = x + self.cross_attn(self.norm_ca(x), text, text_mask)
    h = modulate(self.norm_ff(x), shift_ff, scale_ff)
    return x + gate_ff[:, None, :] * (self.moe(h) if self.sparse else self.ffn(h))


class FinalLayer(nn.Module):
  def __init__(self, cfg: Config):
    super().__init__()
    self.adaln = AdaLN(cfg.width, 2)
    self.norm = LayerNorm(cfg.width, BLOCK_LN_EPS, affine=False)
    self.proj = nn.Linear(cfg.width, cfg.patch_dim)

  def forward(self, x, c):
    shift, scale = self.adaln(c)
    return self.proj(modulate(self.norm(x), shift, scale))


class ECDiT(nn.Module):
  """forward(x_t [B,H,W,C], t [B], text_ids [B,L], text_mask [B,L] | None) → velocity [B,H,W,C]."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.patch_embed = PatchEmbed(cfg.patch_dim, cfg.width)
    self.t_embed = TimestepEmbedder(cfg.width)
    if cfg.text_encoder == 'transformer':
      self.text_encoder = TextEncoder(cfg)
    self.text_proj = nn.Linear(cfg.text_dim, cfg.width)
    self.blocks = nn.ModuleList([DiTBlock(cfg, i) for i in range(cfg.depth)])
    self.final = FinalLayer(cfg)
    self.register_buffer('pos_embed', sincos_pos_embed_2d(cfg.width, cfg.grid_size), persistent=False)

  def check_inputs(self, x, t, text, text_mask):
    cfg = self.cfg
    want = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f'x_t: got shape {tuple(x.shape)}, expected [B, {want[0]}, {want[1]}, {want[2]}] (NHWC)')
    b = x.shape[0]
    if tuple(t.shape) != (b,):
      raise ValueError(f't: got shape {tuple(t.shape)}, expected [{b}]')
    if cfg.text_encoder == 'transformer':
      if text.ndim != 2 or text.shape[0] != b or text.shape[1] > cfg.text_length:
        raise ValueError(f'text_ids: got shape {tuple(text.shape)}, expected [{b}, L] with L <= {cfg.text_length}')
    elif text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_states_dim:
      raise ValueError(f'text states: got shape {tuple(text.shape)}, expected [{b}, L, {cfg.text_states_dim}]')
    if tuple(text_mask.shape) != tuple(text.shape[:2]):
      raise ValueError(f'text_mask: got shape {tuple(text_mask.shape)}, expected {list(text.shape[:2])}')

  def forward(self, x_t, t, text_ids, text_mask=None):
    cfg = self.cfg
    if text_mask is None:
      text_mask = (text_ids != PAD_ID) if cfg.text_encoder == 'transformer' else torch.ones(
          text_ids.shape[:2], dtype=torch.bool)
    self.check_inputs(x_t, t, text_ids, text_mask)
    text_mask = text_mask.bool()
    tokens = self.patch_embed(patchify(x_t.float(), cfg.patch_size)) + self.pos_embed[None]
    c = self.t_embed(t)
    states = self.text_encoder(text_ids, text_mask) if cfg.text_encoder == 'transformer' else text_ids.float()
    ctx = self.text_proj(states)
    for block in self.blocks:
      tokens = block(tokens, c, ctx, text_mask)
    return unpatchify(self.final(tokens, c), cfg.patch_size, cfg.grid_size, cfg.in_channels)


# ---- loading ------------------------------------------------------------------------------------------
#
# Everything a config.json says is checked before a tensor is allocated: its keys present and typed, the sizes
# that set how much memory a model takes (depth, width, experts, text depth) against the safetensors header
# (read without reading a tensor), the rest consistent and below LIMITS, then every tensor name, shape and
# dtype against a model built on the meta device (no memory); only then are the weights read. Every failure
# is one ExportError line naming the file and the key or tensor.

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
ROUTINGS = ('dense', 'expert_choice', 'token_choice')
SCOPES = ('image', 'group', 'batch')
TEXT_ENCODERS = ('transformer', 'precomputed')
FLOAT_DTYPES = ('F16', 'BF16', 'F32', 'F64')
# Upper bounds far above any real EC-DiT; they keep a damaged config.json from asking for absurd work first.
LIMITS = {'image_size': 16384, 'in_channels': 1024, 'patch_size': 256, 'width': 65536, 'depth': 4096,
          'num_heads': 4096, 'mlp_ratio': 64, 'num_experts': 65536, 'moe_every': 4096, 'top_k': 65536,
          'vocab_size': 1 << 22, 'text_length': 65536, 'text_width': 65536, 'text_depth': 4096,
          'text_heads': 4096, 'text_states_dim': 65536, 'group_size': 1 << 24}
MAX_IMAGE_TOKENS = 1 << 16   # (image_size / patch_size)²: sets the position table, which no tensor checks
MODEL_SIZES = ('image_size', 'in_channels', 'patch_size', 'width', 'depth', 'num_heads', 'mlp_ratio',
               'num_experts', 'moe_every', 'top_k')
TEXT_SIZES = {'transformer': ('vocab_size', 'text_length', 'text_width', 'text_depth', 'text_heads'),
              'precomputed': ('text_states_dim',)}
OPTIONAL = ('num_kv_heads', 'eval_capacity_factor', 'group_size')   # None when absent


def first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
  """Fails with one ExportError naming `where` and `prefix + key`."""

  def __init__(self, d: Mapping[str, Any], where, prefix: str):
    self.d, self.where, self.prefix = d, where, prefix

  def fail(self, key: str, expected: str):
    if key not in self.d:
      raise ExportError(f'{self.where}: {self.prefix}{key} is missing: expected {expected}')
    raise ExportError(f'{self.where}: {self.prefix}{key}={self.d[key]!r} is invalid: expected {expected}')

  def sizes(self, keys, bounded: bool = True) -> None:
    for key in keys:
      v, top = self.d.get(key), LIMITS[key] if bounded else None
      if not _is_int(v) or v < 1 or (top is not None and v > top):
        self.fail(key, f'an integer in [1, {top}]' if top else 'a positive integer')

  def choice(self, key: str, allowed) -> str:
    if self.d.get(key) not in allowed:
      self.fail(key, f'one of {list(allowed)}')
    return self.d[key]

  def multiple(self, key: str, of: str) -> None:
    if self.d[key] % self.d[of]:
      self.fail(key, f'a multiple of {self.prefix}{of}={self.d[of]}')


def check_config(d: Mapping[str, Any], where, prefix: str = 'model.', header=None, weights=None,
                 text_prefix: str | None = 'text_encoder.') -> Config:
  """The architecture fields of a config.json (the `model` section of an export, or a diffusers transformer's
  config with text_encoder='precomputed') checked → Config; ExportError naming the key otherwise.

  header: read_header() of the weights file `weights`. The sizes that set how much a model allocates (depth,
  width, experts, text depth; text_prefix: where the text encoder's tensors are, None: not in these weights)
  are then compared with the weights first, so a wrong one is reported as what the weights hold."""
  if not isinstance(d, Mapping):
    raise ExportError(f'{where}: expected a JSON object of model fields, got {type(d).__name__}')
  c = _Checker(d, where, prefix)
  text_encoder = c.choice('text_encoder', TEXT_ENCODERS)
  routing = c.choice('routing', ROUTINGS)
  scope = c.choice('routing_scope', SCOPES)
  sizes = MODEL_SIZES + TEXT_SIZES[text_encoder]
  c.sizes(sizes, bounded=False)
  if header is not None:
    check_sizes(header_sizes(routing, text_encoder, header, text_prefix), d, weights, prefix)
  c.sizes(sizes)
  if text_encoder == 'transformer':
    c.multiple('text_width', 'text_heads')
  c.multiple('width', 'num_heads')
  c.multiple('image_size', 'patch_size')
  kv = d.get('num_kv_heads')
  if kv is not None and (not _is_int(kv) or kv < 1 or d['num_heads'] % kv):
    c.fail('num_kv_heads', f'null or a positive divisor of {prefix}num_heads={d["num_heads"]}')
  if (d['image_size'] // d['patch_size']) ** 2 > MAX_IMAGE_TOKENS:
    c.fail('image_size', f'at most {MAX_IMAGE_TOKENS} patches of {d["patch_size"]}² per image')
  if not _is_number(d.get('capacity_factor')) or d['capacity_factor'] <= 0:
    c.fail('capacity_factor', 'a number > 0')
  ecf = d.get('eval_capacity_factor')
  if ecf is not None and (not _is_number(ecf) or ecf <= 0):
    c.fail('eval_capacity_factor', 'null or a number > 0')
  if routing == 'token_choice' and d['top_k'] > d['num_experts']:
    c.fail('top_k', f'at most {prefix}num_experts={d["num_experts"]}')
  if scope == 'group':
    c.sizes(['group_size'])
  return Config({**{k: None for k in OPTIONAL}, **d})


def check_text_config(d: Mapping[str, Any], where, prefix: str = '', header=None, weights=None) -> None:
  """The sizes of ecdit's own text encoder component (its tensors named without the `text_encoder.` prefix)."""
  c = _Checker(d, where, prefix)
  c.sizes(TEXT_SIZES['transformer'], bounded=False)
  if header is not None:
    check_sizes({'text_depth': block_count(header, 'blocks.')}, d, weights, prefix)
  c.sizes(TEXT_SIZES['transformer'])
  c.multiple('text_width', 'text_heads')


def read_json_object(path: Path) -> dict:
  try:
    d = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ExportError(f'{path} is not a readable JSON file: {e}') from None
  if not isinstance(d, dict):
    raise ExportError(f'{path}: expected a JSON object, got {type(d).__name__}')
  return d


def read_header(files) -> dict[str, tuple[tuple[int, ...], str]]:
  """{tensor name: (shape, safetensors dtype)} from the headers of one or more safetensors files (the shards of
  one model), without reading any tensor."""
  import safetensors
  header, origin = {}, {}
  for file in files:
    try:
      with safetensors.safe_open(str(file), framework='pt') as f:
        names = list(f.keys())
        for name in names:
          if name in header:
            raise ExportError(f'{file}: tensor {name!r} is also in {origin[name]}; one tensor, one file')
          s = f.get_slice(name)
          header[name], origin[name] = (tuple(s.get_shape()), s.get_dtype()), file
    except ExportError:
      raise
    except Exception as e:  # noqa: BLE001 — the library raises several types for a damaged file.
      raise ExportError(f'{file} is not a readable safetensors file: {first_line(e)}') from None
  return header


def block_count(header, prefix: str) -> int:
  """How many distinct `<prefix><i>.` blocks the tensor names hold."""
  return len({n[len(prefix):].split('.')[0] for n in header if n.startswith(prefix)})


def check_sizes(found: Mapping[str, Any], want: Mapping[str, Any], where, prefix: str) -> None:
  """Sizes read from a header (`found`) against config.json's (`want`), before a model is built from the latter."""
  for key, value in found.items():
    if value != want[key]:
      raise ExportError(f'{where}: config.json says {prefix}{key}={want[key]}, but the weights hold {key}={value}; '
                        'do config.json and the weights belong together?')


def header_sizes(routing: str, text_encoder: str, header, text_prefix: str | None = 'text_encoder.') -> dict:
  """The sizes that set how much an ECDiT allocates, as the header holds them. text_prefix: where the text
  encoder's tensors are (None: not in these weights)."""
  found = {'depth': block_count(header, 'blocks.')}
  if 'patch_embed.proj.weight' in header:
    found['width'] = (header['patch_embed.proj.weight'][0] or (0,))[0]     # [width, patch_dim]
  if routing != 'dense':
    experts = [shape for n, (shape, _) in header.items() if n.endswith('.moe.wi.weight') and shape]
    found['num_experts'] = experts[0][0] if experts else 0                   # [E, hidden, width]
  if text_encoder == 'transformer' and text_prefix is not None:
    found['text_depth'] = block_count(header, f'{text_prefix}blocks.')
  return found


def expected_shapes(build) -> dict[str, tuple[int, ...]]:
  """{name: shape} of the state dict of the module `build()` makes, built on the meta device (no memory)."""
  with torch.device('meta'):
    module = build()
  return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_tensors(header, expected: Mapping[str, tuple[int, ...]], where) -> None:
  """Every expected tensor present with its shape and a float dtype; no unknown ones. ExportError naming the
  first offending tensor."""
  for name, shape in expected.items():
    if name not in header:
      raise ExportError(f'{where}: missing tensor {name!r} (shape {list(shape)}), which config.json requires')
    got, dtype = header[name]
    if got != shape:
      raise ExportError(f'{where}: tensor {name!r} has shape {list(got)}, but config.json implies '
                        f'{list(shape)}; do config.json and the weights belong together?')
    if dtype not in FLOAT_DTYPES:
      raise ExportError(f'{where}: tensor {name!r} has dtype {dtype}, expected one of {list(FLOAT_DTYPES)}')
  unknown = sorted(set(header) - set(expected))
  if unknown:
    raise ExportError(f'{where}: unexpected tensor(s) {unknown[:5]}{" ..." if len(unknown) > 5 else ""} that a '
                      'model with this config.json does not have; do config.json and the weights belong together?')


def _export_file(export_dir: Path, name: str) -> Path:
  if not export_dir.is_dir():
    raise ExportError(f'export directory {export_dir} does not exist')
  path = export_dir / name
  if not path.is_file():
    raise ExportError(f'{path} is missing: an export directory holds {CONFIG_FILE} and {WEIGHTS_FILE} '
                      '(written by `ecdit export`)')
  return path


def read_model_config(export_dir: str | Path, header=None) -> Config:
  """The checked `model` section of an export's config.json; with `header` (of its model.safetensors), checked
  against the weights too (check_config)."""
  export_dir = Path(export_dir)
  path = _export_file(export_dir, CONFIG_FILE)
  d = read_json_object(path)
  if not isinstance(d.get('model'), dict):
    raise ExportError(f'{path}: no "model" section (the model config); not an ecdit export?')
  return check_config(d['model'], path, 'model.', header, export_dir / WEIGHTS_FILE)


def load_model(export_dir: str | Path) -> ECDiT:
  """The exported model as a float32 `torch.nn.Module` in eval mode. Raises ExportError (one line, naming the
  file and the key or tensor) for a bad config.json or a model.safetensors that does not match it — checked
  on the safetensors header before any tensor is allocated or read."""
  from safetensors.torch import load_file
  export_dir = Path(export_dir)
  _export_file(export_dir, CONFIG_FILE)
  weights = _export_file(export_dir, WEIGHTS_FILE)
  header = read_header([weights])
  cfg = read_model_config(export_dir, header)
  check_tensors(header, expected_shapes(lambda: ECDiT(cfg)), weights)
  try:
    tensors = load_file(str(weights))
  except Exception as e:  # noqa: BLE001 — a file whose header is fine but whose data is cut short.
    raise ExportError(f'{weights} is not a readable safetensors file: {first_line(e)}') from None
  model = ECDiT(cfg)
  model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
  return model.eval()
