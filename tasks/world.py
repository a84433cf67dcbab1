"""SeqIO tasks of the demo's world (`specialize_jax.demo.world`): the paper in miniature.

Registered by `register_world_tasks` (this module's `register`) over a world directory, default
`$SPECIALIZE_DATA_DIR/world`, all but the teacher's in the student vocabulary (`student.spm`):
- `world_pretrain`: span corruption on the world's text (the raw start's pretraining);
- `world_instruct`: the generalist's instruction mixture (generic tasks and a little math, the four
  formats);
- `world_teacher_train`: the teacher's math CoT data, in the teacher's vocabulary (`teacher.spm`);
- `world_distill` (sample matching: text targets) and `world_distill_top6` (distribution matching:
  the teacher's top-6 aligned to the student's pieces), over the four formats of the prepared set
  `<world>/prepared` (written by `specialize demo` from the served teacher's samples);
  `world_distill_zs` and `world_distill_top6_zs` the zero-shot formats only;
- evaluation, split `test` of SeqIO (the world's own split is in the name):
  `world_{family}_{dev|test}_{format}` for the math families (`gsm` in distribution; `multiarith`,
  `svamp`, `asdiv` out of it), metric `math_accuracy`; `world_bbh_{task}_{dev|test}_{format}` for
  the generic suite, metric `bbh_cot_accuracy` (CoT formats) or `bbh_answer_only_accuracy`. The
  in-context math prompt is two fixed `gsm` exemplars (`world.eval_exemplars`); the generic tasks
  use `generic_tasks.exemplars`.
Registering reads no file: the files are read when a dataset is built.
"""
import json
import pathlib
from typing import Callable, Dict, List, Optional

import seqio
import tensorflow as tf

from specialize_jax.data import data_dir
from specialize_jax.data import formats
from specialize_jax.data import metrics
from specialize_jax.demo import generic_tasks
from specialize_jax.demo import world
from specialize_jax.tasks import common
from specialize_jax.tasks import distillation

WORLD_SUBDIR = "world"
PREPARED_SUBDIR = "prepared"
EVAL_SPLIT = "test"
TEACHER_K = 6
ZERO_SHOT_RATES = {"zs_cot": 0.2, "zs_ao": 0.005}


def default_world_dir() -> pathlib.Path:
  return data_dir.data_dir() / WORLD_SUBDIR


def prepared_dir(world_dir) -> str:
  return str(pathlib.Path(world_dir) / PREPARED_SUBDIR)


def math_task_name(family: str, split: str, format_name: str) -> str:
  return f"world_{family}_{split}_{format_name}"


def generic_task_name(task: str, split: str, format_name: str) -> str:
  return f"world_bbh_{task}_{split}_{format_name}"


def features(vocab_path: str) -> Dict[str, seqio.Feature]:
  vocab = seqio.SentencePieceVocabulary(vocab_path)
  return {"inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
          "targets": seqio.Feature(vocabulary=vocab, add_eos=True)}


def _missing(path: pathlib.Path) -> FileNotFoundError:
  return FileNotFoundError(f"World file {path} does not exist. Write the world first: "
                           "`specialize demo --only_data` (or world.write_world).")


def _read_jsonl(path: pathlib.Path) -> List[dict]:
  if not path.is_file():
    raise _missing(path)
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _source(columns_fn: Callable[[], Dict[str, list]]) -> seqio.DataSource:
  """One SeqIO split over in-memory string columns (checkpointable, unlike a generator)."""
  def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
    columns = columns_fn()
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, dtype=tf.string) for k, v in columns.items()})
  return seqio.FunctionDataSource(dataset_fn, splits=("train", EVAL_SPLIT))


def _text_pairs(path: pathlib.Path) -> Callable[[], Dict[str, list]]:
  def columns():
    rows = _read_jsonl(path)
    return {"inputs": [r["inputs"] for r in rows], "targets": [r["targets"] for r in rows]}
  return columns


