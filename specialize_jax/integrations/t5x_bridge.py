"""The T5X bridge: our distillation loss inside `t5x.models.EncoderDecoderModel`, for users who train
with `python -m t5x.train` (gin files in `gin/t5x/`).

Imported only by those gin files (and tests), never by `import specialize_jax`: T5X is not on PyPI
and is optional. The loss is not reimplemented here: the teacher KL is
`specialize_jax.model.distillation_loss` (the same `TeacherKL` and `loss_terms` our trainer uses),
the teacher features reach the model through `specialize_jax.data.feature_converters`'
`TeacherEncDecFeatureConverter` (bound as `feature_converter_cls` in the gin files), and the
cross-entropy is T5X's own.

Terms:
  loss: `cross_entropy_weight * CE + z_loss + (1 - ce_weight) * KL` exactly as
    `specialize_jax.model.models.EncoderDecoderModel.loss_fn`, with T5X's loss normalizing factor.
  metrics: T5X's base metrics with `cross_ent_loss` holding the cross-entropy alone (T5X's
    default would put `loss - z_loss`, which here includes the KL), plus `kl` and `teacher_mass`.
  training eval: T5X evaluates `eval_fn` on tasks that usually have no teacher features (e.g.
    `gsm8k_dev_zs_cot`); there the teacher is the one-hot target (`distillation_loss.one_hot_teacher`),
    on which the KL equals the cross-entropy, so `loss` stays comparable across tasks. Training
    on a batch without teacher features under `loss_type='distribution'` is an error instead.
"""
from typing import Any, Mapping, Optional, Tuple

from clu import metrics as clu_metrics
import jax
import jax.numpy as jnp
from t5x import losses as t5x_losses
from t5x import metrics as t5x_metrics
from t5x import models as t5x_models

from specialize_jax.model import distillation_loss

Array = jax.Array


class DistillationEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """`t5x.models.EncoderDecoderModel` trained with `loss_type` 'sample' or 'distribution'.

  Args:
    *args, **kwargs: `t5x.models.EncoderDecoderModel`'s (module, vocabularies, optimizer_def,
      feature_converter_cls, z_loss, ...).
    loss_type: 'sample' (T5X's cross-entropy) or 'distribution' (the teacher KL).
    distribution_ce_weight: with 'distribution', the cross-entropy's share of the loss.
    renormalize_teacher: with 'distribution', renormalize the teacher's top-k mass to one.
  """

  def __init__(self, *args, loss_type: str = 'sample', distribution_ce_weight: float = 0.0,
               renormalize_teacher: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self.loss_type = loss_type
    self.cross_entropy_weight, self.teacher_losses = distillation_loss.loss_terms(
        loss_type, distribution_ce_weight, renormalize_teacher)

  def loss_fn(self, params: Any, batch: Mapping[str, Array],
              dropout_rng: Optional[Array]) -> Tuple[Array, Mapping[str, Any]]:
    logits = self._compute_logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    factor, weights = t5x_losses.get_loss_normalizing_factor_and_weights(
        self._loss_normalizing_factor, batch)
    loss, z_loss, _ = t5x_losses.compute_weighted_cross_entropy(
        logits, targets=targets, weights=weights, label_smoothing=self._label_smoothing,
        z_loss=self._z_loss, loss_normalizing_factor=factor)
    cross_ent = loss - z_loss
    loss = self.cross_entropy_weight * cross_ent + z_loss
    extra_metrics = {}
    for teacher_loss in self.teacher_losses:
      value, reported = teacher_loss(logits, batch, weights=weights,
                                     loss_normalizing_factor=factor)
      loss = loss + value
      extra_metrics.update(reported)

    segment_ids = {name[:-len('_segment_ids')]: value for name, value in batch.items()
                   if name.endswith('_segment_ids')}
    if not segment_ids:
      segment_ids = {name: value != 0 for name, value in batch.items()
                     if name in ('encoder_input_tokens', 'decoder_target_tokens')}
    metrics = dict(self._compute_metrics(logits=logits, targets=targets, mask=weights, loss=loss,
                                         z_loss=z_loss, segment_ids=segment_ids))
    num_tokens = jnp.array(targets.size)
    metrics['cross_ent_loss'] = t5x_metrics.AveragePerStep(total=cross_ent)
    metrics['cross_ent_loss_per_all_target_tokens'] = clu_metrics.Average(
        total=jnp.sum(cross_ent), count=num_tokens)
    if 'kl' in extra_metrics:
      metrics['kl'] = t5x_metrics.AveragePerStep(total=extra_metrics['kl'])
      metrics['teacher_mass'] = clu_metrics.Average(
          total=extra_metrics['teacher_mass'], count=jnp.array(1.0))
    return loss, metrics

  def eval_fn(self, params: Any, batch: Mapping[str, Array]) -> Tuple[Array, Mapping[str, Any]]:
    """T5X's training eval; batches without teacher features use the one-hot target teacher."""
    if self.teacher_losses and distillation_loss.TEACHER_TOPK_IDS not in batch:
      batch = {**batch, **distillation_loss.one_hot_teacher(batch['decoder_target_tokens'])}
    return self.loss_fn(params, batch, dropout_rng=None)
