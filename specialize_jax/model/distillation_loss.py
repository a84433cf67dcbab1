"""Distribution matching: the forward KL from the teacher's top-k to the student (docs/method.md).

Terms:
  teacher features: `teacher_topk_ids` `[batch, length, k]` int and `teacher_topk_logprobs`
    `[batch, length, k]` float, row t being the teacher's distribution for predicting
    `decoder_target_tokens[:, t]` (see `specialize_jax.data.feature_converters`). Positions without a
    teacher distribution carry a one-hot row (id = target, logprob 0; other slots logprob
    `TEACHER_PAD_LOGPROB`, i.e. probability 0).
  support: the k ids of a row. The KL is taken over this sparse support only, as in the original:
    `KL_t = sum_j p_j (log p_j - log q(id_j))`, p the teacher's probabilities and q the student's
    softmax over the whole vocabulary (temperature 1).
  renormalize: the API's top-k mass is below one; by default it is used as is (the original's rule).
    With `renormalize=True`, p is divided by its sum over the support first, so each row is a proper
    distribution.
  loss types: `sample` trains on the teacher's text with cross-entropy only (no extra loss);
    `distribution` adds this KL (weight `1 - ce_weight`) and keeps cross-entropy with weight
    `ce_weight` (0 in the original). Build both with `loss_terms(loss_type, ce_weight)`.

On a one-hot row the KL equals the token cross-entropy, so answer-only targets (all one-hot) are
trained with plain cross-entropy under either loss type, as the original did.

The KL is weighted by the batch's loss weights and divided by the same loss normalizing factor as
the cross-entropy, so it follows packing, padding and gradient accumulation exactly as the
cross-entropy does.
"""
from typing import Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from specialize_jax.model import losses

Array = jax.Array

TEACHER_TOPK_IDS = 'teacher_topk_ids'
TEACHER_TOPK_LOGPROBS = 'teacher_topk_logprobs'
LOSS_TYPES = ('sample', 'distribution')


def token_kl(logits: Array, topk_ids: Array, topk_logprobs: Array,
             renormalize: bool = False) -> Array:
  """Per-position `sum_j p_j (log p_j - log q(id_j))`: `[batch, length]` float32.

  Args:
    logits: student logits `[batch, length, vocab]`.
    topk_ids: `[batch, length, k]` teacher candidate ids (student vocabulary).
    topk_logprobs: `[batch, length, k]` teacher log-probabilities (padding slots: very negative).
    renormalize: divide the teacher's probabilities by their sum over the k candidates.
  """
  logits = logits.astype(jnp.float32)
  teacher_logprobs = topk_logprobs.astype(jnp.float32)
  if renormalize:
    teacher_logprobs = teacher_logprobs - jax.nn.logsumexp(teacher_logprobs, axis=-1,
                                                           keepdims=True)
  teacher_probs = jnp.exp(teacher_logprobs)
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  student_logprobs = jnp.take_along_axis(logits, topk_ids.astype(jnp.int32), axis=-1) - log_z
  # Padding slots have p = 0 exactly (exp(-1e9)), so they add 0 whatever their logprob.
  return jnp.sum(teacher_probs * (teacher_logprobs - student_logprobs), axis=-1)


class TeacherKL:
  """The extra loss `(1 - ce_weight) * KL(teacher || student)` for `EncoderDecoderModel`.

  Reports `kl` (the unweighted KL, normalized like the loss) and `teacher_mass` (mean teacher
  probability mass per weighted target token; 1 for one-hot rows, below one for top-k rows).

  Args:
    ce_weight: the cross-entropy's share of the loss; the KL gets the rest. Give the model the same
      value as `cross_entropy_weight` (`loss_terms` does).
    renormalize: see the module docstring.
  """

  def __init__(self, ce_weight: float = 0.0, renormalize: bool = False):
    if not 0.0 <= ce_weight < 1.0:
      raise ValueError(f'ce_weight={ce_weight} must be in [0, 1): at 1 the KL has no weight; use '
                       "loss_type='sample' for cross-entropy alone.")
    self.ce_weight = ce_weight
    self.renormalize = renormalize

  def __repr__(self) -> str:
    return f'TeacherKL(ce_weight={self.ce_weight}, renormalize={self.renormalize})'

  def __call__(self, logits: Array, batch: Mapping[str, Array], weights: Optional[Array],
               loss_normalizing_factor: Optional[Union[float, Array]]
               ) -> Tuple[Array, Mapping[str, Array]]:
    missing = [name for name in (TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS) if name not in batch]
    if missing:
      raise ValueError(
          f'The distribution loss needs the teacher features {missing}, but the batch has only '
          f'{sorted(batch)}. Train on a task with teacher features (an aligned teacher file, see '
          "`specialize align`) and set the dataset's teacher_k, or use loss_type='sample'.")
    kl = token_kl(logits, batch[TEACHER_TOPK_IDS], batch[TEACHER_TOPK_LOGPROBS], self.renormalize)
    # Exactly as `losses.compute_weighted_cross_entropy`: no weights means every position counts.
    kl = jnp.sum(kl if weights is None else kl * weights)
    mass = jnp.sum(jnp.exp(batch[TEACHER_TOPK_LOGPROBS].astype(jnp.float32)), axis=-1)
    token_weights = losses.counted_tokens(batch)
    num_tokens = jnp.maximum(jnp.sum(token_weights), 1e-8)
    if loss_normalizing_factor is not None:
      kl = kl / loss_normalizing_factor
    metrics = {'kl': kl, 'teacher_mass': jnp.sum(mass * token_weights) / num_tokens}
    return (1.0 - self.ce_weight) * kl, metrics


def one_hot_teacher(targets: Array) -> Mapping[str, Array]:
  """Teacher features (k = 1) that put all mass on `targets [batch, length]`: the KL is then the
  cross-entropy. For evaluating a distribution-loss model on tasks without teacher features."""
  return {TEACHER_TOPK_IDS: targets.astype(jnp.int32)[..., None],
          TEACHER_TOPK_LOGPROBS: jnp.zeros(targets.shape + (1,), jnp.float32)}


def loss_terms(loss_type: str = 'sample', ce_weight: float = 0.0,
               renormalize: bool = False) -> Tuple[float, Tuple[TeacherKL, ...]]:
  """`(cross_entropy_weight, extra_losses)` for `EncoderDecoderModel` from a loss type.

  `sample`: cross-entropy alone (`ce_weight` must stay 0, it has no meaning there);
  `distribution`: `ce_weight` * cross-entropy + (1 - `ce_weight`) * KL.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'loss_type={loss_type!r}; use one of {LOSS_TYPES}.')
  if loss_type == 'sample':
    if ce_weight or renormalize:
      raise ValueError("ce_weight and renormalize apply to loss_type='distribution' only.")
    return 1.0, ()
  return ce_weight, (TeacherKL(ce_weight, renormalize),)
