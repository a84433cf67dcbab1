"""Pieces shared by the task registrations: output features and the SeqIO postprocessors."""
import seqio
import tensorflow as tf

from specialize_jax.data import feature_converters
from specialize_jax.data import vocabulary


def output_features(with_teacher: bool = False, vocab=None) -> dict:
  """`inputs` and `targets` in `vocab` (default the T5 vocabulary); `with_teacher` adds the teacher
  top-k features.

  The teacher features must be output features: a SeqIO Mixture keeps only its tasks' output
  features, so without them a top-k mixture would silently drop the teacher distributions.
  """
  vocab = vocab or vocabulary.get_vocabulary()
  features = {
      "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
  }
  if with_teacher:
    for name, dtype in ((feature_converters.TEACHER_TOPK_IDS, tf.int32),
                        (feature_converters.TEACHER_TOPK_LOGPROBS, tf.float32)):
      features[name] = seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=0),
                                     add_eos=False, required=False, dtype=dtype, rank=2)
  return features


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def gold_answer_postprocessor(output, example=None, is_target=False):
  """Targets become the example's gold answer string (e.g. `9 (apples)`); predictions stay text,
  so the metric sees (gold answer, model output) pairs."""
  if is_target:
    return _text(example["answer"])
  return _text(output)


PAPER_SUFFIX = "_paper"


def paper_variant(metric_fn):
  """A paper-rule metric whose keys carry `_paper` (`accuracy_paper`), so SeqIO can report it
  beside the default metric without one overwriting the other."""
  def fn(targets, predictions):
    return {f"{k}{PAPER_SUFFIX}": v for k, v in metric_fn(targets, predictions).items()}
  fn.__name__ = metric_fn.__name__
  return fn
