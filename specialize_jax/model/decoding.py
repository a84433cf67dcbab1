"""Incremental decoding with a key/value cache: greedy, temperature sampling, beam search.

Terms:
  tokens_to_logits: `(token_ids [rows, 1], cache) -> (logits [rows, vocab] float32, cache)`, one
    decoder step; the model object builds it over `Transformer.decode(..., decode=True)`.
  rows: `batch * num_decodes` decoder rows; the copies of one input are adjacent
    (`[x0, x0, x1, x1]` for two decodes), as T5X's `flat_batch_beam_expand` lays them out.
  sequences: `[batch, num_decodes, max_decode_length]` generated ids without the BOS 0; a row
    stops after EOS (id 1), and the positions after it hold 0.
  scores: `[batch, num_decodes]` float32. Greedy and sampling: the sum of the model's own
    log-probabilities of the generated tokens, up to and including EOS (T5X's sampler by default
    scores with the temperature/top-k/top-p-rescaled distribution; the model's log-probability is
    what answer voting and reporting need). Beam search: that sum divided by the brevity penalty
    `((5 + length) / 6) ** alpha` (T5X / brax).
  order: along `num_decodes`, increasing score, so the best decode is last (T5X's convention).
  cache phases: the search can run as one loop per self-attention cache length
    (`cache_lengths`, e.g. 32, 64, 96, 128), growing the cache with `grow_cache` between loops,
    so early steps attend over a short cache instead of the full `max_decode_length` one (the
    attention over the cache reads all of it at every step). The results are the same.

Each search is a `lax.while_loop` (one per cache phase) that stops as soon as every row is done,
so short answers cost few steps; all functions are jittable (pass `topk`, `topp`, `num_decodes`,
`beam_size`, `max_decode_length` and `cache_lengths` as static arguments).
"""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], Tuple[Array, Cache]]
GrowCache = Callable[[Cache, int], Cache]

EOS_ID = 1
# A finite "minus infinity" that survives additions without producing NaNs (T5X's value).
NEG_INF = -1.0e7


def expand_rows(x: Array, num_decodes: int) -> Array:
  """`[batch, ...] -> [batch * num_decodes, ...]` with the copies of each row adjacent."""
  return jnp.repeat(x, num_decodes, axis=0)


