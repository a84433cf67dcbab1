"""Training batches from a SeqIO task or mixture, deterministic and resumable.

Terms:
- global batch: `batch_size` examples per step over all processes; process p of P holds
  `L = batch_size / P` of them, which `partitioning.global_batch` places on p's devices. Two ways
  to get them (`DatasetConfig.shard_by_process`):
  * True (default, T5X's way): each process reads only its SeqIO shard
    (`ShardInfo(p, P)`) and batches `L` rows: input work is split across hosts, but what global
    batch k holds depends on P (each host draws from its own 1/P of the data).
  * False: every process reads the same global stream and keeps rows `[p*L, (p+1)*L)` of each
    global batch, so batch k holds the same examples whatever P: a run gives the same losses and
    parameters on one host or many and may resume on another number of hosts, at the price of
    every process tokenizing every example (fine at moderate batch sizes).
- position: `{'batches_consumed': N, 'seed': S, ...}`, saved with every checkpoint. The order of
  batches is a function of the seed alone, so a resumed run skips the first N batches and sees
  exactly the batches the uninterrupted run would have seen. (Skipping re-reads those N batches'
  source records, which costs seconds at our scales; a SeqIO cache would make it O(1).)
"""
import dataclasses
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import jax
import numpy as np
import seqio

from specialize_jax.data import feature_converters


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to train on (the `train/DatasetConfig` of the gin files)."""
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = "train"
  shuffle: bool = True
  seed: int = 0
  pack: bool = False
  use_cached: bool = False
  teacher_k: Optional[int] = None
  shard_by_process: bool = True


def local_batch_size(config: DatasetConfig, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ValueError(f"BATCH_SIZE={config.batch_size} is not divisible by the number of processes "
                     f"({process_count}); set --gin.BATCH_SIZE to a multiple of {process_count}.")
  return config.batch_size // process_count


def model_feature_lengths(config: DatasetConfig) -> Dict[str, int]:
  converter = feature_converters.TeacherEncDecFeatureConverter(pack=config.pack,
                                                               teacher_k=config.teacher_k)
  return dict(converter.get_model_feature_lengths(dict(config.task_feature_lengths)))


def mixture_or_task(config: DatasetConfig):
  """The registered task or mixture, or an error that suggests close names."""
  if config.mixture_or_task_name not in seqio.MixtureRegistry.names() and \
      config.mixture_or_task_name not in seqio.TaskRegistry.names():
    import difflib  # pylint: disable=g-import-not-at-top
    names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(config.mixture_or_task_name, names, n=3)
    raise ValueError(f"MIXTURE_OR_TASK_NAME={config.mixture_or_task_name!r} is not registered"
                     f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} "
                     "(`specialize tasks` lists them).")
  return seqio.get_mixture_or_task(config.mixture_or_task_name)


def _dataset(config: DatasetConfig, process_index: int, process_count: int):
  mixture_or_task(config)  # An unknown name fails here, with suggestions.
  converter = feature_converters.TeacherEncDecFeatureConverter(pack=config.pack,
                                                               teacher_k=config.teacher_k)
  local_rows = local_batch_size(config, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}) (the number "
                     "of processes).")
  if config.shard_by_process and process_count > 1:
    dataset = seqio.get_dataset(
        config.mixture_or_task_name, task_feature_lengths=dict(config.task_feature_lengths),
        dataset_split=config.split, shuffle=config.shuffle, num_epochs=None,
        feature_converter=converter,
        shard_info=seqio.ShardInfo(index=process_index, num_shards=process_count),
        seed=config.seed, use_cached=config.use_cached)
    return dataset.batch(local_rows, drop_remainder=True)
  # The same global stream on every process: see "global batch" above.
  dataset = seqio.get_dataset(
      config.mixture_or_task_name, task_feature_lengths=dict(config.task_feature_lengths),
      dataset_split=config.split, shuffle=config.shuffle, num_epochs=None,
      feature_converter=converter, seed=config.seed, use_cached=config.use_cached)
  dataset = dataset.batch(config.batch_size, drop_remainder=True)
  if process_count == 1:
    return dataset
  start = process_index * local_rows
  return dataset.map(lambda batch: {name: value[start:start + local_rows]  # [L, ...]
                                    for name, value in batch.items()})


class TrainIterator:
  """Process-local numpy batches with a saveable position."""

  def __init__(self, config: DatasetConfig, position: Optional[Mapping[str, Any]] = None,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    self.config = config
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    self._batches_consumed = 0
    dataset = _dataset(config, process_index, process_count)
    if position:
      if position.get("seed", config.seed) != config.seed:
        raise ValueError(f"The checkpoint's data position was recorded with seed "
                         f"{position['seed']}, but the run uses seed {config.seed}; resume with "
                         f"the same --gin.train/DatasetConfig.seed.")
      self._batches_consumed = int(position.get("batches_consumed", 0))
      dataset = dataset.skip(self._batches_consumed)
    self._iterator: Iterator[Dict[str, np.ndarray]] = dataset.as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._batches_consumed += 1
    return batch

  def position(self) -> Dict[str, Any]:
    return {"batches_consumed": self._batches_consumed, "seed": self.config.seed,
            "mixture_or_task_name": self.config.mixture_or_task_name}


def input_shapes(config: DatasetConfig) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """Global `(encoder, decoder)` token shapes, for initialising the model abstractly."""
  lengths = model_feature_lengths(config)
  return ((config.batch_size, lengths["encoder_input_tokens"]),
          (config.batch_size, lengths["decoder_target_tokens"]))
