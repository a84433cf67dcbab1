"""Token cross-entropy with T5X's semantics: z-loss, label smoothing, loss normalizing factors.

Terms:
  z-loss: `z_loss * log(Z)**2` per token, Z the softmax normalizer; it keeps logits near
    log-probabilities (bfloat16 round-off) and is part of the training loss, not of scores.
  label smoothing: targets put `1 - label_smoothing` on the label and spread the rest evenly over
    the other `vocab - 1` ids; the entropy of that distribution is subtracted, so a perfect
    prediction of the smoothed targets has loss 0 (T5X's convention).
  loss normalizing factor (LNF): what the summed token loss is divided by. None: nothing (sum);
    a number: that constant; 'NUM_REAL_TARGET_TOKENS': the sum of the loss weights;
    'NUM_TOTAL_TARGET_TOKENS': batch * target_length; 'AVERAGE_PER_SEQUENCE': each sequence's
    weights are first divided by that sequence's weight sum (per packed segment when packed), then
    the LNF is the sum of those weights, i.e. the mean over sequences of their mean token loss.
"""
import enum
import functools
from typing import Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class SpecialLossNormalizingFactor(enum.Enum):
  """Loss normalizing factors computed from the batch (T5X's names)."""
  NUM_REAL_TARGET_TOKENS = 1
  NUM_TOTAL_TARGET_TOKENS = 2
  AVERAGE_PER_SEQUENCE = 3


LossNormalizingFactor = Optional[Union[float, int, str, SpecialLossNormalizingFactor]]


def cross_entropy_with_logits(logits: Array, targets: Array,
                              z_loss: float = 0.0) -> Tuple[Array, Array]:
  """Per-token `-sum(targets * log_softmax(logits)) + z_loss * log(Z)**2` and the z-loss part.

  Args:
    logits: `[..., vocab]` float logits.
    targets: `[..., vocab]` target distributions (one-hot or smoothed).
    z_loss: coefficient of the z-loss term.

  Returns:
    `(loss, z_loss_term)`, both `[...]` float32; `loss` includes the z-loss term. Plain autodiff
    gives T5X's custom gradient wherever the targets sum to one.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
  log_softmax = logits - log_z[..., None]
  z_term = z_loss * jnp.square(log_z)
  loss = -jnp.sum(targets * log_softmax, axis=-1) + z_term
  return loss, z_term


def _smoothing(label_smoothing: float, vocab_size: int) -> Tuple[float, float, float]:
  """(on value, off value, entropy of the smoothed target distribution)."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing={label_smoothing} must be in [0, 1).')
  confidence = 1.0 - label_smoothing
  low = label_smoothing if vocab_size == 1 else label_smoothing / (vocab_size - 1)
  entropy = -(confidence * np.log(confidence) + (vocab_size - 1) * low * np.log(low + 1e-20))
  return confidence, low, float(entropy)


def token_cross_entropy(logits: Array, targets: Array, label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> Tuple[Array, Array]:
  """`cross_entropy_with_logits` against integer targets, without building one-hot arrays.

  The gradient is T5X's closed form, `g * ((1 + 2 z log Z) softmax - smoothed targets)` (plus the
  z-term's own cotangent), computed in one elementwise pass over `[batch, length, vocab]`; plain
  autodiff would add a scatter into a zero array of that size and several more passes.

  Args:
    logits: `[batch, length, vocab]`.
    targets: `[batch, length]` integer ids.

  Returns:
    `(loss, z_loss_term)`, each `[batch, length]` float32, with the smoothed-target entropy
    already subtracted.
  """
  return _token_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.int32),
                              float(label_smoothing), float(z_loss))


def _token_cross_entropy_forward(logits, targets, label_smoothing, z_loss):
  vocab_size = logits.shape[-1]
  confidence, low, entropy = _smoothing(label_smoothing, vocab_size)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  # sum_v t_v log p_v with t = low + (confidence - low) * onehot(target).
  cross_entropy = -(confidence - low) * (target_logit - log_z)
  if low > 0.0:
    cross_entropy = cross_entropy - low * (jnp.sum(logits, axis=-1) - vocab_size * log_z)
  z_term = z_loss * jnp.square(log_z)
  return (cross_entropy + z_term - entropy, z_term), log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_cross_entropy(logits, targets, label_smoothing, z_loss):
  return _token_cross_entropy_forward(logits, targets, label_smoothing, z_loss)[0]


def _token_cross_entropy_fwd(logits, targets, label_smoothing, z_loss):
  outputs, log_z = _token_cross_entropy_forward(logits, targets, label_smoothing, z_loss)
  return outputs, (logits, targets, log_z)


def _token_cross_entropy_bwd(label_smoothing, z_loss, residuals, cotangents):
  logits, targets, log_z = residuals
  loss_cotangent, z_cotangent = cotangents
  vocab_size = logits.shape[-1]
  confidence, low, _ = _smoothing(label_smoothing, vocab_size)
  probs = jnp.exp(logits - log_z[..., None])
  z_slope = 2.0 * z_loss * log_z  # d z_term / d log Z
  # d loss / d logits = softmax * ((confidence - low) + low * vocab + z_slope)
  #                     - (confidence - low) * onehot - low; the first factor is 1 + z_slope.
  prob_scale = loss_cotangent * ((confidence - low) + low * vocab_size + z_slope) + (
      z_cotangent * z_slope)
  is_target = targets[..., None] == jnp.arange(vocab_size, dtype=targets.dtype)
  target_part = jnp.where(is_target, confidence - low, 0.0) + low
  grad = probs * prob_scale[..., None] - loss_cotangent[..., None] * target_part
  return grad, None


