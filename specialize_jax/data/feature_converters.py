"""A SeqIO encoder-decoder feature converter that carries teacher top-k features, with packing.

Terms:
  teacher features: the teacher's top-k next-token distribution at each target token, as two task
    features aligned with ``targets`` token by token: ``teacher_topk_ids`` (int32, ``[n, k]``) and
    ``teacher_topk_logprobs`` (float32, ``[n, k]``), where ``n`` is the example's number of target
    tokens and ``k`` is fixed per task. Row ``t`` is the teacher's distribution for predicting
    ``targets[t]``.
  one-hot row: the row a position carries when it has no teacher distribution (a gold rationale
    with no teacher logprobs, or a padding position): id ``targets[t]`` with logprob 0.0 in slot 0,
    and ``TEACHER_PAD_ID`` with ``TEACHER_PAD_LOGPROB`` in slots 1..k-1. It is the delta
    distribution on the target, so a distillation loss on it is ordinary cross-entropy. Padding
    positions are one-hot on the pad token 0, the value ``decoder_target_tokens`` has there.
    ``TEACHER_PAD_LOGPROB`` is a large finite negative, not -inf, so ``p * logp`` and
    ``0 * logp`` stay finite (0 * -inf is NaN) before the loss weights mask a position.
  segment / packed row: as in SeqIO, packing concatenates several examples into one row of
    ``inputs`` and ``targets`` length; ``*_segment_ids`` number the examples in a row from 1
    (0 = padding) and ``*_positions`` count tokens from 0 within each example.
  window: like SeqIO's tf-ops packer, examples are packed greedily in order within consecutive
    windows of ``max(inputs_length, targets_length)`` examples (enough to fill at least one row);
    a row is closed as soon as the next example would overflow inputs or targets.

Why packing matters here: chain-of-thought targets range from a one-line answer to several hundred
tokens, so padding every example to the longest target wastes most decoder positions, and the
teacher features multiply that waste by k (``[targets_length, k]`` ids and logprobs per example).
SeqIO's ``EncDecFeatureConverter`` refuses pass-through features when ``pack=True``, and its packer
(``seqio.utils.trim_and_pack_dataset``) takes only rank-1 features, casts them to int32 and infers
each example's length by counting non-zero values, which a logprob row (0.0 is common) breaks; so
this module packs itself, see ``_pack_dataset``.

Parity with SeqIO: with no teacher features in the dataset the converter IS
``seqio.EncDecFeatureConverter`` (it delegates). With teacher features, inputs/targets are laid out
exactly as SeqIO's packer lays them out, with two deliberate differences that only show on
degenerate data: example lengths are real lengths, not counts of non-zero tokens (a token id 0
inside a sequence is kept), and segment ids number examples, so an example with empty ``inputs``
still has matching encoder and decoder segment ids (SeqIO numbers each feature separately and
shifts one against the other).

Loss scale: a task may give each example a float32 scalar ``loss_scale`` (the original's per-micro-
batch token mean, ``prepared.micro_batches``); the converter multiplies it into
``decoder_loss_weights``, which are then float32 (unpacked only: a packed row mixes examples).

Teacher features may be longer than ``targets`` only when ``targets`` has exactly the targets
length, i.e. a SeqIO Task trimmed ``targets`` (``trim_output_features``) but not the teacher
features; they are then cut to the same prefix. Any other length difference is an error.
"""
from typing import Dict, Mapping, Optional, Union

import seqio
import tensorflow as tf

from specialize_jax.errors import ConfigError

TEACHER_TOPK_IDS = "teacher_topk_ids"
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
TEACHER_FEATURES = (TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS)
LOSS_SCALE = "loss_scale"
# Slots 1..k-1 of a one-hot row (see the module docstring).
TEACHER_PAD_ID = 0
TEACHER_PAD_LOGPROB = -1e9

_TEACHER_DTYPES = {TEACHER_TOPK_IDS: tf.int32, TEACHER_TOPK_LOGPROBS: tf.float32}
_Spec = seqio.FeatureConverter.FeatureSpec
TEACHER_MODEL_FEATURES = {
    TEACHER_TOPK_IDS: _Spec(dtype=tf.int32, rank=2),
    TEACHER_TOPK_LOGPROBS: _Spec(dtype=tf.float32, rank=2),
}
# Per-example lengths carried through padded_batch while packing (not model features).
_INPUTS_LENGTH = "_inputs_length"
_TARGETS_LENGTH = "_targets_length"


