"""BIG-Bench Hard tasks: `bbh_{task}_cot` (the task's 3-shot CoT prompt) and `bbh_{task}_ao` (the same
exemplars answer-only) for the 27 tasks, and the mixtures `bbh_cot` and `bbh_ao` (equal rates).
One split, `test`. Metrics: exact match after the last "the answer is" (CoT) / of the first line (AO).
"""
import functools

import seqio
import tensorflow as tf

from specialize_jax.data import metrics
from specialize_jax.data import readers
from specialize_jax.tasks import common

EVAL_SPLIT = "test"
FORMATS = ("cot", "ao")
COT_ANSWER_TRIGGER = "\nA: Let's think step by step."
AO_ANSWER_TRIGGER = "\nA:"


def bbh_task_name(task: str, format_name: str) -> str:
  return f"bbh_{task}_{format_name}"


def _source(task: str) -> seqio.DataSource:
  def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
    examples = readers.read_bbh(task)
    return tf.data.Dataset.from_tensor_slices({
        "id": [e.id for e in examples], "question": [e.input for e in examples],
        "answer": [e.target for e in examples]})
  return seqio.FunctionDataSource(dataset_fn, splits=(EVAL_SPLIT,))


@functools.lru_cache(maxsize=None)
def bbh_prompt(task: str, format_name: str) -> str:
  cot_prompt = readers.read_bbh_cot_prompt(task)
  return cot_prompt if format_name == "cot" else readers.bbh_answer_only_prompt(cot_prompt)


def format_bbh(dataset: tf.data.Dataset, task: str, format_name: str) -> tf.data.Dataset:
  prompt = bbh_prompt(task, format_name)
  trigger = COT_ANSWER_TRIGGER if format_name == "cot" else AO_ANSWER_TRIGGER

  def fn(example):
    return {**example,
            "inputs": tf.strings.join([prompt, "\n\nQ: ", example["question"], trigger]),
            "targets": example["answer"]}
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def register() -> None:
  for format_name in FORMATS:
    if format_name == "cot":
      metric_fns = [metrics.bbh_cot_accuracy, common.paper_variant(metrics.bbh_cot_accuracy_paper)]
    else:
      metric_fns = [metrics.bbh_answer_only_accuracy,
                    common.paper_variant(metrics.bbh_answer_only_accuracy_paper)]
    names = []
    for task in readers.BBH_TASKS:
      name = bbh_task_name(task, format_name)
      seqio.TaskRegistry.add(
          name,
          source=_source(task),
          preprocessors=[
              functools.partial(format_bbh, task=task, format_name=format_name),
              seqio.preprocessors.tokenize,
              seqio.preprocessors.append_eos_after_trim,
          ],
          output_features=common.output_features(),
          postprocess_fn=common.gold_answer_postprocessor,
          metric_fns=metric_fns,
      )
      names.append(name)
    seqio.MixtureRegistry.add(f"bbh_{format_name}", [(n, 1.0) for n in names])
