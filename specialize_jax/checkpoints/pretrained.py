"""A loaded checkpoint you can call: `load_pretrained(path).generate(...)` / `.logits(...)`.

Terms:
  vocabulary: anything with `encode(str) -> list[int]` and `decode(list[int]) -> str`, usually a
    `seqio.SentencePieceVocabulary`; a path to a SentencePiece model is wrapped in one. With a
    vocabulary, `generate` also takes and returns strings; inputs get EOS appended, as SeqIO's
    T5 tasks and HF's T5 tokenizer do.
  token inputs: `[batch, length]` int ids with 0 as padding (right-padded), EOS (1) included by the
    caller; ragged lists of ids are padded here.
"""
import functools
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from specialize_jax.checkpoints import loading
from specialize_jax.data import storage
from specialize_jax.model import decoding
from specialize_jax.model import models
from specialize_jax.model.config import T5Config

Inputs = Union[np.ndarray, Sequence[Sequence[int]], Sequence[str], str]


def _as_vocabulary(vocabulary: Any) -> Any:
  # Paths first: a str has an `encode` method too.
  if isinstance(vocabulary, (str, os.PathLike)):
    if not storage.exists(vocabulary):
      raise ValueError(f'SentencePiece model {vocabulary} does not exist.')
    import seqio  # pylint: disable=g-import-not-at-top  (imports TensorFlow: only when asked)
    return seqio.SentencePieceVocabulary(os.fspath(vocabulary))
  if vocabulary is None or (hasattr(vocabulary, 'encode') and hasattr(vocabulary, 'decode')):
    return vocabulary
  raise ValueError(f'vocabulary must be a SentencePiece model path or an object with encode/decode '
                   f'(e.g. seqio.SentencePieceVocabulary), got {type(vocabulary)}.')


def _pad(rows: Sequence[Sequence[int]]) -> np.ndarray:
  if not rows:
    raise ValueError('No inputs given: pass at least one row.')
  length = max(len(r) for r in rows)
  if length == 0:
    raise ValueError('All inputs are empty; each row needs at least one token (EOS at least).')
  out = np.zeros((len(rows), length), np.int32)  # [batch, length]
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


@functools.lru_cache(maxsize=8)
def _compiled(config: T5Config, eos_id: int) -> Tuple[models.EncoderDecoderModel, Callable]:
  """One model object (and so one set of compiled functions) per architecture.

  Reloading a checkpoint of the same architecture then reuses the compiled decoders.
  """
  model = models.EncoderDecoderModel(config, eos_id=eos_id)
  return model, jax.jit(model.compute_logits)


