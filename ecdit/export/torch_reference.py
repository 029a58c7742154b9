"""The plain-PyTorch EC-DiT reference; its home is now the JAX-free `ecdit_torch` package
(ecdit_torch/ecdit_reference.py). This module keeps the old import path working:

    model = ecdit.export.torch_reference.load_model('export_dir')   # same as ecdit_torch.load_model
"""
from ecdit_torch.ecdit_reference import *  # noqa: F401,F403 — the public names, re-exported unchanged.
