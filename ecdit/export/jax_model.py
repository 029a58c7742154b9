"""`load_jax(export_dir)`: the exported model as a JAX callable with the PyTorch reference's signature."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from ecdit.export.weights import PAD_ID, load_params
from ecdit.config.model import ModelConfig
from ecdit.models.ecdit import build_model


class JaxVelocity:
  """`fn(x_t, t, text_ids, text_mask=None) -> velocity [B, H, W, C]` (NHWC; mask default `text_ids != 0`).

  Attributes: `params` (unboxed Flax params), `config` (ModelConfig), `model` (the Flax module)."""

  def __init__(self, params, config: ModelConfig):
    self.params, self.config = params, config
    self.model = build_model(config.for_inference())
    self._apply = jax.jit(lambda p, x, t, ids, m: self.model.apply({'params': p}, x, t, ids, m, train=False))

  def __call__(self, x_t, t, text_ids, text_mask=None):
    text_ids = jnp.asarray(text_ids)
    if text_mask is None:
      text_mask = (text_ids != PAD_ID) if self.config.text_encoder == 'transformer' else jnp.ones(
          text_ids.shape[:2], bool)
    return self._apply(self.params, jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32), text_ids,
                       jnp.asarray(text_mask, bool))


def load_jax(export_dir: str | Path) -> JaxVelocity:
  """Rebuilds the JAX model from an export directory's config.json and model.safetensors (checked tensor by
  tensor; ExportError names the offending one)."""
  params, cfg = load_params(export_dir)
  return JaxVelocity(params, cfg)
