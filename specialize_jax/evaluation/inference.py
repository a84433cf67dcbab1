"""Decoding inputs in fixed-shape batches and writing the predictions (`specialize infer`).

Terms:
  fixed-shape batches: every batch has `batch_size` rows and the same token lengths; the last one
    is padded with empty rows (all ids 0) whose outputs are dropped. Decoding then compiles once per
    (batch_size, input_length, max_decode_length, decode options) and the compiled program is
    reused across calls, tasks of equal lengths and checkpoints.
  predictions file: JSON lines `{"index", "input", "prediction"}`, plus `"target"` (the task's
    postprocessed gold answer) when the inputs come from a task: the file `specialize score` reads.
    Written to a temporary file beside the target, then moved into place.
  inputs file: plain text, one input a line (a trailing newline is optional); a blank line is an
    error naming file:line, since silently skipping it would shift every later index.
  decode options: keyword arguments of `EncoderDecoderModel.predict_batch` (`decode_method`,
    `num_decodes`, `temperature`, `topk`, `topp`, `alpha`); `max_decode_length` is explicit.

  sharded decoding (`Decoder`): params stay in their mesh shardings (the trainer's, or read
    straight into them by `restore_params`), each batch is split over the mesh's `data` axis (so
    the batch size must divide it), and the decoded tokens come back replicated to every process.

The evaluator (`evaluator.py`) builds on these helpers and adds metrics.
"""
import contextlib
import difflib
import json
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import Mesh, NamedSharding
import numpy as np
import seqio

from specialize_jax.runtime import xla_flags
from specialize_jax.errors import ConfigError
from specialize_jax.errors import UserError
from specialize_jax.data import storage
from specialize_jax.data import vocabulary as vocabulary_lib
from specialize_jax.evaluation import process_zero
from specialize_jax.checkpoints import directories
from specialize_jax.checkpoints import loading
from specialize_jax.model import models
from specialize_jax.training import partitioning
from specialize_jax.training import train_state

EVAL_SPLIT = 'test'  # Our eval tasks expose their examples as a single split, 'test'.
DATA_AXIS = 'data'
_MAX_CLOSE_NAMES = 5


class InputsError(UserError, ValueError):
  """Bad inference inputs; the message names file:line (or the input's index) and the fix."""


# ---------------------------------------------------------------------------------------------
# Tasks


def get_task(name: str) -> seqio.Task:
  """The registered task `name`; an unknown name raises listing the closest registered names."""
  names = seqio.TaskRegistry.names()
  if name not in names:
    close = difflib.get_close_matches(name, list(names) + list(seqio.MixtureRegistry.names()),
                                      n=_MAX_CLOSE_NAMES, cutoff=0.5)
    hint = f' Closest registered names: {close}.' if close else ''
    if name in seqio.MixtureRegistry.names():
      hint = f' {name!r} is a mixture; name one of its tasks.'
    raise ConfigError(f'Unknown task {name!r}.{hint} `specialize tasks` lists them (and the tasks '
                      'are registered by `import tasks`).')
  return seqio.get_mixture_or_task(name)


def task_examples(task: seqio.Task, split: str = EVAL_SPLIT,
                  max_examples: Optional[int] = None) -> List[Dict[str, Any]]:
  """The first `max_examples` preprocessed examples of `task` in order, as numpy dicts.

  Untrimmed (no sequence length), so a caller can refuse inputs that its lengths would cut.
  """
  if split not in task.splits:
    raise ValueError(f'Task {task.name} has no split {split!r} (it has {list(task.splits)}).')
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  examples = list(dataset.as_numpy_iterator())
  if not examples:
    raise ValueError(f'Task {task.name} split {split!r} has no examples.')
  return examples


def text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def gold_target(task: seqio.Task, example: Mapping[str, Any]) -> Any:
  """The target the task's metrics compare with (postprocessed, as SeqIO's evaluator does)."""
  return task.postprocess_fn(None, example=example, is_target=True)


# ---------------------------------------------------------------------------------------------
# Batching and decoding


