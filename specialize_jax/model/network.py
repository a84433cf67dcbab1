"""The T5 v1.1 / FlanT5 encoder-decoder in Flax linen, with T5X's parameter tree.

The parameter names, shapes and logical axis names are those of T5X's
`t5x/examples/t5/network.py`, so T5X checkpoints and T5X partitioning rules apply unchanged:

  token_embedder/embedding                          [vocab, embed]
  encoder/relpos_bias/rel_embedding                 [heads, relpos_buckets]
  encoder/layers_N/pre_attention_layer_norm/scale   [embed]
  encoder/layers_N/attention/{query,key,value}/kernel  [embed, joined_kv]
  encoder/layers_N/attention/out/kernel             [joined_kv, embed]
  encoder/layers_N/pre_mlp_layer_norm/scale         [embed]
  encoder/layers_N/mlp/{wi_0,wi_1}/kernel           [embed, mlp]
  encoder/layers_N/mlp/wo/kernel                    [mlp, embed]
  encoder/encoder_norm/scale                        [embed]
  decoder/...  the same, with self_attention, encoder_decoder_attention and their
               pre_self_attention_layer_norm / pre_cross_attention_layer_norm,
               decoder_norm, relpos_bias and logits_dense/kernel [embed, vocab].

Terms:
  boxed variables: the output of `Transformer.init`, whose leaves are `nn.LogicallyPartitioned`
    boxes carrying logical axis names; `nn.meta.unbox` turns them into plain arrays (the
    T5X-identical tree that checkpoints and optimizers see). `apply` accepts either.
  decode mode (`decode=True`): autoregressive inference with a key/value cache in the `cache`
    collection. The first call (cache absent, `mutable=['cache']`) creates the cache from the
    shapes of a full-length `decoder_input_tokens` and stores the cross-attention keys/values of
    the `encoded` it is given; each later call feeds one token per row.
  positions: per-token positions inside a packed example. Accepted (T5X passes them) but not
    needed: as in T5X, the relative position bias is computed from row offsets `key - query`,
    which equal the position differences for every pair of tokens in the same packed example
    (positions count up by one inside an example), and pairs across examples are masked. So one
    `[1, heads, len, len]` bias serves the whole batch instead of a per-row gather.

Departures from T5X, all output-preserving:
  * embeddings are a gather (`jnp.take`), not a one-hot contraction over the vocabulary, and the
    relative bias table is gathered too: both are faster on CPU/GPU (tools/bench_train.py). The bias table's
    gradient sums each bucket in float32 (`lookup_buckets`; off CPU as T5X's one-hot product).
  * the self-attention cache is heads-first, `[batch, heads, length, head_dim]`, written with
    `lax.dynamic_update_slice` (T5X: `[batch, heads, head_dim, length]` written with a one-hot
    multiply); heads-first keeps each step's attention free of cache transposes on CPU/GPU; the
    cross-attention keys/values are cached once instead of being re-projected at every step.
  * attention logits and softmax are computed in float32 whatever the compute dtype (T5X's
    `float32_attention_logits=True`), which changes nothing in float32 and steadies bfloat16;
    `T5Config.float32_attention_logits=False` computes them in the compute dtype, as T5X then does.

Attention kernels (`T5Config.attention_kernel`, `attention_kernels.choose`): 'xla' (default) is the
einsum/softmax path below; 'cudnn' (GPU) and 'pallas' (TPU) are fused kernels that take T5's
relative bias with its gradient; 'auto' picks per platform and shape. Masks travel as per-token
attention ids (`attention_mask.AttentionMask`), made dense only where a path needs it. Decoding
always takes the 'xla' path (its heads-first cache).

Rematerialization (`T5Config.remat_policy`): each encoder and decoder layer can recompute its
activations in the backward pass instead of keeping them (`nn.remat` with a `jax.checkpoint`
policy), trading compute for the activation memory that `specialize plan` shows dominating from
FlanT5-Large up. Decoding never rematerializes (no gradient).
"""
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from specialize_jax.model import attention_kernels
from specialize_jax.model.attention_mask import AttentionMask, attention_ids
from specialize_jax.model.config import T5Config

Array = jax.Array
Initializer = Callable[..., Array]

