"""Fused attention kernels for training and scoring, and the choice among them (`choose`).

Kernels (`T5Config.attention_kernel`):
  'xla'    the reference einsum/softmax path in `network.MultiHeadAttention` (every platform).
  'cudnn'  `jax.nn.dot_product_attention`'s fused cuDNN kernel (`cudnn_attention`): GPU, a bf16
           or fp16 compute dtype, head_dim a multiple of 8 up to 128, even lengths. It takes T5's
           `[1, heads, q, k]` relative bias and returns its gradient; the mask travels as a bias.
  'pallas' the Pallas flash-attention kernel of `jax.experimental.pallas.ops.tpu`
           (`pallas_attention`): TPU. The mask goes in as per-token segment ids plus the causal
           flag, so masked blocks are skipped and no dense mask exists; the relative bias goes in
           as its `ab` operand, broadcast over the batch, and gets its gradient. The kernel works
           in blocks of 128 positions: other lengths are padded up to a multiple (masked). Off
           TPU the same kernel runs in Pallas's TPU interpreter: correct and slow, for CPU tests
           and debugging.
  'auto'   cuDNN on GPU and Pallas on TPU where the shapes suit them (for Pallas, lengths that
           are multiples of 128: no padding), else 'xla', the reason logged once.

Every kernel computes the logits in float32 (`float32_attention_logits` only changes 'xla') and
none drops attention weights, so attention dropout keeps 'xla'. Padding queries see other padding
in 'pallas' and everything in 'xla': their outputs differ, and nothing reads them (their targets
weigh 0 and their keys are masked).
"""
import functools
import logging
from typing import Callable, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from specialize_jax.model.attention_mask import AttentionMask
from specialize_jax.model.config import T5Config

Array = jax.Array

# Added to the logits of masked pairs (T5X's value).
MASKED_LOGIT = -1e10
# The Pallas kernel's block along each sequence (its default, and what it needs for segment ids).
PALLAS_BLOCK = 128
# Logical axes of the heads-first operands the Pallas kernel takes, `[batch, heads, length, d]`.
_HEADS_FIRST_AXES = ('batch', 'heads', 'length', 'kv')


def mask_to_bias(mask: Optional[Array]) -> Optional[Array]:
  """A boolean mask as an additive float32 bias (0 where it may attend, `MASKED_LOGIT` not)."""
  if mask is None:
    return None
  return jnp.where(mask, 0.0, MASKED_LOGIT).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _log_choice(choice: str, reason: str) -> None:
  logging.info('attention_kernel=auto: %s (%s).', choice, reason)


def _cudnn_gaps(cfg: T5Config, query: Array, key: Array) -> List[str]:
  gaps = []
  head_dim = query.shape[-1]
  if jax.default_backend() != 'gpu':
    gaps.append(f'the backend is {jax.default_backend()}, not gpu')
  if cfg.compute_dtype not in (jnp.bfloat16, jnp.float16):
    gaps.append(f'the compute dtype is {cfg.dtype}, not bfloat16')
  if head_dim > 128 or head_dim % 8:
    gaps.append(f'head_dim {head_dim} is not a multiple of 8 up to 128')
  if query.shape[1] % 2 or key.shape[1] % 2:
    gaps.append(f'lengths {query.shape[1]} x {key.shape[1]} are not even')
  return gaps


def _pallas_shape_gaps(query: Array, key: Array) -> List[str]:
  return [f'{name} length {length} is not a multiple of {PALLAS_BLOCK} (it would be padded)'
          for name, length in (('query', query.shape[1]), ('key', key.shape[1]))
          if length % PALLAS_BLOCK]


def choose(cfg: T5Config, query: Array, key: Array, dropout: bool) -> str:
  """'xla', 'cudnn' or 'pallas' for a training/scoring attention of these `[batch, length, heads,
  head_dim]` shapes under `cfg.attention_kernel`. An explicit kernel that cannot run raises,
  naming what is missing; 'auto' falls back to 'xla', logging why once."""
  wanted = cfg.attention_kernel
  if wanted == 'xla':
    return 'xla'
  common = ['attention dropout is on'] if dropout else []
  if wanted == 'cudnn' or (wanted == 'auto' and jax.default_backend() == 'gpu'):
    kernel, gaps = 'cudnn', _cudnn_gaps(cfg, query, key) + common
  elif wanted == 'pallas':
    kernel, gaps = 'pallas', common
  elif wanted == 'auto' and jax.default_backend() == 'tpu':
    kernel, gaps = 'pallas', _pallas_shape_gaps(query, key) + common
  else:
    kernel, gaps = None, [f'no fused kernel on {jax.default_backend()}']
  if not gaps:
    return kernel
  if wanted != 'auto':
    raise ValueError(f"attention_kernel={wanted!r} cannot run here: {'; '.join(gaps)}. Use "
                     "'auto' (falls back to 'xla') or 'xla'.")
  _log_choice('xla', '; '.join(gaps))
  return 'xla'


