"""SeqIO tasks of the embedded demo (`specialize demo`): generated arithmetic word problems.

Registered by `register_demo_tasks` (the `register` of this module), all with the demo vocabulary
(`<demo dir>/spm.model`, a 384-piece BPE model, see `specialize_jax.demo.synthetic`):
- training, split `train`: `demo_train_cot` (inputs `Q: {q}\\nLet's think step by step`, targets the
  gold chain of thought) and `demo_train_ao` (inputs `Q: {q} A:`, targets `The answer is N`), over
  the demo's prepared set (`<demo dir>/prepared`, written with the demo data from `train.jsonl` by
  the same `prepare` code as the distillation sets, read in the same seeded global order);
- evaluation, split `test`: `demo_{id,ood,long}_{cot,ao}` over `test_id.jsonl`, `test_ood.jsonl`,
  `test_long.jsonl`, with the inputs of the matching training format, targets as in training (so a
  teacher-forced eval loss is meaningful), `metrics.math_accuracy`, and
  `common.gold_answer_postprocessor` (metric targets are the gold answers).

Every example also carries `id`, `question`, `answer` (gold, text) and `num_steps` (int32), so
predictions can be scored by step count with `synthetic.accuracy_by_steps`.

The demo directory defaults to `$SPECIALIZE_DATA_DIR/demo` and is read only when a dataset is built
(and the vocabulary when first used), so registering needs no data; write the directory first with
`synthetic.write_demo_data`. Evaluation examples come in file order (index i is record i), and a
process keeps the vocabulary it first loaded (SeqIO caches SentencePiece models by path).
"""
import pathlib
from typing import Dict, List, Optional

import seqio
import tensorflow as tf

from specialize_jax.data import data_dir
from specialize_jax.data import formats
from specialize_jax.data import metrics
from specialize_jax.demo import synthetic
from specialize_jax.teacher import teacher_data
from specialize_jax.tasks import common
from specialize_jax.tasks import distillation

DEMO_SUBDIR = "demo"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "test"
PREFIX = "demo"
# Task name part -> training format of `formats`.
TARGET_FORMATS = {"cot": "zs_cot", "ao": "zs_ao"}
# Task name part -> demo split (file) evaluated.
EVAL_SETS = {"id": "test_id", "ood": "test_ood", "long": "test_long"}


def default_demo_dir() -> pathlib.Path:
  return data_dir.data_dir() / DEMO_SUBDIR


def train_task_name(target: str) -> str:
  return f"{PREFIX}_train_{target}"


def eval_task_name(eval_set: str, target: str) -> str:
  return f"{PREFIX}_{eval_set}_{target}"


def task_names() -> List[str]:
  """Every task `register_demo_tasks` registers."""
  return ([train_task_name(t) for t in TARGET_FORMATS] +
          [eval_task_name(s, t) for s in EVAL_SETS for t in TARGET_FORMATS])


def output_features(demo_dir: pathlib.Path) -> Dict[str, seqio.Feature]:
  vocab = seqio.SentencePieceVocabulary(str(demo_dir / synthetic.VOCAB_FILE))
  return {
      "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
  }


def _read(path: pathlib.Path) -> List[teacher_data.TeacherRecord]:
  if not path.is_file():
    raise FileNotFoundError(
        f"Demo data file {path} does not exist. Write the demo directory first: "
        f"`specialize demo --only_data`, or synthetic.write_demo_data({str(path.parent)!r}) from "
        "specialize_jax.data; or register the tasks with another `demo_dir`.")
  return list(teacher_data.read_records(path).records)


def _examples(records: List[teacher_data.TeacherRecord], format_name: str) -> Dict[str, list]:
  """Columns `id`, `question`, `inputs`, `targets`, `answer`, `num_steps`; one row per chain."""
  by_id = {r.id: r for r in records}
  columns: Dict[str, list] = {k: [] for k in ("id", "question", "inputs", "targets", "answer",
                                              "num_steps")}
  # Zero-shot formats draw no exemplars, so no sampler is needed.
  for example in formats.distillation_examples(records, format_name, sampler=None):
    record = by_id[example["id"]]
    columns["id"].append(example["id"])
    columns["question"].append(record.question)
    columns["inputs"].append(example["inputs"])
    columns["targets"].append(example["targets"])
    columns["answer"].append(example["answer"])
    columns["num_steps"].append(int(record.meta["num_steps"]))
  return columns


def demo_source(demo_dir: pathlib.Path, demo_split: str, format_name: str,
                task_split: str) -> seqio.DataSource:
  """A SeqIO source over one demo file, exposed as the single split `task_split`.

  In-memory tensor slices rather than a Python generator, so tf.data can checkpoint the iterator.
  """
  def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
    columns = _examples(_read(demo_dir / synthetic.SPLIT_FILES[demo_split]), format_name)
    # Tensors first: from_tensor_slices walks a Python list as a nested structure (seconds for the
    # 200,000 training examples), tf.constant converts it at once.
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, dtype=tf.int32 if k == "num_steps" else tf.string)
         for k, v in columns.items()})
  return seqio.FunctionDataSource(dataset_fn, splits=(task_split,))


def _add(name: str, **kwargs) -> None:
  """Registers `name`, replacing an earlier registration (re-registering picks up a new dir)."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, **kwargs)


def register_demo_tasks(demo_dir: Optional[str] = None) -> List[str]:
  """Registers (or re-registers) the demo tasks over `demo_dir`; returns their names."""
  demo_dir = pathlib.Path(demo_dir) if demo_dir is not None else default_demo_dir()
  features = output_features(demo_dir)
  preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  prepared_dir = str(demo_dir / synthetic.PREPARED_SUBDIR)
  for target, format_name in TARGET_FORMATS.items():
    distillation.register_prepared_task(
        train_task_name(target), lambda: prepared_dir, (format_name,), output_features=features,
        vocabulary_path=str(demo_dir / synthetic.VOCAB_FILE),
        missing_fix="write the demo data first: `specialize demo --only_data`")
    for eval_set, demo_split in EVAL_SETS.items():
      _add(eval_task_name(eval_set, target),
           source=demo_source(demo_dir, demo_split, format_name, EVAL_SPLIT),
           preprocessors=preprocessors, output_features=features,
           postprocess_fn=common.gold_answer_postprocessor,
           metric_fns=[metrics.math_accuracy])
  return task_names()


def register() -> None:
  register_demo_tasks()