# T5X initializers (t5x/examples/t5/layers.py and network.py). The 1/sqrt(head_dim) attention
# scaling is folded into the query initializer; nothing rescales logits at run time.
_DENSE_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
_ATTENTION_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
_EMBEDDING_INIT = nn.initializers.normal(stddev=1.0)
_RELPOS_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')

# Logical axis names of activations (T5X's).
_EMBED_AXES = ('batch', 'length', 'embed')
_MLP_AXES = ('batch', 'length', 'mlp')
_HEADS_AXES = ('batch', 'length', 'heads', 'kv')
_LOGITS_AXES = ('batch', 'length', 'vocab')


def _param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
           axes: Tuple[str, ...]) -> Array:
  """Declares a float32 parameter annotated with logical axis names; returns it unboxed."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32)


class RmsNorm(nn.Module):
  """T5's layer norm: scale by the root mean square (no mean subtraction, no bias), in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = (x * lax.rsqrt(mean_square + self.epsilon)).astype(self.dtype)
    scale = _param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',))
    return y * scale.astype(self.dtype)


class Dense(nn.Module):
  """A bias-free linear map over the last `num_input_axes` axes, T5X's `DenseGeneral`.

  The kernel is stored 2-D `[prod(input dims), prod(features)]` as in T5X checkpoints and
  reshaped at use.
  """
  features: Tuple[int, ...]
  kernel_axes: Tuple[str, str]
  num_input_axes: int = 1
  kernel_init: Initializer = _DENSE_INIT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    input_dims = inputs.shape[inputs.ndim - self.num_input_axes:]
    kernel = _param(self, 'kernel', self.kernel_init,
                    (int(np.prod(input_dims)), int(np.prod(self.features))), self.kernel_axes)
    kernel = kernel.astype(self.dtype).reshape(input_dims + tuple(self.features))
    inputs = inputs.astype(self.dtype)
    contract = tuple(range(inputs.ndim - self.num_input_axes, inputs.ndim))
    return lax.dot_general(inputs, kernel, ((contract, tuple(range(self.num_input_axes))),
                                            ((), ())))


def _activation(name: str) -> Callable[[Array], Array]:
  if name == 'linear':
    return lambda x: x
  if name == 'gelu':
    # T5 v1.1 / HF 'gelu_new': the tanh approximation.
    return functools.partial(nn.gelu, approximate=True)
  fn = getattr(nn, name, None)
  if fn is None or not callable(fn):
    raise ValueError(f'Unknown MLP activation {name!r}; use "gelu", "linear" or a flax.linen '
                     'activation name such as "relu".')
  return fn


