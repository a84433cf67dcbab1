"""Checks the `specialize` command runs before a job compiles anything: every task it will read
(expanded from mixtures) is registered, its vocabularies and its data can be read. A problem is a
`FileNotFoundError` naming the path and the command that fetches it, or a `ConfigError` naming the
binding, never a TensorFlow stack from inside SeqIO minutes into a run.

Reading an eval task's data here means building its source dataset once: our sources read their
files when the dataset is built, so a missing file shows up here. A training mixture's data can be
large (the teacher's chains), so only its vocabularies are checked here; the trainer builds its
input pipeline before compiling.
"""
import difflib
import os
from typing import Iterable, List

import seqio
import tensorflow as tf

from specialize_jax.errors import ConfigError
from specialize_jax.data import data_dir
from specialize_jax.data import storage
from specialize_jax.data import vocabulary as vocabulary_lib
from specialize_jax.jobs import gin_config

_FETCH_TOKENIZER = "`specialize download --only tokenizer`"


def registered(name: str, where: str) -> seqio.Task:
  """The registered task or mixture `name`; else a `ConfigError` naming `where` and close names."""
  names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
  if name not in names:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"Unknown task or mixture {name!r} in {where}.{hint} `specialize tasks` "
                      "lists them.")
  return seqio.get_mixture_or_task(name)


def _missing_vocabulary(path: str, task_name: str, reason: str) -> FileNotFoundError:
  if path == os.environ.get(vocabulary_lib.VOCAB_PATH_ENV):
    fix = (f"point ${vocabulary_lib.VOCAB_PATH_ENV} at a SentencePiece model, or unset it to use "
           f"{data_dir.data_dir() / vocabulary_lib.LOCAL_VOCAB_FILE} (fetched by "
           f"{_FETCH_TOKENIZER})")
  elif os.path.basename(path) == vocabulary_lib.DEMO_VOCAB_FILE:
    fix = "write the demo data first: `specialize demo --only_data`"
  else:
    fix = (f"fetch the T5 vocabulary with {_FETCH_TOKENIZER}, or set "
           f"${vocabulary_lib.VOCAB_PATH_ENV} to a SentencePiece model")
  return FileNotFoundError(f"Vocabulary {path} of task {task_name} {reason}; {fix}.")


def check_vocabulary(vocabulary: seqio.Vocabulary, task_name: str) -> None:
  """Raises `FileNotFoundError` unless a SentencePiece `vocabulary`'s model file can be read."""
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return
  path = vocabulary.sentencepiece_model_file
  if "://" not in path:
    if not os.path.isfile(path):  # local: not a URL (above)
      raise _missing_vocabulary(path, task_name, "does not exist")
    return
  try:  # gs://... (the T5X public vocabulary): readable only with network and credentials.
    exists = tf.io.gfile.exists(path)
  except tf.errors.OpError as e:
    raise _missing_vocabulary(path, task_name, f"cannot be read ({e.message.splitlines()[0]})")
  if not exists:
    raise _missing_vocabulary(path, task_name, "does not exist")


def check_source(task: seqio.Task) -> None:
  """Raises `FileNotFoundError` (naming the path and the fix) unless `task`'s data can be read
  (its first split: eval tasks have one)."""
  source = task.source
  if isinstance(source, seqio.TfdsDataSource):
    # Never build it here: a TFDS source whose data is missing starts a download.
    builder = source.tfds_dataset.builder
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      raise FileNotFoundError(
          f"Task {task.name} reads the TFDS dataset {source.tfds_dataset.name}, which is not "
          f"prepared in {builder.data_dir}; build it offline with `specialize prepare_tfds "
          "--tfds_data_dir DIR` and set TFDS_DATA_DIR=DIR.")
    return
  try:
    source.get_dataset(split=next(iter(source.splits)), shuffle=False)
  except tf.errors.NotFoundError as e:  # A file TensorFlow opened itself.
    raise FileNotFoundError(f"Task {task.name}: {e.message.splitlines()[0]}; fetch the data with "
                            f"`specialize download` (data directory {data_dir.data_dir()}).") from e


def tasks_of(names: Iterable[str], where: str) -> List[seqio.Task]:
  """The registered tasks `names` denote (mixtures expanded), in order, each once."""
  tasks: List[seqio.Task] = []
  for name in names:
    task_or_mixture = registered(name, where)
    members = (task_or_mixture.tasks if isinstance(task_or_mixture, seqio.Mixture)
               else [task_or_mixture])
    for task in members:
      if all(task.name != t.name for t in tasks):
        tasks.append(task)
  return tasks


def check_tasks(names: Iterable[str], where: str, read_data: bool = True) -> None:
  """Every task `names` denote is registered, its vocabularies can be read and, with `read_data`,
  its data."""
  for task in tasks_of(names, where):
    for feature in task.output_features.values():
      check_vocabulary(feature.vocabulary, task.name)
    if read_data:
      check_source(task)


def check_job_inputs(command: str) -> None:
  """Fails before anything compiles when a task the gin-configured job `command` ("train", "eval"
  or "infer") reads is unknown or its data or vocabulary is missing: the tasks named by the
  parsed gin configuration's bindings (as the shipped gin files set them)."""
  eval_tasks = gin_config.bound_value("evaluator.EvalConfig.task_names") or ()
  eval_tasks = (eval_tasks,) if isinstance(eval_tasks, str) else tuple(eval_tasks)
  checks = []  # (task names, where they are set, whether to read their data here)
  if command == "train":  # The trainer reads its data itself before compiling.
    name = gin_config.bound_value("train/input_pipeline.DatasetConfig.mixture_or_task_name")
    checks.append(([name] if name else [], "MIXTURE_OR_TASK_NAME", False))
    if gin_config.bound_value("runs.train.eval_period"):
      checks.append((eval_tasks, "EVAL_TASKS", True))
  elif command == "eval":
    checks.append((eval_tasks, "EVAL_TASKS", True))
  elif command == "infer":
    inputs = gin_config.bound_value("runs.infer.inputs")
    vocabulary_path = gin_config.bound_value("runs.infer.vocabulary_path")
    if vocabulary_path and not storage.isfile(vocabulary_path):
      raise FileNotFoundError(f"VOCABULARY_PATH={vocabulary_path} does not exist; point "
                              "--gin.VOCABULARY_PATH at a SentencePiece model.")
    if isinstance(inputs, str) and not storage.exists(inputs):
      checks.append(([inputs], "INFER_INPUTS (a task name or a file of inputs)", True))
  for names, where, _ in checks:  # Every name first: a typo is reported before missing data.
    tasks_of(names, where)
  for names, where, read_data in checks:
    check_tasks(names, where, read_data)
