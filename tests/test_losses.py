"""Cross-entropy, z-loss, label smoothing and loss normalization against numpy; the model's loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specialize_jax.model import losses
from specialize_jax.model import models
from tests.test_network import TINY, random_params, _forward

ATOL = 1e-5


def _np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  return logits - log_z[..., None], log_z


def _np_token_loss(logits, targets, label_smoothing, z_loss):
  """Per-token T5X loss with explicit smoothed one-hot targets, in float64."""
  vocab = logits.shape[-1]
  log_probs, log_z = _np_log_softmax(logits)
  on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
  soft = np.full(logits.shape, off)
  np.put_along_axis(soft, np.asarray(targets)[..., None], on, axis=-1)
  entropy = -(on * np.log(on) + (vocab - 1) * off * np.log(off + 1e-20))
  z_term = z_loss * log_z ** 2
  return -np.sum(soft * log_probs, -1) + z_term - entropy, z_term


# A hand case: 2 sequences x 3 positions over a vocabulary of 5; the last target is padding.
LOGITS = np.array([[[2.0, 0.5, -1.0, 0.0, 1.0], [0.1, 0.2, 3.0, -2.0, 0.0],
                    [1.0, 1.0, 1.0, 1.0, 1.0]],
                   [[-3.0, 4.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 5.0, -5.0],
                    [2.0, -1.0, 0.0, 0.0, 3.0]]], np.float32)
TARGETS = np.array([[0, 2, 4], [1, 3, 0]])
WEIGHTS = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], np.float32)


def test_cross_entropy_with_logits_hand_values():
  # One position: logits (0, ln 3) -> p = (1/4, 3/4); log Z = ln 4.
  logits = jnp.array([[0.0, np.log(3.0)]])
  loss, z_term = losses.cross_entropy_with_logits(logits, jnp.array([[0.0, 1.0]]), z_loss=0.1)
  np.testing.assert_allclose(z_term, [0.1 * np.log(4.0) ** 2], rtol=1e-6)
  np.testing.assert_allclose(loss, [-np.log(0.75) + 0.1 * np.log(4.0) ** 2], rtol=1e-6)


@pytest.mark.parametrize('label_smoothing,z_loss', [(0.0, 0.0), (0.1, 1e-4), (0.3, 0.5)])
def test_token_cross_entropy_matches_numpy(label_smoothing, z_loss):
  got, got_z = losses.token_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS),
                                          label_smoothing, z_loss)
  want, want_z = _np_token_loss(LOGITS, TARGETS, label_smoothing, z_loss)
  np.testing.assert_allclose(got, want, atol=ATOL)
  np.testing.assert_allclose(got_z, want_z, atol=ATOL)


@pytest.mark.parametrize('factor', [None, 7.0])
def test_compute_weighted_cross_entropy_matches_numpy(factor):
  loss, z_loss, weight_sum = losses.compute_weighted_cross_entropy(
      jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(WEIGHTS), label_smoothing=0.1,
      z_loss=1e-2, loss_normalizing_factor=factor)
  token_loss, token_z = _np_token_loss(LOGITS, TARGETS, 0.1, 1e-2)
  divisor = factor or 1.0
  np.testing.assert_allclose(loss, np.sum(token_loss * WEIGHTS) / divisor, atol=ATOL)
  np.testing.assert_allclose(z_loss, np.sum(token_z * WEIGHTS) / divisor, atol=ATOL)
  assert float(weight_sum) == 5.0


def test_z_loss_gradient_matches_t5x_formula():
  """d loss / d logits = (1 + 2 z log Z) softmax - targets, T5X's custom gradient."""
  z = 0.2
  grad = jax.grad(lambda x: jnp.sum(losses.token_cross_entropy(x, jnp.asarray(TARGETS),
                                                               0.0, z)[0]))(jnp.asarray(LOGITS))
  log_probs, log_z = _np_log_softmax(LOGITS)
  one_hot = np.eye(5)[TARGETS]
  want = (1 + 2 * z * log_z)[..., None] * np.exp(log_probs) - one_hot
  np.testing.assert_allclose(grad, want, atol=ATOL)


@pytest.mark.parametrize('label_smoothing,z_loss', [(0.0, 0.0), (0.1, 1e-4), (0.3, 0.5)])
def test_token_cross_entropy_gradient_equals_autodiff(label_smoothing, z_loss):
  """The closed-form backward pass against autodiff of the same forward, with cotangents on
  both outputs (the loss and the z-term)."""
  loss_weights = jnp.asarray(np.random.RandomState(0).rand(*TARGETS.shape), jnp.float32)

  def objective(cross_entropy):
    def f(logits):
      loss, z_term = cross_entropy(logits, jnp.asarray(TARGETS), label_smoothing, z_loss)
      return jnp.sum(loss * loss_weights) + 3.0 * jnp.sum(z_term)
    return f

  plain = lambda *args: losses._token_cross_entropy_forward(*args)[0]  # pylint: disable=protected-access
  got = jax.grad(objective(losses.token_cross_entropy))(jnp.asarray(LOGITS))
  want = jax.grad(objective(plain))(jnp.asarray(LOGITS))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert float(jnp.max(jnp.abs(want))) > 0.1  # the comparison is not between near-zeros


