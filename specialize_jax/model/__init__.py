"""The T5 v1.1 / FlanT5 student: network, presets, losses, decoding and the model object.

Submodules are imported explicitly (`from specialize_jax.model import network`); this package
imports nothing so that `import specialize_jax.model` stays cheap.
"""