class Mlp(nn.Module):
  """Gated feed-forward block: wo(dropout(prod_i act_i(wi_i x)))."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    dtype = cfg.compute_dtype
    activations = cfg.mlp_activations
    hidden = None
    for i, name in enumerate(activations):
      dense_name = 'wi' if len(activations) == 1 else f'wi_{i}'
      h = Dense((cfg.mlp_dim,), ('embed', 'mlp'), dtype=dtype, name=dense_name)(x)
      h = _activation(name)(h)
      hidden = h if hidden is None else hidden * h  # [batch, length, mlp]
    hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic)
    hidden = nn.with_logical_constraint(hidden, _MLP_AXES)
    return Dense((x.shape[-1],), ('mlp', 'embed'), dtype=dtype, name='wo')(hidden)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """Maps `key_position - query_position` to a bucket in [0, num_buckets) (Mesh TF / T5X rule).

  Half the buckets (per direction when bidirectional) hold exact distances 0..max_exact-1; the
  rest are logarithmically spaced up to `max_distance`, beyond which all distances share the
  last bucket. When not bidirectional, keys after the query fall in bucket 0 (they are masked).
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  bucket = jnp.zeros_like(relative_position)
  distance = -relative_position
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (distance < 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # float32 throughout, with T5X's epsilon, so boundary distances land in T5X's buckets.
  log_ratio = jnp.log(distance.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
  large = max_exact + (log_ratio / np.float32(np.log(max_distance / max_exact)) *
                       (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
  """T5's learned relative position bias: one `[heads, buckets]` table per stack."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array, bidirectional: bool) -> Array:
    """Returns the bias `[batch or 1, heads, q_len, k_len]` from positions `[batch or 1, len]`."""
    table = _param(self, 'rel_embedding', _RELPOS_INIT, (self.num_heads, self.num_buckets),
                   ('heads', 'relpos_buckets'))
    relative = key_positions[:, None, :] - query_positions[:, :, None]  # [batch, q_len, k_len]
    buckets = relative_position_bucket(relative, bidirectional, self.num_buckets,
                                       self.max_distance)
    bias = lookup_buckets(table, buckets).astype(self.dtype)  # [heads, batch, q_len, k_len]
    return jnp.transpose(bias, (1, 0, 2, 3))


@jax.custom_vjp
def lookup_buckets(table: Array, buckets: Array) -> Array:
  """`table[:, buckets]`: `[heads, num_buckets]` and int `[...]` -> `[heads, ...]`.

  A gather. Its gradient sums the cotangents of each bucket in float32 (`bucket_sums`): autodiff
  would scatter-add in the table's dtype, which under bfloat16 compute is bfloat16 (sums off by
  percents) and on an H200 took 1.57 s of a 1.7 s t5-base step (262,144 (query, key) pairs per
  head onto 32 buckets at 512 positions).
  """
  return jnp.take(table, buckets, axis=1)


def _lookup_buckets_fwd(table: Array, buckets: Array) -> Tuple[Array, Tuple[Array, Array]]:
  return lookup_buckets(table, buckets), (table, buckets)


def _lookup_buckets_bwd(residuals: Tuple[Array, Array], grad: Array) -> Tuple[Array, None]:
  table, buckets = residuals
  return bucket_sums(grad, buckets, table.shape[1], jax.default_backend()).astype(table.dtype), None


lookup_buckets.defvjp(_lookup_buckets_fwd, _lookup_buckets_bwd)


def bucket_sums(values: Array, buckets: Array, num_buckets: int, backend: str) -> Array:
  """float32 `[heads, num_buckets]`: the sums of `values [heads, ...]` over each bucket's entries.

  On CPU a scatter-add, which runs in order there (T5X's one-hot product made a demo-size
  training step ~9 % slower); elsewhere T5X's one-hot product, a small matrix product instead of
  a scatter whose atomic adds all land on a few addresses.
  """
  values = values.astype(jnp.float32)
  if backend == 'cpu':
    return jnp.zeros((values.shape[0], num_buckets), jnp.float32).at[:, buckets].add(values)
  one_hot = jax.nn.one_hot(buckets.reshape(-1), num_buckets, dtype=jnp.float32)
  return jnp.dot(values.reshape(values.shape[0], -1), one_hot, precision=lax.Precision.HIGHEST)


def _heads_first(key: Array, value: Array) -> Tuple[Array, Array]:
  """`[batch, length, heads, head_dim]` -> `[batch, heads, length, head_dim]` (the cache layout)."""
  return key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention without biases or run-time logit scaling.

  `cache_kind` says what decode mode caches: 'self' appends each step's key/value to a
  `[batch, max_length, heads, head_dim]` cache; 'cross' stores the projected `inputs_kv` once.
  """
  config: T5Config
  cache_kind: str = 'self'

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array],
               mask: Optional[AttentionMask] = None, bias: Optional[Array] = None, *,
               deterministic: bool = True, decode: bool = False,
               decode_index: Optional[Array] = None) -> Array:
    """Attends `inputs_q [batch, q_len, embed]` to `inputs_kv [batch, kv_len, embed]`.

    `mask` says which pairs may attend; `bias` broadcasts to `[batch, heads, q_len, kv_len]`.
    In decode mode, `decode_index` is the position of the single query token.
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    projection = functools.partial(Dense, (cfg.num_heads, cfg.head_dim), ('embed', 'joined_kv'),
                                   dtype=dtype)
    query_init = lambda *args: _ATTENTION_INIT(*args) / np.sqrt(cfg.head_dim).astype(np.float32)
    query = projection(kernel_init=query_init, name='query')(inputs_q)  # [b, q, heads, kv]
    query = nn.with_logical_constraint(query, _HEADS_AXES)

    def project_kv(x):
      key = projection(kernel_init=_ATTENTION_INIT, name='key')(x)
      value = projection(kernel_init=_ATTENTION_INIT, name='value')(x)
      return (nn.with_logical_constraint(key, _HEADS_AXES),
              nn.with_logical_constraint(value, _HEADS_AXES))

    if decode and self.cache_kind == 'cross':
      is_initialized = self.has_variable('cache', 'cached_key')
      if is_initialized:
        key = self.variable('cache', 'cached_key').value
        value = self.variable('cache', 'cached_value').value
      else:
        if inputs_kv is None:
          raise ValueError('The cross-attention cache is empty: initialize the cache with the '
                           'encoder output (`encoded`) before decoding with encoded=None.')
        key, value = _heads_first(*project_kv(inputs_kv))
        self.variable('cache', 'cached_key', lambda: key)
        self.variable('cache', 'cached_value', lambda: value)
    else:
      key, value = project_kv(inputs_kv)

    if decode and self.cache_kind == 'self':
      is_initialized = self.has_variable('cache', 'cached_key')
      key, value = _heads_first(key, value)
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
      if is_initialized:
        batch, num_heads, max_length, head_dim = cached_key.value.shape
        if query.shape != (batch, 1, num_heads, head_dim):
          raise ValueError(f'Decoding feeds one token per row: expected query shape '
                           f'{(batch, 1, num_heads, head_dim)}, got {query.shape}.')
        if decode_index is None:
          raise ValueError('decode_index is required for a cached decode step.')
        start = (0, 0, decode_index, 0)
        cached_key.value = lax.dynamic_update_slice(cached_key.value, key.astype(dtype), start)
        cached_value.value = lax.dynamic_update_slice(cached_value.value, value.astype(dtype),
                                                      start)
        key, value = cached_key.value, cached_value.value
        # Only the positions written so far are visible.
        filled = (jnp.arange(max_length) <= decode_index)[None, None, None, :]
        if mask is not None:
          filled = jnp.logical_and(mask.dense(), filled)
        x = self._reference(query, key, value, filled, bias, dropout=False, decode=True)
        return self._out(x, inputs_q.shape[-1])

    dropout = not deterministic and cfg.dropout_rate > 0.0
    kernel = 'xla' if decode else attention_kernels.choose(cfg, query, key, dropout)
    if kernel == 'pallas':
      if mask is None:
        raise ValueError("attention_kernel='pallas' needs the attention mask (the token ids).")
      x = attention_kernels.pallas_attention(query, key, value, mask, bias)
    else:
      dense = None if mask is None else mask.dense()
      if kernel == 'cudnn':
        x = attention_kernels.cudnn_attention(query, key, value, dense, bias)
      else:
        x = self._reference(query, key, value, dense, bias, dropout, decode)
    return self._out(x, inputs_q.shape[-1])

  def _out(self, x: Array, features: int) -> Array:
    x = nn.with_logical_constraint(x, _HEADS_AXES)  # [b, q, heads, kv]
    return Dense((features,), ('joined_kv', 'embed'), num_input_axes=2,
                 kernel_init=_ATTENTION_INIT, dtype=self.config.compute_dtype, name='out')(x)

  def _reference(self, query: Array, key: Array, value: Array, mask: Optional[Array],
                 bias: Optional[Array], dropout: bool, decode: bool) -> Array:
    """The einsum/softmax attention ('xla'), `mask` dense boolean; `[b, q, heads, kv]` out."""
    cfg = self.config
    dtype = cfg.compute_dtype
    # Cached keys/values are heads-first ([b, heads, k, d]) so the per-step attention over the
    # whole cache is a batched matmul with leading batch dims: no transpose of the cache per step.
    kv = 'bhkd' if decode else 'bkhd'
    logits_dtype = jnp.float32 if cfg.float32_attention_logits else dtype
    # [batch, heads, q_len, kv_len]
    logits = jnp.einsum(f'bqhd,{kv}->bhqk', query, key, preferred_element_type=logits_dtype)
    if mask is not None:
      logits = logits + attention_kernels.mask_to_bias(mask).astype(logits_dtype)
    if bias is not None:
      logits = logits + bias.astype(logits_dtype)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if dropout:
      # T5X drops whole query rows of the attention weights (broadcast along q_len).
      keep_prob = 1.0 - cfg.dropout_rate
      keep_shape = weights.shape[:-2] + (1,) + weights.shape[-1:]
      keep = jax.random.bernoulli(self.make_rng('dropout'), keep_prob, keep_shape)
      weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
    return jnp.einsum(f'bhqk,{kv}->bqhd', weights, value.astype(dtype))


def grow_self_attention_cache(cache: Any, length: int) -> Any:
  """The decode cache with every self-attention key/value cache zero-padded to `length` positions.

  The filled positions keep their values; the new ones are zeros, which the decode step masks
  (it sees `arange(cache length) <= decode_index`), so decoding goes on as with a cache created
  at `length`. The cross-attention caches and `cache_index` are unchanged.
  """
  def grow(path, x):
    names = [getattr(entry, 'key', None) for entry in path]
    if 'self_attention' not in names or names[-1] not in ('cached_key', 'cached_value'):
      return x
    if length < x.shape[2]:
      raise ValueError(f'Cannot shrink a self-attention cache from {x.shape[2]} to {length} '
                       'positions.')
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
  return jax.tree_util.tree_map_with_path(grow, cache)


def _dropout(cfg: T5Config, x: Array, deterministic: bool, broadcast_length: bool = True) -> Array:
  dims = (-2,) if broadcast_length else ()
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=dims)(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP blocks with residuals."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: AttentionMask, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    norm = functools.partial(RmsNorm, cfg.layer_norm_epsilon, cfg.compute_dtype)
    y = norm(name='pre_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, name='attention')(y, y, mask, bias, deterministic=deterministic)
    x = x + _dropout(cfg, y, deterministic)
    y = norm(name='pre_mlp_layer_norm')(x)
    y = Mlp(cfg, name='mlp')(y, deterministic)
    x = x + _dropout(cfg, y, deterministic)
    return nn.with_logical_constraint(x, _EMBED_AXES)


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention and MLP blocks with residuals."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, encoded: Optional[Array], self_mask: Optional[AttentionMask],
               cross_mask: AttentionMask, bias: Array, deterministic: bool, decode: bool,
               decode_index: Optional[Array]) -> Array:
    cfg = self.config
    norm = functools.partial(RmsNorm, cfg.layer_norm_epsilon, cfg.compute_dtype)
    y = norm(name='pre_self_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, cache_kind='self', name='self_attention')(
        y, y, self_mask, bias, deterministic=deterministic, decode=decode,
        decode_index=decode_index)
    x = x + _dropout(cfg, y, deterministic)
    y = norm(name='pre_cross_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, cache_kind='cross', name='encoder_decoder_attention')(
        y, encoded, cross_mask, deterministic=deterministic, decode=decode)
    x = x + _dropout(cfg, y, deterministic)
    y = norm(name='pre_mlp_layer_norm')(x)
    y = Mlp(cfg, name='mlp')(y, deterministic)
    x = x + _dropout(cfg, y, deterministic)
    return nn.with_logical_constraint(x, _EMBED_AXES)


def _relpos_bias(cfg: T5Config) -> RelativePositionBias:
  return RelativePositionBias(cfg.relative_attention_num_buckets,
                              cfg.relative_attention_max_distance, cfg.num_heads,
                              cfg.compute_dtype, name='relpos_bias')


def _default_positions(length: int) -> Array:
  return jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, length]


def _embed(embedding: Array, tokens: Array, dtype: Any) -> Array:
  """Gathers token embeddings (T5X: one-hot contraction; same values, faster off TPU)."""
  x = jnp.take(embedding, tokens.astype(jnp.int32), axis=0).astype(dtype)
  return nn.with_logical_constraint(x, _EMBED_AXES)  # [batch, length, embed]


_REMAT = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
}


def _layer(cls, cfg: T5Config, static_argnums: Tuple[int, ...], decode: bool = False):
  """`cls`, or with `cfg.remat_policy` its rematerialized version for training (decoding computes
  no gradient). `static_argnums` count `self` as 0. Parameter names are unchanged."""
  if cfg.remat_policy == 'none' or decode:
    return cls
  return nn.remat(cls, policy=_REMAT[cfg.remat_policy], static_argnums=static_argnums)


class Encoder(nn.Module):
  """Embedding, a stack of encoder layers sharing one relative bias table, final norm."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, mask: AttentionMask, positions: Optional[Array],
               deterministic: bool) -> Array:
    del positions  # See "positions" in the module docstring.
    cfg = self.config
    row = _default_positions(tokens.shape[-1])
    bias = _relpos_bias(cfg)(row, row, bidirectional=True)
    x = _embed(self.shared_embedding.embedding, tokens, cfg.compute_dtype)
    x = _dropout(cfg, x, deterministic)
    layer = _layer(EncoderLayer, cfg, static_argnums=(4,))  # deterministic
    for i in range(cfg.num_encoder_layers):
      x = layer(cfg, name=f'layers_{i}')(x, mask, bias, deterministic)
    x = RmsNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name='encoder_norm')(x)
    return _dropout(cfg, x, deterministic, broadcast_length=False)