def cudnn_attention(query: Array, key: Array, value: Array, mask: Optional[Array],
                    bias: Optional[Array], implementation: str = 'cudnn') -> Array:
  """`jax.nn.dot_product_attention` with T5's conventions: `[b, q, heads, d]` in and out, no
  1/sqrt(d) scale (folded into the query kernel), the additive bias `[1 or b, heads, q, k]`
  (relative positions) plus the boolean mask as a bias. `implementation='xla'` runs the same
  call without cuDNN (for checking it on CPU)."""
  total = None if bias is None else bias.astype(query.dtype)
  if mask is not None:
    masked = mask_to_bias(mask).astype(query.dtype)
    total = masked if total is None else total + masked
  return jax.nn.dot_product_attention(query, key, value.astype(query.dtype), bias=total,
                                      scale=1.0, implementation=implementation)


def _pad_to_block(x: Array, axis: int) -> Array:
  extra = -x.shape[axis] % PALLAS_BLOCK
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _flash(query: Array, key: Array, value: Array, bias: Optional[Array], query_ids: Array,
           key_ids: Array, causal: bool) -> Array:
  """The kernel on heads-first operands (one shard's, under `shard_map`), lengths padded to whole
  blocks with id 0 (padding sees only padding, and is cut from the output)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as flash  # pylint: disable=g-import-not-at-top
  q_len, k_len = query.shape[2], key.shape[2]
  if bias is not None:
    bias = _pad_to_block(_pad_to_block(
        jnp.broadcast_to(bias, query.shape[:2] + (q_len, k_len)), 2), 3)
  query, key, value = _pad_to_block(query, 2), _pad_to_block(key, 2), _pad_to_block(value, 2)
  ids = flash.SegmentIds(q=_pad_to_block(query_ids, 1), kv=_pad_to_block(key_ids, 1))
  run = functools.partial(flash.flash_attention, causal=causal, sm_scale=1.0)
  if jax.default_backend() != 'tpu':
    run = _interpreted(run)
  return run(query, key, value, bias, ids)[:, :, :q_len]


def _interpreted(kernel: Callable[..., Array]) -> Callable[..., Array]:
  """`kernel` run in Pallas's TPU interpreter, its backward pass too: the backward kernel is
  traced when the gradient is, after the forward call has returned, so the interpreter is
  switched on again there."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

  @jax.custom_vjp
  def run(*operands):
    with pltpu.force_tpu_interpret_mode():
      return kernel(*operands)

  def forward(*operands):
    with pltpu.force_tpu_interpret_mode():
      return jax.vjp(kernel, *operands)

  def backward(vjp, cotangent):
    with pltpu.force_tpu_interpret_mode():
      return vjp(cotangent)

  run.defvjp(forward, backward)
  return run


def _mesh_axes(logical: tuple) -> jax.sharding.PartitionSpec:
  """The mesh axes of `logical` under the rules in scope, with sequences and head_dim whole."""
  spec = nn.logical_to_mesh_axes(logical)
  return jax.sharding.PartitionSpec(*(
      None if name in ('length', 'kv') else axes for name, axes in zip(logical, spec)))


def pallas_attention(query: Array, key: Array, value: Array, mask: AttentionMask,
                     bias: Optional[Array]) -> Array:
  """The Pallas flash-attention kernel with T5's conventions: `[b, q, heads, d]` in and out, no
  1/sqrt(d) scale, `bias` `[1 or b, heads, q, k]`, `mask` as attention ids plus its causal flag.

  Under a mesh (the abstract mesh the trainer traces under) the kernel runs per shard
  (`jax.shard_map`): batch and heads split as the logical-axis rules in scope say, sequences
  whole, so no operand is gathered to one device.
  """
  heads_first = lambda x: x.transpose(0, 2, 1, 3).astype(query.dtype)
  operands = [heads_first(query), heads_first(key), heads_first(value)]
  # In the compute dtype, as T5X computes the bias: it is materialized for every row per shard.
  bias = None if bias is None else bias.astype(query.dtype)
  run = functools.partial(_flash, causal=mask.causal)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    spec = _mesh_axes(_HEADS_FIRST_AXES)
    ids = jax.sharding.PartitionSpec(spec[0], None)
    bias_spec = jax.sharding.PartitionSpec(spec[0] if bias is not None and bias.shape[0] > 1
                                           else None, spec[1], None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, bias_spec, ids, ids),
                        out_specs=spec, check_vma=False)
  out = run(*operands, bias, mask.query_ids, mask.key_ids)
  return out.transpose(0, 2, 1, 3)
