"""BIG-Bench Hard tasks: `bbh_{task}_cot` (the task's 3-shot CoT prompt) and `bbh_{task}_ao` (the same
exemplars answer-only) for the 27 tasks, and the mixtures `bbh_cot` and `bbh_ao` (equal rates).
One split, `test`. Metrics: exact match after the last "the answer is" (CoT) / of the first line (AO).

`bbh_{task}_ao_paper` (mixture `bbh_ao_paper`) is the original's answer-only input: its
`modify_prompt` of the raw prompt file (`readers.bbh_answer_only_prompt_paper`), then
`\n\nQ: {question}\nA: the answer is `. `bbh_{task}_cot_paper` (mixture `bbh_cot_paper`) is its CoT
input: the raw prompt file as it is (canary header included), then
`\n\nQ: {question}\nA: Let's think step by step.\n` (`test_bbh.py`). They are tasks of their own,
not a scoring switch, because the prompt decides what the model generates: `--metric_mode paper`
rescores saved predictions, it cannot change the inputs they were generated from. Their metrics are
the `_ao` and `_cot` tasks' (the paper's substring rule as `accuracy_paper`).
"""
import functools

import seqio
import tensorflow as tf

from specialize_jax.data import metrics
from specialize_jax.data import readers
from specialize_jax.tasks import common

EVAL_SPLIT = "test"
FORMATS = ("cot", "ao", "ao_paper", "cot_paper")
COT_ANSWER_TRIGGER = "\nA: Let's think step by step."
AO_ANSWER_TRIGGER = "\nA:"
AO_PAPER_ANSWER_TRIGGER = f"\nA: {readers.BBH_PAPER_ANSWER_TRIGGER}"
# The original's CoT trigger ends in a newline (`test_bbh.py`); ours, as BBH's own, does not.
COT_PAPER_ANSWER_TRIGGER = COT_ANSWER_TRIGGER + "\n"
_TRIGGERS = {"cot": COT_ANSWER_TRIGGER, "ao": AO_ANSWER_TRIGGER,
             "ao_paper": AO_PAPER_ANSWER_TRIGGER, "cot_paper": COT_PAPER_ANSWER_TRIGGER}


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
  if format_name == "ao_paper":
    return readers.bbh_answer_only_prompt_paper(readers.read_bbh_prompt_file(task))
  if format_name == "cot_paper":
    return readers.read_bbh_prompt_file(task)
  cot_prompt = readers.read_bbh_cot_prompt(task)
  return cot_prompt if format_name == "cot" else readers.bbh_answer_only_prompt(cot_prompt)


def format_bbh(dataset: tf.data.Dataset, task: str, format_name: str) -> tf.data.Dataset:
  prompt = bbh_prompt(task, format_name)
  trigger = _TRIGGERS[format_name]

  def fn(example):
    return {**example,
            "inputs": tf.strings.join([prompt, "\n\nQ: ", example["question"], trigger]),
            "targets": example["answer"]}
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def register() -> None:
  for format_name in FORMATS:
    if format_name in ("cot", "cot_paper"):
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
