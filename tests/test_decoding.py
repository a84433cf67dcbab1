"""Decoding: searches on a hand-made bigram model, then the cached T5 decoder against re-runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specialize_jax.model import decoding
from specialize_jax.model import models
from specialize_jax.model import network
from tests.test_network import TINY, _batch, _forward, random_params

# A bigram "language model" over 6 ids (0 BOS, 1 EOS): row = previous token, column = next.
# Greedy takes 2 (0.6) then 4 (0.25) then EOS (0.9): log-prob ln(.6 * .25 * .9) = -2.00.
# The best sequence is 3 then EOS: ln(.4 * .99) = -0.93, which beam search with 2 beams finds.
_EPS = 1e-6
BIGRAM = np.array([
    [_EPS, _EPS, 0.6, 0.4, _EPS, _EPS],
    [1.0, _EPS, _EPS, _EPS, _EPS, _EPS],
    [_EPS, 0.15, 0.2, 0.2, 0.25, 0.2],
    [_EPS, 0.99, _EPS, _EPS, 0.01, _EPS],
    [_EPS, 0.9, _EPS, _EPS, _EPS, 0.1],
    [_EPS, 0.9, 0.1, _EPS, _EPS, _EPS],
])
LOG_BIGRAM = jnp.asarray(np.log(BIGRAM / BIGRAM.sum(1, keepdims=True)), jnp.float32)
GREEDY_LOG_PROB = float(LOG_BIGRAM[0, 2] + LOG_BIGRAM[2, 4] + LOG_BIGRAM[4, 1])
BEST_LOG_PROB = float(LOG_BIGRAM[0, 3] + LOG_BIGRAM[3, 1])


def bigram_step(token_ids, cache):
  """`tokens_to_logits` of the bigram model; the cache counts the calls (steps run)."""
  return LOG_BIGRAM[token_ids[:, 0]], {'calls': cache['calls'] + 1}


def _bigram_cache():
  return {'calls': jnp.zeros((), jnp.int32)}


def test_bigram_greedy_and_beam():
  seqs, scores = jax.jit(lambda: decoding.greedy_decode(
      bigram_step, _bigram_cache(), batch_size=1, max_decode_length=5))()
  np.testing.assert_array_equal(seqs, [[[2, 4, 1, 0, 0]]])
  np.testing.assert_allclose(scores, [[GREEDY_LOG_PROB]], rtol=1e-5)

  beam = jax.jit(lambda k: decoding.beam_search(
      bigram_step, _bigram_cache(), batch_size=1, beam_size=k, max_decode_length=5, alpha=0.0),
                 static_argnums=0)
  seqs, scores = beam(1)
  np.testing.assert_array_equal(seqs, [[[2, 4, 1, 0, 0]]])
  np.testing.assert_allclose(scores, [[GREEDY_LOG_PROB]], rtol=1e-5)
  seqs, scores = beam(2)
  np.testing.assert_array_equal(seqs[0, -1], [3, 1, 0, 0, 0])  # best last
  np.testing.assert_allclose(scores[0, -1], BEST_LOG_PROB, rtol=1e-5)
  assert scores[0, 0] <= scores[0, 1]


def test_first_argmax_equals_jnp_argmax_with_ties_nans_and_infinities():
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 3, size=(6, 50)).astype(np.float32)  # many ties
  logits[1, [7, 20]] = np.nan
  logits[2] = -np.inf
  logits[3, 5] = np.inf
  logits[4, 49] = 10.0  # the last index
  logits[5] = 2.0  # all equal
  got = jax.jit(decoding.first_argmax)(jnp.asarray(logits))
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(logits), axis=-1))
  np.testing.assert_array_equal(got, [np.argmax(logits[0]), 7, 0, 5, 49, 0])


def test_brevity_penalty_formula():
  np.testing.assert_allclose(decoding.brevity_penalty(0.6, 7), ((5 + 7) / 6) ** 0.6, rtol=1e-6)
  assert float(decoding.brevity_penalty(0.0, 7)) == 1.0


def test_rows_stop_after_eos_and_the_loop_stops_when_all_are_done():
  """Row r emits EOS at step r; after EOS a row holds 0 and the loop ends with the last row."""
  steps_run = []

  def step(token_ids, cache):
    del token_ids
    jax.debug.callback(steps_run.append, cache['step'])
    eos_now = cache['step'] >= cache['eos_step']  # [rows]
    logits = jnp.where(eos_now[:, None], jax.nn.one_hot(1, 6), jax.nn.one_hot(2, 6)) * 10.0
    return logits, dict(cache, step=cache['step'] + 1)

  want = [[1, 0, 0, 0, 0, 0, 0, 0], [2, 2, 1, 0, 0, 0, 0, 0], [2, 1, 0, 0, 0, 0, 0, 0]]
  cache = {'step': jnp.zeros((), jnp.int32), 'eos_step': jnp.array([0, 2, 1])}
  seqs, _ = jax.jit(lambda: decoding.greedy_decode(step, cache, batch_size=3,
                                                   max_decode_length=8))()
  np.testing.assert_array_equal(seqs[:, 0], want)
  assert len(steps_run) == 3  # not 8

  steps_run.clear()
  beam_cache = dict(cache, eos_step=jnp.repeat(cache['eos_step'], 2))
  seqs, _ = jax.jit(lambda: decoding.beam_search(step, beam_cache, batch_size=3, beam_size=2,
                                                 max_decode_length=8, alpha=0.0))()
  np.testing.assert_array_equal(seqs[:, -1], want)
  assert len(steps_run) < 8


def test_cache_lengths_split_the_decode_into_rounded_phases():
  assert decoding.cache_lengths(128, 4) == (32, 64, 96, 128)
  assert decoding.cache_lengths(80, 4) == (24, 40, 64, 80)  # multiples of 8, then the end
  assert decoding.cache_lengths(20, 4) == (8, 16, 20)  # fewer phases when short
  assert decoding.cache_lengths(6, 4) == (6,)
  assert decoding.cache_lengths(128, 1) == (128,)
  with pytest.raises(ValueError, match='num_phases'):
    decoding.cache_lengths(128, 0)


def test_phased_loops_grow_the_cache_between_phases_and_give_the_same_search():
  grown = []

  def grow(cache, length):
    grown.append(length)
    return dict(cache, length=jnp.asarray(length, jnp.int32))

  def step(token_ids, cache):  # the bigram, plus a check that the cache always has room
    logits, _ = bigram_step(token_ids, cache)
    room = cache['calls'] < cache['length']
    return jnp.where(room, logits, jnp.nan), dict(cache, calls=cache['calls'] + 1)

  cache = dict(_bigram_cache(), length=jnp.asarray(2, jnp.int32))
  phased = dict(cache_lengths=(2, 4, 5), grow_cache=grow)
  seqs, scores = jax.jit(lambda: decoding.greedy_decode(
      step, cache, batch_size=1, max_decode_length=5, **phased))()
  np.testing.assert_array_equal(seqs, [[[2, 4, 1, 0, 0]]])  # 3 steps: across two phases
  np.testing.assert_allclose(scores, [[GREEDY_LOG_PROB]], rtol=1e-5)
  assert grown == [4, 5]
  seqs, scores = jax.jit(lambda: decoding.beam_search(
      step, cache, batch_size=1, beam_size=2, max_decode_length=5, alpha=0.0, **phased))()
  np.testing.assert_array_equal(seqs[0, -1], [3, 1, 0, 0, 0])
  np.testing.assert_allclose(scores[0, -1], BEST_LOG_PROB, rtol=1e-5)

  decode = lambda **kw: decoding.greedy_decode(step, cache, batch_size=1, max_decode_length=5,
                                               **kw)
  with pytest.raises(ValueError, match='must end at max_decode_length=5'):
    decode(cache_lengths=(2, 4), grow_cache=grow)
  with pytest.raises(ValueError, match='must increase'):
    decode(cache_lengths=(4, 2, 5), grow_cache=grow)
  with pytest.raises(ValueError, match='needs grow_cache'):
    decode(cache_lengths=(2, 5))


def test_sampling_top_k_and_top_p_on_the_bigram():
  sample = jax.jit(lambda rng, temperature, topk, topp: decoding.temperature_sample(
      bigram_step, _bigram_cache(), batch_size=1, max_decode_length=5, rng=rng, num_decodes=16,
      temperature=temperature, topk=topk, topp=topp), static_argnums=(2, 3))
  # rbg keys compile faster than threefry on CPU; the searches accept any key type.
  key = jax.random.key(0, impl='rbg')
  free, free_scores = sample(key, 1.0, 0, 1.0)
  assert len({tuple(s) for s in np.asarray(free[0])}) > 1  # samples differ
  assert set(np.asarray(free[0, :, 0])) == {2, 3}
  assert np.all(np.diff(free_scores[0]) >= 0)  # increasing score, best last
  top1, _ = sample(key, 1.0, 1, 1.0)
  np.testing.assert_array_equal(top1[0], np.tile([2, 4, 1, 0, 0], (16, 1)))
  # p(2 | BOS) = 0.6 >= 0.5, so nucleus sampling with topp=0.5 never starts with 3.
  nucleus, _ = sample(key, 1.0, 0, 0.5)
  assert set(np.asarray(nucleus[0, :, 0])) == {2}
  with pytest.raises(ValueError, match='topp'):
    sample(key, 1.0, 0, 0.0)


# -- the T5 decoder ------------------------------------------------------------------------------

# Random weights scaled so greedy outputs vary; with EOS = 4 one row ends at step 0 and one at
# step 2, the other two run to the maximum length (asserted below, so the test stays meaningful).
EOS = 4
MAX_LENGTH = 6


@pytest.fixture(scope='module')
def params():
  return jax.tree_util.tree_map(lambda x: 2.0 * x if x.ndim == 2 else x,
                                random_params(TINY, seed=2))


@pytest.fixture(scope='module')
def model():
  return models.EncoderDecoderModel(TINY, eos_id=EOS)


@pytest.fixture(scope='module')
def batch():
  return _batch(jax.random.key(11), 4, 8, MAX_LENGTH)


@pytest.fixture(scope='module')
def greedy(model, params, batch):
  seqs, aux = model.predict_batch_with_aux(params, batch, decode_method='greedy')
  return np.asarray(seqs), np.asarray(aux['scores'])


def test_greedy_equals_argmax_of_full_forward_reruns(params, batch, greedy):
  """Re-run the whole decoder on the prefix so far (no cache) and take the argmax each step."""
  enc = batch['encoder_input_tokens']
  dec_in = np.zeros((4, MAX_LENGTH), np.int32)
  want = np.zeros((4, MAX_LENGTH), np.int32)
  log_prob = np.zeros(4)
  ended = np.zeros(4, bool)
  for i in range(MAX_LENGTH):
    # Future positions are causally masked, so the zeros after the prefix do not matter.
    logits = np.asarray(_forward(params, encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                                 decoder_target_tokens=np.ones_like(dec_in)))[:, i]
    token = np.where(ended, 0, logits.argmax(-1))
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    log_prob += np.where(ended, 0.0, log_probs[np.arange(4), token])
    want[:, i] = token
    if i + 1 < MAX_LENGTH:
      dec_in[:, i + 1] = token
    ended |= token == EOS
  seqs, scores = greedy
  np.testing.assert_array_equal(seqs, want)
  np.testing.assert_allclose(scores, log_prob, rtol=1e-4)
  # The case is meaningful: some rows end early (then hold 0), some run to the end.
  assert 0 < ended.sum() < 4
  eos_position = (seqs == EOS).argmax(-1)
  for row in np.flatnonzero(ended):
    assert np.all(seqs[row, eos_position[row] + 1:] == 0)


def test_greedy_scores_equal_score_batch(model, params, batch, greedy):
  seqs, scores = greedy
  weights = np.cumsum(seqs == EOS, axis=-1) - (seqs == EOS) == 0  # up to and including EOS
  scored = jax.jit(model.score_batch)(params, {
      'encoder_input_tokens': batch['encoder_input_tokens'],
      'decoder_input_tokens': np.pad(seqs[:, :-1], ((0, 0), (1, 0))),
      'decoder_target_tokens': np.where(weights, seqs, 0),
      'decoder_loss_weights': weights.astype(np.float32)})
  np.testing.assert_allclose(scored, scores, rtol=1e-4)


@pytest.mark.slow
def test_sampling_limits_equal_greedy_and_samples_differ(model, params, batch, greedy):
  seqs, _ = greedy
  kwargs = dict(decode_method='sample', num_decodes=3, return_all_decodes=True)
  key = jax.random.key(1, impl='rbg')
  cold, _ = model.predict_batch_with_aux(params, batch, key, temperature=1e-4, **kwargs)
  np.testing.assert_array_equal(cold, np.repeat(seqs[:, None], 3, axis=1))
  top1, _ = model.predict_batch_with_aux(params, batch, key, temperature=1.0, topk=1,
                                         **kwargs)
  np.testing.assert_array_equal(top1, np.repeat(seqs[:, None], 3, axis=1))
  hot, aux = model.predict_batch_with_aux(params, batch, key, temperature=1.0, **kwargs)
  assert hot.shape == (4, 3, MAX_LENGTH) and aux['scores'].shape == (4, 3)
  assert any(len({tuple(s) for s in np.asarray(row)}) > 1 for row in hot)
  assert np.all(np.diff(np.asarray(aux['scores']), axis=1) >= 0)


@pytest.mark.slow
def test_beam_search_on_the_model(model, params, batch, greedy):
  seqs, scores = greedy
  one, aux = model.predict_batch_with_aux(params, batch, decode_method='beam', num_decodes=1,
                                          alpha=0.0)
  np.testing.assert_array_equal(one, seqs)
  np.testing.assert_allclose(aux['scores'], scores, rtol=1e-4)
  four, aux = model.predict_batch_with_aux(params, batch, decode_method='beam', num_decodes=4,
                                           alpha=0.0, return_all_decodes=True)
  assert four.shape == (4, 4, MAX_LENGTH)
  assert np.all(np.asarray(aux['scores'])[:, -1] >= scores - 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('method, options', [
    ('greedy', {}), ('sample', dict(num_decodes=3, temperature=1.0)),
    ('beam', dict(num_decodes=3, alpha=0.6))])
def test_cache_phases_give_the_same_decodes_as_one_loop(params, method, options):
  """20 tokens: phases over caches of 8, 16 and 20 positions decode as one 20-position loop."""
  batch = _batch(jax.random.key(11), 4, 8, 20)
  key = jax.random.key(1, impl='rbg')
  decodes = {}
  for phases in (1, 4):
    model = models.EncoderDecoderModel(TINY, eos_id=EOS, decode_cache_phases=phases)
    decodes[phases] = model.predict_batch_with_aux(params, batch, key, decode_method=method,
                                                   return_all_decodes=True, **options)
  np.testing.assert_array_equal(decodes[4][0], decodes[1][0])
  np.testing.assert_allclose(decodes[4][1]['scores'], decodes[1][1]['scores'], rtol=1e-5)
  assert decoding.cache_lengths(20, 4) == (8, 16, 20)
  assert np.any(np.asarray(decodes[1][0])[..., 16:] != 0)  # some rows reach the last phase


@pytest.mark.slow
def test_grow_self_attention_cache_pads_only_self_attention(params, batch):
  model = models.EncoderDecoderModel(TINY, eos_id=EOS)
  module = model.module
  encoded = module.apply({'params': params}, batch['encoder_input_tokens'],
                         method=module.encode)
  _, variables = module.apply({'params': params}, encoded, batch['encoder_input_tokens'],
                              jnp.zeros((4, 3), jnp.int32), decode=True, mutable=['cache'],
                              method=module.decode)
  cache = jax.tree.map(lambda x: x + 1, variables['cache'])  # nonzero, to see what moves
  grown = network.grow_self_attention_cache(cache, 7)
  layer, new_layer = cache['decoder']['layers_0'], grown['decoder']['layers_0']
  for name in ('cached_key', 'cached_value'):
    old, new = layer['self_attention'][name], new_layer['self_attention'][name]
    assert new.shape == old.shape[:2] + (7,) + old.shape[3:]
    np.testing.assert_array_equal(new[:, :, :3], old)
    assert not np.any(new[:, :, 3:])
    np.testing.assert_array_equal(new_layer['encoder_decoder_attention'][name],
                                  layer['encoder_decoder_attention'][name])
  assert int(grown['decoder']['cache_index']) == int(cache['decoder']['cache_index'])
  with pytest.raises(ValueError, match='shrink'):
    network.grow_self_attention_cache(cache, 2)


def test_predict_batch_rejects_bad_options(model, params, batch):
  with pytest.raises(ValueError, match='num_decodes'):
    model.predict_batch(params, batch, decode_method='greedy', num_decodes=2)
  with pytest.raises(ValueError, match='rng'):
    model.predict_batch(params, batch, decode_method='sample')
  with pytest.raises(ValueError, match='decode_method'):
    model.predict_batch(params, batch, decode_method='nucleus')
  with pytest.raises(ValueError, match='decoder_params'):
    model.predict_batch(params, batch, decoder_params={'beam_size': 2})