def local_mesh() -> Mesh:
  """A one-device `('data', 'model')` mesh on this process's first device (decoding without a
  configured mesh)."""
  return partitioning.make_mesh(partitioning.PartitioningConfig(),
                                devices=[jax.local_devices()[0]])


def params_mesh(params: Any) -> Optional[Mesh]:
  """The mesh of the first parameter that is a `jax.Array` on a `NamedSharding`, if any."""
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding):
      return leaf.sharding.mesh
  return None


def decode_mesh(mesh: Optional[Mesh], params: Any) -> Mesh:
  """`mesh`, else the params' mesh, else this process's first device."""
  if mesh is not None:
    return mesh
  found = params_mesh(params)
  return found if found is not None else local_mesh()


def place_params(params: Any, mesh: Optional[Mesh] = None) -> Any:
  """Params on device once (not per batch): host arrays replicated over `mesh` (default: this
  process's first device), each process filling its own devices; arrays already on devices (the
  trainer's sharded params, `restore_params`'s) stay as they are."""
  target = partitioning.replicated(mesh if mesh is not None else local_mesh())

  def place(x):
    if isinstance(x, jax.Array):
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])
  return jax.tree.map(place, params)


def restore_params(checkpoint_path: str, mesh: Mesh,
                   rules: partitioning.LogicalAxisRules = partitioning.STANDARD_LOGICAL_AXIS_RULES,
                   model_config: Any = None, dtype: Optional[str] = None) -> Tuple[Any, Any]:
  """(config, params) of a checkpoint, read straight into the mesh shardings that `rules` give
  the model's logical axes (the trainer's): each process reads only its devices' slices, and no
  device or host holds a full copy of a sharded parameter. The config's compute dtype is `dtype`
  (None: `model_config`'s, else the checkpoint's stored config's, else float32); params stay
  float32."""
  config, params, _ = loading.load_checkpoint_sharded(
      checkpoint_path, lambda c: train_state.abstract_params(c, mesh, rules),
      config=model_config, dtype=dtype)
  return config, params


def check_batch_size(batch_size: int, mesh: Optional[Mesh], setting: str,
                     flag: Optional[str] = None) -> None:
  """Raises a `ConfigError` unless `batch_size` is positive and splits evenly over the mesh's
  data axis; `flag` is what the user sets (e.g. '--gin.EVAL_BATCH_SIZE')."""
  flag = flag or setting
  if batch_size < 1:
    raise ConfigError(f'{setting}={batch_size} must be >= 1; set {flag}.')
  if mesh is not None and DATA_AXIS in mesh.axis_names:
    data_size = mesh.shape[DATA_AXIS]
    if batch_size % data_size:
      raise ConfigError(f'{setting}={batch_size} is not divisible by the data axis ({data_size} '
                        f'devices); set {flag} to a multiple of {data_size}, or shrink the data '
                        'axis with a larger model axis (--gin.NUM_PARTITIONS; sweep: '
                        '--num_partitions).')


def fixed_size_batches(features: Mapping[str, np.ndarray], batch_size: int
                       ) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
  """Yields (batch, number of real rows): `[batch_size, ...]` slices of `features` (each
  `[num_examples, ...]`), the last padded with zero rows."""
  num_examples = len(next(iter(features.values())))
  for start in range(0, num_examples, batch_size):
    stop = min(start + batch_size, num_examples)
    batch = {}
    for name, value in features.items():
      rows = value[start:stop]
      if stop - start < batch_size:
        padding = np.zeros((batch_size - (stop - start),) + value.shape[1:], value.dtype)
        rows = np.concatenate([rows, padding])
      batch[name] = rows
    yield batch, stop - start


