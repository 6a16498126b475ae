"""ttmpd_jax: test-time structured pruning and distillation (TT-MPD) in JAX/Flax."""

__version__ = '0.1.0'
