"""ecdit: EC-DiT (expert-choice Mixture-of-Experts diffusion transformers) in JAX/Flax."""
__version__ = '0.1.0'
