"""ecdit's own small text transformer (trained with the model) as a diffusers component.

    states = text_encoder(input_ids [B, L] int, attention_mask [B, L] bool)   # float32 [B, L, text_width]

The module is ecdit_reference.TextEncoder; weight names are those of `ecdit export` with the
`text_encoder.` prefix dropped. Imports torch, diffusers and the sibling ecdit_reference.py only.
"""
from __future__ import annotations

import types

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .ecdit_reference import PAD_ID, TextEncoder


class ECDiTTextEncoder(TextEncoder, ModelMixin, ConfigMixin):
  """Token + position embeddings, pre-LN transformer blocks (padding masked out of attention), final LN."""

  @register_to_config
  def __init__(self, vocab_size: int = 1024, text_length: int = 32, text_width: int = 256, text_depth: int = 2,
               text_heads: int = 4):
    super().__init__(types.SimpleNamespace(vocab_size=vocab_size, text_length=text_length, text_width=text_width,
                                           text_depth=text_depth, text_heads=text_heads))

  def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    if input_ids.ndim != 2 or input_ids.shape[1] > self.config.text_length:
      raise ValueError(f'input_ids: got shape {tuple(input_ids.shape)}, expected [B, L] with L <= '
                       f'{self.config.text_length}')
    mask = (input_ids != PAD_ID) if attention_mask is None else attention_mask.bool()
    return super().forward(input_ids, mask)