def check_vocabulary_fits(task: Union[seqio.Task, seqio.Mixture], model_vocab_size: int) -> None:
  """Raises unless every token id `task` can hold is below the model's `vocab_size`.

  The network's embedding lookup (`jnp.take`) fills ids past the table's end with NaN, so a
  vocabulary larger than the model's would only show up later, as a non-finite training loss or
  empty predictions, naming no cause.
  """
  for name in ("inputs", "targets"):
    if name not in task.output_features:
      continue
    size = task.output_features[name].vocabulary.vocab_size
    if size > model_vocab_size:
      raise ConfigError(
          f"Task {task.name!r}: its {name!r} vocabulary has {size} ids but the model's "
          f"vocab_size is {model_vocab_size}, so larger ids would have no embedding. Use a model "
          f"(gin file or checkpoint) whose `T5Config.vocab_size` is at least {size}.")


def one_hot_teacher_features(targets: tf.Tensor, k: int) -> Dict[str, tf.Tensor]:
  """Teacher features for positions with no teacher distribution: one-hot on each target token.

  Args:
    targets: int32 ``[..., length]`` target tokens.
    k: the task's top-k width (>= 1).

  Returns:
    ``{TEACHER_TOPK_IDS: int32 [..., length, k], TEACHER_TOPK_LOGPROBS: float32 [..., length, k]}``.
  """
  if k < 1:
    raise ValueError(f"k={k}: the teacher top-k width must be at least 1.")
  targets = tf.convert_to_tensor(targets, dtype=tf.int32)
  is_first_slot = tf.range(k) == 0  # [k]
  ids = tf.where(is_first_slot, targets[..., None], TEACHER_PAD_ID)  # [..., length, k]
  logprobs = tf.where(is_first_slot, 0.0, TEACHER_PAD_LOGPROB)  # [k]
  logprobs = tf.broadcast_to(logprobs, tf.shape(ids))
  return {TEACHER_TOPK_IDS: ids, TEACHER_TOPK_LOGPROBS: logprobs}


def _fill_non_tokens(features: Mapping[str, tf.Tensor], targets: tf.Tensor, is_token: tf.Tensor,
                     k: int) -> Dict[str, tf.Tensor]:
  """Replaces teacher rows where ``is_token`` is False by one-hot rows on ``targets``."""
  fill = one_hot_teacher_features(targets, k)
  return {name: tf.where(is_token[..., None], features[name], fill[name])
          for name in TEACHER_FEATURES}


def _check_and_trim(ex: Mapping[str, tf.Tensor], inputs_length: int,
                    targets_length: int) -> Dict[str, tf.Tensor]:
  """Checks teacher/targets alignment, then trims inputs, targets and teacher features."""
  targets_n = tf.shape(ex["targets"])[0]
  ids_n = tf.shape(ex[TEACHER_TOPK_IDS])[0]
  logprobs_n = tf.shape(ex[TEACHER_TOPK_LOGPROBS])[0]
  trimmed_by_task = tf.logical_and(tf.equal(targets_n, targets_length), ids_n > targets_length)
  aligned = tf.logical_and(tf.equal(ids_n, logprobs_n),
                           tf.logical_or(tf.equal(ids_n, targets_n), trimmed_by_task))
  check = tf.debugging.Assert(aligned, [
      f"{TEACHER_TOPK_IDS} / {TEACHER_TOPK_LOGPROBS} must have one row per target token "
      f"(targets length {targets_length} from task_feature_lengths); fix the teacher-feature "
      "preprocessor. Rows (ids, logprobs) and target tokens:", ids_n, logprobs_n, targets_n])
  with tf.control_dependencies([check]):
    targets = tf.identity(ex["targets"][:targets_length])
  out = dict(ex)
  out["inputs"] = ex["inputs"][:inputs_length]
  out["targets"] = targets
  kept = tf.shape(targets)[0]
  for name in TEACHER_FEATURES:
    out[name] = ex[name][:kept]
  return out


def _pad_teacher(ex: Mapping[str, tf.Tensor], targets_length: int) -> Dict[str, tf.Tensor]:
  """Pads trimmed teacher features to ``targets_length`` with one-hot rows on the pad token."""
  out = dict(ex)
  k = ex[TEACHER_TOPK_IDS].shape[-1]
  n = tf.shape(ex[TEACHER_TOPK_IDS])[0]
  padded = {name: tf.pad(ex[name], [[0, targets_length - n], [0, 0]]) for name in TEACHER_FEATURES}
  out.update(_fill_non_tokens(padded, out["targets"], tf.range(targets_length) < n, k))
  for name in TEACHER_FEATURES:
    out[name] = tf.ensure_shape(out[name], [targets_length, k])
  return out


