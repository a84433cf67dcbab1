"""A prepared training set on disk, and the SeqIO source that reads it in a seeded global order.

`specialize prepare` (module `prepare`) writes it once; the distillation and demo training tasks
read it. Everything per example is decided when it is written (format, seeded exemplars, held-out
exclusion, input budget, tokenization, teacher rows aligned to the student's pieces), so a training
start only opens files.

Layout of a prepared directory (local or `gs://`):

  metadata.json                    schema `specialize_jax.prepared/1`, written last (its presence
                                   means the set is complete): formats, counts, files, mixture
                                   rates, vocabulary hash, settings, what was held out
                                   (`held_out`: its name) and how many records that excluded
  {format}-{i:05d}-of-{n:05d}.array_record   the examples of one format, chunk i of n (by question)
  {format}.questions.npy           int32 [num_examples]: the question (teacher-file position) of
                                   every example of that format, in file order
  {format}.target_tokens.npy       int32 [num_examples]: each example's target tokens (no EOS), for
                                   the original's per-micro-batch loss (`micro_batches`)

Records are serialized `tf.train.Example`s (SeqIO's convention): `inputs`, `targets` (token ids,
no EOS), `id`, `answer`, `format`, `sample_index` (-1 for answer-only), and with teacher rows
`teacher_topk_ids` / `teacher_topk_logprobs` (`[len(targets), k]` flattened; empty where the
target has no teacher distribution: answer-only targets, samples the alignment skipped).

Why ArrayRecord: random access by record index (what grain and MaxText read, what TFDS writes), so
the order is a function of the seed and the position alone: no shuffle buffer, every process reads
only its own rows, and a resumed run starts at its position without reading what came before.

Where: a local directory or `gs://` (what `array_record` opens: from 0.8, through Google Cloud's C++
storage client, which finds credentials as every Google client does and honours
`CLOUD_STORAGE_EMULATOR_ENDPOINT`, as the tests use). A record read from a bucket is a ranged read
of that record alone. The metadata and question files go through `storage` (etils epath).

Terms:
  stream: the infinite, seeded sequence of examples a training task yields. Data shard s of S,
    feeding L rows of every batch of B = S * L, reads positions [k * B + s * L, k * B + (s + 1) * L)
    for batch k: global batch k holds positions [k * B, (k + 1) * B) in the same row order whatever
    the number of shards (the same rows on every device on 1 or 64 hosts). L defaults to 1.
  quota block: with several formats, every block of `QUOTA_BLOCK` positions holds a fixed number of
    each format (the rates, rounded by largest remainder), in a seeded order per block. A format's
    n-th draw is its n-th example in its own epoch order, so each format is read epoch by epoch.
  spread shuffle: a format's epoch order. A question with m samples gets them at m evenly spaced
    random points of the epoch (key = (random rank + U(0, 1)) / m), so the order is a uniform
    shuffle in which a question's samples never bunch: every stretch of the epoch sees questions in
    proportion to their sample counts, and a batch rarely holds one question twice.
"""
import dataclasses
import functools
import hashlib
import io
import json
import logging
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from specialize_jax.errors import ConfigError
from specialize_jax.data import feature_converters
from specialize_jax.data import storage
from specialize_jax.prepared import micro_batches

SCHEMA = "specialize_jax.prepared/1"
METADATA_FILE = "metadata.json"
QUOTA_BLOCK = 1000
READ_BATCH = 256
TRAIN_SPLIT = "train"
# A split `train@N` starts this data shard's stream at its N-th example (how a run resumes);
# `train@N:L` also gives the shard's rows per batch (see "stream").
_SPLIT = re.compile(r"^(?P<split>[A-Za-z_]+)(@(?P<start>\d+)(:(?P<rows>\d+))?)?$")


class PreparedDataError(ConfigError):
  """A prepared directory that is missing, incomplete or does not fit the task reading it (a user
  error: the command prints it as one line)."""


