"""ModelConfig: every architectural knob of an EC-DiT model, validated before anything compiles.

Experiments describe the model as the `model` section of an `ml_collections.ConfigDict`; `ModelConfig.from_dict`
resolves a size preset (`model.size`, see sizes.py) and checks every value, raising a `ValueError` that names
the field and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ecdit.config.sizes import preset

# Slack added before flooring in `capacity`, so that S·f/E products that are whole numbers in decimal
# (100·0.29 = 28.999999999999996 in binary floating point) are not rounded down.
_FLOOR_SLACK = 1e-9


def capacity(group_tokens: int, num_experts: int, factor: float) -> int:
  """Slots per expert per routing group: `clip(floor(S·f/E), 1, S)`.

  Rounding: the exact product S·f/E is rounded *down* (so `E·C <= S·f`, never more compute than asked for),
  then clipped to at least 1 (every expert processes something) and at most S (an expert cannot pick a
  token twice). The product is computed in float64 with a 1e-9 slack so that decimal factors such as 0.29
  land on the whole number they denote. No rounding to a multiple of anything (AXLearn rounds up to 4;
  we keep the paper's C = S·f_c/E).

  For token choice, pass `factor = f_c·k` (ModelConfig.capacity_for does).
  """
  if isinstance(group_tokens, bool) or not isinstance(group_tokens, int) or group_tokens < 1:
    raise ValueError(f'capacity: group_tokens={group_tokens!r} is invalid: expected an integer >= 1')
  if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f'capacity: num_experts={num_experts!r} is invalid: expected an integer >= 1')
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
    raise ValueError(f'capacity: capacity factor={factor!r} is invalid: expected a number > 0')
  c = math.floor(group_tokens * float(factor) / num_experts + _FLOOR_SLACK)
  return int(min(max(c, 1), group_tokens))



ROUTINGS = ('expert_choice', 'token_choice', 'dense')
BACKENDS = ('gather', 'onehot')
SCOPES = ('image', 'group', 'batch')
TEXT_ENCODERS = ('transformer', 'precomputed')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """An EC-DiT architecture. Images are NHWC; tokens are patches of `patch_size`²."""
  # Image side.
  image_size: int = 32
  in_channels: int = 3
  patch_size: int = 2
  # Backbone.
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  num_kv_heads: int | None = None  # None: same as num_heads (plain multi-head attention).
  mlp_ratio: int = 4
  # Feed-forward layers: every `moe_every`-th block (2nd, 4th, ... for 2) is sparse.
  routing: str = 'expert_choice'
  num_experts: int = 8
  moe_every: int = 2
  capacity_factor: float = 2.0       # expert choice: C = S·f_c/E; token choice: C = S·k·f_c/E.
  eval_capacity_factor: float | None = None  # None: same as capacity_factor.
  routing_scope: str = 'image'       # 'image' (Algorithm 1), 'group' (group_size tokens), 'batch' (pool).
  group_size: int | None = None      # tokens per routing group when routing_scope == 'group'.
  inference_group_size: int | None = None  # the same at sampling / eval / export (for_inference); None: group_size.
  moe_backend: str = 'gather'
  top_k: int = 2                     # token choice only.
  aux_loss_weight: float = 0.01      # token choice load-balancing loss weight.
  router_init_std: float = 0.006
  # Text side.
  text_encoder: str = 'transformer'  # or 'precomputed': the model takes text states [B, L, text_states_dim].
  vocab_size: int = 1024
  text_length: int = 32
  text_width: int = 256
  text_depth: int = 2
  text_heads: int = 4
  text_states_dim: int = 256         # only for text_encoder == 'precomputed'.
  # Numerics.
  dtype: str = 'float32'             # compute dtype; the router always runs in float32.
  param_dtype: str = 'float32'
  # Compilation.
  scan_layers: bool = False          # run the block stack as a scan over units of moe_every blocks.

  # ---- derived -------------------------------------------------------------------------------
  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.in_channels

  @property
  def scan_unit(self) -> int:
    """Blocks in the repeating unit of the stack: moe_every (dense…, MoE), or 1 for an all-dense model."""
    return 1 if self.routing == 'dense' else self.moe_every

  def is_sparse_block(self, index: int) -> bool:
    """0-based block index -> whether its FFN is an MoE layer (the 2nd, 4th, ... block for moe_every=2)."""
    return self.routing != 'dense' and (index + 1) % self.moe_every == 0

  def capacity_for(self, group_tokens: int, train: bool) -> int:
    """Tokens per expert per routing group. See `capacity` above for the rounding rule."""
    f = self.capacity_factor if train or self.eval_capacity_factor is None else self.eval_capacity_factor
    k = self.top_k if self.routing == 'token_choice' else 1
    return capacity(group_tokens, self.num_experts, f * k)

  # ---- construction --------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    """Builds from a mapping (e.g. a ConfigDict's `model` section). `size` selects a preset from sizes.py
    whose values the mapping's own keys override; unknown keys are an error."""
    d = dict(d)
    size = d.pop('size', None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'model: unknown key(s) {unknown}; known keys are {sorted(fields | {"size"})}')
    values = {}
    if size:
      values.update(preset(size))
    values.update({k: v for k, v in d.items()})
    cfg = cls(**values)
    cfg.validate()
    return cfg

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if d['inference_group_size'] is None:
      # Left out when unset, so that resolved models (workdir hashes) and exports from before it are unchanged.
      del d['inference_group_size']
    return d

  def for_inference(self) -> 'ModelConfig':
    """The model as sampling, evaluation and exports run it: routing groups of `inference_group_size` tokens
    (the paper: 1024 in training, 512 at inference). Parameters do not depend on the group size."""
    if self.inference_group_size is None:
      return self
    return dataclasses.replace(self, group_size=self.inference_group_size, inference_group_size=None)

  def validate(self) -> 'ModelConfig':
    def fail(field, value, expected):
      raise ValueError(f'model.{field}={value!r} is invalid: expected {expected}')

    def choice(field, allowed):
      if getattr(self, field) not in allowed:
        fail(field, getattr(self, field), f'one of {list(allowed)}')

    def positive(*names):
      for n in names:
        v = getattr(self, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
          fail(n, v, 'a positive integer')

    positive('image_size', 'in_channels', 'patch_size', 'width', 'depth', 'num_heads', 'mlp_ratio',
             'moe_every', 'top_k', 'vocab_size', 'text_length', 'text_width', 'text_depth', 'text_heads',
             'text_states_dim')
    if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
      fail('num_experts', self.num_experts, 'an integer >= 1')
    choice('routing', ROUTINGS)
    choice('moe_backend', BACKENDS)
    choice('routing_scope', SCOPES)
    choice('text_encoder', TEXT_ENCODERS)
    choice('dtype', DTYPES)
    choice('param_dtype', DTYPES)
    def finite(name, positive_only: bool):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
          or (v <= 0 if positive_only else v < 0):   # nan and inf fail here too
        fail(name, v, 'a finite number ' + ('> 0' if positive_only else '>= 0'))

    finite('capacity_factor', True)
    if self.eval_capacity_factor is not None:
      finite('eval_capacity_factor', True)
    finite('aux_loss_weight', False)
    finite('router_init_std', False)
    if self.width % self.num_heads:
      fail('width', self.width, f'a multiple of num_heads={self.num_heads}')
    if self.num_kv_heads is not None:
      if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
        fail('num_kv_heads', self.num_kv_heads, f'a positive divisor of num_heads={self.num_heads}')
    if self.image_size % self.patch_size:
      fail('image_size', self.image_size, f'a multiple of patch_size={self.patch_size}')
    if self.text_width % self.text_heads:
      fail('text_width', self.text_width, f'a multiple of text_heads={self.text_heads}')
    if self.routing == 'token_choice' and self.top_k > self.num_experts:
      fail('top_k', self.top_k, f'at most num_experts={self.num_experts}')
    if self.routing_scope == 'group':
      if not isinstance(self.group_size, int) or self.group_size < 1:
        fail('group_size', self.group_size, "a positive integer when routing_scope='group'")
    elif self.group_size is not None:
      fail('group_size', self.group_size, f"None unless routing_scope='group' (it is {self.routing_scope!r})")
    if self.inference_group_size is not None:
      v = self.inference_group_size
      if self.routing_scope != 'group':
        fail('inference_group_size', v, f"None unless routing_scope='group' (it is {self.routing_scope!r})")
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        fail('inference_group_size', v, "a positive integer or None (same as group_size)")
    if not isinstance(self.scan_layers, bool):
      fail('scan_layers', self.scan_layers, 'True or False')
    if self.scan_layers and self.depth % self.scan_unit:
      fail('depth', self.depth, f'a multiple of the scan unit ({self.scan_unit} blocks: moe_every) with '
           'model.scan_layers=True')
    return self
