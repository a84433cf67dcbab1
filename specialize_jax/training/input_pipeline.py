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
from specialize_jax.prepared import micro_batches as micro_batches_lib
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
  micro_batches: Optional[micro_batches_lib.MicroBatchSettings] = None


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


def _prepared_source(name: str) -> Optional[prepared_data.PreparedSource]:
  if name not in seqio.TaskRegistry.names():
    return None
  source = seqio.get_mixture_or_task(name).source
  return source if isinstance(source, prepared_data.PreparedSource) else None


def _is_prepared(config: DatasetConfig) -> bool:
  """Whether the task reads a prepared set (random access: resumable in O(1))."""
  return _prepared_source(config.mixture_or_task_name) is not None


def batching(config: DatasetConfig) -> Optional[micro_batches_lib.MicroBatchSettings]:
  """The original's batching the run reads in (`config.micro_batches`, or the task's own when it
  was registered with it, as T5X's gin files do), its rows per step the batch size; else None."""
  settings = config.micro_batches
  if settings is None:
    source = _prepared_source(config.mixture_or_task_name)
    settings = source.batching if source is not None else None
  if settings is None:
    return None
  if settings.rows_per_step not in (None, config.batch_size):
    raise ConfigError(f"MicroBatchSettings.rows_per_step={settings.rows_per_step} differs from "
                      f"BATCH_SIZE={config.batch_size}; bind it to %BATCH_SIZE.")
  if config.pack:
    raise ConfigError("The original's batching reads one example per row; set USE_PACKING=False.")
  return dataclasses.replace(settings, rows_per_step=config.batch_size)


def task_name(config: DatasetConfig) -> str:
  """The task the batches come from: `config.mixture_or_task_name`, or with `micro_batches` its
  variant in the original's batching."""
  if config.micro_batches is None:
    return config.mixture_or_task_name
  mixture_or_task(config)  # An unknown name fails here, with suggestions.
  return prepared_data.register_batched_task(config.mixture_or_task_name, batching(config))


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
  if config.micro_batches is not None:
    config = dataclasses.replace(config, mixture_or_task_name=task_name(config),
                                 micro_batches=None)
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
  if batching(config) is not None:
    dtypes["decoder_loss_weights"] = tf.float32  # Scaled by each row's loss scale.
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


def micro_batch_rows(config: DatasetConfig, num_train_steps: int,
                     num_microbatches: int) -> Optional[np.ndarray]:
  """With the original's batching: the rows each of the run's steps holds (int64
  `[num_train_steps]`), after checking that every step fits the batch and that the layout's device
  micro-batches are the trainer's (a ConfigError naming the fix otherwise); None without it."""
  settings = batching(config)
  if settings is None:
    return None
  if settings.device_micro_batches != num_microbatches:
    raise ConfigError(f"MicroBatchSettings.device_micro_batches={settings.device_micro_batches} "
                      f"differs from NUM_MICROBATCHES={num_microbatches}; bind it to "
                      "%NUM_MICROBATCHES.")
  source = _prepared_source(config.mixture_or_task_name)
  if source is None:
    raise ConfigError(f"{config.mixture_or_task_name} is not a task over a prepared set, so the "
                      "original's batching cannot read it; train on a prepared-set task "
                      "(gsm8k_distill, gsm8k_distill_top5, ...) or set MICRO_BATCHES = None.")
  prepared = source.prepared()
  formats = source.format_names
  plan = settings.plan({f: prepared.num_examples(f) for f in formats}, config.seed)
  rows = plan.rows_per_step(num_train_steps)
  if int(rows.max()) > config.batch_size:
    step = int(np.argmax(rows))
    raise ConfigError(
        f"Step {step} of the original's batching holds {int(rows.max())} rows but BATCH_SIZE="
        f"{config.batch_size}; " + micro_batches_lib.growth_advice(
            int(rows.max()), config.batch_size, num_microbatches))
  return rows