def _pack_dataset(ds: tf.data.Dataset, inputs_length: int, targets_length: int) -> tf.data.Dataset:
  """Packs trimmed examples with teacher features into rows, SeqIO's layout for inputs/targets.

  Per window: ``padded_batch`` the window, assign each example a (row, start offset, segment id)
  with a sequential ``tf.scan`` over its two lengths, then ``scatter_nd`` every token (and its
  teacher row, along the same target axis) to its packed place. Real lengths travel beside the
  features, so padding is never inferred from values.
  """
  k = ds.element_spec[TEACHER_TOPK_IDS].shape[-1]
  keys = ("inputs", "targets") + TEACHER_FEATURES

  def add_lengths(ex):
    ex = {name: ex[name] for name in keys}
    ex[_INPUTS_LENGTH] = tf.shape(ex["inputs"])[0]
    ex[_TARGETS_LENGTH] = tf.shape(ex["targets"])[0]
    return ex

  def assign(state, lengths):
    row, _, _, segment, end_inputs, end_targets = state
    n_inputs, n_targets = lengths
    overflow = tf.logical_or(end_inputs + n_inputs > inputs_length,
                             end_targets + n_targets > targets_length)
    row = tf.where(overflow, row + 1, row)
    start_inputs = tf.where(overflow, 0, end_inputs)
    start_targets = tf.where(overflow, 0, end_targets)
    # An example with no tokens at all takes no segment id (as in SeqIO).
    has_tokens = tf.cast(n_inputs + n_targets > 0, tf.int32)
    segment = tf.where(overflow, 1, segment + has_tokens)
    return (row, start_inputs, start_targets, segment, start_inputs + n_inputs,
            start_targets + n_targets)

  def pack_window(batch):
    zero = tf.constant(0, tf.int32)
    row, start_inputs, start_targets, segment, _, _ = tf.scan(
        assign, (batch[_INPUTS_LENGTH], batch[_TARGETS_LENGTH]), initializer=(zero,) * 6)
    num_rows = row[-1] + 1
    packed = {}

    def scatter(values, lengths, starts, length):
      """Returns the packed values, plus the token's (row, column) and (example, position)."""
      mask = tf.sequence_mask(lengths, maxlen=tf.shape(values)[1])  # [batch, max_len]
      source = tf.cast(tf.where(mask), tf.int32)  # [tokens, 2]: (example, position)
      example, position = source[:, 0], source[:, 1]
      dest = tf.stack([tf.gather(row, example), tf.gather(starts, example) + position], axis=1)
      shape = tf.concat([[num_rows, length], tf.shape(values)[2:]], axis=0)
      return tf.scatter_nd(dest, tf.gather_nd(values, source), shape), dest, example, position

    for name, lengths, starts, length in (
        ("inputs", batch[_INPUTS_LENGTH], start_inputs, inputs_length),
        ("targets", batch[_TARGETS_LENGTH], start_targets, targets_length)):
      packed[name], dest, example, position = scatter(batch[name], lengths, starts, length)
      packed[name + "_segment_ids"] = tf.scatter_nd(
          dest, tf.gather(segment, example), [num_rows, length])
      packed[name + "_positions"] = tf.scatter_nd(dest, position, [num_rows, length])
    teacher = {name: scatter(batch[name], batch[_TARGETS_LENGTH], start_targets,
                             targets_length)[0] for name in TEACHER_FEATURES}
    packed.update(_fill_non_tokens(teacher, packed["targets"], packed["targets_segment_ids"] > 0,
                                   k))
    return packed

  def set_shapes(ex):
    out = {}
    for name, value in ex.items():
      if name in TEACHER_FEATURES:
        out[name] = tf.ensure_shape(value, [targets_length, k])
      else:
        out[name] = tf.ensure_shape(
            value, [inputs_length if name.startswith("inputs") else targets_length])
    return out

  autotune = tf.data.experimental.AUTOTUNE
  ds = ds.map(add_lengths, num_parallel_calls=autotune)
  ds = ds.padded_batch(max(inputs_length, targets_length))
  ds = ds.map(pack_window, num_parallel_calls=autotune).unbatch()
  return ds.map(set_shapes, num_parallel_calls=autotune)


class TeacherEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """``seqio.EncDecFeatureConverter`` plus ``teacher_topk_ids`` / ``teacher_topk_logprobs``.

  Model features: SeqIO's encoder-decoder features (segment ids and positions when packed) plus,
  when the dataset has teacher features, ``teacher_topk_ids`` int32 ``[targets_length, k]`` and
  ``teacher_topk_logprobs`` float32 ``[targets_length, k]``, aligned with
  ``decoder_target_tokens``; padding positions hold one-hot rows on token 0. Packing is supported
  with teacher features. ``task_feature_lengths`` is SeqIO's ``{"inputs": N, "targets": M}``;
  teacher features use M (a teacher key may be given only with the value M).

  Args:
    teacher_k: None (default) carries teacher features when the dataset has them, so one converter
      serves distillation and eval tasks. An int requires them with that k, and makes
      ``get_model_feature_lengths`` list them.
    **kwargs: ``seqio.EncDecFeatureConverter``'s (``pack``, ``apply_length_check``, ``bos_id``,
      ...).
  """

  def __init__(self, teacher_k: Optional[int] = None, **kwargs) -> None:
    super().__init__(**kwargs)
    if teacher_k is not None and teacher_k < 1:
      raise ValueError(f"teacher_k={teacher_k}: set it to the task's top-k width (>= 1) or None.")
    self._teacher_k = teacher_k

  @property
  def teacher_k(self) -> Optional[int]:
    return self._teacher_k

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """Converts task features to model features, validating like ``seqio.FeatureConverter``."""
    task_feature_lengths = _without_teacher_lengths(task_feature_lengths)
    if self.pack:
      # Packing keeps model inputs only and SeqIO warns about every other feature (a prepared
      # set's `id`, `answer`, ...) in every run: drop them here, quietly.
      keep = set(self.TASK_FEATURES) | set(self._passthrough_features) | set(TEACHER_FEATURES)
      if set(ds.element_spec) - keep:
        ds = ds.map(lambda example: {k: v for k, v in example.items() if k in keep})
    k = self._teacher_k_of(ds.element_spec)
    scaled = LOSS_SCALE in ds.element_spec
    if scaled and self.pack:
      raise ValueError(f"The dataset's examples carry {LOSS_SCALE} (the original's batching), "
                       "which packing would mix across examples; set pack=False (USE_PACKING).")
    if k is None and not scaled:
      return super().__call__(ds, task_feature_lengths)
    if self.pack and self._use_custom_packing_ops:
      raise ValueError(
          "use_custom_packing_ops=True cannot pack teacher features (the custom ops pack rank-1 "
          "integer features only); set use_custom_packing_ops=False.")

    # The same validations as seqio.FeatureConverter.__call__, with rank-2 teacher features.
    task_features = dict(self.TASK_FEATURES)
    task_features.update(self._passthrough_features)
    if set(task_feature_lengths) != set(task_features):
      raise ValueError(
          f"task_feature_lengths has {sorted(task_feature_lengths)}; expected exactly "
          f"{sorted(task_features)} (teacher features take the 'targets' length).")
    ds = self._validate_dataset(ds, task_features, task_feature_lengths, strict=False,
                                error_label="input_validation")
    ds = self._convert_features(ds, task_feature_lengths)
    model_features = dict(self.MODEL_FEATURES)
    model_features.update(self._passthrough_features)
    if self.pack:
      model_features.update({name: _Spec(dtype=dtype)
                             for name, dtype in self.PACKING_FEATURE_DTYPES.items()})
    if k is not None:
      model_features.update(TEACHER_MODEL_FEATURES)
    if scaled:
      model_features["decoder_loss_weights"] = _Spec(dtype=tf.float32)
    model_feature_lengths = self._model_feature_lengths(task_feature_lengths,
                                                        with_teacher=k is not None)
    ds = self._validate_dataset(ds, model_features, model_feature_lengths, strict=True,
                                error_label="output_validation")
    if set(ds.element_spec) != set(model_features):
      raise ValueError(  # A bug here, not in the caller's data.
          f"Converted features {sorted(ds.element_spec)} differ from the model features "
          f"{sorted(model_features)}.")
    return ds

  def _teacher_k_of(self, element_spec: Mapping[str, tf.TypeSpec]) -> Optional[int]:
    """The dataset's teacher top-k width, or None without teacher features; raises if malformed."""
    present = [name for name in TEACHER_FEATURES if name in element_spec]
    if not present:
      if self._teacher_k is not None:
        raise ValueError(
            f"The dataset has no {TEACHER_TOPK_IDS} / {TEACHER_TOPK_LOGPROBS} but teacher_k="
            f"{self._teacher_k} requires them; add the teacher preprocessor to the task or set "
            "teacher_k=None. Dataset features: " + ", ".join(sorted(element_spec)))
      return None
    if len(present) == 1:
      missing, = set(TEACHER_FEATURES) - set(present)
      raise ValueError(f"The dataset has {present[0]} but not {missing}; a task must output both "
                       "teacher features or neither.")
    widths = {}
    for name, dtype in _TEACHER_DTYPES.items():
      spec = element_spec[name]
      if not isinstance(spec, tf.TensorSpec):
        raise ValueError(f"{name} is a {type(spec).__name__}; expected a dense tf.Tensor of shape "
                         "[targets_length, k] (convert ragged rows with .to_tensor()).")
      if spec.shape.rank != 2:
        raise ValueError(
            f"{name} has shape {spec.shape} (rank {spec.shape.rank}); expected rank 2, "
            "[targets_length, k], one row of top-k entries per target token.")
      if spec.dtype != dtype:
        raise ValueError(f"{name} has dtype {spec.dtype.name}; expected {dtype.name} (tf.cast it "
                         "in the task's preprocessor).")
      widths[name] = spec.shape[1]
    if any(width is None for width in widths.values()):
      raise ValueError(f"The teacher top-k width is not static ({widths}); set it in the task, "
                       "e.g. tf.ensure_shape(x, [None, k]).")
    if widths[TEACHER_TOPK_IDS] != widths[TEACHER_TOPK_LOGPROBS]:
      raise ValueError(f"k mismatch: {TEACHER_TOPK_IDS} has k={widths[TEACHER_TOPK_IDS]} but "
                       f"{TEACHER_TOPK_LOGPROBS} has k={widths[TEACHER_TOPK_LOGPROBS]}.")
    k = widths[TEACHER_TOPK_IDS]
    if self._teacher_k is not None and k != self._teacher_k:
      raise ValueError(f"k mismatch: the dataset's teacher features have k={k} but the converter "
                       f"has teacher_k={self._teacher_k}; set teacher_k={k} (or None).")
    return k

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    if not all(name in ds.element_spec for name in TEACHER_FEATURES):
      return super()._convert_features(ds, task_feature_lengths)
    inputs_length = task_feature_lengths["inputs"]
    targets_length = task_feature_lengths["targets"]
    autotune = tf.data.experimental.AUTOTUNE
    ds = ds.map(lambda ex: _check_and_trim(ex, inputs_length, targets_length),
                num_parallel_calls=autotune)
    if self.pack:
      ds = _pack_dataset(ds, inputs_length, targets_length)
    else:
      ds = seqio.utils.trim_and_pad_dataset(ds, task_feature_lengths)
      ds = ds.map(lambda ex: _pad_teacher(ex, targets_length), num_parallel_calls=autotune)
    return ds.map(self._convert_example, num_parallel_calls=autotune)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    model_features = dict(super()._convert_example(features))
    for name in TEACHER_FEATURES:
      if name in features:
        model_features[name] = features[name]
    if LOSS_SCALE in features:
      model_features["decoder_loss_weights"] = (
          tf.cast(model_features["decoder_loss_weights"], tf.float32) * features[LOSS_SCALE])
    return model_features

  def get_model_feature_lengths(self,
                                task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    """SeqIO's encoder-decoder lengths, plus teacher features if teacher_k is set."""
    return self._model_feature_lengths(task_feature_lengths,
                                       with_teacher=self._teacher_k is not None)

  def _model_feature_lengths(self, task_feature_lengths: Mapping[str, int],
                             with_teacher: bool) -> Dict[str, int]:
    task_feature_lengths = _without_teacher_lengths(task_feature_lengths)
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    if with_teacher:
      lengths.update({name: task_feature_lengths["targets"] for name in TEACHER_FEATURES})
    return lengths


def _without_teacher_lengths(task_feature_lengths: Mapping[str, int]) -> Dict[str, int]:
  """Drops teacher keys, allowed only with the targets length (e.g. a Task's output features)."""
  lengths = dict(task_feature_lengths)
  for name in TEACHER_FEATURES:
    if name in lengths:
      if lengths[name] != lengths.get("targets"):
        raise ValueError(
            f"task_feature_lengths[{name!r}]={lengths[name]} differs from 'targets'="
            f"{lengths.get('targets')}; teacher features always take the targets length, so drop "
            f"the {name!r} entry.")
      del lengths[name]
  return lengths