def test_loss_normalizing_factors():
  batch = {'decoder_target_tokens': jnp.asarray(TARGETS),
           'decoder_loss_weights': jnp.asarray(WEIGHTS)}
  assert losses.get_loss_normalizing_factor_and_weights(None, batch)[0] is None
  assert losses.get_loss_normalizing_factor_and_weights(3.0, batch)[0] == 3.0
  factor, _ = losses.get_loss_normalizing_factor_and_weights('num_real_target_tokens', batch)
  assert float(factor) == 5.0
  factor, _ = losses.get_loss_normalizing_factor_and_weights(
      losses.SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS, batch)
  assert float(factor) == 6.0
  factor, weights = losses.get_loss_normalizing_factor_and_weights('AVERAGE_PER_SEQUENCE', batch)
  np.testing.assert_allclose(weights, [[1 / 3] * 3, [0.5, 0.5, 0.0]], atol=1e-6)
  assert float(factor) == pytest.approx(2.0)
  with pytest.raises(ValueError, match='NUM_REAL_TARGET_TOKENS'):
    losses.get_loss_normalizing_factor_and_weights('per_token', batch)


def test_average_per_sequence_with_packing_weights_each_segment():
  """Packed row [a a b b b 0]: each segment's tokens share weight 1 / its length."""
  batch = {'decoder_target_tokens': jnp.array([[5, 1, 6, 7, 1, 0]]),
           'decoder_segment_ids': jnp.array([[1, 1, 2, 2, 2, 0]]),
           'decoder_positions': jnp.array([[0, 1, 0, 1, 2, 0]])}
  factor, weights = losses.get_loss_normalizing_factor_and_weights('AVERAGE_PER_SEQUENCE', batch)
  np.testing.assert_allclose(weights, [[0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 0.0]], atol=1e-6)
  assert float(factor) == pytest.approx(2.0)


@pytest.fixture(scope='module')
def params():
  return random_params(TINY, seed=1)


def _logits(params, batch):
  """Teacher-forced logits through test_network's jitted forward (shares its compilation)."""
  return np.asarray(_forward(params, **{k: v for k, v in batch.items()
                                        if k != 'decoder_loss_weights'}))


def _model_batch():
  return {
      'encoder_input_tokens': jnp.array([[5, 6, 7, 8, 1, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 1]]),
      'decoder_input_tokens': jnp.array([[0, 20, 21, 22, 0, 0], [0, 30, 31, 0, 0, 0]]),
      'decoder_target_tokens': jnp.array([[20, 21, 22, 1, 0, 0], [30, 31, 1, 0, 0, 0]]),
      'decoder_loss_weights': jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], jnp.float32),
  }


def test_loss_fn_matches_numpy_reference(params):
  model = models.EncoderDecoderModel(TINY, z_loss=1e-2, label_smoothing=0.1,
                                     loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  batch = _model_batch()
  loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
  logits = _logits(params, batch)
  targets, weights = np.asarray(batch['decoder_target_tokens']), np.asarray(
      batch['decoder_loss_weights'])
  token_loss, token_z = _np_token_loss(logits, targets, 0.1, 1e-2)
  np.testing.assert_allclose(loss, np.sum(token_loss * weights) / 7.0, rtol=1e-5)
  np.testing.assert_allclose(metrics['z_loss'], np.sum(token_z * weights) / 7.0, rtol=1e-5)
  np.testing.assert_allclose(metrics['cross_ent_loss'], float(loss) - float(metrics['z_loss']),
                             rtol=1e-5)
  accuracy = np.sum((logits.argmax(-1) == targets) * weights) / 7.0
  np.testing.assert_allclose(metrics['accuracy'], accuracy, atol=1e-6)
  assert float(metrics['num_tokens']) == 7.0 and float(metrics['num_examples']) == 2.0
  assert float(metrics['loss']) == float(loss)


def test_extra_losses_are_added(params):
  def mean_logit(logits, batch, weights, loss_normalizing_factor):
    del batch, weights, loss_normalizing_factor
    value = jnp.mean(logits)
    return value, {'mean_logit': value}

  batch = _model_batch()
  model = models.EncoderDecoderModel(TINY, extra_losses=(mean_logit,))
  loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
  np.testing.assert_allclose(metrics['mean_logit'], np.mean(_logits(params, batch)), rtol=1e-5)
  np.testing.assert_allclose(
      loss, metrics['cross_ent_loss'] + metrics['z_loss'] + metrics['mean_logit'], rtol=1e-6)
  assert float(metrics['mean_logit']) != 0.0

  clash = lambda logits, batch, **_: (jnp.zeros(()), {'accuracy': jnp.zeros(())})
  with pytest.raises(ValueError, match='accuracy'):
    jax.eval_shape(models.EncoderDecoderModel(TINY, extra_losses=(clash,)).loss_fn, params,
                   batch, None)


def test_score_batch_is_sum_of_target_log_probs(params):
  model = models.EncoderDecoderModel(TINY, z_loss=0.5)  # z-loss must not enter scores
  batch = _model_batch()
  scores, intermediates = jax.jit(model.score_batch, static_argnums=2)(params, batch, True)
  log_probs, _ = _np_log_softmax(_logits(params, batch))
  token = np.take_along_axis(log_probs, np.asarray(batch['decoder_target_tokens'])[..., None],
                             -1)[..., 0] * np.asarray(batch['decoder_loss_weights'])
  np.testing.assert_allclose(scores, token.sum(-1), rtol=1e-5)
  np.testing.assert_allclose(intermediates['token_scores'], token, atol=1e-5)


def test_get_initial_variables_gives_t5x_tree():
  model = models.EncoderDecoderModel(TINY)
  variables = jax.eval_shape(lambda: model.get_initial_variables(
      jax.random.key(0), {'encoder_input_tokens': (2, 8), 'decoder_input_tokens': (2, 6)}))
  shapes = nn.meta.unbox(variables)['params']
  assert set(shapes) == {'token_embedder', 'encoder', 'decoder'}
  assert shapes['decoder']['logits_dense']['kernel'].shape == (16, 64)
  with pytest.raises(ValueError, match='decoder_input_tokens'):
    model.get_initial_variables(jax.random.key(0), {'encoder_input_tokens': (2, 8)})
