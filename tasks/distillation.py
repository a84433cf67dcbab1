"""Distillation (training) tasks: the four formats of METHOD.md §2 built from a teacher-data file.

Registered at import:
- `gsm8k_distill_{zs_ao,zs_cot,icl_ao,icl_cot}` (split `train`) and the mixture `gsm8k_distill`
  whose per-format rates default to the original's mix (≈79 % in-context CoT, 20 % zero-shot CoT,
  1 % answer-only): text targets, for the `sample` loss.
- `gsm8k_distill_top{5,20}_{format}` and the mixtures `gsm8k_distill_top5` / `gsm8k_distill_top20`:
  the same examples plus the teacher's top-k distribution per target token (features
  `teacher_topk_ids` / `teacher_topk_logprobs`, see `specialize_jax.teacher.teacher_features`), for the
  `distribution` loss; k = 5 fits the completions API (and the paper's Codex data), 20 the chat API.

Teacher data: the file named by `$SPECIALIZE_TEACHER_DATA` (schema `specialize_jax.teacher/1`, see
`specialize_jax.teacher.teacher_data`), read when the dataset is built; without it, the GSM8K gold
rationales (one "sample" per question), so the tasks always build. GSM8K dev and test questions are
never trained on. Other teacher files or budgets: call `register_distillation_tasks(prefix, ...)`.

Aligned data (top-k tasks): the file named by `$SPECIALIZE_ALIGNED_DATA` (schema
`specialize_jax.aligned/1`, written by `specialize align` from the same teacher file), joined to the
teacher samples by (id, sample index). Samples without an aligned row, and answer-only targets, get
one-hot rows (the KL there is cross-entropy); the count of each is logged when the dataset is built.
"""
import functools
import logging
import os
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from specialize_jax.data import data_dir
from specialize_jax.data import formats
from specialize_jax.data import readers
from specialize_jax.data import splits
from specialize_jax.teacher import teacher_data
from specialize_jax.teacher import teacher_features
from specialize_jax.teacher import teacher_sources
from specialize_jax.data import vocabulary
from tasks import common

TEACHER_DATA_ENV = "SPECIALIZE_TEACHER_DATA"
ALIGNED_DATA_ENV = "SPECIALIZE_ALIGNED_DATA"
TOPK_WIDTHS = (5, 20)
TRAIN_SPLIT = "train"
DEFAULT_PREFIX = "gsm8k_distill"
# In-context inputs run past 512 T5 tokens (no newline piece): METHOD.md §2 asks for >= 1024.
DEFAULT_MAX_INPUT_TOKENS = 1024
# The original's mixture (3B setting): one format per micro-batch, ~79 % IC-CoT, 20 % ZS-CoT, ~1 % AO.
DEFAULT_FORMAT_RATES = {"icl_cot": 0.79, "zs_cot": 0.20, "icl_ao": 0.005, "zs_ao": 0.005}


def load_teacher_records(teacher_data_path: Optional[str] = None) -> list:
  """Teacher records from `teacher_data_path`, else `$SPECIALIZE_TEACHER_DATA`, else GSM8K gold."""
  path = teacher_data_path or os.environ.get(TEACHER_DATA_ENV)
  if path:
    return list(teacher_data.read_records(path).records)
  return teacher_sources.records_from_gsm8k_gold(data_dir.data_path(readers.GSM8K_FILES["train"]))


def held_out_questions() -> frozenset:
  """Questions no training task may contain: GSM8K dev and test."""
  return frozenset(e.question for split in ("dev", "test") for e in splits.math_split("gsm8k", split))


@functools.lru_cache(maxsize=2)
def _dense_rows_cached(path: str, k: int, mtime_ns: int, size: int) -> dict:
  del mtime_ns, size  # Part of the cache key only: a rewritten file is read again.
  return teacher_features.load_dense_rows(path, k)


def load_aligned_rows(aligned_data_path: Optional[str], k: int) -> dict:
  """`{(id, sample_index): teacher_features.DenseAlignedRow}` from `aligned_data_path`, else
  `$SPECIALIZE_ALIGNED_DATA`; empty (every row one-hot, with a warning) when neither is set. The CoT
  tasks of one mixture share one in-memory copy."""
  path = aligned_data_path or os.environ.get(ALIGNED_DATA_ENV)
  if not path:
    logging.warning(
        "No aligned teacher file ($%s is unset): every target token gets a one-hot teacher row, so "
        "the distribution loss equals cross-entropy. Run `specialize align` and set $%s.",
        ALIGNED_DATA_ENV, ALIGNED_DATA_ENV)
    return {}
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"${ALIGNED_DATA_ENV} / aligned_data_path names {path}, which does "
                            "not exist; write it with `specialize align`.") from None
  return _dense_rows_cached(path, k, stat.st_mtime_ns, stat.st_size)


