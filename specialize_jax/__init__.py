"""specialize_jax: specialize small T5/FlanT5 students for multi-step reasoning (JAX/Flax, T5X-style)."""

__version__ = "0.1.0"
