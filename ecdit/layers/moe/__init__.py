"""Feed-forward layers: the dense FFN and the Mixture-of-Experts FFN (expert-choice or token-choice routing),
with its expert-parallel path, its config check and its layout check.

`make_ffn(cfg, sparse)(x, train=...)` is what a transformer block calls. The MoE layer:

  1. cuts the `[B, S, d]` tokens into routing groups `[G, Sg, d]` (`cfg.routing_scope`: one image per group,
     fixed-size groups spanning images, or the whole batch);
  2. routes in float32: `probs = softmax(x·W_r)` over experts, then `routing.expert_choice` (or
     `routing.token_choice`) gives an expert-centric plan `gate, index [G, E, C]`;
  3. dispatches with `cfg.moe_backend`:
       'gather'  takes the chosen tokens into an expert-major `[E, G, C, d]` buffer and scatter-adds the
                 gate-weighted expert outputs back (memory O(G·E·C·d));
       'onehot'  builds the one-hot dispatch tensor `[G, E, C, Sg]` and uses two einsums (memory
                 O(G·E·C·Sg), quadratic in the group size; the readable reference);
  4. runs the E stacked experts as one batched einsum over `[E, G·C, d]`; output = Σ over the experts that
     chose a token of gate · expert(token), not renormalised. A token no expert chose gets 0 (the block's
     residual carries it).

Expert-major `[E, G, C, d]` is the layout the experts' batched matmul wants (dispatch.py says why).

Under `jax.set_mesh(mesh)` with ecdit's mesh axes and more than one device, steps 1-4 run expert-parallel in
`jax.shard_map` (parallel.py) with the same results; one device runs them as written in layer.py.

Modules (each imports only those above it):
  ffn.py       the FFN maths, once: DenseFFN and the E stacked experts (`run_experts`, optional 'model' psum)
  dispatch.py  routing groups (`group_tokens`) and the gather / one-hot dispatch and combine
  router.py    the float32 router (`route`) and the 'moe_stats' values (`routing_stats`)
  layout.py    the split over a mesh and its divisibility errors (`layout`, `check_experts`)
  parallel.py  the expert-parallel shard_map path (`active_mesh`, `moe_expert_parallel`)
  layer.py     MoEFFN (parameters, path choice, sowing), `check_moe_config`, `make_ffn`

Sown collections (only when the caller makes them mutable in `apply`; `init` sows nothing, so the variables it
returns hold only 'params'):
  'moe_stats': experts_per_token `[B, S]` int32, experts_per_token_hist `[E+1]` (fraction of tokens with
               0..E experts), unrouted_fraction, mean_gate, router_logit_rms, and for token choice
               dropped_fraction (share of the k·tokens requests dropped for capacity).
  'losses':    aux_loss = cfg.aux_loss_weight · load_balance_loss (token choice only).
"""

from ecdit.layers.moe import parallel
from ecdit.layers.moe.dispatch import (dispatch_and_combine, gather_combine, gather_dispatch, group_tokens,
                                       onehot_dispatch_mask)
from ecdit.layers.moe.ffn import GELU_APPROXIMATE, DenseFFN, gelu, run_experts
from ecdit.layers.moe.layer import MoEFFN, check_moe_config, make_ffn
from ecdit.layers.moe.layout import Layout, check_experts, layout
from ecdit.layers.moe.router import route, routing_stats

__all__ = ['GELU_APPROXIMATE', 'DenseFFN', 'Layout', 'MoEFFN', 'check_experts', 'check_moe_config',
           'dispatch_and_combine', 'gather_combine', 'gather_dispatch', 'gelu', 'group_tokens', 'layout',
           'make_ffn', 'onehot_dispatch_mask', 'parallel', 'route', 'routing_stats', 'run_experts']
