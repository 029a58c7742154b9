"""The batch contract: the one place that says what a training batch holds.

`ecdit.data.pipeline` emits it; the frozen text encoder (`ecdit.train.frozen.text_step`), the train step
(`ecdit.train.step`) and the loss (`ecdit.diffusion.flow.flow_loss`) read it without deciding anything again.

Step arrays (global `jax.Array`s sharded over the batch axis when the pipeline is given a sharding):

  x0         float32 [B, H, W, C]   what the flow diffuses: pixels in [-1, 1], or the dataset's VAE latent
                                    (`ecdit.data.latents`), whichever the prepared dataset holds
  text       int32   [B, L]         token ids (the model's own text encoder), or
             float32 [B, L, D]      a frozen encoder's states (precomputed in the dataset, or written in by
                                    `frozen.text_step` when the encoder runs in the loop)
  text_mask  bool    [B, L]         True = real token; a dropped caption is the empty caption (one end token,
                                    or the empty caption's precomputed states)

Host values (this process's rows, numpy / list, never sent to devices):

  image      float32 [b, H, W, 3]   the pixels in [-1, 1] (the same array as x0 in pixel space)
  caption    list[str]              the captions as fed to the text encoder ('' where dropped)
"""
from __future__ import annotations

from typing import Any, Mapping

STEP_KEYS = ('x0', 'text', 'text_mask')   # what the train step takes, in this order of documentation
HOST_KEYS = ('image', 'caption')          # kept on the host by the pipeline


def step_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The arrays of `batch` the train step consumes (drops the host values)."""
  return {k: batch[k] for k in STEP_KEYS}
