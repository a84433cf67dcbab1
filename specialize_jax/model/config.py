"""Hyperparameters of the T5 v1.1 / FlanT5 network and the standard size presets.

Terms:
  preset: a named `T5Config` with the dimensions of a published T5 v1.1 / FlanT5 size (the T5X
    gin files `t5_1_1/{small,base,large,xl,xxl}.gin`), plus `tiny` for CPU tests and demos.
  compute dtype: the dtype of activations (`dtype`); parameters are always stored in float32 and
    logits are always float32.
"""
import dataclasses
from typing import Tuple

import jax.numpy as jnp

# The T5 SentencePiece model has 32,000 pieces; T5X pads the embedding to a multiple of 128.
T5_VOCAB_SIZE = 32128
DTYPES = ('float32', 'bfloat16')  # compute dtypes
# What a layer keeps for the backward pass (`network`): 'none' keeps every activation; 'full'
# recomputes the whole layer (keeps its input); 'minimal' keeps the matmul outputs that have no
# batch dimension, as T5X's and MaxText's policy of that name; 'dots' keeps every matmul output.
REMAT_POLICIES = ('none', 'minimal', 'dots', 'full')
# How attention runs (`attention_kernels`): 'xla' the reference einsum/softmax path; 'cudnn'
# `jax.nn.dot_product_attention`'s cuDNN fused kernel (GPU, bf16/fp16); 'pallas' the Pallas
# flash-attention kernel (TPU; interpreted elsewhere); 'auto' the platform's fused kernel where
# it applies, else 'xla', the reason logged once.
ATTENTION_KERNELS = ('xla', 'cudnn', 'pallas', 'auto')


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of an encoder-decoder T5 v1.1 network (gated-GELU, RMS norm, relative bias).

  Names follow T5X's `network.T5Config` so gin bindings read the same; `dtype` is a name rather
  than a jnp dtype so the config is hashable, printable and gin-friendly.
  """
  vocab_size: int = T5_VOCAB_SIZE
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: Tuple[str, ...] = ('gelu', 'linear')
  dropout_rate: float = 0.1
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dtype: str = 'float32'
  logits_via_embedding: bool = False
  layer_norm_epsilon: float = 1e-6
  remat_policy: str = 'none'
  float32_attention_logits: bool = True
  attention_kernel: str = 'xla'

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f'T5Config.dtype={self.dtype!r} is not supported; use one of {DTYPES}.')
    if self.attention_kernel not in ATTENTION_KERNELS:
      raise ValueError(f'T5Config.attention_kernel={self.attention_kernel!r}; use one of '
                       f'{ATTENTION_KERNELS}.')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'T5Config.remat_policy={self.remat_policy!r}; use one of '
                       f'{REMAT_POLICIES}.')
    # gin and json hand over lists; a tuple keeps the config hashable (it is a jit static arg).
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    for field in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim',
                  'relative_attention_num_buckets', 'relative_attention_max_distance'):
      if getattr(self, field) <= 0:
        raise ValueError(f'T5Config.{field}={getattr(self, field)} must be positive.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'T5Config.dropout_rate={self.dropout_rate} must be in [0, 1).')
    if not self.mlp_activations:
      raise ValueError('T5Config.mlp_activations is empty; T5 v1.1 uses ("gelu", "linear").')

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The jnp dtype of activations."""
    return jnp.dtype(self.dtype)


PRESETS = {
    # A 2+2 layer model of width 16 for CPU tests.
    'tiny': T5Config(emb_dim=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                     head_dim=8, mlp_dim=32),
    # The embedded demo's student (gin/models/demo_tiny.gin) over its 384-piece vocabulary.
    'demo': T5Config(vocab_size=384, emb_dim=128, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2, head_dim=32, mlp_dim=512, dropout_rate=0.0),
    'small': T5Config(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8,
                      head_dim=64, mlp_dim=1024),
    'base': T5Config(emb_dim=768, num_heads=12, num_encoder_layers=12, num_decoder_layers=12,
                     head_dim=64, mlp_dim=2048),
    'large': T5Config(emb_dim=1024, num_heads=16, num_encoder_layers=24, num_decoder_layers=24,
                      head_dim=64, mlp_dim=2816),
    'xl': T5Config(emb_dim=2048, num_heads=32, num_encoder_layers=24, num_decoder_layers=24,
                   head_dim=64, mlp_dim=5120),
    'xxl': T5Config(emb_dim=4096, num_heads=64, num_encoder_layers=24, num_decoder_layers=24,
                    head_dim=64, mlp_dim=10240),
}


def get_config(name: str, **overrides) -> T5Config:
  """Returns the preset `name` with fields replaced by `overrides` (e.g. `dtype='bfloat16'`)."""
  if name not in PRESETS:
    raise ValueError(f'Unknown T5 preset {name!r}; choose one of {sorted(PRESETS)}.')
  return dataclasses.replace(PRESETS[name], **overrides)
