"""Prepared sets of GSM8K teacher files, built in-process for tests."""
from tests.support import shared_data


def prepare_gsm8k_set(output_dir, teacher_path=None, aligned_path=None, teacher_k=None,
                      **config):
  """`specialize prepare`'s work in-process: a prepared set of a GSM8K teacher file (default: the
  gold rationales) in the shared T5 vocabulary; returns its directory. Needs SPECIALIZE_DATA_DIR."""
  from specialize_jax.prepared import prepare  # pylint: disable=g-import-not-at-top
  vocab = shared_data.shared_file("tokenizer/t5_spiece.model")
  config = prepare.PrepareConfig(output_dir=str(output_dir), vocab_path=str(vocab),
                                 teacher_k=teacher_k, **config)
  return prepare.prepare_gsm8k(config, teacher_path and str(teacher_path),
                               aligned_path and str(aligned_path)).directory
