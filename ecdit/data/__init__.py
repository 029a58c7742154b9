"""Data and text: the shapes world, tfds builders, sentencepiece tokenizer, grain input pipeline.

Modules: shapes (scenes, renderer, captions, GenEval records),
shapes_builder / folder_builder (tfds builders), folder (reading an image+caption folder), features (shared
schema), reader (opening a prepared dataset), prepare (`ecdit prepare`), tokenizer, pipeline.
Importing this package is cheap; tfds, grain and JAX load with the modules that need them.
"""
from ecdit.config.data import default_data_config, validate_data_config

__all__ = ['default_data_config', 'validate_data_config']