def _key_data(rng: jax.Array) -> np.ndarray:
  """The raw bits of a key (typed or a legacy uint32 key) on the host."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.asarray(rng)


class Decoder:
  """Decodes fixed-size batches on a mesh with one jitted, explicitly sharded step.

  The step takes the params in the shardings they have (the trainer's, or `restore_params`'s:
  never re-placed), the batch split over `data` (each process feeds the rows of the data
  coordinates it holds, interleaved on TPU, replicas the same rows: `partitioning.data_layout`)
  and a replicated key, and returns the tokens replicated, so every process reads the whole batch
  from its own devices (`addressable_data`) also when not all shards are addressable. One compilation per params sharding and batch shape.

  Args:
    model: the model whose `predict_batch` decodes.
    mesh: the mesh of the batches; None: the params' mesh, else this process's first device.
    max_decode_length, decode_options: as `predict_batch` takes them (static).
    setting, flag: how the batch size is named in a divisibility error.
    logical_axis_rules: the rules the params were sharded under (the trainer's): the decode is
      traced under them, so the model's activation constraints apply as in training. Under FSDP
      XLA then gathers the weights once, before the decode loop, instead of reducing activations
      across the data axis at every token (`tests/test_sharded_eval.py` counts the collectives).
      None: no constraints, XLA's propagation alone.
  """

  def __init__(self, model: models.EncoderDecoderModel, mesh: Optional[Mesh],
               max_decode_length: int, *, setting: str = 'batch_size',
               flag: Optional[str] = None,
               logical_axis_rules: Optional[partitioning.LogicalAxisRules] = None,
               **decode_options):
    self.model = model
    self.mesh = mesh
    self.logical_axis_rules = logical_axis_rules
    self.max_decode_length = max_decode_length
    self.decode_options = decode_options
    self.setting, self.flag = setting, flag
    self._steps: Dict[Any, Any] = {}

  def _step(self, params: Any, mesh: Mesh):
    shardings = jax.tree.map(lambda x: x.sharding, params)
    key = (jax.tree.structure(params), tuple(jax.tree.leaves(shardings)), mesh)
    if key not in self._steps:
      model, options = self.model, dict(self.decode_options)
      max_decode_length, rules = self.max_decode_length, self.logical_axis_rules

      def step(params, batch, key_data):
        with contextlib.ExitStack() as stack:
          if rules is not None:
            stack.enter_context(partitioning.partitioning_context(mesh, rules))
          return model.predict_batch(params, batch, jax.random.wrap_key_data(key_data),
                                     max_decode_length=max_decode_length, jit=False, **options)

      replicated = partitioning.replicated(mesh)
      self._steps[key] = jax.jit(
          step, in_shardings=(shardings, partitioning.batch_sharding(mesh), replicated),
          out_shardings=replicated,
          compiler_options=xla_flags.decode_compiler_options(jax.default_backend()))
    return self._steps[key]

  def __call__(self, params: Any, features: Mapping[str, np.ndarray], batch_size: int,
               rng: Optional[jax.Array] = None) -> List[np.ndarray]:
    """Decoded ids, one `[max_decode_length]` array per example (EOS then zeros).

    `features` holds at least `encoder_input_tokens` `[num_examples, input_length]` (every
    process the same); the whole batch goes to `model.predict_batch`. The last batch is padded
    and its padded rows dropped. Every batch is dispatched before any result is fetched, so host
    transfers overlap the decoding. Batch `i` uses `fold_in(rng, i)` (default key 0).
    """
    mesh = decode_mesh(self.mesh, params)
    check_batch_size(batch_size, mesh, self.setting, self.flag)
    params = place_params(params, mesh)
    step = self._step(params, mesh)
    layout = partitioning.data_layout(mesh, batch_size)
    rows = layout.row_indices
    replicated = partitioning.replicated(mesh)
    rng = jax.random.key(0) if rng is None else rng
    pending = []
    for batch_index, (batch, num_real) in enumerate(fixed_size_batches(features, batch_size)):
      batch = partitioning.global_batch({k: v[rows] for k, v in batch.items()}, mesh, layout)
      key_data = _key_data(jax.random.fold_in(rng, batch_index))
      key_data = jax.make_array_from_callback(key_data.shape, replicated,
                                              lambda index, k=key_data: k[index])
      pending.append((step(params, batch, key_data), num_real))  # [batch, max_decode_length]
    result: List[np.ndarray] = []
    for tokens, num_real in pending:
      result.extend(np.asarray(tokens.addressable_data(0))[:num_real])
    return result


# (id(model), mesh, max_decode_length, rules, options) -> (model, its Decoder); the model is held
# so that its id names it for as long as the entry lives (`shared_decoder`).
_SHARED_DECODERS: Dict[Any, Tuple[models.EncoderDecoderModel, Decoder]] = {}
_MAX_SHARED_DECODERS = 16


def _frozen(value: Any) -> Any:
  """`value` with its lists as tuples (gin gives rules as lists), so that it can be a key."""
  return tuple(map(_frozen, value)) if isinstance(value, (list, tuple)) else value


def shared_decoder(model: models.EncoderDecoderModel, mesh: Optional[Mesh],
                   max_decode_length: int, *, setting: str = 'batch_size',
                   flag: Optional[str] = None,
                   logical_axis_rules: Optional[partitioning.LogicalAxisRules] = None,
                   **decode_options) -> Decoder:
  """One `Decoder` per model object and decoding settings in this process, so that evaluators
  built again for the same model (one per sweep or checkpoint call: `checkpoint_model` hands
  them the same model) compile each decode shape once."""
  key = (id(model), mesh, max_decode_length, setting, flag, _frozen(logical_axis_rules),
         _frozen(sorted(decode_options.items())))
  if key not in _SHARED_DECODERS:
    while len(_SHARED_DECODERS) >= _MAX_SHARED_DECODERS:
      del _SHARED_DECODERS[next(iter(_SHARED_DECODERS))]
    _SHARED_DECODERS[key] = (model, Decoder(
        model, mesh, max_decode_length, setting=setting, flag=flag,
        logical_axis_rules=logical_axis_rules, **decode_options))
  return _SHARED_DECODERS[key][1]


_CHECKPOINT_MODELS: Dict[Any, models.EncoderDecoderModel] = {}


def checkpoint_model(config: Any) -> models.EncoderDecoderModel:
  """The model that decodes checkpoints of architecture `config` (a `T5Config`), one per
  architecture in this process, so their decoding compiles once (`shared_decoder`)."""
  if config not in _CHECKPOINT_MODELS:
    _CHECKPOINT_MODELS[config] = models.EncoderDecoderModel(config)
  return _CHECKPOINT_MODELS[config]


def predict_tokens(model: models.EncoderDecoderModel, params: Any,
                   features: Mapping[str, np.ndarray], batch_size: int, max_decode_length: int,
                   *, mesh: Optional[Mesh] = None, rng: Optional[jax.Array] = None,
                   **decode_options) -> List[np.ndarray]:
  """One-off `Decoder(model, mesh, max_decode_length, **decode_options)(params, features,
  batch_size, rng)` (a `Decoder` kept across calls compiles once)."""
  return Decoder(model, mesh, max_decode_length, **decode_options)(params, features, batch_size,
                                                                   rng)


def decode_ids(vocabulary: seqio.Vocabulary, ids: Sequence[int]) -> str:
  """Text of the ids before the first EOS (the padding after it is not text)."""
  ids = [int(i) for i in ids]
  eos_id = vocabulary.eos_id
  if eos_id is not None and eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return vocabulary.decode(ids)


# ---------------------------------------------------------------------------------------------
# Files


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> int:
  """Writes `rows` as JSON lines atomically (`storage.atomic_write`: local or gs://)."""
  count = 0
  with storage.atomic_write(path) as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False, default=str) + '\n')
      count += 1
  return count


