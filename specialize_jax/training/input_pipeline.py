"""Training batches from a SeqIO task or mixture, deterministic and resumable.

Terms:
- global batch: `batch_size` examples per step over all processes. The engine's data layout
  (`partitioning.data_layout`) says which rows a process feeds: one block of the global batch on
  CPU and GPU hosts, several interleaved blocks on a TPU host (`DataLayout.shards`); replicas
  feed identical rows and `partitioning.global_batch` places them. A data shard is one such block
  of `L = batch_size / num_shards` rows; a process reads each of its shards and concatenates
  them in order. Two ways to get a shard's rows (`DatasetConfig.shard_by_process`):
  * True (default, T5X's way): each data shard reads only its SeqIO shard
    (`ShardInfo(shard, num_shards)`) and batches `L` rows. For prepared sets
    (`teacher.prepared_data`), shard s reads rows [s*L, (s+1)*L) of every global batch of one
    seeded global order, so global batch k holds the same rows in the same order whatever the
    number of shards; other tasks split their source per shard, so what batch k holds depends on
    the shard count.
  * False: every process reads the same global stream and keeps its shard's rows
    `[s*L, (s+1)*L)` of each global batch (the same batches for any layout, at the price of every
    process reading and tokenizing every example).
- position: `{'batches_consumed': N, 'seed': S, ...}`, saved with every checkpoint. The order of
  batches is a function of the seed alone, so a resumed run sees exactly the batches the
  uninterrupted run would have seen. A prepared set, unpacked, resumes in O(1): the shard's stream
  starts at its example `N * L` (split `train@{N*L}:{L}`). Otherwise (packing, other tasks) the
  first N batches are read again and skipped.
"""
import dataclasses
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
import seqio
import tensorflow as tf

from specialize_jax.errors import ConfigError
from specialize_jax.data import feature_converters
from specialize_jax.prepared import prepared_data


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


def local_batch_size(config: DatasetConfig, num_shards: int) -> int:
  if config.batch_size % num_shards:
    raise ConfigError(f"BATCH_SIZE={config.batch_size} is not divisible by the number of data "
                      f"shards ({num_shards}); set --gin.BATCH_SIZE to a multiple of {num_shards}.")
  return config.batch_size // num_shards


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
    raise ConfigError(f"MIXTURE_OR_TASK_NAME={config.mixture_or_task_name!r} is not registered"
                      f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} "
                      "(`specialize tasks` lists them).")
  return seqio.get_mixture_or_task(config.mixture_or_task_name)


def _is_prepared(config: DatasetConfig) -> bool:
  """Whether the task reads a prepared set (random access: resumable in O(1))."""
  if config.mixture_or_task_name not in seqio.TaskRegistry.names():
    return False
  source = seqio.get_mixture_or_task(config.mixture_or_task_name).source
  return isinstance(source, prepared_data.PreparedSource)


def _shard_dataset(config: DatasetConfig, shard: seqio.ShardInfo, start_example: int = 0):
  """Batches of the `B / shard.num_shards` rows of block `shard.index` of every global batch."""
  converter = feature_converters.TeacherEncDecFeatureConverter(pack=config.pack,
                                                               teacher_k=config.teacher_k)
  local_rows = local_batch_size(config, shard.num_shards)
  if not 0 <= shard.index < shard.num_shards:
    raise ValueError(f"shard index {shard.index} must be in [0, {shard.num_shards}) (the number "
                     "of data shards).")
  prepared = _is_prepared(config)
  if start_example and not prepared:
    raise ValueError(f"{config.mixture_or_task_name} is not a prepared set: it cannot start at an "
                     "example (resume skips batches instead).")
  if config.shard_by_process and shard.num_shards > 1:
    # A prepared set gives each shard its block of rows of every global batch (`stream`).
    split = (prepared_data.split_with_start(config.split, start_example, local_rows) if prepared
             else config.split)
    dataset = seqio.get_dataset(
        config.mixture_or_task_name, task_feature_lengths=dict(config.task_feature_lengths),
        dataset_split=split, shuffle=config.shuffle, num_epochs=None,
        feature_converter=converter, shard_info=shard, seed=config.seed,
        use_cached=config.use_cached)
    return dataset.batch(local_rows, drop_remainder=True)
  # The same global stream on every process: see "global batch" above.
  split = prepared_data.split_with_start(config.split, start_example) if prepared else config.split
  dataset = seqio.get_dataset(
      config.mixture_or_task_name, task_feature_lengths=dict(config.task_feature_lengths),
      dataset_split=split, shuffle=config.shuffle, num_epochs=None,
      feature_converter=converter, seed=config.seed, use_cached=config.use_cached)
  dataset = dataset.batch(config.batch_size, drop_remainder=True)
  if shard.num_shards == 1:
    return dataset
  start = shard.index * local_rows
  return dataset.map(lambda batch: {name: value[start:start + local_rows]  # [L, ...]
                                    for name, value in batch.items()})


