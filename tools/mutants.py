"""Hand-written mutants for `tools/mutate.py`: one small, realistic bug each, with the tests that should catch it.

Each entry: `id`, `file`, `old` (a snippet that must occur exactly once in the file), `new`, `tests` (pytest
arguments: files, `file::test`, `-k expr`), and `why` (the behaviour the bug breaks). Keep `old` short enough to
survive unrelated edits; the tool reports a mutant whose `old` is gone as stale instead of guessing.
"""

MUTANTS = [
    # ---- routing ---------------------------------------------------------------------------------------------
    dict(id='ec-topk-over-experts', file='ecdit/layers/routing.py',
         old='jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)', new='jax.lax.top_k(probs, capacity)',
         tests=['tests/test_routing.py'], why='expert choice picks tokens per expert, not experts per token'),
    dict(id='tc-priority-order', file='ecdit/layers/routing.py',
         old='request = jax.nn.one_hot(jnp.swapaxes(choice, 1, 2), experts', new='request = jax.nn.one_hot(choice, experts',
         tests=['tests/test_routing.py'], why='token choice serves all first choices before any second choice'),
    dict(id='tc-slot-off-by-one', file='ecdit/layers/routing.py',
         old='slot = jnp.cumsum(request, axis=1) - 1', new='slot = jnp.cumsum(request, axis=1)',
         tests=['tests/test_routing.py', 'tests/test_moe.py'], why="an expert's first request takes slot 0"),
    dict(id='balance-loss-no-E', file='ecdit/layers/routing.py',
         old='return jnp.mean(experts * jnp.sum(fraction * mean_prob, axis=-1))',
         new='return jnp.mean(jnp.sum(fraction * mean_prob, axis=-1))',
         tests=['tests/test_routing.py'], why='the Switch loss is E·Σ f·P (1 for a uniform router)'),
    dict(id='capacity-ceil', file='ecdit/config/model.py',
         old='c = math.floor(group_tokens * float(factor) / num_experts + _FLOOR_SLACK)',
         new='c = math.ceil(group_tokens * float(factor) / num_experts)',
         tests=['tests/test_routing.py', 'tests/test_moe.py'], why='capacity rounds down: floor(S·f/E)'),
    # ---- MoE dispatch ----------------------------------------------------------------------------------------
    dict(id='combine-no-gate', file='ecdit/layers/moe/dispatch.py',
         old='weighted = expert_out * jnp.swapaxes(gate, 0, 1)[..., None].astype(expert_out.dtype)',
         new='weighted = expert_out',
         tests=['tests/test_moe.py'], why='expert outputs are weighted by their gates'),
    dict(id='flat-index-no-offset', file='ecdit/layers/moe/dispatch.py',
         old='offsets = (jnp.arange(groups, dtype=index.dtype) * tokens)[:, None, None]',
         new='offsets = jnp.zeros((groups, 1, 1), index.dtype)',
         tests=['tests/test_moe.py'], why='group g indexes its own rows of the flattened tokens'),
    # ---- attention -------------------------------------------------------------------------------------------
    dict(id='softmax-no-max-shift', file='ecdit/layers/attention.py',
         old='shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))',
         new='shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)) + 0.5 * (logits > 0)',
         tests=['tests/test_layers.py'], why='softmax is shift-invariant only for a per-row constant'),
    dict(id='attention-bwd-rowsum', file='ecdit/layers/attention.py',
         old='d_logits = probs * (d_probs - jnp.sum(d_out * out, axis=-1, keepdims=True))',
         new='d_logits = probs * d_probs',
         tests=['tests/test_layers.py'], why='softmax backward subtracts rowsum(P·dP)'),
    dict(id='attention-mask-ignored', file='ecdit/layers/attention.py',
         old="logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)",
         new="logits = logits",
         tests=['tests/test_layers.py'], why='padding keys get no attention'),
    # ---- DiT block -------------------------------------------------------------------------------------------
    dict(id='modulate-swap', file='ecdit/layers/dit.py',
         old='return x * (1 + scale[:, None, :]) + shift[:, None, :]',
         new='return x * (1 + shift[:, None, :]) + scale[:, None, :]',
         tests=['tests/test_dit_reference.py', 'tests/test_layers.py'], why='modulate(x, shift, scale) = x(1+scale)+shift'),
    dict(id='ffn-attention-gate', file='ecdit/layers/dit.py',
         old='x = x + gate_ff[:, None, :] * out', new='x = x + gate_sa[:, None, :] * out',
         tests=['tests/test_dit_reference.py', 'tests/test_layers.py'], why='each branch has its own adaLN gate'),
    dict(id='position-after-gather', file='ecdit/models/ecdit.py',
         old='''    tokens = tokens + jnp.asarray(sincos_pos_embed_2d(cfg.width, cfg.grid_size), dtype)[None]
    if keep_idx is not None:                                                                   # [B, K, d]
      tokens = jnp.take_along_axis(tokens, keep_idx.astype(jnp.int32)[:, :, None], axis=1)''',
         new='''    if keep_idx is not None:                                                                   # [B, K, d]
      tokens = jnp.take_along_axis(tokens, keep_idx.astype(jnp.int32)[:, :, None], axis=1)
    tokens = tokens + jnp.asarray(sincos_pos_embed_2d(cfg.width, cfg.grid_size), dtype)[None, :tokens.shape[1]]''',
         tests=['tests/test_train_paths.py', 'tests/test_flow.py'], why='kept tokens keep their true positions'),
    # ---- flow ------------------------------------------------------------------------------------------------
    dict(id='interpolate-reversed', file='ecdit/diffusion/flow.py',
         old='return t * noise + (1.0 - t) * x0', new='return t * x0 + (1.0 - t) * noise',
         tests=['tests/test_flow.py'], why='t=1 is pure noise'),
    dict(id='velocity-sign', file='ecdit/diffusion/flow.py',
         old='return noise - x0', new='return x0 - noise',
         tests=['tests/test_flow.py'], why='v = dx/dt = noise − x0'),
    dict(id='logit-normal-no-std', file='ecdit/diffusion/flow.py',
         old='jax.nn.sigmoid(mean + std * jax.random.normal(', new='jax.nn.sigmoid(mean + jax.random.normal(',
         tests=['tests/test_flow.py'], why='logit-normal t has the configured std'),
    dict(id='keep-count-round', file='ecdit/diffusion/flow.py',
         old='int(round(num_tokens * (1.0 - mask_ratio)))', new='int(num_tokens * mask_ratio)',
         tests=['tests/test_flow.py'], why='mask_ratio is the share of tokens dropped'),
    # ---- sampler ---------------------------------------------------------------------------------------------
    dict(id='heun-no-average', file='ecdit/diffusion/sampler.py',
         old='x_heun = x + (t_next - t) * 0.5 * (v + v_next)', new='x_heun = x + (t_next - t) * v_next',
         tests=['tests/test_flow.py', 'tests/test_analyze.py'], why='Heun averages the slopes at both ends'),
    dict(id='euler-wrong-direction', file='ecdit/diffusion/sampler.py',
         old='x_euler = x + (t_next - t) * v', new='x_euler = x + (t - t_next) * v',
         tests=['tests/test_flow.py'], why='sampling integrates from t=1 down to t=0'),
    # ---- update / step ---------------------------------------------------------------------------------------
    dict(id='adam-bias-correction', file='ecdit/train/update.py',
         old='u = (m / correct1.astype(m.dtype))', new='u = (m)',
         tests=['tests/test_train_update.py'], why="AdamW divides m by 1-b1^t (optax's bias correction)"),
    dict(id='ema-decay-flipped', file='ecdit/train/update.py',
         old="e = (k['decay'] * e + (1.0 - k['decay']) * p).astype(e.dtype)",
         new="e = ((1.0 - k['decay']) * e + k['decay'] * p).astype(e.dtype)",
         tests=['tests/test_train_update.py', 'tests/test_train.py'], why='EMA keeps decay of the old average'),
    dict(id='skip-ignores-grad-norm', file='ecdit/train/step.py',
         old='finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)   # and, checked there',
         new='finite = jnp.isfinite(loss)   # and, checked there',
         tests=['tests/test_train_paths.py', 'tests/test_train_update.py'], why='a non-finite gradient skips the step'),
    # ---- checkpoint / pipeline -------------------------------------------------------------------------------
    dict(id='restore-oldest-first', file='ecdit/train/checkpoint.py',
         old='for step in reversed(steps):', new='for step in steps:',
         tests=['tests/test_train.py'], why='resume from the newest readable checkpoint'),
    dict(id='checksum-ignored', file='ecdit/train/checkpoint.py',
         old='    if saved.get(name) != value:', new='    if False:',
         tests=['tests/test_train.py'], why='a restored array that differs from the saved one is damage'),
    dict(id='pipeline-state-ignored', file='ecdit/data/pipeline.py',
         old="self._step = int(state['step'])", new='self._step = 0',
         tests=['tests/test_data_pipeline.py'], why='set_state resumes the stream where it was saved'),
    # ---- export / eval ---------------------------------------------------------------------------------------
    dict(id='export-no-transpose', file='ecdit/export/weights.py',
         old='  return np.swapaxes(x, -1, -2)\n', new='  return np.asarray(x)\n',
         tests=['tests/test_dit_reference.py', 'tests/test_export.py'], why='files hold kernels in torch nn.Linear [out, in] layout'),
    dict(id='geneval-left-threshold', file='ecdit/eval/geneval_rules.py',
         old="  if dx < -0.5:\n    rels.add('left of')", new="  if dx < 0.5:\n    rels.add('left of')",
         tests=['tests/test_eval_shapes.py'], why="GenEval's position dead zone"),
]
