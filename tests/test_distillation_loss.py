"""The teacher KL (distribution matching) against numpy, finite differences and cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specialize_jax.data import feature_converters
from specialize_jax.model import distillation_loss
from specialize_jax.model import models
from tests.test_losses import _logits as _model_logits
from tests.test_losses import _model_batch
from tests.test_network import TINY, random_params

PAD = feature_converters.TEACHER_PAD_LOGPROB
K = 3


def _logits(params, batch):
  return _model_logits(params, {k: v for k, v in batch.items() if not k.startswith('teacher_')})


@pytest.fixture(scope='module')
def params():
  return random_params(TINY, seed=3)


def _np_kl(logits, ids, logprobs, weights, renormalize=False):
  """sum_t w_t sum_j p_j (log p_j - log q(id_j)) in float64, padding slots skipped explicitly."""
  logits = np.asarray(logits, np.float64)
  log_q = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                 keepdims=True)) - logits.max(-1, keepdims=True)
  total = 0.0
  for b in range(ids.shape[0]):
    for t in range(ids.shape[1]):
      real = logprobs[b, t] > PAD / 2
      lp = np.asarray(logprobs[b, t][real], np.float64)
      if renormalize:
        lp = lp - np.log(np.sum(np.exp(lp)))
      kl = np.sum(np.exp(lp) * (lp - log_q[b, t, ids[b, t][real]]))
      total += weights[b, t] * kl
  return total


def _teacher_batch(seed=0):
  """The model batch plus top-3 teacher rows: a real distribution on some positions, one-hot on
  the rest (as the feature converter writes them)."""
  batch = {k: np.asarray(v) for k, v in _model_batch().items()}
  targets = batch['decoder_target_tokens']
  rng = np.random.default_rng(seed)
  ids = np.zeros(targets.shape + (K,), np.int32)
  logprobs = np.full(targets.shape + (K,), PAD, np.float32)
  ids[..., 0] = targets
  logprobs[..., 0] = 0.0
  for b, t in [(0, 0), (0, 2), (1, 1)]:
    others = rng.choice([i for i in range(2, 64) if i != targets[b, t]], K - 1, replace=False)
    ids[b, t] = [targets[b, t], *others]
    probs = np.array([0.6, 0.25, 0.1])  # top-3 mass 0.95, as an API's top-k
    logprobs[b, t] = np.log(probs)
  batch['teacher_topk_ids'] = ids
  batch['teacher_topk_logprobs'] = logprobs
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.slow
@pytest.mark.parametrize('renormalize', [False, True])
@pytest.mark.parametrize('factor', [None, 'NUM_REAL_TARGET_TOKENS'])
def test_kl_matches_numpy(params, renormalize, factor):
  batch = _teacher_batch()
  model = models.EncoderDecoderModel(TINY, z_loss=0.0, loss_type='distribution',
                                     renormalize_teacher=renormalize,
                                     loss_normalizing_factor=factor)
  loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
  weights = np.asarray(batch['decoder_loss_weights'])
  want = _np_kl(_logits(params, batch), np.asarray(batch['teacher_topk_ids']),
                np.asarray(batch['teacher_topk_logprobs']), weights, renormalize)
  if factor:
    want /= weights.sum()
  np.testing.assert_allclose(metrics['kl'], want, rtol=1e-5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)  # ce_weight 0, z-loss 0: the loss is the KL
  # 3 of the 7 weighted positions carry 0.95 of mass, the rest are one-hot.
  np.testing.assert_allclose(metrics['teacher_mass'], (4 + 3 * 0.95) / 7, rtol=1e-6)
  assert float(metrics['cross_ent_loss']) > float(metrics['kl'])  # CE is reported, not trained


@pytest.mark.slow
@pytest.mark.parametrize('with_weights', [True, False])
@pytest.mark.parametrize('rows', ['converter', 'one_hot_teacher'])
def test_one_hot_teacher_is_cross_entropy(params, with_weights, rows):
  """One-hot rows from the feature converter (k slots) or `one_hot_teacher` (k = 1, used by the
  T5X bridge's training eval) turn the KL into the cross-entropy."""
  batch = dict(_model_batch())
  if not with_weights:  # then both losses count every position, padding included
    del batch['decoder_loss_weights']
  targets = np.asarray(batch['decoder_target_tokens'])
  if rows == 'converter':
    one_hot = feature_converters.one_hot_teacher_features(targets, K)
  else:
    one_hot = distillation_loss.one_hot_teacher(jnp.asarray(targets))
  batch.update({k: jnp.asarray(np.asarray(v)) for k, v in one_hot.items()})
  sample = models.EncoderDecoderModel(TINY, z_loss=1e-3, loss_normalizing_factor=3.0)
  distribution = models.EncoderDecoderModel(TINY, z_loss=1e-3, loss_normalizing_factor=3.0,
                                            loss_type='distribution')
  sample_loss, sample_metrics = jax.jit(sample.loss_fn)(params, batch, None)
  kl_loss, kl_metrics = jax.jit(distribution.loss_fn)(params, batch, None)
  np.testing.assert_allclose(kl_metrics['kl'], sample_metrics['cross_ent_loss'], rtol=1e-5)
  np.testing.assert_allclose(kl_loss, sample_loss, rtol=1e-5)
  np.testing.assert_allclose(kl_metrics['teacher_mass'], 1.0, rtol=1e-6)
  assert 'kl' not in sample_metrics


def test_ce_weight_mixes_the_two(params):
  batch = _teacher_batch()
  mixed = models.EncoderDecoderModel(TINY, z_loss=1e-3, loss_type='distribution',
                                     distribution_ce_weight=0.25)
  loss, metrics = jax.jit(mixed.loss_fn)(params, batch, None)
  want = 0.25 * metrics['cross_ent_loss'] + 0.75 * metrics['kl'] + metrics['z_loss']
  np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.slow
def test_gradient_matches_finite_differences(params):
  batch = _teacher_batch(seed=1)
  model = models.EncoderDecoderModel(TINY, z_loss=0.0, loss_type='distribution',
                                     loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  loss = jax.jit(lambda p: model.loss_fn(p, batch, None)[0])
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, None)[0]))(params)
  rng = np.random.default_rng(0)
  direction = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
  norm = np.sqrt(sum(float(jnp.sum(d * d)) for d in jax.tree_util.tree_leaves(direction)))
  direction = jax.tree_util.tree_map(lambda d: d / norm, direction)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                       jax.tree_util.tree_leaves(direction)))
  eps = 1e-2
  shifted = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * eps * d, params, direction)
  numeric = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * eps)
  assert abs(analytic) > 1e-3  # a real slope, so the comparison means something
  np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


