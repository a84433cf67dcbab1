"""The model object: T5X's `BaseModel` interface over the T5 network.

The trainer and evaluator see only this object: `get_initial_variables`, `loss_fn`,
`predict_batch[_with_aux]` and `score_batch`, all pure functions of `(params, batch, rng)`.

Terms:
  batch: a dict of `[batch, length]` arrays with SeqIO's encoder-decoder feature names:
    `encoder_input_tokens`, `decoder_input_tokens` (targets shifted right, BOS 0),
    `decoder_target_tokens`, `decoder_loss_weights`, and when packed `{encoder,decoder}_segment_ids`
    and `{encoder,decoder}_positions`; other features (e.g. teacher top-k) pass through untouched
    to the extra losses.
  extra loss: a callable `(logits [batch, length, vocab] float32, batch, weights,
    loss_normalizing_factor) -> (scalar loss, metrics dict)` added to the cross-entropy, given the
    resolved token weights and normalizing factor so it is normalized like the cross-entropy.
  loss type: `sample` (cross-entropy on the target text) or `distribution` (the teacher KL of
    `distillation_loss`, mixed with cross-entropy by `distribution_ce_weight`).
  metrics: a flat dict of scalar arrays (no clu objects): `loss` (total), `cross_ent_loss`,
    `z_loss`, `accuracy` (fraction of weighted target tokens whose argmax is right),
    `num_tokens` (target tokens with a positive weight), `num_examples` (rows with such a token;
    packed rows count each of their segments), plus whatever extra losses report.
"""
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from specialize_jax.runtime import xla_flags
from specialize_jax.model import decoding
from specialize_jax.model import distillation_loss
from specialize_jax.model import losses
from specialize_jax.model import network
from specialize_jax.model.config import T5Config

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any
ExtraLoss = Callable[..., Tuple[Array, Mapping[str, Array]]]

