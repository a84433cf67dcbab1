"""The original's batching over a prepared set: single-format micro-batches in a seeded order.

The original code (`get_train_batches` with `batch_mix_mode='fully_random'`) never mixes formats
inside a micro-batch. For each format it walks that format's examples in order, cuts them into
*effective batches* of `accumulation * micro_batch_size[format]` examples (a last, shorter one is
dropped), shuffles all formats' effective batches together, splits each into `accumulation`
micro-batches, and shuffles the micro-batches again. An optimizer step is then `accumulation`
consecutive micro-batches, of whatever formats the shuffle put there, and each micro-batch's loss is
its own token mean divided by `accumulation`: every micro-batch weighs the same, so the training
mixture is the share of micro-batches, not of examples. For the 3B student (accumulation 30;
micro-batch sizes in-context CoT 2, in-context answer-only 10, zero-shot CoT 8, zero-shot
answer-only 20) over 207,135 chains and 7,473 questions that is 103,560 / 720 / 25,890 / 360
micro-batches per epoch.

This module is that plan as a pure function of the formats' sizes, the settings, the seed and the
epoch: every process computes the same plan without reading data, and step k of any epoch is found
in O(1) epochs' work (resume).

Departure, on purpose: the original seeds both shuffles with 0 on every call, so every epoch repeats
one order; here epoch e's shuffles are seeded by `(seed, e)`, so epochs differ (`repeat_order=True`
restores the original's).

Terms:
  within-format order: the order a format's examples are cut in. `file` (the original's): the
    prepared set's order, a question's samples next to each other, so a micro-batch of in-context
    CoT holds samples of one or two questions; `shuffled`: a seeded permutation per epoch.
"""
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from specialize_jax.errors import ConfigError

WITHIN_FORMAT_ORDERS = ("file", "shuffled")


@dataclasses.dataclass(frozen=True)
class MicroBatch:
  """One single-format micro-batch: its format and the indices of its examples in that format."""
  format_name: str
  examples: np.ndarray  # int64 [micro_batch_size]


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
  """The original's micro-batches over formats of sizes `counts` (examples per format)."""
  counts: Mapping[str, int]
  micro_batch_sizes: Mapping[str, int]
  accumulation: int
  seed: int = 0
  within_format_order: str = "file"
  repeat_order: bool = False

  def __post_init__(self):
    if self.accumulation < 1:
      raise ConfigError(f"accumulation={self.accumulation} must be >= 1 (NUM_MICROBATCHES).")
    missing = sorted(set(self.counts) - set(self.micro_batch_sizes))
    if missing:
      raise ConfigError(f"No micro-batch size for format(s) {missing}; set one per format in "
                        f"MICRO_BATCH_SIZES (have {dict(self.micro_batch_sizes)}).")
    bad = {f: m for f, m in self.micro_batch_sizes.items() if int(m) < 1}
    if bad:
      raise ConfigError(f"Micro-batch sizes must be >= 1, got {bad} in MICRO_BATCH_SIZES.")
    if self.within_format_order not in WITHIN_FORMAT_ORDERS:
      raise ConfigError(f"within_format_order={self.within_format_order!r}; use one of "
                        f"{WITHIN_FORMAT_ORDERS}.")
    if not self.steps_per_epoch:
      raise ConfigError(
          f"No format has a whole effective batch (accumulation x micro-batch size) of examples: "
          f"counts {dict(self.counts)}, sizes {dict(self.micro_batch_sizes)}, accumulation "
          f"{self.accumulation}; lower MICRO_BATCH_SIZES or NUM_MICROBATCHES.")

  @property
  def formats(self) -> Tuple[str, ...]:
    return tuple(self.counts)

  def effective_batches(self, format_name: str) -> int:
    """Whole effective batches of a format per epoch (the original drops a shorter last one)."""
    return int(self.counts[format_name]) // (self.accumulation *
                                              int(self.micro_batch_sizes[format_name]))

  @property
  def micro_batches_per_epoch(self) -> Dict[str, int]:
    return {f: self.effective_batches(f) * self.accumulation for f in self.formats}

  @property
  def steps_per_epoch(self) -> int:
    """Optimizer steps per epoch: each format contributes whole effective batches, so exact."""
    return sum(self.micro_batches_per_epoch.values()) // self.accumulation

  def _rng(self, stream: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, stream, 0 if self.repeat_order else epoch, *more])

  def _sequence(self, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s micro-batches in order, as rows `(format index, effective batch, part)`."""
    batches = np.array([(f, b) for f, name in enumerate(self.formats)
                        for b in range(self.effective_batches(name))], np.int64).reshape(-1, 2)
    batches = batches[self._rng(1, epoch).permutation(len(batches))]
    parts = np.repeat(batches, self.accumulation, axis=0)
    parts = np.concatenate(
        [parts, np.tile(np.arange(self.accumulation), len(batches))[:, None]], axis=1)
    return parts[self._rng(2, epoch).permutation(len(parts))]

  def _format_order(self, format_index: int, epoch: int) -> Optional[np.ndarray]:
    if self.within_format_order == "file":
      return None
    return self._rng(3, epoch, format_index).permutation(int(self.counts[self.formats[format_index]]))

  def _micro_batches(self, epoch: int, rows: np.ndarray) -> List[MicroBatch]:
    """The micro-batches of `rows` of epoch `epoch`'s sequence."""
    orders = {f: self._format_order(f, epoch) for f in np.unique(rows[:, 0]).tolist()}
    result = []
    for format_index, batch, part in rows:
      name = self.formats[format_index]
      size = int(self.micro_batch_sizes[name])
      start = (batch * self.accumulation + part) * size
      examples = np.arange(start, start + size, dtype=np.int64)
      if orders[format_index] is not None:
        examples = orders[format_index][examples]
      result.append(MicroBatch(name, examples))
    return result

  def epoch(self, epoch: int) -> List[MicroBatch]:
    """Every micro-batch of epoch `epoch`, in training order."""
    return self._micro_batches(epoch, self._sequence(epoch))

  def step(self, step: int) -> List[MicroBatch]:
    """The `accumulation` micro-batches of optimizer step `step` (0-based, across epochs): one
    epoch's order is permuted, but only this step's micro-batches are built."""
    epoch, within = divmod(step, self.steps_per_epoch)
    rows = self._sequence(epoch)[within * self.accumulation:(within + 1) * self.accumulation]
    return self._micro_batches(epoch, rows)


def micro_batch_share(plan: MicroBatchPlan) -> Dict[str, float]:
  """Each format's share of an epoch's micro-batches: the mixture the original trains on."""
  total = sum(plan.micro_batches_per_epoch.values())
  return {f: n / total for f, n in plan.micro_batches_per_epoch.items()}


def token_mean_weights(target_weights: Sequence[np.ndarray], accumulation: int) -> List[np.ndarray]:
  """Per-token loss weights that make a summed loss the original's: micro-batch j's tokens weigh
  `1 / (accumulation * tokens_j)`, so summing weight x token loss over a step's micro-batches gives
  the mean over micro-batches of each one's token mean, divided as the original divides.

  `target_weights`: one `[rows, length]` 0/1 array per micro-batch (1 on real target tokens).
  """
  result = []
  for weights in target_weights:
    tokens = float(np.sum(weights))
    result.append(np.asarray(weights, np.float32) / (accumulation * tokens) if tokens else
                  np.zeros_like(weights, np.float32))
  return result
