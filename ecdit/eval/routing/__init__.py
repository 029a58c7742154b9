"""Routing analysis of an EC-DiT, by job (the pieces behind `ecdit analyze`, ecdit.eval.routing.analysis):

  collect    experts per token out of the model: one call (`routing_fn`) or a whole sampling run
  summary    numbers from counts: histograms, zero-expert share, group totals, fg vs bg, routing change
  scenes     the ground truth of fg/bg: a shapes-world record from a prompt, object share per token
  textual    textual importance: routing change when one text token or word is dropped
  heatmap    the PNG grid of count maps (layers × timesteps)
  analysis   the whole run: sample each prompt, record, summarise, draw, write analysis.json
"""
