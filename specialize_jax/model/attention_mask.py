"""Who may attend to whom, kept per token so that a fused kernel can take it without a dense mask.

Terms:
  attention ids: one int per token, `[batch, length]`. Query `i` may attend to key `j` when both
    ids are equal and nonzero (and, for a causal mask, `j <= i`). 0 marks padding; a packed row's
    examples carry their segment id (1, 2, ...), an unpacked row's tokens carry 1. This is what
    T5X's padding, packing and causal masks combine to, and what the Pallas flash-attention kernel
    takes as its `segment_ids` plus `causal`.
"""
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class AttentionMask:
  """Per-token attention ids for the queries (`[batch, q_len]`) and keys (`[batch, k_len]`).

  A pytree (the flag is static), so it passes through `nn.remat` and `jax.vmap` like an array.
  """
  query_ids: Array
  key_ids: Array
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  def dense(self) -> Array:
    """The boolean `[batch, 1, q_len, k_len]` mask, True where the pair may attend."""
    query = self.query_ids[:, None, :, None]
    key = self.key_ids[:, None, None, :]
    mask = jnp.logical_and(query == key, query > 0)
    if self.causal:
      q_len, k_len = self.query_ids.shape[-1], self.key_ids.shape[-1]
      mask = jnp.logical_and(mask, (jnp.arange(q_len)[:, None] >= jnp.arange(k_len)[None, :]))
    return mask


def attention_ids(tokens: Array, segment_ids: Optional[Array] = None) -> Array:
  """The attention ids of `[batch, length]` token ids (0 = padding), packed when `segment_ids`
  are given (SeqIO's: 1, 2, ... per example, 0 on padding)."""
  valid = (tokens > 0).astype(jnp.int32)
  if segment_ids is None:
    return valid
  return valid * segment_ids.astype(jnp.int32)