def write_json(path: str, value: Any) -> None:
  """Writes one JSON document atomically."""
  with storage.atomic_write(path) as f:
    json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    f.write('\n')


def read_inputs_file(path: os.PathLike) -> List[str]:
  """One input per line; a blank line raises `InputsError` naming path:line."""
  path = os.fspath(path)
  inputs = []
  with storage.open_file(path) as f:
    for line_number, line in enumerate(f, start=1):
      line = line.rstrip('\r\n')
      if not line.strip():
        raise InputsError(f'{path}:{line_number}: blank line; every line must hold one input. '
                          'Remove the line (the output index of an input is its line number - 1).')
      inputs.append(line)
  if not inputs:
    raise InputsError(f'{path}: no inputs; write one input per line.')
  return inputs


def _pad_rows(token_rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  array = np.zeros((len(token_rows), length), np.int32)  # [num_examples, length]
  for i, row in enumerate(token_rows):
    array[i, :len(row)] = row
  return array


def _input_tokens(token_rows: Sequence[Sequence[int]], max_input_length: Optional[int],
                  where: Sequence[str]) -> np.ndarray:
  """`[num_examples, length]` ids; `length` is `max_input_length` or the longest input."""
  longest = max(len(row) for row in token_rows)
  if max_input_length is None:
    return _pad_rows(token_rows, longest)
  for row, place in zip(token_rows, where, strict=True):
    if len(row) > max_input_length:
      raise InputsError(f'{place}: {len(row)} tokens (with EOS) exceed max_input_length='
                        f'{max_input_length}; raise max_input_length or shorten the input.')
  return _pad_rows(token_rows, max_input_length)


# ---------------------------------------------------------------------------------------------
# Entry points


def _resolve_inputs(inputs: Union[str, os.PathLike, Iterable[str]]):
  """('task', task) | ('file', (path, texts)) | ('texts', texts)."""
  if isinstance(inputs, str) and inputs in seqio.TaskRegistry.names():
    return 'task', seqio.get_mixture_or_task(inputs)
  if isinstance(inputs, (str, os.PathLike)):
    path = os.fspath(inputs)
    if not storage.isfile(path):
      close = difflib.get_close_matches(path, seqio.TaskRegistry.names(), n=_MAX_CLOSE_NAMES,
                                        cutoff=0.5)
      raise InputsError(f'Inputs {path!r} are neither a registered task (closest: {close}) nor an '
                        'existing file; pass a task name or a text file with one input a line.')
    return 'file', (path, read_inputs_file(path))
  texts = [str(t) for t in inputs]
  if not texts:
    raise InputsError('No inputs given.')
  for i, t in enumerate(texts):
    if not t.strip():
      raise InputsError(f'Input {i} is blank; drop it or give it text.')
  return 'texts', texts


def infer(model: models.EncoderDecoderModel, params: Any, vocabulary: Optional[seqio.Vocabulary],
          inputs: Union[str, os.PathLike, Iterable[str]], output_path: str, *,
          batch_size: int = 32, max_decode_length: int = 256,
          max_input_length: Optional[int] = None, max_examples: Optional[int] = None,
          mesh: Optional[Mesh] = None, rng: Optional[jax.Array] = None,
          logical_axis_rules: Optional[partitioning.LogicalAxisRules] = None,
          **decode_options) -> int:
  """Decodes `inputs` and writes the predictions file; returns the number of predictions.

  Args:
    model, params: the model and its params (host or device arrays).
    vocabulary: encodes plain inputs and decodes outputs; None for a task means the task's
      targets vocabulary.
    inputs: a registered task name (its 'test' split; rows get `"target"`), a path to a text
      file (one input a line), or an iterable of input strings.
    output_path: the JSONL file to write.
    batch_size, max_decode_length: the fixed decode shape.
    max_input_length: pad inputs to this many tokens (error naming the input if one is longer);
      None pads to the longest input.
    max_examples: for a task, decode only its first examples.
    mesh: split batches over its 'data' axis (default: the params' mesh, else one device).
    rng: key for decode_method='sample' (default `jax.random.key(0)`).
    decode_options: passed to `model.predict_batch` (decode_method, num_decodes, temperature, ...).
  """
  check_batch_size(batch_size, mesh, 'INFER_BATCH_SIZE', '--gin.INFER_BATCH_SIZE')
  kind, source = _resolve_inputs(inputs)
  targets = None
  if kind == 'task':
    task = source
    vocabulary = vocabulary or task.output_features['targets'].vocabulary
    examples = task_examples(task, EVAL_SPLIT, max_examples)
    input_texts = [text(e['inputs_pretokenized']) for e in examples]
    token_rows = [list(e['inputs']) for e in examples]
    where = [f'task {task.name} example {i}' for i in range(len(examples))]
    targets = [gold_target(task, e) for e in examples]
  else:
    if vocabulary is None:
      raise ValueError('Plain-text inputs need a vocabulary; pass vocabulary= (e.g. '
                       'specialize_jax.data.vocabulary.get_vocabulary()).')
    if kind == 'file':
      path, input_texts = source
      where = [f'{path}:{i + 1}' for i in range(len(input_texts))]
    else:
      input_texts = source
      where = [f'input {i}' for i in range(len(input_texts))]
    if max_examples is not None:
      input_texts, where = input_texts[:max_examples], where[:max_examples]
    eos = [] if vocabulary.eos_id is None else [vocabulary.eos_id]
    token_rows = [list(vocabulary.encode(t)) + eos for t in input_texts]
  encoder_input_tokens = _input_tokens(token_rows, max_input_length, where)
  if decode_options.get('decode_method') == 'sample' and rng is None:
    rng = jax.random.key(0)
  decoder = Decoder(model, mesh, max_decode_length, setting='INFER_BATCH_SIZE',
                    flag='--gin.INFER_BATCH_SIZE', logical_axis_rules=logical_axis_rules,
                    **decode_options)
  outputs = decoder(params, {'encoder_input_tokens': encoder_input_tokens}, batch_size, rng)
  rows = []
  for index, (input_text, ids) in enumerate(zip(input_texts, outputs, strict=True)):
    row = {'index': index, 'input': input_text, 'prediction': decode_ids(vocabulary, ids)}
    if targets is not None:
      row['target'] = targets[index]
    rows.append(row)
  count = write_jsonl(output_path, rows) if jax.process_index() == 0 else len(rows)
  logging.info('Wrote %d predictions to %s.', count, output_path)
  return count


def infer_from_checkpoint(checkpoint_path: str, inputs: Union[str, os.PathLike, Iterable[str]],
                          output_path: str, *, vocabulary_path: Optional[str] = None,
                          model_config: Any = None, mesh: Optional[Mesh] = None,
                          logical_axis_rules: partitioning.LogicalAxisRules = (
                              partitioning.STANDARD_LOGICAL_AXIS_RULES),
                          dtype: Optional[str] = None, **infer_options) -> int:
  """`infer` with the params (and architecture) of a checkpoint in any format `load_checkpoint`
  reads, read straight into their shardings on `mesh` (default: this process's first device)
  under `logical_axis_rules` (`restore_params`), decoding in `dtype` (as `restore_params`). The
  vocabulary: `vocabulary_path` (a SentencePiece model), else the task's, else the project's T5
  vocabulary. A run directory is its latest committed step as process 0 resolves it: every process
  reads that one."""
  mesh = mesh if mesh is not None else local_mesh()
  resolved = process_zero.decided_by_process_zero(
      lambda: str(directories.resolve_checkpoint(checkpoint_path)[1]), 'the checkpoint to read')
  config, params = restore_params(resolved, mesh, logical_axis_rules, model_config, dtype)
  logging.info('Decoding %s in %s.', resolved, config.dtype)
  model = models.EncoderDecoderModel(config)
  vocabulary = None
  if vocabulary_path:
    vocabulary = seqio.SentencePieceVocabulary(vocabulary_path, extra_ids=100)
  elif not (isinstance(inputs, str) and inputs in seqio.TaskRegistry.names()):
    vocabulary = vocabulary_lib.get_vocabulary()
  return infer(model, params, vocabulary, inputs, output_path, mesh=mesh,
               logical_axis_rules=logical_axis_rules, **infer_options)
