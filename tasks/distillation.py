"""Distillation (training) tasks: the four formats (docs/method.md) from a prepared training set.

Registered at import:
- `gsm8k_distill_{zs_ao,zs_cot,icl_ao,icl_cot}` (one format each) and `gsm8k_distill` (the four
  mixed at the rates recorded when the set was prepared; the original's mix by default: ≈79 %
  in-context CoT, 20 % zero-shot CoT, 1 % answer-only): text targets, for the `sample` loss.
- `gsm8k_distill_top{k}` and `gsm8k_distill_top{k}_{format}`, k in 5, 6, 20, 21: the same examples
  plus the teacher's distribution over k candidates per target token (features `teacher_topk_ids` /
  `teacher_topk_logprobs`), for the `distribution` loss; the set must have been prepared with
  `--aligned` and that `--teacher_k`. 6 is the original's: the sampled token plus the completions
  API's top-5 (the paper's Codex data), `specialize prepare`'s default; 21 the same for a chat API's
  top-20; 5 and 20 drop the sampled token where it is outside the API's list.

The prepared set (`specialize prepare`, see `specialize_jax.prepared.prepare`) is the directory
named by `$SPECIALIZE_PREPARED_DATA`, else `<data dir>/prepared/gsm8k_gold` (the GSM8K gold
rationales: `specialize prepare` with no `--teacher`). It is opened when a dataset is built, so
registering needs no data. Every example was decided when the set was written (exemplars, held-out
exclusion of GSM8K dev and test, input budget, tokens, teacher rows); a set that held out another
GSM8K dev split (an older definition) is refused with the fix, `specialize prepare` again.
Training reads each data shard's own positions of one seeded global order
(`prepared_data.PreparedSource`). Other sets or rates: call `register_distillation_tasks(prefix, prepared_dir, ...)` (gin does, for T5X).
"""
import functools
import os
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from specialize_jax.data import data_dir
from specialize_jax.data import formats
from specialize_jax.data import splits
from specialize_jax.data import vocabulary
from specialize_jax.prepared import micro_batches
from specialize_jax.prepared import prepared_data
from specialize_jax.tasks import common

PREPARED_DATA_ENV = "SPECIALIZE_PREPARED_DATA"
DEFAULT_PREPARED_SUBDIR = "prepared/gsm8k_gold"
TOPK_WIDTHS = (5, 6, 20, 21)
DEFAULT_PREFIX = "gsm8k_distill"


def default_prepared_dir() -> str:
  return str(data_dir.data_dir() / DEFAULT_PREPARED_SUBDIR)


def prepared_dir_fn(prepared_dir: Optional[str] = None):
  """The set's directory, resolved when a dataset is built: `prepared_dir`, else
  `$SPECIALIZE_PREPARED_DATA`, else the GSM8K gold set under the data directory."""
  return lambda: prepared_dir or os.environ.get(PREPARED_DATA_ENV) or default_prepared_dir()


def check_input_budget(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                       directory_fn, format_names) -> tf.data.Dataset:
  """Fails before training when the inputs length would cut the set's in-context inputs."""
  prepared = prepared_data.PreparedSet.open(directory_fn())
  if not any(formats.is_in_context(f) and f in prepared.formats and prepared.num_examples(f)
             for f in format_names):
    return dataset
  budget = prepared.metadata["settings"]["max_input_tokens"]
  if sequence_length and sequence_length.get("inputs") and sequence_length["inputs"] < budget:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS['inputs']={sequence_length['inputs']} is shorter than the prepared "
        f"set's in-context input budget of {budget} tokens, so questions would be truncated. Set "
        f"--gin.TASK_FEATURE_LENGTHS to at least {{'inputs': {budget}, ...}} or prepare the set "
        "with a smaller `--max_input_tokens`.")
  return dataset


def register_prepared_task(name: str, directory_fn, format_names, teacher_k: Optional[int] = None,
                           rates: Optional[Mapping[str, float]] = None,
                           output_features: Optional[Mapping[str, seqio.Feature]] = None,
                           vocabulary_path=vocabulary.vocabulary_path,
                           missing_fix: Optional[str] = None,
                           held_out: Optional[str] = None,
                           batching: Optional[micro_batches.MicroBatchSettings] = None) -> None:
  """Registers (or replaces) one training task over some formats of a prepared set; `missing_fix`
  is the advice when the set is missing (default: `specialize prepare`); with `held_out`, a set
  that held out other questions is refused (`prepared_data.check_held_out`); with `batching`, the
  set is read in the original's batching (`prepared_data.PreparedSource`)."""
  source = prepared_data.PreparedSource(directory_fn, format_names, teacher_k, rates,
                                        vocabulary_path=vocabulary_path, missing_fix=missing_fix,
                                        held_out=held_out, batching=batching)
  preprocessors = [seqio.preprocessors.append_eos_after_trim]
  if teacher_k:
    preprocessors.append(prepared_data.complete_teacher_rows)
  if any(formats.is_in_context(f) for f in format_names):
    preprocessors.insert(0, functools.partial(check_input_budget, directory_fn=directory_fn,
                                              format_names=tuple(format_names)))
  if batching is not None:
    preprocessors.insert(0, functools.partial(prepared_data.check_targets_fit, source=source))
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=preprocessors,
      output_features=output_features or common.output_features(with_teacher=bool(teacher_k)),
      postprocess_fn=common.gold_answer_postprocessor,
      shuffle_buffer_size=None,  # The source shuffles globally (PreparedSource).
  )


def register_distillation_tasks(prefix: str = DEFAULT_PREFIX,
                                prepared_dir: Optional[str] = None,
                                rates: Optional[Mapping[str, float]] = None,
                                teacher_k: Optional[int] = None,
                                batching: Optional[micro_batches.MicroBatchSettings] = None
                                ) -> str:
  """Registers `{prefix}_{format}` for the four formats and `{prefix}`, all four mixed (replacing an
  earlier registration of `prefix`); returns the mixed task's name.

  `rates` overrides the rates recorded in the set (e.g. `{'zs_cot': 1.0}`; with `batching` they
  only select the formats). With `teacher_k`, the tasks carry the set's top-`teacher_k` rows; train
  them with the `distribution` loss and TEACHER_K = k. With `batching`, `{prefix}` is read in the
  original's batching (how T5X's gin files ask for it; `specialize train` can also set
  `DatasetConfig.micro_batches` on any prepared task).
  """
  if rates is not None:
    unknown = set(rates) - set(formats.FORMATS)
    if unknown:
      raise ValueError(f"Unknown formats in rates: {sorted(unknown)}; expected {formats.FORMATS}.")
  directory_fn = prepared_dir_fn(prepared_dir)
  seqio.MixtureRegistry.remove(prefix)
  for format_name in formats.FORMATS:
    register_prepared_task(f"{prefix}_{format_name}", directory_fn, (format_name,), teacher_k,
                           held_out=splits.GSM8K_HELD_OUT)
  mixed = [f for f in formats.FORMATS if rates is None or rates.get(f, 0) > 0]
  register_prepared_task(prefix, directory_fn, mixed, teacher_k, rates,
                         held_out=splits.GSM8K_HELD_OUT, batching=batching)
  return prefix


def register() -> None:
  register_distillation_tasks()
  for k in TOPK_WIDTHS:
    register_distillation_tasks(f"{DEFAULT_PREFIX}_top{k}", teacher_k=k)
