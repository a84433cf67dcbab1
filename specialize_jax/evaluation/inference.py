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

The evaluator (`evaluator.py`) builds on these helpers and adds metrics.
"""
import difflib
import json
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import seqio

from specialize_jax.config_errors import ConfigError
from specialize_jax.data import storage
from specialize_jax.data import vocabulary as vocabulary_lib
from specialize_jax.model import checkpoints
from specialize_jax.model import models

EVAL_SPLIT = 'test'  # Our eval tasks expose their examples as a single split, 'test'.
DATA_AXIS = 'data'
_MAX_CLOSE_NAMES = 5


class InputsError(ValueError):
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


def place_params(params: Any, mesh: Optional[Mesh] = None) -> Any:
  """Params on device once (not per batch): host arrays go to the default device, or replicated
  over `mesh`; arrays already on devices (e.g. the trainer's sharded params) stay as they are."""
  target = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

  def place(x):
    if isinstance(x, jax.Array):
      return x
    return jax.device_put(x, target) if target is not None else jax.device_put(x)
  return jax.tree.map(place, params)


def check_batch_size(batch_size: int, mesh: Optional[Mesh], setting: str) -> None:
  """Raises unless `batch_size` is positive and splits evenly over the mesh's data axis."""
  if batch_size < 1:
    raise ValueError(f'{setting}={batch_size} must be >= 1.')
  if mesh is not None and DATA_AXIS in mesh.axis_names:
    data_size = mesh.shape[DATA_AXIS]
    if batch_size % data_size:
      raise ValueError(f'{setting}={batch_size} is not divisible by the data axis ({data_size} '
                       f'devices); set it to a multiple of {data_size}.')


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


def predict_tokens(model: models.EncoderDecoderModel, params: Any,
                   features: Mapping[str, np.ndarray], batch_size: int, max_decode_length: int,
                   *, mesh: Optional[Mesh] = None, rng: Optional[jax.Array] = None,
                   **decode_options) -> List[np.ndarray]:
  """Decoded ids, one `[max_decode_length]` array per example (EOS then zeros).

  `features` holds at least `encoder_input_tokens` `[num_examples, input_length]`; the whole batch
  goes to `model.predict_batch`. Every batch is dispatched before any result is fetched, so host
  transfers overlap the decoding. With `mesh`, batches are split over its data axis (the caller
  checks divisibility with `check_batch_size`). Batch `i` samples with `fold_in(rng, i)`.
  """
  sharding = None
  if mesh is not None:
    spec = PartitionSpec(DATA_AXIS) if DATA_AXIS in mesh.axis_names else PartitionSpec()
    sharding = NamedSharding(mesh, spec)
  pending = []
  for batch_index, (batch, num_real) in enumerate(fixed_size_batches(features, batch_size)):
    if sharding is not None:
      batch = jax.device_put(batch, sharding)
    batch_rng = None if rng is None else jax.random.fold_in(rng, batch_index)
    tokens = model.predict_batch(params, batch, batch_rng, max_decode_length=max_decode_length,
                                 **decode_options)  # [batch_size, max_decode_length]
    pending.append((tokens, num_real))
  rows: List[np.ndarray] = []
  for tokens, num_real in pending:
    rows.extend(np.asarray(jax.device_get(tokens))[:num_real])
  return rows


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
    mesh: split batches over its 'data' axis.
    rng: key for decode_method='sample' (default `jax.random.key(0)`).
    decode_options: passed to `model.predict_batch` (decode_method, num_decodes, temperature, ...).
  """
  check_batch_size(batch_size, mesh, 'batch_size')
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
  params = place_params(params, mesh)
  outputs = predict_tokens(model, params, {'encoder_input_tokens': encoder_input_tokens},
                           batch_size, max_decode_length, mesh=mesh, rng=rng, **decode_options)
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
                          model_config: Any = None, **infer_options) -> int:
  """`infer` with the params (and architecture) of a checkpoint in any format `load_checkpoint`
  reads. The vocabulary: `vocabulary_path` (a SentencePiece model), else the task's, else the
  project's T5 vocabulary."""
  config, params = checkpoints.load_checkpoint(checkpoint_path, config=model_config)
  model = models.EncoderDecoderModel(config)
  vocabulary = None
  if vocabulary_path:
    vocabulary = seqio.SentencePieceVocabulary(vocabulary_path, extra_ids=100)
  elif not (isinstance(inputs, str) and inputs in seqio.TaskRegistry.names()):
    vocabulary = vocabulary_lib.get_vocabulary()
  return infer(model, params, vocabulary, inputs, output_path, **infer_options)