def _dataset(config: DatasetConfig, shards: Sequence[seqio.ShardInfo], batches_consumed: int):
  """This process's batches: each shard's rows, concatenated in shard order, from batch
  `batches_consumed` on (a prepared set, unpacked, starts there in O(1); others skip)."""
  mixture_or_task(config)  # An unknown name fails here, with suggestions.
  if not config.shard_by_process and len(shards) > 1:
    # One read of the global stream, cut into this process's blocks.
    whole = _dataset(config, [seqio.ShardInfo(0, 1)], batches_consumed)
    blocks = [(s.index * local_batch_size(config, s.num_shards),
               (s.index + 1) * local_batch_size(config, s.num_shards)) for s in shards]
    return whole.map(lambda batch: {name: tf.concat([value[a:b] for a, b in blocks], axis=0)
                                    for name, value in batch.items()})
  starts_at_example = batches_consumed and _is_prepared(config) and not config.pack
  datasets = []
  for shard in shards:
    if starts_at_example:
      # Every batch took exactly its rows from the stream read here: start right after them.
      reads_own_shard = config.shard_by_process and shard.num_shards > 1
      rows = local_batch_size(config, shard.num_shards) if reads_own_shard else config.batch_size
      datasets.append(_shard_dataset(config, shard, start_example=batches_consumed * rows))
    else:
      datasets.append(_shard_dataset(config, shard).skip(batches_consumed))
  if len(datasets) == 1:
    return datasets[0]
  return tf.data.Dataset.zip(tuple(datasets)).map(
      lambda *parts: {name: tf.concat([part[name] for part in parts], axis=0)
                      for name in parts[0]})


class TrainIterator:
  """This process's numpy batches with a saveable position.

  `shards` are the blocks of the global batch this process feeds, `(index, count)` pairs
  (`partitioning.DataLayout.shards`: one on CPU and GPU hosts, one per interleaved block on a TPU
  host); by default one block per process.
  """

  def __init__(self, config: DatasetConfig, position: Optional[Mapping[str, Any]] = None,
               shards: Optional[Sequence[Tuple[int, int]]] = None):
    self.config = config
    if shards is None:
      shards = [(jax.process_index(), jax.process_count())]
    self._batches_consumed = 0
    if position:
      if position.get("seed", config.seed) != config.seed:
        raise ConfigError(f"The checkpoint's data position was recorded with seed "
                          f"{position['seed']}, but the run uses seed {config.seed}; resume with "
                          f"the same --gin.train/DatasetConfig.seed.")
      self._batches_consumed = int(position.get("batches_consumed", 0))
    dataset = _dataset(config, [seqio.ShardInfo(index=i, num_shards=n) for i, n in shards],
                       self._batches_consumed)
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


def batch_spec(config: DatasetConfig) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
  """`{feature: (global shape, numpy dtype)}` of the batches `TrainIterator` yields, read from the
  feature converter (no data is read): `[batch, length]` token features, `[batch, targets, k]`
  teacher features."""
  converter = feature_converters.TeacherEncDecFeatureConverter(pack=config.pack,
                                                               teacher_k=config.teacher_k)
  dtypes = {name: spec.dtype for name, spec in converter.MODEL_FEATURES.items()}
  if config.pack:
    dtypes.update(converter.PACKING_FEATURE_DTYPES)
  ranks = {name: spec.rank for name, spec in feature_converters.TEACHER_MODEL_FEATURES.items()}
  dtypes.update({name: spec.dtype for name, spec in
                 feature_converters.TEACHER_MODEL_FEATURES.items()})
  spec = {}
  for name, length in model_feature_lengths(config).items():
    shape = (config.batch_size, length) + ((config.teacher_k,) * (ranks.get(name, 1) - 1))
    spec[name] = (shape, np.dtype(dtypes[name].as_numpy_dtype))
  return spec


def input_shapes(config: DatasetConfig) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """Global `(encoder, decoder)` token shapes, for initialising the model abstractly."""
  lengths = model_feature_lengths(config)
  return ((config.batch_size, lengths["encoder_input_tokens"]),
          (config.batch_size, lengths["decoder_target_tokens"]))
