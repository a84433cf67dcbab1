"""Pieces shared by the task registrations: output features and the SeqIO postprocessors."""
import seqio

from specialize_jax.data import vocabulary


def output_features() -> dict:
  vocab = vocabulary.get_vocabulary()
  return {
      "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
  }


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
