"""specialize_jax: specialize small T5/FlanT5 students for multi-step reasoning (JAX/Flax, T5X-style)."""

__version__ = "0.1.0"


def __getattr__(name: str):
  """Lazy exports, so `import specialize_jax` does not import JAX, Flax or TensorStore."""
  if name == "load_pretrained":
    from specialize_jax.checkpoints.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
    return load_pretrained
  raise AttributeError(f"module 'specialize_jax' has no attribute {name!r}")
