"""The EC-DiT backbone as a diffusers model: `ECDiTTransformer2DModel.from_pretrained(folder)`.

The module *is* the reference model (ecdit_reference.ECDiT, the math written once); this class adds diffusers'
config + loading machinery and the diffusers calling convention:

    v = transformer(hidden_states [B, C, H, W] (NCHW), timestep t [B] in [0, 1] (1 = pure noise),
                    encoder_hidden_states [B, L, text_states_dim], encoder_attention_mask bool [B, L]).sample

and returns the rectified-flow velocity dx/dt, NCHW. The text encoder is a separate component
(text_encoder_ecdit.py or a pretrained CLIP / T5), so this model always takes text states. State-dict names
are those of `ecdit export` (weights.py's table) without the `text_encoder.` entries: experts stacked,
`blocks.i.moe.wi.weight [E, hidden, d]`, slice e = expert e as an nn.Linear weight.

Imports torch, diffusers and the sibling ecdit_reference.py only (this file is copied into exported folders).
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from .ecdit_reference import ECDiT, Config


class ECDiTTransformer2DModel(ECDiT, ModelMixin, ConfigMixin):
  """EC-DiT (expert-choice / token-choice MoE or dense) velocity model. Config keys: the architecture fields of
  ecdit's ModelConfig that inference needs (training-only ones such as aux_loss_weight are dropped)."""

  _supports_gradient_checkpointing = False
  _no_split_modules = ['DiTBlock']

  @register_to_config
  def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 2, width: int = 384,
               depth: int = 12, num_heads: int = 6, num_kv_heads: int | None = None, mlp_ratio: int = 4,
               routing: str = 'expert_choice', num_experts: int = 8, moe_every: int = 2,
               capacity_factor: float = 2.0, eval_capacity_factor: float | None = None,
               routing_scope: str = 'image', group_size: int | None = None, top_k: int = 2,
               text_states_dim: int = 256):
    arch = {k: v for k, v in locals().items() if k not in ('self', '__class__')}
    super().__init__(Config(dict(arch, text_encoder='precomputed')))

  def forward(self, hidden_states: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
              encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
    b = hidden_states.shape[0]
    t = torch.as_tensor(timestep, dtype=torch.float32, device=hidden_states.device)
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t
    v = super().forward(hidden_states.permute(0, 2, 3, 1), t, encoder_hidden_states, encoder_attention_mask)
    v = v.permute(0, 3, 1, 2).to(hidden_states.dtype)
    return Transformer2DModelOutput(sample=v) if return_dict else (v,)