def shard_file(format_name: str, index: int, count: int) -> str:
  return f"{format_name}-{index:05d}-of-{count:05d}.array_record"


def questions_file(format_name: str) -> str:
  return f"{format_name}.questions.npy"


def target_tokens_file(format_name: str) -> str:
  return f"{format_name}.target_tokens.npy"


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.open_file(path, "rb") as f:
    for block in iter(functools.partial(f.read, 1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def split_with_start(split: str, start: int, rows_per_batch: int = 1) -> str:
  """The split name that starts a data shard's stream at its `start`-th example, the shard feeding
  `rows_per_batch` rows of each global batch (see "stream")."""
  if rows_per_batch == 1:
    return split if start == 0 else f"{split}@{start}"
  return f"{split}@{start}:{rows_per_batch}"


def parse_split(split: str) -> Tuple[str, int, int]:
  """`(split, start, rows_per_batch)` of a split name from `split_with_start`."""
  match = _SPLIT.match(split)
  if not match or match["rows"] == "0":
    raise ValueError(f"Split {split!r} of a prepared task must be 'train', 'train@N' (start at "
                     "this shard's N-th example) or 'train@N:L' (L rows per batch, L >= 1).")
  return match["split"], int(match["start"] or 0), int(match["rows"] or 1)


# ------------------------------------------------------------------------------------ records


def _int64(values) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(values, np.int64)))


def _bytes(text: str) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode("utf-8")]))