def distillation_source(format_name: str, teacher_data_path: Optional[str], max_input_tokens: int,
                        num_exemplars: int, exemplar_seed: int, teacher_k: Optional[int] = None,
                        aligned_data_path: Optional[str] = None) -> seqio.DataSource:
  """A SeqIO source yielding `id`, `inputs`, `targets`, `answer` (text) for one format, plus the
  teacher features (`teacher_features.example_rows`) when `teacher_k` is set."""
  def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
    records = load_teacher_records(teacher_data_path)
    # Answer-only targets never use the aligned rows (they are one-hot).
    aligned = (load_aligned_rows(aligned_data_path, teacher_k)
               if teacher_k and formats.is_chain_of_thought(format_name) else {})
    sampler = formats.ExemplarSampler(splits.math_split("gsm8k", "train"), num_exemplars,
                                       exemplar_seed)
    count_tokens = formats.SentencePieceCounter(vocabulary.vocabulary_path())
    exclude = held_out_questions()

    def generate():
      with_teacher = 0
      for example in formats.distillation_examples(records, format_name, sampler, max_input_tokens,
                                                   count_tokens, exclude):
        features = {k: example[k] for k in ("id", "inputs", "targets", "answer")}
        if teacher_k:
          row = aligned.get((example["id"], example["sample_index"]))
          with_teacher += row is not None
          features.update(teacher_features.example_rows(
              row, example["targets"], teacher_k,
              where=f"{example['id']} sample {example['sample_index']}"))
        yield features
      if teacher_k:
        logging.info("%s: %d examples carried a teacher distribution from the aligned file.",
                     format_name, with_teacher)

    text = tf.TensorSpec(shape=(), dtype=tf.string)
    signature = {"id": text, "inputs": text, "targets": text, "answer": text}
    if teacher_k:
      signature.update(teacher_features.output_signature(teacher_k))
    return tf.data.Dataset.from_generator(generate, output_signature=signature)
  return seqio.FunctionDataSource(dataset_fn, splits=(TRAIN_SPLIT,))


def check_input_budget(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                       max_input_tokens: int) -> tf.data.Dataset:
  """Fails before training when the inputs length would cut in-context questions short."""
  if sequence_length and sequence_length.get("inputs") and sequence_length["inputs"] < max_input_tokens:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS['inputs']={sequence_length['inputs']} is shorter than the in-context "
        f"tasks' input budget of {max_input_tokens} tokens, so questions would be truncated. Set "
        f"--gin.TASK_FEATURE_LENGTHS to at least {{'inputs': {max_input_tokens}, ...}} or register the "
        "tasks with a smaller `max_input_tokens`.")
  return dataset


def register_distillation_tasks(prefix: str = DEFAULT_PREFIX,
                                teacher_data_path: Optional[str] = None,
                                rates: Mapping[str, float] = DEFAULT_FORMAT_RATES,
                                max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
                                num_exemplars: int = formats.NUM_EXEMPLARS,
                                exemplar_seed: int = 0, teacher_k: Optional[int] = None,
                                aligned_data_path: Optional[str] = None) -> str:
  """Registers `{prefix}_{format}` for the four formats and the mixture `{prefix}` (replacing an
  earlier registration of `prefix`); returns the mixture's name.

  With `teacher_k`, the tasks also carry top-`teacher_k` teacher features from `aligned_data_path`
  (else `$SPECIALIZE_ALIGNED_DATA`); train them with the `distribution` loss and TEACHER_K = k.
  """
  unknown = set(rates) - set(formats.FORMATS)
  if unknown:
    raise ValueError(f"Unknown formats in rates: {sorted(unknown)}; expected {formats.FORMATS}.")
  # Registering a prefix again replaces it (gin files call this when a run builds its dataset).
  seqio.MixtureRegistry.remove(prefix)
  for format_name in formats.FORMATS:
    seqio.TaskRegistry.remove(f"{prefix}_{format_name}")
  for format_name in formats.FORMATS:
    preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    if teacher_k:
      preprocessors.append(teacher_features.complete_teacher_rows)
    if formats.is_in_context(format_name):
      preprocessors.insert(0, functools.partial(check_input_budget,
                                                max_input_tokens=max_input_tokens))
    seqio.TaskRegistry.add(
        f"{prefix}_{format_name}",
        source=distillation_source(format_name, teacher_data_path, max_input_tokens,
                                   num_exemplars, exemplar_seed, teacher_k, aligned_data_path),
        preprocessors=preprocessors,
        output_features=common.output_features(with_teacher=bool(teacher_k)),
        postprocess_fn=common.gold_answer_postprocessor,
        shuffle_buffer_size=10_000,
    )
  seqio.MixtureRegistry.add(
      prefix, [(f"{prefix}_{f}", rate) for f, rate in rates.items() if rate > 0])
  return prefix


def register() -> None:
  register_distillation_tasks()
  for k in TOPK_WIDTHS:
    register_distillation_tasks(f"{DEFAULT_PREFIX}_top{k}", teacher_k=k)