class PretrainedModel:
  """Params on the default device plus the compiled functions to use them.

  Attributes:
    config: the architecture (`dtype` is the compute dtype; params are float32).
    params: the T5X-named parameter tree (jax arrays).
    model: the `EncoderDecoderModel` (for `predict_batch`, `score_batch`, `loss_fn`).
    vocabulary: the attached vocabulary or None.
  """

  def __init__(self, config: T5Config, params: Any, vocabulary: Any = None,
               eos_id: int = decoding.EOS_ID):
    self.config = config
    self.params = jax.device_put(params)
    self.model, self._logits_jit = _compiled(config, eos_id)
    self.vocabulary = _as_vocabulary(vocabulary)

  def _check_ids(self, tokens: np.ndarray, what: str) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f'{what} must be an integer array [batch, length], got dtype {tokens.dtype} '
                       f'and shape {tokens.shape}.')
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ValueError(f'{what} has ids outside [0, {self.config.vocab_size}): min {tokens.min()}, '
                       f'max {tokens.max()}.')
    return tokens.astype(np.int32)

  def logits(self, encoder_input_tokens: np.ndarray, decoder_input_tokens: np.ndarray,
             decoder_target_tokens: Optional[np.ndarray] = None) -> np.ndarray:
    """Teacher-forced float32 logits `[batch, decoder_length, vocab]`.

    `decoder_input_tokens` start with BOS 0. Without `decoder_target_tokens` every decoder
    position is attended (causally), like HF's forward pass without a decoder attention mask.
    """
    enc = self._check_ids(encoder_input_tokens, 'encoder_input_tokens')
    dec = self._check_ids(decoder_input_tokens, 'decoder_input_tokens')
    targets = np.ones_like(dec) if decoder_target_tokens is None else self._check_ids(
        decoder_target_tokens, 'decoder_target_tokens')
    batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
             'decoder_target_tokens': targets}
    return np.asarray(self._logits_jit(self.params, batch))

  def _encode_inputs(self, inputs: Inputs) -> tuple:
    """(token array, whether the caller gave strings)."""
    if isinstance(inputs, str):
      inputs = [inputs]
    if not len(inputs):
      raise ValueError('No inputs given: pass at least one row.')
    if isinstance(inputs, np.ndarray) or (len(inputs) and not isinstance(inputs[0], str)):
      if isinstance(inputs, np.ndarray):
        return self._check_ids(inputs, 'inputs'), False
      return self._check_ids(_pad([list(r) for r in inputs]), 'inputs'), False
    if self.vocabulary is None:
      raise ValueError('String inputs need a vocabulary: load_pretrained(path, vocabulary='
                       '"/path/to/sentencepiece.model"), or pass token ids.')
    return _pad([list(self.vocabulary.encode(s)) + [decoding.EOS_ID] for s in inputs]), True

  def generate(self, inputs: Inputs, max_new_tokens: int, decode_method: str = 'greedy',
               num_decodes: int = 1, temperature: float = 1.0, topk: int = 0,
               topp: float = 1.0, alpha: float = 0.6, seed: int = 0,
               return_all_decodes: bool = False) -> Union[np.ndarray, List[Any]]:
    """Decodes up to `max_new_tokens` per input.

    Returns ids `[batch, max_new_tokens]` (0 after EOS), or `[batch, num_decodes,
    max_new_tokens]` best last with `return_all_decodes`; for string inputs, the decoded strings
    (lists of `num_decodes` strings with `return_all_decodes`).
    """
    tokens, strings = self._encode_inputs(inputs)
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
    rng = jax.random.key(seed) if decode_method == 'sample' else None
    sequences = self.model.predict_batch(
        self.params, {'encoder_input_tokens': jnp.asarray(tokens)}, rng,
        return_all_decodes=return_all_decodes, num_decodes=num_decodes,
        decode_method=decode_method, max_decode_length=max_new_tokens, temperature=temperature,
        topk=topk, topp=topp, alpha=alpha)
    sequences = np.asarray(sequences)
    if not strings:
      return sequences

    def decode(row):
      ids = [int(i) for i in row]
      if decoding.EOS_ID in ids:
        ids = ids[:ids.index(decoding.EOS_ID)]
      return self.vocabulary.decode(ids)

    if return_all_decodes:
      return [[decode(r) for r in decodes] for decodes in sequences]
    return [decode(r) for r in sequences]


def load_pretrained(path: Union[str, os.PathLike], dtype: Optional[str] = None,
                    vocabulary: Any = None, fmt: str = 'auto',
                    config: Any = None) -> PretrainedModel:
  """Loads an HF directory, T5X checkpoint or orbax checkpoint (format detected) for inference.

  Args:
    path: checkpoint directory (a T5X/orbax model directory resolves to its latest step).
    dtype: compute dtype, 'float32' or 'bfloat16' (params stay float32); None: `config`'s, else
      the one an orbax export stored, else float32.
    vocabulary: SentencePiece model path or vocabulary object, for string inputs/outputs.
    fmt: 'auto', 'hf', 't5x' or 'orbax'.
    config: architecture for T5X/orbax checkpoints (T5Config, preset name or dict); inferred from
      the parameter shapes when omitted.
  """
  config, params = loading.load_checkpoint(path, fmt=fmt, config=config, dtype=dtype)
  return PretrainedModel(config, params, vocabulary)
