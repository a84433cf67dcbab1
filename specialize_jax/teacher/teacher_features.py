"""Teacher features for SeqIO training tasks, from an aligned teacher file (`specialize align`).

Terms:
  aligned row: one line of a `specialize_jax.aligned/1` file (see `alignment`): a teacher sample's
    cut target text, its student ids `target_ids`, and per target id a ragged top-k row
    (`topk_ids`, `topk_logprobs`) that is the teacher's distribution for predicting that id, or a
    one-hot row where the alignment kept none.
  dense rows: the `[n, k]` arrays a task emits (`feature_converters.TEACHER_TOPK_IDS` /
    `TEACHER_TOPK_LOGPROBS`): ragged rows cut to their k most probable entries and padded with
    `TEACHER_PAD_ID` / `TEACHER_PAD_LOGPROB`.
  checked ids: the aligned row's `target_ids`, carried as `TEACHER_TARGET_IDS` until the task has
    tokenized its text target, then compared with the tokens and dropped: an aligned file made with
    another vocabulary fails loudly instead of training on shifted distributions.

The task's text target is tokenized by SeqIO as in sample training, so a `distribution` run sees
exactly the examples of the matching `sample` run; only the teacher features are added. Examples
without an aligned row (answer-only formats, samples the alignment skipped, gold rationales) carry
no rows, and `complete_teacher_rows` makes every such position one-hot on its target (the KL there
is cross-entropy), as it does for the EOS token SeqIO appends.
"""
import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from specialize_jax.teacher import aligned_data
from specialize_jax.data import feature_converters

TEACHER_TARGET_IDS = "teacher_target_ids"


def dense_rows(topk_ids: Sequence[Sequence[int]], topk_logprobs: Sequence[Sequence[float]],
               k: int) -> Tuple[np.ndarray, np.ndarray]:
  """Ragged top-k rows as `[n, k]` int32 ids and float32 logprobs (k most probable per row)."""
  n = len(topk_ids)
  ids = np.full((n, k), feature_converters.TEACHER_PAD_ID, np.int32)
  logprobs = np.full((n, k), feature_converters.TEACHER_PAD_LOGPROB, np.float32)
  for t, (row_ids, row_logprobs) in enumerate(zip(topk_ids, topk_logprobs)):
    if len(row_ids) > k:
      keep = np.argsort(-np.asarray(row_logprobs), kind="stable")[:k]
      row_ids = [row_ids[i] for i in keep]
      row_logprobs = [row_logprobs[i] for i in keep]
    ids[t, :len(row_ids)] = row_ids
    logprobs[t, :len(row_logprobs)] = row_logprobs
  return ids, logprobs


def empty_rows(k: int) -> Dict[str, np.ndarray]:
  """The features of an example with no teacher distribution (every position becomes one-hot)."""
  return {feature_converters.TEACHER_TOPK_IDS: np.zeros((0, k), np.int32),
          feature_converters.TEACHER_TOPK_LOGPROBS: np.zeros((0, k), np.float32),
          TEACHER_TARGET_IDS: np.zeros((0,), np.int32)}


@dataclasses.dataclass(frozen=True)
class DenseAlignedRow:
  """An aligned row kept for training: its target and dense `[n, k]` rows (compact numpy: the
  paper's 207k samples take about 2.5 KB each at k = 5, instead of ~18 KB as Python tuples)."""
  target: str
  target_ids: np.ndarray  # [n] int32
  topk_ids: np.ndarray  # [n, k] int32
  topk_logprobs: np.ndarray  # [n, k] float32


def dense_aligned_row(row: aligned_data.AlignedRow, k: int) -> DenseAlignedRow:
  ids, logprobs = dense_rows(row.topk_ids, row.topk_logprobs, k)
  return DenseAlignedRow(row.target, np.asarray(row.target_ids, np.int32), ids, logprobs)


def load_dense_rows(path, k: int) -> Dict[Tuple[str, int], DenseAlignedRow]:
  """`{(id, sample_index): DenseAlignedRow}` of an aligned file, converted while it is read."""
  return {(row.id, row.sample_index): dense_aligned_row(row, k)
          for row in aligned_data.iter_aligned(path)}