def test_distribution_loss_without_teacher_features_names_the_fix(params):
  model = models.EncoderDecoderModel(TINY, loss_type='distribution')
  with pytest.raises(ValueError, match='teacher_topk_ids.*specialize align'):
    jax.eval_shape(model.loss_fn, params, _model_batch(), None)


@pytest.mark.parametrize('kwargs,match', [
    ({'loss_type': 'kl'}, 'loss_type'),
    ({'loss_type': 'sample', 'distribution_ce_weight': 0.5}, 'distribution'),
    ({'loss_type': 'distribution', 'distribution_ce_weight': 1.0}, r'\[0, 1\)'),
])
def test_bad_loss_settings_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.EncoderDecoderModel(TINY, **kwargs)


def test_token_kl_is_zero_when_student_equals_renormalized_teacher():
  probs = np.array([0.5, 0.3, 0.2])
  logits = np.full((1, 1, 8), -50.0, np.float32)
  logits[0, 0, [2, 5, 7]] = np.log(probs)
  kl = distillation_loss.token_kl(jnp.asarray(logits), jnp.asarray([[[2, 5, 7]]]),
                                  jnp.asarray(np.log(probs * 0.9)[None, None], jnp.float32),
                                  renormalize=True)
  np.testing.assert_allclose(kl, [[0.0]], atol=1e-5)


def test_feature_names_agree_with_the_converter():
  # The model layer names the features without importing TensorFlow; both must stay equal.
  assert distillation_loss.TEACHER_TOPK_IDS == feature_converters.TEACHER_TOPK_IDS
  assert distillation_loss.TEACHER_TOPK_LOGPROBS == feature_converters.TEACHER_TOPK_LOGPROBS