_token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)


def compute_weighted_cross_entropy(
    logits: Array, targets: Array, weights: Optional[Array] = None,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
    loss_normalizing_factor: Optional[Union[float, Array]] = None) -> Tuple[Array, Array, Array]:
  """Weighted token cross-entropy summed over the batch, as T5X's function of the same name.

  Args:
    logits: `[batch, length, vocab]` float logits.
    targets: `[batch, length]` integer targets.
    weights: optional `[batch, length]` loss weights (0 on padding).
    label_smoothing: see the module docstring.
    z_loss: coefficient of the z-loss term.
    loss_normalizing_factor: a number (or scalar array) to divide by, or None to return sums.
      Resolve the special names first with `get_loss_normalizing_factor_and_weights`.

  Returns:
    `(loss, z_loss, weight_sum)` scalars; `loss` includes the z-loss.
  """
  if logits.ndim != targets.ndim + 1:
    raise ValueError(f'Incorrect shapes: logits {logits.shape} must be targets {targets.shape} '
                     'plus a vocabulary axis.')
  if isinstance(loss_normalizing_factor, (str, SpecialLossNormalizingFactor)):
    raise ValueError(f'loss_normalizing_factor={loss_normalizing_factor!r} must be resolved with '
                     'get_loss_normalizing_factor_and_weights before this call.')
  loss, z_term = token_cross_entropy(logits, targets, label_smoothing, z_loss)
  weight_sum = jnp.asarray(np.prod(targets.shape), jnp.float32)
  if weights is not None:
    loss = loss * weights
    z_term = z_term * weights
    weight_sum = jnp.sum(weights)
  # As T5X: no normalization by default (Adafactor is nearly scale-invariant, and every token
  # then counts the same whatever its sequence's length).
  if loss_normalizing_factor is not None:
    loss = loss / loss_normalizing_factor
    z_term = z_term / loss_normalizing_factor
  return jnp.sum(loss), jnp.sum(z_term), weight_sum


def parse_loss_normalizing_factor(
    value: Union[str, SpecialLossNormalizingFactor]) -> SpecialLossNormalizingFactor:
  """The special LNF named by `value` (case-insensitive), T5X's names."""
  if isinstance(value, SpecialLossNormalizingFactor):
    return value
  try:
    return SpecialLossNormalizingFactor[value.upper()]
  except KeyError:
    raise ValueError(f'Unknown loss_normalizing_factor {value!r}; use None, a number, or one of '
                     f'{[m.name for m in SpecialLossNormalizingFactor]}.') from None


def _segment_weight_sums(segment_ids: Array, weights: Array) -> Array:
  """For each token, the weight sum of its packed segment: `[batch, length]`.

  T5X finds segment ends from `decoder_positions`; grouping by equal segment id is the same for
  SeqIO's packing (ids 1, 2, ... in order, 0 for padding).
  """
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, length, length]
  return jnp.einsum('bst,bt->bs', same_segment.astype(weights.dtype), weights)


def get_loss_normalizing_factor_and_weights(
    loss_normalizing_factor: LossNormalizingFactor,
    batch: Mapping[str, Array]) -> Tuple[Optional[Union[float, Array]], Optional[Array]]:
  """Resolves an LNF (see the module docstring) into `(factor, loss_weights)` for a batch.

  Without `decoder_loss_weights` in the batch, special LNFs weight the non-padding targets.
  """
  weights = batch.get('decoder_loss_weights')
  if loss_normalizing_factor is None or not isinstance(loss_normalizing_factor,
                                                       (str, SpecialLossNormalizingFactor)):
    return loss_normalizing_factor, weights
  special = parse_loss_normalizing_factor(loss_normalizing_factor)
  targets = batch['decoder_target_tokens']
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  if special == SpecialLossNormalizingFactor.NUM_REAL_TARGET_TOKENS:
    return jnp.sum(weights), weights
  if special == SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
    return float(np.prod(targets.shape)), weights
  # AVERAGE_PER_SEQUENCE
  if batch.get('decoder_segment_ids') is not None:
    per_sequence = _segment_weight_sums(batch['decoder_segment_ids'], weights)
  else:
    per_sequence = jnp.sum(weights, axis=-1, keepdims=True)
  weights = jnp.nan_to_num(weights / per_sequence, nan=0.0, posinf=0.0, neginf=0.0)
  return jnp.sum(weights), weights


def counted_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
  """1.0 on the target tokens the loss counts (positive `decoder_loss_weights`, else non-padding
  targets), 0.0 elsewhere, `[batch, length]`: what token counts and per-token means are over,
  whatever the weights' scale (the original's batching scales them per micro-batch)."""
  weights = batch.get('decoder_loss_weights')
  if weights is None:
    return (batch['decoder_target_tokens'] > 0).astype(jnp.float32)
  return (weights > 0).astype(jnp.float32)
