"""The bench model trained in plain PyTorch, timed beside ecdit's JAX step: the suite's `torch.*` keys.

Issue 8 calibrated its targets with the public PyTorch DiT on the machine it was written on. This measures the
same comparison wherever the suite runs, on the same model and batch: `ecdit/export/torch_reference.py` (a
plain PyTorch port of the EC-DiT model, float32, eager) holding the JAX model's initial weights, and one train
step doing the JAX step's work — rectified-flow loss at logit-normal t, backward, global-norm clipping,
`torch.optim.AdamW` (foreach) and an EMA of the parameters. And the float32 2048² matmul as torch runs it
(oneDNN/MKL), because XLA's matmul is not the fastest this machine has: `peak_gflops_blas`.

torch is an optional extra (`pip install -e '.[torch]'`); without it the suite writes `torch: null`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ecdit.config.model import ModelConfig
from ecdit.export import weights


def available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


class TrainStep:
  """`step()` runs one PyTorch train step of `cfg` (initial weights = the JAX `params`) on `batch` (the suite's
  step arrays: x0, text (states), text_mask) and returns the loss. `model`, `ema` (a list, in
  `model.parameters()` order) are exposed for tests."""

  def __init__(self, cfg: ModelConfig, params, batch: dict, tcfg):
    import torch  # pylint: disable=import-outside-toplevel
    from ecdit.export import torch_reference  # pylint: disable=import-outside-toplevel  (imports torch)
    self._torch = torch
    self.generator = torch.Generator().manual_seed(0)
    self.model = torch_reference.ECDiT(torch_reference.Config(cfg.to_dict())).train()
    self.model.load_state_dict({k: torch.from_numpy(np.array(v))
                                for k, v in weights.export_params(params, cfg).items()}, strict=True)
    self.train_cfg = t = tcfg.train
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps,
                                 weight_decay=t.weight_decay, foreach=True)
    self.ema = [p.detach().clone() for p in self.model.parameters()]
    self.image = torch.from_numpy(np.array(batch['x0']))
    self.states = torch.from_numpy(np.array(batch['text']))
    self.mask = torch.from_numpy(np.array(batch['text_mask']))

  def __call__(self) -> float:
    torch, t = self._torch, self.train_cfg
    noise = torch.randn(self.image.shape, generator=self.generator)
    tt = torch.sigmoid(torch.randn(self.image.shape[0], generator=self.generator))   # logit-normal t
    s = tt[:, None, None, None]
    x_t = (1 - s) * self.image + s * noise
    loss = torch.mean((self.model(x_t, tt, self.states, self.mask) - (noise - self.image)) ** 2)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(self.model.parameters())
    if t.grad_clip:
      torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, params, 1.0 - t.ema_decay)  # pylint: disable=protected-access
    return float(loss.detach())


def peak_matmul(n: int = 2048, calls: int = 4) -> tuple[Callable[[], object], float]:
  """`calls` float32 n×n @ n×n matmuls in torch (the machine's BLAS), and their FLOPs."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(0)
  a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)

  def fn():
    return [torch.mm(a, b) for _ in range(calls)][-1]
  return fn, 2.0 * n ** 3 * calls
