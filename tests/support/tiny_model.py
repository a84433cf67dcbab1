"""The tiny demo T5 the training tests run: one encoder and one decoder layer of width 32.

`config()` is the model config (the demo vocabulary's 384 pieces); `gin_bindings()` the same
dimensions as `--gin.` bindings over a gin file's model (`experiments/demo_cpu.gin`). The library
is imported only when a config is built, so worker scripts can import this before jax.
"""
from typing import Dict

VOCAB_SIZE = 384
DIMENSIONS = {'emb_dim': 32, 'num_heads': 2, 'head_dim': 16, 'num_encoder_layers': 1,
              'num_decoder_layers': 1, 'mlp_dim': 64}


def config(**overrides):
  """The tiny demo `T5Config` (no dropout), with `overrides` replacing its fields."""
  from specialize_jax.model.config import T5Config  # pylint: disable=g-import-not-at-top
  return T5Config(**{'vocab_size': VOCAB_SIZE, **DIMENSIONS, 'dropout_rate': 0.0, **overrides})


def gin_bindings(**overrides) -> Dict[str, object]:
  """`{'model_config.T5Config.emb_dim': 32, ...}`: DIMENSIONS with `overrides`, as gin bindings."""
  return {f'model_config.T5Config.{name}': value
          for name, value in {**DIMENSIONS, **overrides}.items()}


def random_params(cfg, seed: int = 0, as_numpy: bool = False):
  """Random float32 parameters in T5X's tree for `cfg`, drawn in numpy from
  `network.param_shapes` (as jax arrays, or numpy arrays with `as_numpy`).

  Compiling the real initializer costs seconds; these have the same tree and a similar scale.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from specialize_jax.model import network
  # pylint: enable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  convert = (lambda x: x.astype(np.float32)) if as_numpy else (lambda x: jax.numpy.asarray(
      x, jax.numpy.float32))

  def draw(leaf):
    if leaf.ndim == 1:  # norm scales
      return convert(1.0 + 0.1 * rng.standard_normal(leaf.shape))
    return convert(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0]))

  return jax.tree_util.tree_map(draw, network.param_shapes(cfg))
