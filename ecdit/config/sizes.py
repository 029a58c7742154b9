"""Model size presets: `preset(name) -> dict` of ModelConfig fields (`model.size` in a config).

Paper sizes (EC-DiT Table 1; head dim 64 everywhere; 256×256 images → 32×32×4 latents, patch 2 → 256
tokens; CLIP-like text encoder, see PAPER_TEXT):

  name    width  depth  heads  kv heads
  XL      1152   28     18     6
  XXL     1536   38     24     6
  3XL     2304   42     36     6
  M       3072   46     48     12      ('M-64E': 38 layers and 64 experts, the paper's 97B model)

A `-<E>E` suffix (e.g. 'XL-32E') also sets `num_experts`. Small sizes for CPU work: 'S' (384, 12, 6),
'B' (768, 12, 12) on 32×32×3 images with the small default text encoder; 'tiny' for tests.
"""
from __future__ import annotations

import re

# The paper's text encoder as we reconstruct it: CLIP-text-like (width 1280, 32 layers, 20 heads) over the
# T5 tokenizer's 32128-entry vocabulary and 77 positions: 0.671B parameters ("670M CLIP-based").
PAPER_TEXT = dict(text_encoder='transformer', vocab_size=32128, text_length=77, text_width=1280,
                  text_depth=32, text_heads=20)
PAPER_IMAGE = dict(image_size=32, in_channels=4, patch_size=2)

_PAPER = {
    'XL': dict(width=1152, depth=28, num_heads=18, num_kv_heads=6),
    'XXL': dict(width=1536, depth=38, num_heads=24, num_kv_heads=6),
    '3XL': dict(width=2304, depth=42, num_heads=36, num_kv_heads=6),
    'M': dict(width=3072, depth=46, num_heads=48, num_kv_heads=12),
}
_SMALL = {
    'tiny': dict(image_size=8, in_channels=3, patch_size=2, width=32, depth=2, num_heads=2, num_kv_heads=1,
                 num_experts=4, vocab_size=64, text_length=8, text_width=32, text_depth=1, text_heads=2,
                 text_states_dim=32),
    'S': dict(width=384, depth=12, num_heads=6),
    'B': dict(width=768, depth=12, num_heads=12),
}
PAPER_SIZES = tuple(_PAPER)
# The exact names preset() accepts besides the '-<E>E' suffix forms.
KNOWN = tuple(_SMALL) + PAPER_SIZES + ('M-64E',)


def preset(name: str) -> dict:
  """ModelConfig fields for a named size; ValueError (listing the known names) for an unknown one."""
  if not isinstance(name, str):
    raise ValueError(f'model.size={name!r} is invalid: expected one of {list(KNOWN)} (optionally '
                     "with an '-<E>E' expert suffix, e.g. 'XL-32E')")
  m = re.fullmatch(r'(.+?)-(\d+)E', name)
  base, experts = (m.group(1), int(m.group(2))) if m else (name, None)
  if base in _SMALL:
    out = dict(_SMALL[base])
  elif base in _PAPER:
    out = dict(PAPER_IMAGE, **PAPER_TEXT, **_PAPER[base])
    if base == 'M' and experts == 64:
      out['depth'] = 38   # the paper's M-64E drops to 38 layers to fit accelerator memory.
  else:
    raise ValueError(f'model.size={name!r} is invalid: expected one of {list(KNOWN)} (optionally '
                     "with an '-<E>E' expert suffix, e.g. 'XL-32E')")
  if experts is not None:
    if experts < 1:
      raise ValueError(f'model.size={name!r}: the expert count must be >= 1')
    out['num_experts'] = experts
  return out
