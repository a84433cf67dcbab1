"""Teacher features for training examples, from an aligned teacher file (`specialize align`).

Terms:
  aligned row: one line of a `specialize_jax.aligned/1` file (see `alignment`): a teacher sample's
    cut target text, its student ids `target_ids`, and per target id a ragged top-k row
    (`topk_ids`, `topk_logprobs`) that is the teacher's distribution for predicting that id, or a
    one-hot row where the alignment kept none.
  dense rows: the `[n, k]` arrays a prepared example stores (`feature_converters.TEACHER_TOPK_IDS`
    / `TEACHER_TOPK_LOGPROBS`): ragged rows cut to their k most probable entries and padded with
    `TEACHER_PAD_ID` / `TEACHER_PAD_LOGPROB`.

`specialize prepare` joins the rows to the examples of the matching sample-loss set
(`example_rows`), checking the target text and its ids in the student's vocabulary: an aligned
file made from another teacher file or with another vocabulary fails loudly instead of training on
shifted distributions. Examples without an aligned row (answer-only formats, samples the alignment
skipped, gold rationales) store no rows; the training task makes every such position one-hot on
its target (`prepared_data.complete_teacher_rows`; the KL there is cross-entropy), as it does for
the EOS token.
"""
import dataclasses
import logging
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from specialize_jax.data import feature_converters
from specialize_jax.align import aligned_data
from specialize_jax.errors import ConfigError


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
          feature_converters.TEACHER_TOPK_LOGPROBS: np.zeros((0, k), np.float32)}


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


def load_dense_rows(path, k: int, log: Callable[[str], None] = logging.info,
                    log_every: int = 20_000) -> Dict[Tuple[str, int], DenseAlignedRow]:
  """`{(id, sample_index): DenseAlignedRow}` of an aligned file, converted while it is read (a
  progress line every `log_every` rows: a paper-size file takes minutes)."""
  start, rows, cut, widest = time.perf_counter(), {}, 0, 0
  for count, row in enumerate(aligned_data.iter_aligned(path), 1):
    rows[(row.id, row.sample_index)] = dense_aligned_row(row, k)
    widths = [len(ids) for ids in row.topk_ids]
    cut += sum(w > k for w in widths)
    widest = max([widest] + widths)
    if count % log_every == 0:
      log(f"{path}: {count} aligned rows read, {count / (time.perf_counter() - start):.0f}/s")
  log(f"{path}: {len(rows)} aligned rows ({k} candidates per position) in "
      f"{time.perf_counter() - start:.0f} s.")
  if cut:
    log(f"{path}: {cut} positions had more than {k} candidates (up to {widest}: the sampled token "
        f"outside the API's top list); their least probable were dropped. `--teacher_k {widest}` "
        "keeps them all, as the original did.")
  return rows


def example_rows(aligned: Optional[DenseAlignedRow], target: str, target_ids: Sequence[int],
                 k: int, where: str) -> Dict[str, np.ndarray]:
  """Teacher features of one training example whose text target is `target`.

  Args:
    aligned: the example's dense aligned row (`load_dense_rows`, width `k`), or None (one-hot
      everywhere).
    target: the example's text target; must be the aligned row's `target`.
    target_ids: `target` in the student's vocabulary; must be the aligned row's `target_ids`.
    k: the top-k width.
    where: names the example in errors (e.g. `gsm8k/train/3 sample 1 of FILE`).
  """
  if aligned is None:
    return empty_rows(k)
  if aligned.target != target:
    raise ConfigError(
        f"{where}: the aligned target differs from the teacher file's sample cut after its answer "
        f"line ({aligned.target[:60]!r}... vs {target[:60]!r}...). The aligned file was made "
        "from another teacher file: rerun `specialize align` on the teacher file you train on.")
  if not np.array_equal(aligned.target_ids, target_ids):
    raise ConfigError(
        f"{where}: the aligned file's target_ids differ from this vocabulary's tokenization of the "
        "same target: it was aligned with another vocabulary. Rerun `specialize align --vocab` "
        "with the vocabulary the set is prepared with.")
  if aligned.topk_ids.shape[1] != k:
    raise ValueError(f"{where}: aligned rows of width {aligned.topk_ids.shape[1]}, task k={k}.")
  return {feature_converters.TEACHER_TOPK_IDS: aligned.topk_ids,
          feature_converters.TEACHER_TOPK_LOGPROBS: aligned.topk_logprobs}