class Decoder(nn.Module):
  """Embedding, a stack of decoder layers sharing one causal bias table, final norm, logits."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Optional[Array], tokens: Array, positions: Optional[Array],
               self_mask: Optional[AttentionMask], cross_mask: AttentionMask, deterministic: bool,
               decode: bool) -> Array:
    cfg = self.config
    relpos = _relpos_bias(cfg)
    decode_index = None
    if decode and self.has_variable('cache', 'cache_index'):
      # One cached step: the query sits at `decode_index`, the keys are the whole cache.
      index = self.variable('cache', 'cache_index')
      decode_index = index.value
      index.value = decode_index + 1
      max_length = self.variables['cache']['layers_0']['self_attention']['cached_key'].shape[2]
      bias = relpos(jnp.reshape(decode_index, (1, 1)), _default_positions(max_length),
                    bidirectional=False)
    else:
      if decode:  # Cache initialization: the call only fixes shapes and the cross cache.
        self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
      row = _default_positions(tokens.shape[-1])  # `positions` unused: see the module docstring.
      bias = relpos(row, row, bidirectional=False)

    y = _embed(self.shared_embedding.embedding, tokens, cfg.compute_dtype)
    y = _dropout(cfg, y, deterministic)
    layer = _layer(DecoderLayer, cfg, static_argnums=(6, 7), decode=decode)  # deterministic, decode
    for i in range(cfg.num_decoder_layers):
      y = layer(cfg, name=f'layers_{i}')(y, encoded, self_mask, cross_mask, bias, deterministic,
                                         decode, decode_index)
    y = RmsNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name='decoder_norm')(y)
    y = _dropout(cfg, y, deterministic)

    if cfg.logits_via_embedding:
      embedding = self.shared_embedding.embedding
      logits = jnp.dot(y.astype(jnp.float32), embedding.T) / np.sqrt(y.shape[-1])
    else:
      logits = Dense((cfg.vocab_size,), ('embed', 'vocab'), dtype=jnp.float32,
                     name='logits_dense')(y)
    return nn.with_logical_constraint(logits, _LOGITS_AXES)  # [batch, length, vocab] float32


class Embed(nn.Module):
  """The shared token embedding table `[vocab, embed]` (looked up by the stacks with a gather)."""
  num_embeddings: int
  features: int

  def setup(self):
    self.embedding = _param(self, 'embedding', _EMBEDDING_INIT,
                            (self.num_embeddings, self.features), ('vocab', 'embed'))

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens.astype(jnp.int32), axis=0)


class Transformer(nn.Module):
  """The T5 v1.1 encoder-decoder; `encode` once, then `decode` (optionally step by step)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             enable_dropout: bool = True, encoder_positions: Optional[Array] = None) -> Array:
    """Encodes `[batch, length]` token ids (0 = padding) into `[batch, length, embed]`."""
    if encoder_input_tokens.ndim != 2:
      raise ValueError(f'encoder_input_tokens must be [batch, length], got shape '
                       f'{encoder_input_tokens.shape}.')
    ids = attention_ids(encoder_input_tokens, encoder_segment_ids)
    return self.encoder(encoder_input_tokens, AttentionMask(ids, ids), encoder_positions,
                        deterministic=not enable_dropout)

  def decode(self, encoded: Optional[Array], encoder_input_tokens: Array,
             decoder_input_tokens: Array, decoder_target_tokens: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, enable_dropout: bool = True,
             decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Returns float32 logits `[batch, length, vocab]` for `decoder_input_tokens`.

    `encoder_input_tokens` only supplies the padding mask. In decode mode `encoded` may be None
    once the cache holds the cross-attention keys/values, and `decoder_positions` and
    `max_decode_length` are unused (the cache fixes the length; kept for T5X's signature).
    """
    del max_decode_length
    if decode:
      if encoder_segment_ids is not None:
        raise ValueError('Packed inputs cannot be decoded: drop encoder_segment_ids when '
                         'decode=True (decode unpacked batches).')
      # No target padding mask at inference; causality comes from the cache index.
      self_mask = None
      cross_mask = AttentionMask(jnp.ones_like(decoder_input_tokens, jnp.int32),
                                 attention_ids(encoder_input_tokens))
    else:
      if decoder_target_tokens is None:
        raise ValueError('decoder_target_tokens is required when decode=False: it gives the '
                         'target padding mask.')
      if encoder_segment_ids is not None and decoder_segment_ids is None:
        raise ValueError('encoder_segment_ids given without decoder_segment_ids; packed '
                         'batches need both.')
      targets = attention_ids(decoder_target_tokens, decoder_segment_ids)
      self_mask = AttentionMask(targets, targets, causal=True)
      # Unpacked inputs: every real target token (id 1) sees every real input token (id 1).
      cross_queries = targets if encoder_segment_ids is not None else attention_ids(
          decoder_target_tokens)
      cross_mask = AttentionMask(cross_queries,
                                 attention_ids(encoder_input_tokens, encoder_segment_ids))
    return self.decoder(encoded, decoder_input_tokens, decoder_positions, self_mask, cross_mask,
                        deterministic=not enable_dropout, decode=decode)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Teacher-forced logits `[batch, target_length, vocab]` (float32).

    `decoder_input_tokens` are the targets shifted right with BOS 0 (done by the feature
    converter); `decoder_target_tokens` only supply the padding mask.
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout,
                          encoder_positions)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout, decode, max_decode_length)


def dummy_inputs(batch: int = 1, encoder_length: int = 1,
                 decoder_length: int = 1) -> Tuple[Array, Array, Array]:
  """Token arrays for `init`: the parameter shapes do not depend on them."""
  enc = jnp.ones((batch, encoder_length), jnp.int32)
  dec = jnp.ones((batch, decoder_length), jnp.int32)
  return enc, dec, dec


def init_boxed(config: T5Config, rng: Array) -> Any:
  """Boxed `{'params': ...}` (leaves are `nn.LogicallyPartitioned`); use under `jax.eval_shape`
  for shapes and axes without allocating."""
  return Transformer(config).init(rng, *dummy_inputs(), enable_dropout=False)


def init_params(config: T5Config, rng: Array) -> Any:
  """Plain float32 parameters, T5X's tree (`{'token_embedder': ..., 'encoder': ..., ...}`)."""
  return jax.jit(lambda key: nn.meta.unbox(init_boxed(config, key))['params'])(rng)


@functools.lru_cache(maxsize=8)
def _abstract_boxed(config: T5Config) -> Any:
  """`init_boxed`'s tree as `jax.ShapeDtypeStruct`s with their partitioning boxes, traced once per
  config (an XXL init takes seconds to trace; the memory plan asks for it per candidate mesh)."""
  return jax.eval_shape(functools.partial(init_boxed, config), jax.random.key(0))


def param_shapes(config: T5Config) -> Any:
  """The parameter tree as `jax.ShapeDtypeStruct`s, computed without allocating."""
  return nn.meta.unbox(_abstract_boxed(config))['params']


def logical_axes(config: T5Config) -> Any:
  """The parameter tree with each leaf replaced by its tuple of logical axis names.

  Map it to mesh shardings with `nn.logical_to_mesh_sharding` and the run's axis rules.
  """
  specs = nn.get_partition_spec(_abstract_boxed(config))['params']
  return jax.tree_util.tree_map(tuple, specs,
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def num_params(config: T5Config) -> int:
  """The number of parameters, computed without allocating."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(param_shapes(config)))


def format_param_axes(config: T5Config) -> str:
  """One line per parameter, `path shape logical_axes`, sorted by path (for logs and goldens)."""
  shapes = param_shapes(config)
  axes = logical_axes(config)
  lines = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = functools.reduce(lambda tree, key: tree[key.key], path, axes)
    name = '/'.join(key.key for key in path)
    lines.append(f'{name} {tuple(leaf.shape)} {tuple(names)}')
  return '\n'.join(sorted(lines)) + '\n'