DECODE_METHODS = ('greedy', 'sample', 'beam')
_OPTIONAL_FEATURES = ('encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                      'decoder_positions')


def _num_examples(batch: Batch, counted: Array) -> Array:
  """Examples in `batch`: its rows with a counted token, or when packed its target segments (a
  segment starts where the id is positive and differs from the previous position's)."""
  segments = batch.get('decoder_segment_ids')
  if segments is None:
    return jnp.sum(jnp.any(counted > 0, axis=-1)).astype(jnp.float32)
  previous = jnp.pad(segments[:, :-1], ((0, 0), (1, 0)))  # [batch, length]
  return jnp.sum((segments > 0) & (segments != previous)).astype(jnp.float32)


class EncoderDecoderModel:
  """T5 encoder-decoder with T5X's loss and decoding interface.

  Args:
    module: a `network.Transformer` or a `T5Config` to build one from.
    z_loss: coefficient of the z-loss term of the training loss.
    label_smoothing: label smoothing of the cross-entropy.
    loss_normalizing_factor: see `losses`; None sums the token losses (T5X's default).
    extra_losses: callables `(logits, batch, weights, loss_normalizing_factor) -> (loss,
      metrics)` added to the loss.
    eos_id: the id that ends a decode.
    loss_type: 'sample' or 'distribution' (see `distillation_loss`).
    distribution_ce_weight: with 'distribution', the cross-entropy's share of the loss.
    renormalize_teacher: with 'distribution', renormalize the teacher's top-k mass to one.
    decode_cache_phases: decoding runs one loop per self-attention cache length, this many
      lengths up to `max_decode_length` (`decoding.cache_lengths`), so early steps read a short
      cache; 1 gives one loop over the full cache (a smaller program: faster to compile).
  """

  def __init__(self, module: Union[network.Transformer, T5Config], *, z_loss: float = 1e-4,
               label_smoothing: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizingFactor = None,
               extra_losses: Sequence[ExtraLoss] = (), eos_id: int = decoding.EOS_ID,
               loss_type: str = 'sample', distribution_ce_weight: float = 0.0,
               renormalize_teacher: bool = False, decode_cache_phases: int = 4):
    if isinstance(module, T5Config):
      module = network.Transformer(module)
    if not isinstance(module, network.Transformer):
      raise ValueError(f'module must be a network.Transformer or a T5Config, got {type(module)}.')
    if isinstance(loss_normalizing_factor, str):  # fail at construction on an unknown name
      loss_normalizing_factor = losses.parse_loss_normalizing_factor(loss_normalizing_factor)
    self.module = module
    self.config = module.config
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor
    self.loss_type = loss_type
    self.cross_entropy_weight, teacher_losses = distillation_loss.loss_terms(
        loss_type, distribution_ce_weight, renormalize_teacher)
    self.extra_losses = tuple(teacher_losses) + tuple(extra_losses)
    self.eos_id = eos_id
    decoding.cache_lengths(1, decode_cache_phases)  # fail at construction on a bad value
    self.decode_cache_phases = decode_cache_phases
    self._decode_jit = None  # see `_decoder`

  def _decoder(self):
    """The jitted `_decode_impl`, one compilation per static option set.

    Built at the first decode, when the backend is known, with that backend's decoder compiler
    options (`xla_flags.decode_compiler_options`: on CPU, XLA's own dots, not YNNPACK).
    """
    if self._decode_jit is None:
      self._decode_jit = jax.jit(
          self._decode_impl, static_argnames=('num_decodes', 'decode_method',
                                              'max_decode_length', 'topk', 'topp', 'alpha'),
          compiler_options=xla_flags.decode_compiler_options(jax.default_backend()))
    return self._decode_jit

  # -- variables -------------------------------------------------------------------------------

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Sequence[int]],
                            input_types: Optional[Mapping[str, Any]] = None) -> Mapping[str, Any]:
    """Boxed initial variables `{'params': ...}` (leaves `nn.LogicallyPartitioned`).

    Use under `jax.eval_shape` for shapes and logical axes; `nn.meta.unbox` gives the plain
    T5X-identical tree.
    """
    input_types = input_types or {}

    def ones(name):
      if name not in input_shapes:
        return None
      return jnp.ones(input_shapes[name], input_types.get(name, jnp.int32))

    for name in ('encoder_input_tokens', 'decoder_input_tokens'):
      if name not in input_shapes:
        raise ValueError(f'input_shapes lacks {name!r}; it has {sorted(input_shapes)}.')
    decoder_tokens = ones('decoder_input_tokens')
    return self.module.init(
        rng, ones('encoder_input_tokens'), decoder_tokens, decoder_tokens,
        **{name: ones(name) for name in _OPTIONAL_FEATURES}, enable_dropout=False)

  # -- training --------------------------------------------------------------------------------

  def compute_logits(self, params: Params, batch: Batch,
                     dropout_rng: Optional[Array] = None) -> Array:
    """Teacher-forced float32 logits `[batch, target_length, vocab]`; dropout iff a key is given."""
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'],
        **{name: batch.get(name) for name in _OPTIONAL_FEATURES},
        enable_dropout=dropout_rng is not None, rngs=rngs)

  def loss_fn(self, params: Params, batch: Batch,
              dropout_rng: Optional[Array]) -> Tuple[Array, Mapping[str, Array]]:
    """Weighted cross-entropy (with z-loss, smoothing, normalization) plus the extra losses.

    The z-loss always has weight one; `cross_entropy_weight` scales only the cross-entropy.
    """
    logits = self.compute_logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    factor, weights = losses.get_loss_normalizing_factor_and_weights(
        self.loss_normalizing_factor, batch)
    loss, z_loss, _ = losses.compute_weighted_cross_entropy(
        logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
        loss_normalizing_factor=factor)
    cross_ent = loss - z_loss
    loss = self.cross_entropy_weight * cross_ent + z_loss
    token_weights = losses.counted_tokens(batch)
    num_tokens = jnp.sum(token_weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        'cross_ent_loss': cross_ent,
        'z_loss': z_loss,
        'accuracy': jnp.sum(correct * token_weights) / jnp.maximum(num_tokens, 1e-8),
        'num_tokens': num_tokens,
        'num_examples': _num_examples(batch, token_weights),
    }
    for extra_loss in self.extra_losses:
      value, extra_metrics = extra_loss(logits, batch, weights=weights,
                                        loss_normalizing_factor=factor)
      loss = loss + value
      for name, metric in extra_metrics.items():
        if name in metrics:
          raise ValueError(f'Extra loss {extra_loss!r} reports metric {name!r}, which is already '
                           f'taken ({sorted(metrics)}); rename it.')
        metrics[name] = metric
    metrics['loss'] = loss
    return loss, metrics

  # -- scoring ---------------------------------------------------------------------------------

  def score_batch(self, params: Params, batch: Batch, return_intermediates: bool = False
                  ) -> Union[Array, Tuple[Array, Mapping[str, Array]]]:
    """Per-sequence sum of weighted target-token log-probabilities `[batch]` (no z-loss).

    With `return_intermediates`, also `{'token_scores': [batch, length]}`.
    """
    logits = self.compute_logits(params, batch)
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = (targets > 0).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_scores = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                       axis=-1)[..., 0] * weights  # [batch, length]
    sequence_scores = jnp.sum(token_scores, axis=-1)
    if return_intermediates:
      return sequence_scores, {'token_scores': token_scores}
    return sequence_scores

  # -- decoding --------------------------------------------------------------------------------

  def _decode_impl(self, params, encoder_input_tokens, rng, temperature, *, num_decodes,
                   decode_method, max_decode_length, topk, topp, alpha):
    """Encodes once, fills the cache (cross-attention keys/values), then searches."""
    module = self.module
    batch_size = encoder_input_tokens.shape[0]
    encoded = module.apply({'params': params}, encoder_input_tokens, enable_dropout=False,
                           method=module.encode)
    # [rows, input_length, ...]: the copies of each input are adjacent.
    encoded = decoding.expand_rows(encoded, num_decodes)
    input_tokens = decoding.expand_rows(encoder_input_tokens, num_decodes)
    rows = batch_size * num_decodes
    cache_lengths = decoding.cache_lengths(max_decode_length, self.decode_cache_phases)
    # A call in decode mode with `cache_lengths[0]` tokens creates the cache; its logits are
    # unused and compiled away, so it costs only the cross-attention projections.
    _, variables = module.apply(
        {'params': params}, encoded, input_tokens,
        jnp.zeros((rows, cache_lengths[0]), jnp.int32), decode=True, enable_dropout=False,
        mutable=['cache'], method=module.decode)

    def tokens_to_logits(token_ids, cache):
      logits, new_variables = module.apply(
          {'params': params, 'cache': cache}, None, input_tokens, token_ids, decode=True,
          enable_dropout=False, mutable=['cache'], method=module.decode)
      return logits[:, 0, :], new_variables['cache']

    cache = variables['cache']
    phases = dict(cache_lengths=cache_lengths, grow_cache=network.grow_self_attention_cache)
    if decode_method == 'beam':
      return decoding.beam_search(tokens_to_logits, cache, batch_size=batch_size,
                                  beam_size=num_decodes, max_decode_length=max_decode_length,
                                  alpha=alpha, eos_id=self.eos_id, **phases)
    if decode_method == 'greedy':
      temperature = jnp.zeros((), jnp.float32)
    return decoding.temperature_sample(
        tokens_to_logits, cache, batch_size=batch_size, max_decode_length=max_decode_length,
        rng=rng, num_decodes=num_decodes, temperature=temperature, topk=topk, topp=topp,
        eos_id=self.eos_id, **phases)

  def predict_batch_with_aux(
      self, params: Params, batch: Batch, rng: Optional[Array] = None, *,
      decoder_params: Optional[Mapping[str, Any]] = None, return_all_decodes: bool = False,
      num_decodes: int = 1, decode_method: str = 'greedy',
      max_decode_length: Optional[int] = None, temperature: float = 1.0, topk: int = 0,
      topp: float = 1.0, alpha: float = 0.6, jit: bool = True
  ) -> Tuple[Array, Mapping[str, Array]]:
    """Decodes `batch['encoder_input_tokens']`; returns predictions and `{'scores': ...}`.

    Args:
      params: plain parameters.
      batch: needs `encoder_input_tokens`; `decoder_input_tokens` sets the default length.
      rng: sampling key (required for 'sample').
      decoder_params: overrides of the keyword options below, T5X-style (e.g. from gin).
      return_all_decodes: return `[batch, num_decodes, length]` and scores `[batch,
        num_decodes]` in increasing score order; otherwise the best `[batch, length]`, `[batch]`.
      num_decodes: samples ('sample') or beams ('beam') per input; 1 for 'greedy'.
      decode_method: 'greedy', 'sample' or 'beam'.
      max_decode_length: tokens to generate at most (default: the decoder_input_tokens length).
      temperature, topk, topp: sampling options (see `decoding.temperature_sample`).
      alpha: beam brevity penalty exponent.
      jit: False traces the decoder into the caller's own `jax.jit` (one that sets shardings and
        compiler options, e.g. `decode_compiler_options`: a nested jit may not set them).
    """
    options = dict(num_decodes=num_decodes, decode_method=decode_method,
                   max_decode_length=max_decode_length, temperature=temperature, topk=topk,
                   topp=topp, alpha=alpha)
    for name, value in (decoder_params or {}).items():
      if name not in options:
        raise ValueError(f'Unknown decoder_params key {name!r}; use one of {sorted(options)}.')
      options[name] = value
    method = options['decode_method']
    if method not in DECODE_METHODS:
      raise ValueError(f'decode_method={method!r}; use one of {DECODE_METHODS}.')
    if method == 'greedy' and options['num_decodes'] != 1:
      raise ValueError(f'Greedy decoding gives one decode, not num_decodes='
                       f'{options["num_decodes"]}; use decode_method="sample" or "beam".')
    if options['num_decodes'] < 1:
      raise ValueError(f'num_decodes={options["num_decodes"]} must be >= 1.')
    if method == 'sample' and rng is None:
      raise ValueError('decode_method="sample" needs an rng key: pass rng=jax.random.key(seed).')
    if options['max_decode_length'] is None:
      if 'decoder_input_tokens' not in batch:
        raise ValueError('Set max_decode_length or give the batch decoder_input_tokens, whose '
                         'length is the default.')
      options['max_decode_length'] = batch['decoder_input_tokens'].shape[1]
    if rng is None:
      rng = jax.random.key(0)
    temperature = jnp.asarray(options.pop('temperature'), jnp.float32)
    decoder = self._decoder() if jit else self._decode_impl
    sequences, scores = decoder(
        params, batch['encoder_input_tokens'], rng, temperature,
        num_decodes=int(options['num_decodes']), decode_method=method,
        max_decode_length=int(options['max_decode_length']), topk=int(options['topk']),
        topp=float(options['topp']), alpha=float(options['alpha']))
    if return_all_decodes:
      return sequences, {'scores': scores}
    return sequences[:, -1, :], {'scores': scores[:, -1]}

  def predict_batch(self, params: Params, batch: Batch, rng: Optional[Array] = None,
                    **kwargs) -> Array:
    """`predict_batch_with_aux` without the scores."""
    return self.predict_batch_with_aux(params, batch, rng, **kwargs)[0]
