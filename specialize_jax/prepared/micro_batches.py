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

Laid into fixed-shape batches (`StepLayout`): a step's micro-batches hold a varying number of rows
(3B: 30 micro-batches of 2 to 20 rows), but a compiled step takes one shape. So every step is a batch
of `rows_per_step` rows (BATCH_SIZE): the step's real rows, then padding rows of loss scale 0. Each
row carries its micro-batch's loss scale `1 / (accumulation * target tokens of that micro-batch)`,
so the summed token loss is the original's whatever the layout (the trainer's device micro-batches,
T5X's, any number of hosts). The real rows fill the trainer's device micro-batches one after another
(device micro-batch i holds rows i, i + k, ...; `training.train_step`), so whole device
micro-batches are padding and the trainer skips them: a step costs its real rows, rounded up to a
device micro-batch.

Terms:
  within-format order: the order a format's examples are cut in. `file` (the original's): the
    prepared set's order, a question's samples next to each other, so a micro-batch of in-context
    CoT holds samples of one or two questions; `shuffled`: a seeded permutation per epoch.
"""
import dataclasses
import functools
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
    """The formats in sorted order: the plan does not depend on the order `counts` lists them."""
    return tuple(sorted(self.counts))

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

  def sequence(self, epoch: int) -> np.ndarray:
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

  def micro_batches(self, epoch: int, rows: np.ndarray) -> List[MicroBatch]:
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
    return self.micro_batches(epoch, self.sequence(epoch))

  def step(self, step: int, sequence: Optional[np.ndarray] = None) -> List[MicroBatch]:
    """The `accumulation` micro-batches of optimizer step `step` (0-based, across epochs): one
    epoch's order is permuted (or given: `sequence(epoch)` of the step's epoch, cached by the
    caller), but only this step's micro-batches are built."""
    epoch, within = divmod(step, self.steps_per_epoch)
    if sequence is None:
      sequence = self.sequence(epoch)
    rows = sequence[within * self.accumulation:(within + 1) * self.accumulation]
    return self.micro_batches(epoch, rows)

  def rows_per_step(self, num_steps: int) -> np.ndarray:
    """The number of rows (examples) of each of steps `0 .. num_steps - 1`, int64 `[num_steps]`."""
    sizes = np.array([int(self.micro_batch_sizes[f]) for f in self.formats], np.int64)
    result = []
    for epoch in range(-(-num_steps // self.steps_per_epoch)):
      rows = sizes[self.sequence(epoch)[:, 0]].reshape(-1, self.accumulation).sum(axis=1)
      result.append(rows)
    return np.concatenate(result)[:num_steps]


@dataclasses.dataclass(frozen=True)
class MicroBatchSettings:
  """The original's batching as gin sets it: `train/input_pipeline.DatasetConfig.micro_batches`
  (`specialize train`), or `register_distillation_tasks(batching=...)` (T5X).

  Attributes:
    micro_batch_sizes: rows per micro-batch of each format (`{'icl_cot': 2, ...}`).
    accumulation: the original's `grad_accum_steps`: micro-batches per optimizer step.
    device_micro_batches: the trainer's micro-batches per step (NUM_MICROBATCHES), for the layout.
    rows_per_step: rows of every step's batch (BATCH_SIZE); None: the batch size the trainer uses.
    within_format_order, repeat_order: see `MicroBatchPlan`.
  """
  micro_batch_sizes: Mapping[str, int]
  accumulation: int
  device_micro_batches: int = 1
  rows_per_step: Optional[int] = None
  within_format_order: str = "file"
  repeat_order: bool = False

  def plan(self, counts: Mapping[str, int], seed: int) -> MicroBatchPlan:
    return MicroBatchPlan(dict(counts), dict(self.micro_batch_sizes), int(self.accumulation),
                          seed, self.within_format_order, self.repeat_order)


def growth_advice(needed_rows: int, rows_per_step: int, device_micro_batches: int) -> str:
  """How to give every step `needed_rows` rows keeping the rows per device micro-batch (memory)."""
  per_device = rows_per_step // device_micro_batches
  k = -(-needed_rows // per_device)
  return (f"set --gin.NUM_MICROBATCHES={k} --gin.BATCH_SIZE={k * per_device} (the same "
          f"{per_device} rows per device micro-batch; `specialize plan` prints what the run's steps "
          "need).")


@dataclasses.dataclass(frozen=True)
class StepRows:
  """One step laid into its batch: per row the format index, the example in that format and the
  loss scale (0 on padding rows)."""
  format_index: np.ndarray  # int64 [rows_per_step]
  example: np.ndarray  # int64 [rows_per_step]
  loss_scale: np.ndarray  # float32 [rows_per_step]


class StepLayout:
  """A plan's steps laid into batches of `rows_per_step` rows (see the module docstring).

  `target_tokens[f]`: per example of format f, the target tokens its loss counts (with the EOS).
  """

  def __init__(self, plan: MicroBatchPlan, rows_per_step: int, device_micro_batches: int,
               target_tokens: Sequence[np.ndarray]):
    if device_micro_batches < 1 or rows_per_step % device_micro_batches:
      raise ConfigError(f"BATCH_SIZE={rows_per_step} does not split into NUM_MICROBATCHES="
                        f"{device_micro_batches} device micro-batches; make it a multiple.")
    self.plan = plan
    self.rows_per_step = rows_per_step
    self.device_micro_batches = device_micro_batches
    self._tokens = [np.asarray(t, np.int64) for t in target_tokens]
    self._sequence = functools.lru_cache(maxsize=2)(plan.sequence)
    self.step = functools.lru_cache(maxsize=8)(self._step)

  def _step(self, step: int) -> StepRows:
    epoch = step // self.plan.steps_per_epoch
    micro_batches = self.plan.step(step, self._sequence(epoch))
    format_index, example, scale = [], [], []
    for micro_batch in micro_batches:
      f = self.plan.formats.index(micro_batch.format_name)
      tokens = int(np.sum(self._tokens[f][micro_batch.examples]))
      format_index.append(np.full(len(micro_batch.examples), f, np.int64))
      example.append(micro_batch.examples)
      scale.append(np.full(len(micro_batch.examples),
                           1.0 / (self.plan.accumulation * tokens), np.float32))
    format_index, example, scale = (np.concatenate(x) for x in (format_index, example, scale))
    real, rows = len(example), self.rows_per_step
    if real > rows:
      raise ConfigError(
          f"Optimizer step {step} holds {real} rows of the original's micro-batches but a step "
          f"has {rows}; {growth_advice(real, rows, self.device_micro_batches)}")
    # Real row j goes to device micro-batch j // R, its row j % R: position (j % R) * k + j // R.
    k = self.device_micro_batches
    per_device = rows // k
    j = np.arange(real)
    positions = (j % per_device) * k + j // per_device
    out = StepRows(np.full(rows, format_index[0]), np.full(rows, example[0]),
                   np.zeros(rows, np.float32))
    out.format_index[positions], out.example[positions] = format_index, example
    out.loss_scale[positions] = scale
    return out

  def lookup(self, position: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(format index, example, loss scale)` of global stream positions."""
    step, slot = np.divmod(np.asarray(position, np.int64), self.rows_per_step)
    format_index, example = np.empty_like(step), np.empty_like(step)
    scale = np.empty(step.shape, np.float32)
    for s in np.unique(step):
      here = step == s
      rows = self.step(int(s))
      format_index[here] = rows.format_index[slot[here]]
      example[here] = rows.example[slot[here]]
      scale[here] = rows.loss_scale[slot[here]]
    return format_index, example, scale


def micro_batch_share(plan: MicroBatchPlan) -> Dict[str, float]:
  """Each format's share of an epoch's micro-batches: the mixture the original trains on."""
  total = sum(plan.micro_batches_per_epoch.values())
  return {f: n / total for f, n in plan.micro_batches_per_epoch.items()}
