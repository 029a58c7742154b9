"""`ecdit params`: total and activated-per-token parameter counts, without allocating the model.

  ecdit params --size=M --experts=64
  ecdit params --size=XL --experts=32 --json
  ecdit params --config=experiments/<file>.py     (reads the config's `model` section)

Counts come from `jax.eval_shape` of the real model's `init` (shapes only), grouped by component; for the
paper sizes Table 1 is printed beside them. The library (and the accounting, explained) is
`ecdit.models.params`.
"""
from __future__ import annotations

import json
import re

from absl import flags

from ecdit import errors
from ecdit.commands import flags as cflags
from ecdit.config import experiment
from ecdit.models import params as params_lib

_SIZE = flags.DEFINE_string('size', None, 'model size preset (ecdit.config.sizes), e.g. XL, XXL, 3XL, M, M-64E, S')
_EXPERTS = flags.DEFINE_integer('experts', None, 'number of experts (overrides the preset / config)')
_DENSE = flags.DEFINE_bool('dense', False, "count the dense model (routing='dense')")
_CAPACITY = flags.DEFINE_float('capacity_factor', None, 'capacity factor used for the activated count')
_JSON = flags.DEFINE_bool('json', False, 'print one JSON object instead of the table')
_CONFIG = cflags.define_config(None, 'experiment config file; its `model` section is counted', lock_config=False)


def _model_dict() -> dict:
  """The `model` mapping the flags ask for: the config's section, then the preset and explicit overrides."""
  model: dict = {}
  cfg = cflags.config_value(_CONFIG)
  if cfg is not None:
    section = cfg.get('model', None)
    if section is None:
      raise errors.UsageError('--config: the config has no `model` section')
    model = {k: v for k, v in (section.to_dict() if hasattr(section, 'to_dict') else dict(section)).items()
             if v is not None}
    if cfg.get('data', None) is not None:   # image size, channels, vocabulary: the data's, as in training
      implied = experiment.data_implied_model(cfg.data, model.get('text_encoder'))
      model = {**{k: v for k, (v, _) in implied.items()}, **model}
  if _SIZE.value:
    model['size'] = _SIZE.value
  if _EXPERTS.value is not None:
    model['num_experts'] = _EXPERTS.value
    if _SIZE.value and not re.fullmatch(r'.+-\d+E', _SIZE.value):
      model['size'] = f'{_SIZE.value}-{_EXPERTS.value}E'   # the preset's MoE variant (M-64E: 38 layers)
  if _DENSE.value:
    model['routing'] = 'dense'
  if _CAPACITY.value is not None:
    model['capacity_factor'] = _CAPACITY.value
  if not model:
    raise errors.UsageError('give --size=<preset> (e.g. --size=XL --experts=32) or --config=<file>')
  return model


def main(argv):
  cflags.no_arguments(argv)
  cflags.at_least(_EXPERTS, 1)   # named here: folded into the preset name, ModelConfig would blame model.size
  model = _model_dict()
  with cflags.translate():   # a bad preset or model key, named by ModelConfig
    result = params_lib.report(model, model.get('size'))
  print(json.dumps(result, indent=1) if _JSON.value else params_lib.format_report(result))
  return 0
