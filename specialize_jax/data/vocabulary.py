"""The T5 / FlanT5 SentencePiece vocabulary every task uses.

Path resolution: `SPECIALIZE_VOCAB_PATH` if set; else the data directory's `tokenizer/t5_spiece.model`
if present (fetched by `specialize download`, byte-identical to the public file); else the public T5X
path `gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model` that TPU users already read.
"""
import os

import seqio

from specialize_jax.data import data_dir

VOCAB_PATH_ENV = "SPECIALIZE_VOCAB_PATH"
PUBLIC_T5_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
LOCAL_VOCAB_FILE = "tokenizer/t5_spiece.model"
# The embedded demo's own vocabulary, in its data directory (written by `specialize demo`).
DEMO_VOCAB_FILE = "spm.model"


def vocabulary_path() -> str:
  if os.environ.get(VOCAB_PATH_ENV):
    return os.environ[VOCAB_PATH_ENV]
  local = data_dir.data_dir() / LOCAL_VOCAB_FILE
  return str(local) if local.exists() else PUBLIC_T5_VOCAB_PATH


def get_vocabulary() -> seqio.SentencePieceVocabulary:
  """The vocabulary (loaded lazily by SeqIO on first use); 100 extra ids like T5X's `cc_all` vocab."""
  return seqio.SentencePieceVocabulary(vocabulary_path(), extra_ids=100)