def brevity_penalty(alpha: float, length: Array) -> Array:
  """The length normalization of beam scores, `((5 + length) / 6) ** alpha`."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def cache_lengths(max_decode_length: int, num_phases: int, multiple: int = 8) -> Tuple[int, ...]:
  """Increasing cache lengths ending at `max_decode_length`: `num_phases` near-equal steps,
  rounded up to a `multiple` (`(32, 64, 96, 128)` for 128 and 4 phases; fewer when short)."""
  if num_phases < 1:
    raise ValueError(f'num_phases={num_phases} must be >= 1.')
  lengths = [min(max_decode_length, -(-max_decode_length * k // (num_phases * multiple)) * multiple)
             for k in range(1, num_phases + 1)]
  return tuple(sorted(set(lengths)))


def _while_in_phases(cond: Callable[[Dict[str, Any]], Array],
                     body: Callable[[Dict[str, Any]], Dict[str, Any]], state: Dict[str, Any], *,
                     cache_lengths: Sequence[int], grow_cache: Optional[GrowCache],
                     max_decode_length: int) -> Dict[str, Any]:
  """`lax.while_loop(cond, body, state)`, as one loop per cache length (module docstring).

  `state['cache']` holds `cache_lengths[0]` positions (`max_decode_length` when there are no
  lengths); loop `i` runs while `state['step'] < cache_lengths[i]`, then the cache grows to
  `cache_lengths[i + 1]`.
  """
  lengths = tuple(cache_lengths) or (max_decode_length,)
  if lengths[-1] != max_decode_length:
    raise ValueError(f'cache_lengths={lengths} must end at max_decode_length={max_decode_length}.')
  if any(b <= a for a, b in zip(lengths, lengths[1:])):
    raise ValueError(f'cache_lengths={lengths} must increase.')
  if len(lengths) > 1 and grow_cache is None:
    raise ValueError(f'cache_lengths={lengths} needs grow_cache to go from one to the next.')
  for i, length in enumerate(lengths):
    if i:
      state = dict(state, cache=grow_cache(state['cache'], length))
    state = lax.while_loop(lambda s, end=length: cond(s) & (s['step'] < end), body, state)
  return state


def _gather_rows(tree: Cache, rows: Array) -> Cache:
  """Reorders the leading (row) axis of every non-scalar cache leaf."""
  return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else jnp.take(x, rows, axis=0), tree)


def _filter_logits(logits: Array, topk: int, topp: float) -> Array:
  """Keeps the `topk` largest logits and the smallest set of top logits holding `topp` mass."""
  if topk > 0 and topk < logits.shape[-1]:
    kth = lax.top_k(logits, topk)[0][..., -1:]  # [rows, 1]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if topp < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [rows, vocab], descending
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The first index at which the mass reaches topp is kept; later ones are cut.
    cutoff_index = jnp.sum(cumulative < topp, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def first_argmax(logits: Array) -> Array:
  """`jnp.argmax(logits, axis=-1)` (the first maximal index; a NaN counts as the maximum).

  Written as a max and a min over an index where the max is hit, two plain reductions that XLA's
  CPU backend vectorizes, rather than `argmax`'s paired (value, index) reduction that it does not:
  a few percent of a t5-small greedy decode on CPU (docs/benchmarks.md).
  """
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  hit = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(hit, index, logits.shape[-1] - 1), axis=-1)


def _check_sampling_args(topk: int, topp: float, max_decode_length: int):
  if topk < 0:
    raise ValueError(f'topk={topk} must be >= 0 (0 disables top-k).')
  if not 0.0 < topp <= 1.0:
    raise ValueError(f'topp={topp} must be in (0, 1] (1 disables nucleus sampling).')
  if max_decode_length < 1:
    raise ValueError(f'max_decode_length={max_decode_length} must be >= 1.')


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Cache, *, batch_size: int,
                       max_decode_length: int, rng: Array, num_decodes: int = 1,
                       temperature: float | Array = 1.0, topk: int = 0, topp: float = 1.0,
                       eos_id: int = EOS_ID, cache_lengths: Sequence[int] = (),
                       grow_cache: Optional[GrowCache] = None) -> Tuple[Array, Array]:
  """Samples `num_decodes` continuations per input; `temperature == 0` is greedy decoding.

  Args:
    tokens_to_logits: one decoder step (module docstring).
    cache: the decoder cache for `batch_size * num_decodes` rows.
    batch_size: the number of inputs.
    max_decode_length: the number of tokens to generate at most (the cache length).
    rng: sampling key; unused at temperature 0.
    num_decodes: samples per input.
    temperature: softmax temperature, may be traced; 0 picks the argmax.
    topk: sample among the `topk` most likely tokens (0: all).
    topp: sample from the smallest set of tokens with probability >= `topp` (1: all).
    eos_id: the id that ends a row.
    cache_lengths: the cache phases (module docstring); `cache` holds the first length. Empty:
      one loop over a `max_decode_length` cache.
    grow_cache: `(cache, length) -> cache` padded to `length` positions; needed with phases.

  Returns:
    `(sequences [batch, num_decodes, max_decode_length], scores [batch, num_decodes])`.
  """
  _check_sampling_args(topk, topp, max_decode_length)
  rows = batch_size * num_decodes
  temperature = jnp.asarray(temperature, jnp.float32)
  # Column 0 holds the BOS 0 fed at step 0; step i writes column i + 1.
  state0 = dict(step=jnp.array(0, jnp.int32),
                tokens=jnp.zeros((rows, max_decode_length + 1), jnp.int32), cache=cache,
                ended=jnp.zeros((rows,), bool), log_prob=jnp.zeros((rows,), jnp.float32))

  def cond(state):
    return ~jnp.all(state['ended'])

  def body(state):
    step, tokens, ended, log_prob = (state[k] for k in ('step', 'tokens', 'ended', 'log_prob'))
    current = lax.dynamic_slice_in_dim(tokens, step, 1, axis=1)  # [rows, 1]
    logits, cache = tokens_to_logits(current, state['cache'])
    logits = logits.astype(jnp.float32)  # [rows, vocab]

    def sample(logits):
      scaled = _filter_logits(logits / jnp.maximum(temperature, 1e-6), topk, topp)
      return jax.random.categorical(jax.random.fold_in(rng, step), scaled).astype(jnp.int32)

    # A real branch, not a select: greedy steps skip drawing a [rows, vocab] Gumbel sample.
    next_token = lax.cond(temperature > 0.0, sample, first_argmax, logits)
    # log p(next) = logit - logsumexp(logits), without materializing a [rows, vocab] log-softmax.
    token_log_prob = (jnp.take_along_axis(logits, next_token[:, None], axis=-1)[:, 0] -
                      jax.nn.logsumexp(logits, axis=-1))
    next_token = jnp.where(ended, 0, next_token)
    log_prob = log_prob + jnp.where(ended, 0.0, token_log_prob)
    tokens = lax.dynamic_update_slice_in_dim(tokens, next_token[:, None], step + 1, axis=1)
    ended = ended | (next_token == eos_id)
    return dict(step=step + 1, tokens=tokens, cache=cache, ended=ended, log_prob=log_prob)

  final = _while_in_phases(cond, body, state0, cache_lengths=cache_lengths,
                           grow_cache=grow_cache, max_decode_length=max_decode_length)
  tokens, log_prob = final['tokens'], final['log_prob']
  sequences = tokens[:, 1:].reshape(batch_size, num_decodes, max_decode_length)
  scores = log_prob.reshape(batch_size, num_decodes)
  order = jnp.argsort(scores, axis=-1)  # increasing: best last
  sequences = jnp.take_along_axis(sequences, order[:, :, None], axis=1)
  return sequences, jnp.take_along_axis(scores, order, axis=1)


def greedy_decode(tokens_to_logits: TokensToLogits, cache: Cache, *, batch_size: int,
                  max_decode_length: int, eos_id: int = EOS_ID, cache_lengths: Sequence[int] = (),
                  grow_cache: Optional[GrowCache] = None) -> Tuple[Array, Array]:
  """Greedy decoding: `temperature_sample` at temperature 0, one decode per input."""
  return temperature_sample(tokens_to_logits, cache, batch_size=batch_size,
                            max_decode_length=max_decode_length, rng=jax.random.key(0),
                            num_decodes=1, temperature=0.0, eos_id=eos_id,
                            cache_lengths=cache_lengths, grow_cache=grow_cache)


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, *, batch_size: int,
                beam_size: int, max_decode_length: int, alpha: float = 0.6,
                eos_id: int = EOS_ID, cache_lengths: Sequence[int] = (),
                grow_cache: Optional[GrowCache] = None) -> Tuple[Array, Array]:
  """Beam search with T5X's brevity penalty and early stopping.

  Each step extends the `beam_size` live beams by every token, keeps the best `2 * beam_size`
  candidates, moves those ending in EOS into the finished set (scored with the brevity penalty)
  and keeps the best `beam_size` others live. An input is done once its worst finished score
  beats the best score any live beam could still reach; the loop stops when all inputs are done.
  Inputs with no finished beam at the end return their live beams with raw log-probabilities.

  Args:
    tokens_to_logits: one decoder step (module docstring).
    cache: the decoder cache for `batch_size * beam_size` rows.
    batch_size, beam_size, max_decode_length: static sizes.
    alpha: brevity penalty exponent (0: plain log-probability).
    eos_id: the id that finishes a beam.
    cache_lengths, grow_cache: the cache phases, as in `temperature_sample`.

  Returns:
    `(sequences [batch, beam_size, max_decode_length], scores [batch, beam_size])`, best last.
  """
  if beam_size < 1 or max_decode_length < 1:
    raise ValueError(f'beam_size={beam_size} and max_decode_length={max_decode_length} must be '
                     '>= 1.')
  k = beam_size
  length = max_decode_length + 1  # column 0 is BOS
  # Only beam 0 is live at first, so the first step does not pick k copies of one token.
  live_log_probs0 = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch_size, 1))
  state0 = dict(
      step=jnp.array(0, jnp.int32),
      live_seqs=jnp.zeros((batch_size, k, length), jnp.int32),
      live_log_probs=live_log_probs0,
      finished_seqs=jnp.zeros((batch_size, k, length), jnp.int32),
      finished_scores=jnp.full((batch_size, k), NEG_INF, jnp.float32),
      finished_flags=jnp.zeros((batch_size, k), bool),
      cache=cache)
  batch_index = jnp.arange(batch_size)[:, None]  # [batch, 1]

  def cond(state):
    # live_log_probs are sorted, so column 0 is the best; no live beam can score better than
    # its log-probability under the largest penalty (log-probabilities only fall).
    best_live = state['live_log_probs'][:, 0] / brevity_penalty(alpha, max_decode_length)
    worst_finished = jnp.where(state['finished_flags'][:, -1], state['finished_scores'][:, -1],
                               NEG_INF)
    done = worst_finished > best_live  # [batch]
    return ~jnp.all(done)

  def body(state):
    step = state['step']
    current = lax.dynamic_slice_in_dim(state['live_seqs'], step, 1, axis=2)  # [batch, k, 1]
    logits, cache = tokens_to_logits(current.reshape(batch_size * k, 1), state['cache'])
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch_size, k, vocab)
    log_probs = log_probs + state['live_log_probs'][:, :, None]
    # [batch, 2k] best candidates over (beam, token).
    top_log_probs, top_flat = lax.top_k(log_probs.reshape(batch_size, k * vocab), 2 * k)
    top_beam = top_flat // vocab
    top_token = (top_flat % vocab).astype(jnp.int32)
    top_seqs = state['live_seqs'][batch_index, top_beam]  # [batch, 2k, length]
    top_seqs = lax.dynamic_update_slice_in_dim(top_seqs, top_token[:, :, None], step + 1, axis=2)
    newly_finished = top_token == eos_id

    # Live: the best k candidates that did not just end (sorted, best first).
    live_candidates = jnp.where(newly_finished, NEG_INF, top_log_probs)
    live_log_probs, live_pick = lax.top_k(live_candidates, k)  # [batch, k]
    live_seqs = jnp.take_along_axis(top_seqs, live_pick[:, :, None], axis=1)
    source_beam = jnp.take_along_axis(top_beam, live_pick, axis=1)  # [batch, k]
    cache = _gather_rows(cache, (batch_index * k + source_beam).reshape(-1))

    # Finished: merge the new EOS candidates into the k best so far (sorted, best first).
    new_scores = jnp.where(newly_finished,
                           top_log_probs / brevity_penalty(alpha, step + 1), NEG_INF)
    scores = jnp.concatenate([state['finished_scores'], new_scores], axis=1)  # [batch, 3k]
    seqs = jnp.concatenate([state['finished_seqs'], top_seqs], axis=1)
    flags = jnp.concatenate([state['finished_flags'], newly_finished], axis=1)
    finished_scores, pick = lax.top_k(scores, k)
    return dict(
        step=step + 1, live_seqs=live_seqs, live_log_probs=live_log_probs,
        finished_seqs=jnp.take_along_axis(seqs, pick[:, :, None], axis=1),
        finished_scores=finished_scores,
        finished_flags=jnp.take_along_axis(flags, pick, axis=1), cache=cache)

  final = _while_in_phases(cond, body, state0, cache_lengths=cache_lengths,
                           grow_cache=grow_cache, max_decode_length=max_decode_length)
  any_finished = jnp.any(final['finished_flags'], axis=1)  # [batch]
  seqs = jnp.where(any_finished[:, None, None], final['finished_seqs'], final['live_seqs'])
  scores = jnp.where(any_finished[:, None], final['finished_scores'], final['live_log_probs'])
  # Best first -> best last.
  return seqs[:, ::-1, 1:], scores[:, ::-1]