def serialize_example(example: Mapping, inputs: Sequence[int], targets: Sequence[int],
                      format_name: str, topk_ids: Optional[np.ndarray] = None,
                      topk_logprobs: Optional[np.ndarray] = None) -> bytes:
  """One record: a `formats.distillation_examples` example with its token ids (and teacher rows,
  `[len(targets), k]` or `[0, k]`)."""
  features = {"inputs": _int64(inputs), "targets": _int64(targets), "id": _bytes(example["id"]),
              "answer": _bytes(example["answer"]), "format": _bytes(format_name),
              "sample_index": _int64([example["sample_index"]])}
  if topk_ids is not None:
    features[feature_converters.TEACHER_TOPK_IDS] = _int64(np.ravel(topk_ids))
    features[feature_converters.TEACHER_TOPK_LOGPROBS] = tf.train.Feature(
        float_list=tf.train.FloatList(value=np.ravel(topk_logprobs).astype(np.float32)))
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _parse_batch(serialized: tf.Tensor, teacher_k: Optional[int]) -> Dict[str, tf.Tensor]:
  """A batch of records as ragged features, teacher rows already `[n, k]` per example (unbatched
  later into one example each: every per-example op saved here is one less per example)."""
  spec = {"inputs": tf.io.RaggedFeature(tf.int64), "targets": tf.io.RaggedFeature(tf.int64),
          "id": tf.io.FixedLenFeature([], tf.string),
          "answer": tf.io.FixedLenFeature([], tf.string),
          "format": tf.io.FixedLenFeature([], tf.string),
          "sample_index": tf.io.FixedLenFeature([], tf.int64)}
  if teacher_k:
    spec[feature_converters.TEACHER_TOPK_IDS] = tf.io.RaggedFeature(tf.int64)
    spec[feature_converters.TEACHER_TOPK_LOGPROBS] = tf.io.RaggedFeature(tf.float32)
  parsed = tf.io.parse_example(serialized, spec)
  out = {"inputs": tf.cast(parsed["inputs"], tf.int32),
         "targets": tf.cast(parsed["targets"], tf.int32),
         "id": parsed["id"], "answer": parsed["answer"], "format": parsed["format"],
         "sample_index": tf.cast(parsed["sample_index"], tf.int32)}
  if teacher_k:
    for name, dtype in ((feature_converters.TEACHER_TOPK_IDS, tf.int32),
                        (feature_converters.TEACHER_TOPK_LOGPROBS, tf.float32)):
      flat = parsed[name]  # [batch, (n * k)]
      out[name] = tf.RaggedTensor.from_row_lengths(
          tf.reshape(tf.cast(flat.values, dtype), [-1, teacher_k]), flat.row_lengths() // teacher_k)
  return out


def complete_teacher_rows(dataset: tf.data.Dataset,
                          output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """SeqIO preprocessor for prepared sets, after `append_eos_after_trim`: one teacher row per
  target token. Stored rows cover the untrimmed targets (or none: answer-only), so a row is kept
  where its token survived the trim; the EOS row and rows past the stored ones are one-hot (the
  stored ids were checked against the aligned file when the set was prepared)."""
  del output_features  # The EOS is always the last target token here.

  def complete(example):
    example = dict(example)
    targets = example["targets"]
    ids = example[feature_converters.TEACHER_TOPK_IDS]
    k = ids.shape[-1]
    keep = tf.minimum(tf.shape(ids)[0], tf.shape(targets)[0] - 1)
    one_hot = feature_converters.one_hot_teacher_features(targets[keep:], k)
    for name in feature_converters.TEACHER_FEATURES:
      example[name] = tf.concat([example[name][:keep], one_hot[name]], axis=0)
    return example
  return dataset.map(complete, num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class PreparedSet:
  """An opened prepared directory (its metadata; the records are read by `PreparedSource`)."""
  directory: str
  metadata: Mapping

  @classmethod
  def open(cls, directory: str, fix: Optional[str] = None) -> "PreparedSet":
    """The set at `directory`; `fix` replaces the advice given when it is missing."""
    path = f"{directory.rstrip('/')}/{METADATA_FILE}"
    if not storage.exists(path):
      state = (f"not a complete prepared set (no {METADATA_FILE})"
               if storage.exists(directory) else "missing")
      fix = fix or (f"write it with `specialize prepare --output {directory}` (rerunning resumes "
                    "an interrupted prepare) and point $SPECIALIZE_PREPARED_DATA at it")
      raise PreparedDataError(f"The prepared training set {directory} is {state}; {fix}.")
    metadata = json.loads(storage.read_text(path))
    if metadata.get("schema") != SCHEMA:
      raise PreparedDataError(f"{path} has schema {metadata.get('schema')!r}, expected {SCHEMA!r}; "
                              "prepare it again with this version (`specialize prepare`).")
    return cls(directory.rstrip("/"), metadata)

  @property
  def formats(self) -> Tuple[str, ...]:
    return tuple(self.metadata["formats"])

  def num_examples(self, format_name: str) -> int:
    return int(self.metadata["formats"][format_name]["num_examples"])

  def files(self, format_name: str) -> List[str]:
    return [f"{self.directory}/{name}" for name in self.metadata["formats"][format_name]["files"]]

  def questions(self, format_name: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(
        f"{self.directory}/{questions_file(format_name)}")))

  def target_tokens(self, format_name: str) -> np.ndarray:
    """Each example's target tokens without the EOS (written by `prepare` since the original's
    batching; an older set lacks them)."""
    path = f"{self.directory}/{target_tokens_file(format_name)}"
    if not storage.exists(path):
      raise PreparedDataError(
          f"{self.directory} has no {target_tokens_file(format_name)} (it was prepared before the "
          "original's batching, which needs every example's target length); prepare it again "
          f"with `specialize prepare --output {self.directory}` (same --teacher/--aligned).")
    return np.load(io.BytesIO(storage.read_bytes(path)))

  @property
  def teacher_k(self) -> Optional[int]:
    return self.metadata.get("teacher_k")

  def check_format(self, format_name: str) -> None:
    if format_name not in self.metadata["formats"] or not self.num_examples(format_name):
      have = [f for f in self.formats if self.num_examples(f)]
      raise PreparedDataError(f"{self.directory} has no {format_name!r} examples (it has "
                              f"{', '.join(have) or 'none'}); prepare it with that format.")


def quotas(rates: Mapping[str, float], block: int = QUOTA_BLOCK) -> Dict[str, int]:
  """Examples of each format per block of `block` positions: the rates rounded by largest
  remainder, so they sum to `block` (rates need not sum to 1)."""
  names = [f for f, r in rates.items() if r > 0]
  if not names:
    raise ConfigError(f"Mixture rates {dict(rates)} give no format a positive rate; give at "
                      "least one format a rate above 0 (--rates).")
  total = sum(rates[f] for f in names)
  exact = {f: rates[f] / total * block for f in names}
  counts = {f: int(np.floor(v)) for f, v in exact.items()}
  by_remainder = sorted(names, key=lambda f: (-(exact[f] - counts[f]), names.index(f)))
  for f in by_remainder[:block - sum(counts.values())]:
    counts[f] += 1
  return {f: c for f, c in counts.items() if c > 0}


def spread_permutation(questions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """An epoch order of examples whose questions are `questions` (see "spread shuffle")."""
  n = len(questions)
  _, group, counts = np.unique(questions, return_inverse=True, return_counts=True)
  order = np.lexsort((rng.random(n), group))  # Each question's examples in random order.
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n) - starts[group[order]]
  keys = (rank + rng.random(n)) / counts[group]
  return np.argsort(keys, kind="stable")


def global_positions(stream_index: np.ndarray, shard_index: int, num_shards: int,
                     rows_per_batch: int) -> np.ndarray:
  """Positions in the global stream of a data shard's stream indices (see "stream")."""
  batch, row = np.divmod(np.asarray(stream_index, np.int64), rows_per_batch)
  return (batch * num_shards + shard_index) * rows_per_batch + row


class ExampleOrder:
  """Maps a data shard's stream index to `(format index, example index)`: stateless but for
  caches of the current block's and epochs' permutations."""

  def __init__(self, counts: Sequence[int], questions: Sequence[np.ndarray],
               quota: Sequence[int], seed: int, shuffle: bool, shard_index: int = 0,
               num_shards: int = 1, rows_per_batch: int = 1):
    self._counts = np.asarray(counts, np.int64)
    self._questions = questions
    self._quota = np.asarray(quota, np.int64)
    self._block = int(self._quota.sum())
    self._ends = np.cumsum(self._quota)
    self._seed, self._shuffle = seed, shuffle
    self._shard_index, self._num_shards = shard_index, num_shards
    self._rows = rows_per_batch
    # Per instance: a stream reads blocks and epochs in order, so a few recent ones suffice.
    self._block_slots = functools.lru_cache(maxsize=4)(self._slots_of_block)
    self._epoch_order = functools.lru_cache(maxsize=2 * len(counts))(self._order_of_epoch)

  def _slots_of_block(self, block: int) -> np.ndarray:
    if not self._shuffle or self._block == 1:
      return np.arange(self._block)
    return np.random.default_rng([self._seed, 1, block]).permutation(self._block)

  def _order_of_epoch(self, format_index: int, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self._counts[format_index])
    rng = np.random.default_rng([self._seed, 2, format_index, epoch])
    return spread_permutation(self._questions[format_index], rng)

  def lookup(self, stream_index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return self.lookup_positions(global_positions(stream_index, self._shard_index,
                                                  self._num_shards, self._rows))

  def lookup_positions(self, position: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """`(format index, example index)` of global stream positions."""
    block, offset = np.divmod(position, self._block)
    slot = np.empty_like(position)
    for b in np.unique(block):
      here = block == b
      slot[here] = self._block_slots(int(b))[offset[here]]
    format_index = np.searchsorted(self._ends, slot, side="right")
    draw = block * self._quota[format_index] + slot - (self._ends - self._quota)[format_index]
    epoch, within = np.divmod(draw, self._counts[format_index])
    example = np.empty_like(position)
    for f, e in set(zip(format_index.tolist(), epoch.tolist())):
      here = (format_index == f) & (epoch == e)
      example[here] = self._epoch_order(f, e)[within[here]]
    return format_index, example


class PreparedSource(seqio.DataSource):
  """A SeqIO source over some formats of a prepared directory, mixed by its rates.

  Each data shard (`shard_info`, from the engine's data layout) reads only its own positions of
  the one global stream; `split='train@N:L'` starts at the shard's N-th example, L rows a batch.
  The directory is opened when a dataset is built (registering needs no data); `directory` and
  `vocabulary_path` may be callables returning them (environment variables read late). With
  `vocabulary_path`, a set tokenized with another vocabulary fails before training; with
  `held_out`, so does a set that held out other questions (`check_held_out`).

  With `batching` (`micro_batches.MicroBatchSettings`) the stream is the original's single-format
  micro-batches instead of the rates' mixture: global batch k is optimizer step k laid out by
  `micro_batches.StepLayout`, and every example carries `loss_scale` (float32), which the feature
  converter multiplies into `decoder_loss_weights`.
  """

  def __init__(self, directory, format_names: Sequence[str], teacher_k: Optional[int] = None,
               rates: Optional[Mapping[str, float]] = None, vocabulary_path=None,
               missing_fix: Optional[str] = None, held_out: Optional[str] = None,
               batching: Optional[micro_batches.MicroBatchSettings] = None):
    super().__init__(splits=(TRAIN_SPLIT,), num_input_examples=None, caching_permitted=False,
                     performs_internal_shuffling=True)
    if batching is not None and batching.rows_per_step is None:
      raise ConfigError("The original's batching needs its rows per step (BATCH_SIZE): set "
                        "MicroBatchSettings.rows_per_step.")
    self._directory = directory
    self._vocabulary_path = vocabulary_path
    self._missing_fix = missing_fix
    self._format_names = tuple(format_names)
    self._teacher_k = teacher_k
    self._rates = rates
    self._held_out = held_out
    self._batching = batching

  @property
  def batching(self) -> Optional[micro_batches.MicroBatchSettings]:
    return self._batching

  def with_batching(self, batching: micro_batches.MicroBatchSettings) -> "PreparedSource":
    """This source read in the original's batching (`batching`)."""
    return PreparedSource(self._directory, self._format_names, self._teacher_k, self._rates,
                          self._vocabulary_path, self._missing_fix, self._held_out, batching)

  @property
  def format_names(self) -> Tuple[str, ...]:
    return self._format_names

  def step_layout(self, prepared: PreparedSet, seed: int) -> micro_batches.StepLayout:
    """The original's steps over this source's formats of `prepared` (with `batching`)."""
    for name in self._format_names:
      prepared.check_format(name)
    plan = self._batching.plan({f: prepared.num_examples(f) for f in self._format_names}, seed)
    tokens = [prepared.target_tokens(f) + 1 for f in plan.formats]  # + the EOS
    return micro_batches.StepLayout(plan, self._batching.rows_per_step,
                                    self._batching.device_micro_batches, tokens)

  def max_target_tokens(self) -> int:
    """The longest target of this source's formats, in tokens with the EOS."""
    prepared = self.prepared()
    return max(int(np.max(prepared.target_tokens(f), initial=0)) + 1 for f in self._format_names)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [f for name in self._format_names for f in self.prepared().files(name)]

  def prepared(self) -> PreparedSet:
    directory = self._directory() if callable(self._directory) else self._directory
    return PreparedSet.open(directory, self._missing_fix)

  def mixture_quotas(self, prepared: PreparedSet) -> Dict[str, int]:
    if len(self._format_names) == 1:
      return {self._format_names[0]: 1}
    rates = self._rates if self._rates is not None else prepared.metadata["rates"]
    return quotas({f: rates.get(f, 0.0) for f in self._format_names})

  def get_dataset(self, split: str = TRAIN_SPLIT, shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None) -> tf.data.Dataset:
    split, start, rows_per_batch = parse_split(split)
    if split != TRAIN_SPLIT:
      raise ValueError(f"A prepared task has the split {TRAIN_SPLIT!r} only, not {split!r}.")
    prepared = self.prepared()
    if self._vocabulary_path is not None:
      check_vocabulary(prepared, self._vocabulary_path() if callable(self._vocabulary_path)
                       else self._vocabulary_path)
    if self._held_out is not None:
      check_held_out(prepared, self._held_out)
    if self._teacher_k and prepared.teacher_k != self._teacher_k:
      raise PreparedDataError(
          f"{prepared.directory} holds teacher rows of width {prepared.teacher_k}; the task wants "
          f"top-{self._teacher_k}. Prepare it with `--aligned` and `--teacher_k "
          f"{self._teacher_k}` or use the top-{prepared.teacher_k} tasks.")
    if seed is None:
      seed = int(np.random.default_rng().integers(1 << 31))
      logging.info("Prepared set %s: no seed given, shuffling with seed %d.", prepared.directory,
                   seed)
    shard_info = shard_info or seqio.ShardInfo(0, 1)
    if self._batching is not None:
      layout = self.step_layout(prepared, seed)
      names = list(layout.plan.formats)  # the layout's format indices
      if rows_per_batch > 1 and rows_per_batch * shard_info.num_shards != layout.rows_per_step:
        raise ConfigError(
            f"The batch has {rows_per_batch * shard_info.num_shards} rows but the original's "
            f"batching lays out steps of {layout.rows_per_step} (rows_per_step); set them equal "
            "(BATCH_SIZE).")
      lookup = layout.lookup
    else:
      quota = self.mixture_quotas(prepared)
      for name in quota:
        prepared.check_format(name)
      names = list(quota)
      order = ExampleOrder([prepared.num_examples(f) for f in names],
                           [prepared.questions(f) for f in names], [quota[f] for f in names],
                           seed, shuffle)
      lookup = lambda position: order.lookup_positions(position) + (None,)
    if storage.is_url(prepared.directory) and not prepared.directory.startswith("gs://"):
      raise PreparedDataError(
          f"{prepared.directory}: prepared sets are read with array_record, which opens local "
          "paths and gs:// only; copy the set to one of those and point $SPECIALIZE_PREPARED_DATA "
          "at it.")
    # Imported here: array_record is only needed once a set is read.
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    readers = [array_record_data_source.ArrayRecordDataSource(prepared.files(f)) for f in names]

    def read(stream_index):
      position = global_positions(stream_index.numpy(), shard_info.index, shard_info.num_shards,
                                  rows_per_batch)
      format_index, example, scale = lookup(position)
      records = [b""] * len(example)
      for f in np.unique(format_index):
        here = np.flatnonzero(format_index == f)
        # Each distinct record once (the original's padding rows repeat one).
        wanted, inverse = np.unique(example[here], return_inverse=True)
        got = readers[f].__getitems__(wanted.tolist())
        for i, j in zip(here, inverse):
          records[i] = got[j]
      if scale is None:
        scale = np.ones(len(example), np.float32)
      return tf.constant(records), tf.constant(scale, tf.float32)

    stored_k = prepared.teacher_k if self._teacher_k else None
    dataset = tf.data.Dataset.range(start, np.iinfo(np.int64).max).batch(READ_BATCH)
    scaled = self._batching is not None

    def read_batch(index):
      records, scale = tf.py_function(read, [index], [tf.string, tf.float32])
      return tf.ensure_shape(records, [None]), tf.ensure_shape(scale, [None])

    def parse(records, scale):
      parsed = _parse_batch(records, stored_k)
      if scaled:
        parsed[feature_converters.LOSS_SCALE] = scale
      return parsed

    dataset = dataset.map(read_batch)
    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    # `read` is a py_function, which tf.data refuses to checkpoint by default; it is a pure function
    # of the stream position, so the iterator's position is its whole state and saving it (T5X's
    # SaveCheckpointConfig.save_dataset) resumes exactly.
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return dataset.unbatch().with_options(options)


def check_targets_fit(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                      source: PreparedSource) -> tf.data.Dataset:
  """SeqIO preprocessor of a task read in the original's batching: fails when building the dataset
  if the targets length would cut a target. The original never truncated, and each micro-batch's
  loss scale counts every target token."""
  length = (sequence_length or {}).get("targets")
  if length:
    longest = source.max_target_tokens()
    if length < longest:
      raise ConfigError(
          f"TASK_FEATURE_LENGTHS['targets']={length} would cut the prepared set's longest target "
          f"({longest} tokens with the EOS); the original's batching trains on whole targets, as "
          f"the original did. Set --gin.TASK_FEATURE_LENGTHS to at least {{'targets': {longest}, "
          "...}.")
  return dataset


def register_batched_task(task_name: str, batching: micro_batches.MicroBatchSettings) -> str:
  """Registers (or replaces) `{task_name}_micro_batches`: the prepared-set task `task_name` read in
  the original's batching (`PreparedSource.with_batching`); returns its name."""
  task = seqio.get_mixture_or_task(task_name)
  source = getattr(task, "source", None)
  if not isinstance(source, PreparedSource):
    raise ConfigError(
        f"{task_name} is not a task over a prepared set, so the original's batching "
        "(DatasetConfig.micro_batches) cannot read it; train on a prepared-set task "
        "(gsm8k_distill, gsm8k_distill_top5, ...) or set MICRO_BATCHES = None.")
  if source.batching is not None:
    raise ConfigError(f"{task_name} is already registered with the original's batching; leave "
                      "DatasetConfig.micro_batches unset.")
  batched = source.with_batching(batching)
  name = f"{task_name}_micro_batches"
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add_provider(name, task.replace(
      name=name, source=batched,
      preprocessors=[functools.partial(check_targets_fit, source=batched), *task.preprocessors]))
  return name


def check_held_out(prepared: PreparedSet, expected: str) -> None:
  """Raises if the set held out other questions than `expected` (a `prepare.HeldOut` name).

  Why: held-out questions change meaning (GSM8K dev was once a seeded draw; it is now the
  original's `validation_index.npy`). A set prepared under the old definition trains on today's
  dev questions (as targets and as exemplars), which would silently inflate dev accuracy. A set
  that recorded no name and excluded nothing (a toy or demo set) held nothing out and passes; one
  that excluded questions without recording a name predates the name and is refused.
  """
  recorded = prepared.metadata.get("held_out")
  excluded = sum(prepared.metadata.get("excluded", {}).values())
  if recorded == expected or (recorded is None and not excluded):
    return
  what = (f"held out {recorded!r}" if recorded is not None else
          f"excluded {excluded} held-out questions under an earlier definition of them")
  raise PreparedDataError(
      f"The prepared set {prepared.directory} {what}, but training expects {expected!r}, so it "
      "may train on today's held-out questions; prepare it again with `specialize prepare "
      f"--output {prepared.directory}` (same --teacher/--aligned).")


def check_vocabulary(prepared: PreparedSet, vocab_path: str) -> None:
  """Raises unless the set was tokenized with the vocabulary file at `vocab_path`."""
  recorded = prepared.metadata["vocabulary"]
  if recorded["sha256"] != file_sha256(vocab_path):
    raise PreparedDataError(
        f"{prepared.directory} was tokenized with {recorded['path']} (sha256 "
        f"{recorded['sha256'][:12]}…), not this task's vocabulary {vocab_path}; prepare it again "
        f"with `specialize prepare --vocab {vocab_path}`.")
