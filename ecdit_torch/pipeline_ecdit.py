"""Text-to-image with an EC-DiT: `ECDiTPipeline`, a diffusers DiffusionPipeline.

    images = pipe(['a red circle', 'two squares'], num_inference_steps=25, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type='pil').images

The sampler is `ecdit sample`'s: x runs from t = 1 (noise) to t = 0 on the uniform grid t_i = 1 − i/n, with
classifier-free guidance v = v_u + s·(v_c − v_u) where v_u conditions on the empty caption (the training's
dropped caption); s = 1 skips the unconditional pass. The scheduler decides the rule, on exactly that grid:
diffusers' FlowMatchEulerDiscreteScheduler (shift 1): Euler, x ← x + (t_{i+1} − t_i)·v (`--sampler=euler`);
FlowMatchHeunDiscreteScheduler: Heun, the slopes at both ends of an interval averaged, the last interval (to
t = 0) a plain Euler step (`--sampler=heun`). Latents are NCHW, `[B, C, H, W]` (the model's in_channels and
image_size; VAE latents for latent runs, which `vae` decodes). Pass `latents=` to start from chosen noise.

Components: transformer (ECDiTTransformer2DModel), scheduler, text_encoder + tokenizer (ecdit's own, or the
run's pretrained T5EncoderModel + T5TokenizerFast / CLIPTextModel + CLIPTokenizer from transformers: its last
hidden state, after the final layer norm, as ecdit's JAX encoders give it), vae (AutoencoderKL, or None for
pixel-space runs). This file imports only torch, numpy and diffusers (it is copied into exported folders).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import FlowMatchHeunDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor


class ECDiTPipeline(DiffusionPipeline):
  model_cpu_offload_seq = 'text_encoder->transformer->vae'
  _optional_components = ['vae']

  def __init__(self, transformer, scheduler, text_encoder, tokenizer, vae=None, text_length: int = 32,
               text_encoder_uses_mask: bool = True, default_num_inference_steps: int = 25,
               default_guidance_scale: float = 3.0):
    super().__init__()
    self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                          tokenizer=tokenizer, vae=vae)
    # text_encoder_uses_mask: whether the text encoder's attention skips padding (ecdit's and T5: yes;
    # CLIP runs as Stable Diffusion runs it: no). The transformer's cross-attention always uses the mask.
    self.register_to_config(text_length=text_length, text_encoder_uses_mask=text_encoder_uses_mask,
                            default_num_inference_steps=default_num_inference_steps,
                            default_guidance_scale=default_guidance_scale)

  @torch.no_grad()
  def encode_prompt(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(states float32 [B, L, D], mask bool [B, L])."""
    enc = self.tokenizer(prompts, padding='max_length', max_length=self.config.text_length, truncation=True,
                         return_tensors='pt')
    ids, mask = enc['input_ids'].to(device), enc['attention_mask'].to(device)
    out = self.text_encoder(ids, attention_mask=mask.long() if self.config.text_encoder_uses_mask else None)
    states = out if torch.is_tensor(out) else out[0]   # transformers: last_hidden_state (final norm applied)
    return states.float(), mask.bool()

  def _set_grid(self, steps: int, device) -> None:
    """The scheduler's sigmas = ecdit's grid t_i = 1 − i/n (float32), ending at t = 0."""
    grid = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    if not isinstance(self.scheduler, FlowMatchHeunDiscreteScheduler):
      self.scheduler.set_timesteps(sigmas=grid[:-1], device=device)   # the final t = 0 appended by the scheduler
      return
    # Heun's set_timesteps takes no sigmas: build its layout (each inner point twice: the end of the Euler
    # predictor, the start of the next interval) on ecdit's grid instead of its own.
    self.scheduler.set_timesteps(steps, device=device)
    g = torch.from_numpy(grid).to(device)
    self.scheduler.sigmas = torch.cat([g[:1], g[1:-1].repeat_interleave(2), g[-1:]])
    self.scheduler.timesteps = self.scheduler.sigmas[:-1] * self.scheduler.config.num_train_timesteps

  def _velocity(self, x, t, states, mask, null_states, null_mask, guidance_scale):
    b = x.shape[0]
    tb = torch.full((b,), float(t), dtype=torch.float32, device=x.device)
    if guidance_scale == 1.0:
      return self.transformer(x, tb, states, mask).sample.float()
    v = self.transformer(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([states, null_states.expand_as(states)]),
                         torch.cat([mask, null_mask.expand_as(mask)])).sample.float()
    v_c, v_u = v[:b], v[b:]
    return v_u + guidance_scale * (v_c - v_u)

  @torch.no_grad()
  def __call__(self, prompt: str | list[str], num_inference_steps: int | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None, output_type: str = 'pil', return_dict: bool = True):
    """prompt(s) → ImagePipelineOutput(images): PIL images ('pil'), float [B, H, W, C] in [0, 1] ('np'), or
    the same as a torch tensor NCHW ('pt'); 'latent' returns the final latents unclipped."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    steps = self.config.default_num_inference_steps if num_inference_steps is None else int(num_inference_steps)
    scale = self.config.default_guidance_scale if guidance_scale is None else float(guidance_scale)
    if steps < 1:
      raise ValueError(f'num_inference_steps={steps} is invalid: expected an integer >= 1')
    if output_type not in ('pil', 'np', 'pt', 'latent'):
      raise ValueError(f"output_type={output_type!r} is invalid: expected one of 'pil', 'np', 'pt', 'latent'")
    device = self._execution_device
    cfg = self.transformer.config
    shape = (len(prompts), cfg.in_channels, cfg.image_size, cfg.image_size)
    if latents is None:
      latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
      raise ValueError(f'latents: got shape {tuple(latents.shape)}, expected {list(shape)} (NCHW)')
    x = latents.to(device=device, dtype=torch.float32)
    states, mask = self.encode_prompt(prompts, device)
    null_states, null_mask = self.encode_prompt([''], device) if scale != 1.0 else (None, None)
    self._set_grid(steps, device)
    # The model runs at sigmas[i] on the x the scheduler left: Euler's t_i; Heun's t_i, then its corrector's
    # t_{i+1} on the predicted x.
    with self.progress_bar(total=len(self.scheduler.timesteps)) as bar:
      for i, timestep in enumerate(self.scheduler.timesteps):
        v = self._velocity(x, self.scheduler.sigmas[i], states, mask, null_states, null_mask, scale)
        x = self.scheduler.step(v, timestep, x, return_dict=False)[0]
        bar.update()
    if output_type == 'latent':
      images = x
    else:
      if self.vae is not None:
        vc = self.vae.config
        z = x / vc.scaling_factor + (vc.shift_factor or 0.0)
        x = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
      images = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
      if output_type != 'pt':
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == 'pil':
          images = self.numpy_to_pil(images)
    self.maybe_free_model_hooks()
    return ImagePipelineOutput(images=images) if return_dict else (images,)
