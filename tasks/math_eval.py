"""Evaluation tasks for the math sets: `{dataset}_{split}_{format}` for every split in
`specialize_jax.data.splits` and every format in `formats.FORMATS` (e.g. `gsm8k_test_icl_cot`,
`multiarith_dev_zs_cot`, `asdiv_test_icl_ao`), plus `gsm8k_tfds_test_{format}`, the same GSM8K test
tasks read through TFDS (`gsm8k:1.0.0`, honours `--tfds_data_dir`).

Each task has one split, `test`, and the metrics of `specialize_jax.data.metrics` (default answer
normalization) plus the paper-compatible one.
"""
import functools
from typing import Sequence

import seqio
import tensorflow as tf

from specialize_jax.data import formats
from specialize_jax.data import metrics
from specialize_jax.data import readers
from specialize_jax.data import splits
from specialize_jax.data import tfds_gsm8k
from specialize_jax.errors import ConfigError
from specialize_jax.tasks import common

EVAL_SPLIT = "test"
MATH_METRICS = (metrics.math_accuracy, common.paper_variant(metrics.math_accuracy_paper))


def _math_source(dataset: str, dataset_split: str) -> seqio.DataSource:
  """Our split `dataset_split` (e.g. multiarith dev) exposed as the task's single SeqIO split."""
  def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
    examples = splits.math_split(dataset, dataset_split)
    return tf.data.Dataset.from_tensor_slices({
        "id": [e.id for e in examples],
        "question": [e.question for e in examples],
        "answer": [e.answer_text for e in examples],
    })
  return seqio.FunctionDataSource(dataset_fn, splits=(EVAL_SPLIT,))


@functools.lru_cache(maxsize=None)
def eval_template(format_name: str):
  """(prefix, suffix) around the question; prompt files are read on first use, not at import."""
  cot_prompt = answer_only_prompt = ""
  if formats.is_in_context(format_name):
    cot_prompt = readers.read_prompt("prompt_simple_4_cases")
    answer_only_prompt = formats.answer_only_prompt_from(readers.parse_prompt_exemplars(cot_prompt))
  return formats.eval_template(format_name, cot_prompt, answer_only_prompt)


def format_for_eval(dataset: tf.data.Dataset, format_name: str) -> tf.data.Dataset:
  """Adds `inputs` (the eval prompt around `question`) and `targets` (`The answer is <gold>`)."""
  prefix, suffix = eval_template(format_name)

  def fn(example):
    return {
        **example,
        "inputs": tf.strings.join([prefix, example["question"], suffix]),
        "targets": tf.strings.join([formats.answer_only_target(""), example["answer"]]),
    }
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def tfds_gsm8k_to_math_fields(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """TFDS `gsm8k` features -> the fields of our JSONL-backed sources (`id`, `question`, `answer`)."""
  def fn(example):
    return {"id": tf.constant(""), "question": tf.strings.strip(example["question"]),
            "answer": tf.strings.strip(example["short_answer"])}
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def math_eval_task_name(dataset: str, split: str, format_name: str) -> str:
  return f"{dataset}_{split}_{format_name}"


def _register(name: str, source: seqio.DataSource, format_name: str, preprocessors=()) -> None:
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          *preprocessors,
          functools.partial(format_for_eval, format_name=format_name),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=common.output_features(),
      postprocess_fn=common.gold_answer_postprocessor,
      metric_fns=list(MATH_METRICS),
  )


def register_eval_mixture(name: str, task_names: Sequence[str]) -> str:
  """Registers (or replaces) the mixture `name` of the eval tasks `task_names`; returns `name`.

  T5X evaluates one mixture or task in its training loop (`infer_eval/utils.DatasetConfig`), and a
  mixture's tasks are scored one by one, so this is how a T5X run evaluates in-distribution (GSM8K
  dev) and out-of-distribution (MultiArith dev) sets together, as `specialize train` does with its
  EVAL_TASKS. Called from gin (gin/t5x/specialize.gin), possibly more than once.
  """
  unknown = [t for t in task_names if t not in seqio.TaskRegistry.names()]
  if unknown:
    raise ConfigError(f"Unknown eval task(s) {unknown} in EVAL_TASKS (the T5X eval mixture "
                      f"{name!r}); use registered task names, e.g. gsm8k_dev_icl_cot (docs/data.md).")
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(task_names), default_rate=1.0)
  return name


def register() -> None:
  for (dataset, split) in splits.SPLITS:
    if (dataset, split) == ("gsm8k", "train"):
      continue  # Training questions are evaluated through the dev split only.
    for format_name in formats.FORMATS:
      _register(math_eval_task_name(dataset, split, format_name), _math_source(dataset, split),
                format_name)
  for format_name in formats.FORMATS:
    _register(math_eval_task_name("gsm8k_tfds", "test", format_name),
              seqio.TfdsDataSource(tfds_gsm8k.GSM8K_TFDS_NAME, splits={EVAL_SPLIT: "test"}),
              format_name, preprocessors=[tfds_gsm8k_to_math_fields])