def _math_columns(world_dir: pathlib.Path, family: str, split: str,
                  format_name: str) -> Callable[[], Dict[str, list]]:
  def columns():
    path = world.math_path(world_dir, family, split)
    if not path.is_file():
      raise _missing(path)
    exemplars = world.eval_exemplars(world_dir)
    examples = world.read_math(world_dir, family, split)
    cot = formats.is_chain_of_thought(format_name)
    return {
        "id": [e.id for e in examples],
        "inputs": [formats.eval_input(e.question, format_name, world.cot_prompt(exemplars),
                                      world.answer_only_prompt(exemplars)) for e in examples],
        "targets": [e.rationale if cot else formats.answer_only_target(e.answer_text)
                    for e in examples],
        "answer": [e.answer_text for e in examples]}
  return columns


def _generic_columns(world_dir: pathlib.Path, task: str, split: str,
                     format_name: str) -> Callable[[], Dict[str, list]]:
  def columns():
    rows = _read_jsonl(world.generic_path(world_dir, task, split))
    examples = [generic_tasks.GenericExample(**row) for row in rows]
    shots = "few" if formats.is_in_context(format_name) else "zero"
    cot = formats.is_chain_of_thought(format_name)
    return {"inputs": [generic_tasks.build_input(e, task, shots, cot) for e in examples],
            "targets": [generic_tasks.target(e, cot) for e in examples],
            "answer": [e.answer for e in examples]}
  return columns


def _add(name: str, **kwargs) -> None:
  """Registers `name`, replacing an earlier registration (re-registering picks up a new dir)."""
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, **kwargs)


def register_world_tasks(world_dir: Optional[str] = None) -> List[str]:
  """Registers (or re-registers) the world's tasks over `world_dir`; returns their names."""
  world_dir = pathlib.Path(world_dir) if world_dir is not None else default_world_dir()
  student_vocab = str(world_dir / world.STUDENT_VOCAB_FILE)
  student = features(student_vocab)
  tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  names = []

  def add(name, **kwargs):
    _add(name, **kwargs)
    names.append(name)

  add("world_pretrain", source=_source(_text_pairs(world_dir / world.PRETRAIN_FILE)),
      preprocessors=tokenize, output_features=student)
  add("world_instruct", source=_source(_text_pairs(world_dir / world.INSTRUCT_FILE)),
      preprocessors=tokenize, output_features=student)
  add("world_teacher_train", source=_source(_text_pairs(world_dir / world.TEACHER_TRAIN_FILE)),
      preprocessors=tokenize,
      output_features=features(str(world_dir / world.TEACHER_VOCAB_FILE)))
  fix = "run `specialize demo`, which samples the teacher and prepares this set"
  prepared = prepared_dir(world_dir)
  # The original's rates (`prepare.DEFAULT_FORMAT_RATES`, recorded in the set); the zero-shot
  # tasks keep its zero-shot formats at their relative rates.
  for suffix, rates in (("", None), ("_zs", ZERO_SHOT_RATES)):
    format_names = tuple(rates) if rates else formats.FORMATS
    for teacher_k, prefix in ((None, "world_distill"), (TEACHER_K, f"world_distill_top{TEACHER_K}")):
      name = prefix + suffix
      distillation.register_prepared_task(
          name, lambda: prepared, format_names, teacher_k, rates=rates,
          output_features=common.output_features(with_teacher=bool(teacher_k),
                                                 vocab=student["inputs"].vocabulary),
          vocabulary_path=student_vocab, missing_fix=fix)
      names.append(name)
  for family in world.FAMILIES:
    for split in world.EVAL_SPLITS:
      for format_name in formats.FORMATS:
        add(math_task_name(family, split, format_name),
            source=_source(_math_columns(world_dir, family, split, format_name)),
            preprocessors=tokenize, output_features=student,
            postprocess_fn=common.gold_answer_postprocessor,
            metric_fns=[metrics.math_accuracy])
  for task in generic_tasks.TASKS:
    for split in world.EVAL_SPLITS:
      for format_name in formats.FORMATS:
        cot = formats.is_chain_of_thought(format_name)
        add(generic_task_name(task, split, format_name),
            source=_source(_generic_columns(world_dir, task, split, format_name)),
            preprocessors=tokenize, output_features=student,
            postprocess_fn=common.gold_answer_postprocessor,
            metric_fns=[metrics.bbh_cot_accuracy if cot else metrics.bbh_answer_only_accuracy])
  return names


def register() -> None:
  register_world_tasks()