def example_rows(aligned: Optional[DenseAlignedRow], target: str, k: int,
                 where: str) -> Dict[str, np.ndarray]:
  """Teacher features of one training example whose text target is `target`.

  Args:
    aligned: the example's dense aligned row (`load_dense_rows`, width `k`), or None (one-hot
      everywhere).
    target: the example's text target; must be the aligned row's `target`.
    k: the task's top-k width.
    where: names the example in errors (e.g. `gsm8k/train/3 sample 1 of FILE`).
  """
  if aligned is None:
    return empty_rows(k)
  if aligned.target != target:
    raise ValueError(
        f"{where}: the aligned target differs from the teacher file's sample cut after its answer "
        f"line ({aligned.target[:60]!r}... vs {target[:60]!r}...). The aligned file was made "
        "from another teacher file: rerun `specialize align` on the teacher file you train on.")
  if aligned.topk_ids.shape[1] != k:
    raise ValueError(f"{where}: aligned rows of width {aligned.topk_ids.shape[1]}, task k={k}.")
  return {feature_converters.TEACHER_TOPK_IDS: aligned.topk_ids,
          feature_converters.TEACHER_TOPK_LOGPROBS: aligned.topk_logprobs,
          TEACHER_TARGET_IDS: aligned.target_ids}


def output_signature(k: int) -> Dict[str, tf.TensorSpec]:
  return {feature_converters.TEACHER_TOPK_IDS: tf.TensorSpec([None, k], tf.int32),
          feature_converters.TEACHER_TOPK_LOGPROBS: tf.TensorSpec([None, k], tf.float32),
          TEACHER_TARGET_IDS: tf.TensorSpec([None], tf.int32)}


def complete_teacher_rows(dataset: tf.data.Dataset,
                          output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """SeqIO preprocessor, after tokenizing and appending EOS: checks the aligned ids, then makes the
  teacher features one row per target token (rows past the aligned ones, and EOS rows, one-hot on
  the target)."""
  eos_id = output_features["targets"].vocabulary.eos_id
  return dataset.map(lambda example: _complete(example, eos_id),
                     num_parallel_calls=tf.data.AUTOTUNE)


def _complete(example: Mapping[str, tf.Tensor], eos_id: int) -> Dict[str, tf.Tensor]:
  example = dict(example)
  targets = tf.cast(example["targets"], tf.int32)
  ids = example[feature_converters.TEACHER_TOPK_IDS]
  logprobs = example[feature_converters.TEACHER_TOPK_LOGPROBS]
  checked = example.pop(TEACHER_TARGET_IDS)
  length = tf.shape(targets)[0]
  aligned = tf.minimum(tf.shape(checked)[0], length)
  # SeqIO's EOS replaces the last token when it trims, so an EOS position never keeps a teacher row.
  is_eos = tf.equal(targets[:aligned], eos_id)
  matches = tf.logical_or(tf.equal(targets[:aligned], checked[:aligned]), is_eos)
  tf.debugging.assert_equal(
      tf.reduce_all(matches), True,
      message="The aligned teacher file's target_ids differ from this task's tokenization of the "
              "same text: it was aligned with another vocabulary. Rerun `specialize align --vocab` "
              "with the vocabulary this run uses.")
  one_hot = feature_converters.one_hot_teacher_features(targets, ids.shape[-1])
  keep = tf.logical_and(tf.range(length) < aligned,
                        tf.logical_not(tf.equal(targets, eos_id)))
  pad_rows = tf.maximum(length - tf.shape(ids)[0], 0)
  for name, rows in ((feature_converters.TEACHER_TOPK_IDS, ids),
                     (feature_converters.TEACHER_TOPK_LOGPROBS, logprobs)):
    rows = tf.pad(rows[:length], [[0, pad_rows], [0, 0]])
    example[name] = tf.where(keep[:, None], rows, one_hot[name])
  return example
