"""The train step: gradient accumulation equals one full batch (every loss normalizing factor),
sharded accumulation equals the single-device step, loss falls, optimizers and schedules.

Compiling a T5 train step costs seconds on CPU, so T5 steps are compiled once per module (fixtures)
and the accumulation arithmetic for every loss normalizing factor runs on a small linear model that
shares `EncoderDecoderModel.loss_fn`.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specialize_jax import errors
from specialize_jax.model import config as config_lib
from specialize_jax.model import distillation_loss
from specialize_jax.model import models
from specialize_jax.model import network
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.training import train_state as train_state_lib
from specialize_jax.training import train_step as train_step_lib
from tests.support import hlo
from tests.support import tiny_model

VOCAB = 128
TINY = config_lib.get_config('tiny', vocab_size=VOCAB, dropout_rate=0.0)
BATCH, INPUT_LENGTH, TARGET_LENGTH = 8, 6, 5
# Target lengths per row: the strided micro-batches (rows i, i+k, ...) get different token counts.
TARGET_LENGTHS = (1, 5, 2, 5, 3, 4, 1, 5)
TOL = dict(atol=1e-5, rtol=1e-5)
# eps=1e-3: Adam's first update is ~lr*sign(g), which would turn round-off in near-zero gradients
# into lr-sized differences between equal computations; a larger eps keeps updates Lipschitz.
OPTIMIZER_CONFIG = optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-3)
NUM_TRAIN_STEPS = 100


def random_params(config, seed=0):
  """Random float32 numpy params in T5X's tree (the real initializer costs seconds)."""
  return tiny_model.random_params(config, seed, as_numpy=True)


def make_batch(seed=0, target_lengths=TARGET_LENGTHS, vocab=VOCAB):
  """A host batch `[BATCH, length]` with per-row target lengths."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab, (BATCH, INPUT_LENGTH)).astype(np.int32)
  targets = rng.integers(2, vocab, (BATCH, TARGET_LENGTH)).astype(np.int32)
  targets = np.where(np.arange(TARGET_LENGTH) < np.array(target_lengths)[:, None], targets, 0)
  return dict(encoder_input_tokens=inputs, decoder_target_tokens=targets,
              decoder_input_tokens=np.pad(targets[:, :-1], ((0, 0), (1, 0))),
              decoder_loss_weights=(targets > 0).astype(np.float32))


def make_mesh(data, model):
  config = partitioning.PartitioningConfig(num_partitions=model)
  return partitioning.make_mesh(config, jax.devices()[:data * model])


def run_step(model, mesh, num_microbatches, params, batch, num_steps=1,
             rules=partitioning.STANDARD_LOGICAL_AXIS_RULES):
  """`num_steps` jitted steps from `params` on `mesh` with one repeated batch.

  Returns the final state and, per step, `(host params after the step, host metrics)`.
  """
  optimizer = optimizers.make_optimizer(OPTIMIZER_CONFIG, NUM_TRAIN_STEPS)
  state, shardings = train_state_lib.create_train_state(
      model, optimizer, mesh, rules, jax.random.key(0), init_params_fn=lambda: params)
  step = train_step_lib.make_train_step(model, optimizer, shardings, mesh, num_microbatches,
                                        rules=rules)
  global_batch = partitioning.global_batch(batch, mesh)
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, global_batch, jax.random.key(1))
    history.append((jax.device_get(state.params), jax.device_get(metrics)))
  return state, history


@pytest.fixture(scope='module')
def t5_model():
  return models.EncoderDecoderModel(TINY, loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')


@pytest.fixture(scope='module')
def single_device_steps(t5_model):
  """20 single-device steps on one repeated batch: the reference and the loss curve."""
  return run_step(t5_model, make_mesh(1, 1), 1, random_params(TINY), make_batch(), num_steps=20)


# -- the T5 step ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_falls_on_a_repeated_batch(single_device_steps):
  state, history = single_device_steps
  metrics = [m for _, m in history]
  losses = [float(m['loss']) for m in metrics]
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 20
  assert metrics[0]['num_target_tokens'] == sum(TARGET_LENGTHS)
  assert metrics[0]['learning_rate'] == pytest.approx(1e-2)
  assert metrics[-1]['accuracy'] > metrics[0]['accuracy']
  assert set(metrics[0]) >= {'loss', 'cross_ent_loss', 'z_loss', 'accuracy', 'learning_rate',
                             'grad_norm', 'num_target_tokens'}
  assert all(np.asarray(m['loss']).shape == () for m in metrics)


@pytest.mark.slow
def test_sharded_accumulated_step_equals_single_device_full_batch(t5_model, single_device_steps):
  """4x2 mesh, 2 micro-batches with 10 and 20 real target tokens, against one full batch."""
  batch = make_batch()
  counts = [float(train_step_lib.microbatch(batch, i, 2)['decoder_loss_weights'].sum())
            for i in range(2)]
  assert counts[0] != counts[1]
  _, reference = single_device_steps
  state, history = run_step(t5_model, make_mesh(4, 2), 2, random_params(TINY), batch, num_steps=2)
  for step in range(2):
    params, metrics = history[step]
    reference_params, reference_metrics = reference[step]
    for name in ('loss', 'cross_ent_loss', 'z_loss', 'accuracy', 'num_target_tokens',
                 'grad_norm'):
      np.testing.assert_allclose(metrics[name], reference_metrics[name], **TOL, err_msg=name)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), params,
                           reference_params)
  wi_0 = state.params['encoder']['layers_0']['mlp']['wi_0']['kernel']
  assert wi_0.sharding.spec == jax.sharding.PartitionSpec(None, 'model')


def test_bad_batch_size_fails_before_compiling(t5_model):
  mesh = make_mesh(4, 2)
  optimizer = optimizers.make_optimizer(OPTIMIZER_CONFIG, NUM_TRAIN_STEPS)
  abstract, shardings = train_state_lib.abstract_train_state(
      t5_model, optimizer, mesh, partitioning.STANDARD_LOGICAL_AXIS_RULES)
  step = train_step_lib.make_train_step(t5_model, optimizer, shardings, mesh, 4)
  with pytest.raises(ValueError, match=r'BATCH_SIZE=8 does not split into 4 micro-batches'):
    step.lower(abstract, make_batch(), jax.random.key(0))


# -- accumulation arithmetic on a linear model ---------------------------------------------------


class LinearModel(models.EncoderDecoderModel):
  """`EncoderDecoderModel.loss_fn` over cheap logits: a bag of input ids plus the previous token."""

  dropout = False  # set on an instance to drop half the hidden units when given a key

  def compute_logits(self, params, batch, dropout_rng=None):
    context = jnp.mean(params['embed'][batch['encoder_input_tokens']], axis=1)  # [batch, dim]
    hidden = params['embed'][batch['decoder_input_tokens']] + context[:, None, :]
    if self.dropout and dropout_rng is not None:
      hidden = hidden * 2.0 * jax.random.bernoulli(dropout_rng, 0.5, hidden.shape)
    return jnp.tanh(hidden) @ params['out']  # [batch, length, vocab]


def linear_params(seed=0, dim=8):
  rng = np.random.default_rng(seed)
  return {'embed': rng.standard_normal((VOCAB, dim)).astype(np.float32),
          'out': (rng.standard_normal((dim, VOCAB)) / np.sqrt(dim)).astype(np.float32)}


def _linear_steps(model, batch, microbatch_counts=(1, 2, 4)):
  """One SGD step (lr 1, so params carry the gradient) per micro-batch count, compiled together;
  also the plain mean of the 2 micro-batch losses (what unweighted accumulation would report)."""
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  params = jax.tree_util.tree_map(jnp.asarray, linear_params())
  state = train_state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                     opt_state=optimizer.init(params))

  def steps(state, batch, rng):
    results = {k: train_step_lib.train_step(state, batch, rng, model=model, optimizer=optimizer,
                                            num_microbatches=k) for k in microbatch_counts}
    plain_mean = jnp.mean(jnp.stack([
        model.loss_fn(state.params, train_step_lib.microbatch(batch, i, 2), None)[0]
        for i in range(2)]))
    return results, plain_mean

  return jax.jit(steps)(state, batch, jax.random.key(0))


def _packed_batch(teacher_k=3):
  """Two packed segments in some rows, so AVERAGE_PER_SEQUENCE weighs segments; teacher top-k
  features whose mass varies by row (below one), so `teacher_mass` is a real weighted mean."""
  batch = make_batch(seed=3)
  segments = np.where(batch['decoder_target_tokens'] > 0, 1, 0)
  segments[::3, 2:] = np.where(batch['decoder_target_tokens'][::3, 2:] > 0, 2, 0)
  batch['decoder_segment_ids'] = segments.astype(np.int32)
  rng = np.random.default_rng(4)
  shape = (BATCH, TARGET_LENGTH, teacher_k)
  batch[distillation_loss.TEACHER_TOPK_IDS] = rng.integers(2, VOCAB, shape).astype(np.int32)
  probs = rng.dirichlet(np.ones(teacher_k + 1), shape[:2])[..., :teacher_k]  # mass < 1
  batch[distillation_loss.TEACHER_TOPK_LOGPROBS] = np.log(probs).astype(np.float32)
  return batch


# Every metric the step reports; the distribution loss adds `kl` and `teacher_mass`.
STEP_METRICS = ('loss', 'cross_ent_loss', 'z_loss', 'accuracy', 'num_target_tokens', 'grad_norm',
                'num_examples', 'learning_rate')


@pytest.mark.slow
@pytest.mark.parametrize('loss_type', ['sample', 'distribution'])
@pytest.mark.parametrize('factor', [None, 'NUM_REAL_TARGET_TOKENS',
                                    'NUM_TOTAL_TARGET_TOKENS', 'AVERAGE_PER_SEQUENCE'])
def test_accumulation_equals_full_batch(factor, loss_type):
  """k = 2 and 4 micro-batches (with different token counts) against one full batch: params and
  every logged metric (before the fix, `teacher_mass` and `accuracy`-like means came out
  multiplied by k without a loss normalizing factor)."""
  model = LinearModel(TINY, loss_normalizing_factor=factor, z_loss=1e-2, label_smoothing=0.1,
                      loss_type=loss_type,
                      distribution_ce_weight=0.5 if loss_type == 'distribution' else 0.0)
  batch = {k: jnp.asarray(v) for k, v in _packed_batch().items()}
  results, plain_mean = _linear_steps(model, batch)
  full_state, full_metrics = results[1]
  expected_names = set(STEP_METRICS) | ({'kl', 'teacher_mass'} if loss_type == 'distribution'
                                        else set())
  assert set(full_metrics) == expected_names
  if loss_type == 'distribution':
    assert 0.3 < float(full_metrics['teacher_mass']) < 0.95
  for num_microbatches in (2, 4):
    state, metrics = results[num_microbatches]
    assert set(metrics) == expected_names
    for name in sorted(expected_names):
      np.testing.assert_allclose(metrics[name], full_metrics[name], **TOL,
                                 err_msg=f'{name}, k={num_microbatches}')
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), state.params,
                           full_state.params)
  if factor == 'NUM_REAL_TARGET_TOKENS':
    # The micro-batches hold different token counts, so unweighted averaging would be wrong.
    assert abs(float(plain_mean) - float(full_metrics['loss'])) > 1e-3


def test_packed_num_examples_counts_segments():
  """Packed rows hold several examples: `num_examples` counts segments, not rows."""
  batch = _packed_batch()
  segments = batch['decoder_segment_ids']
  expected = sum(len(set(row[row > 0].tolist())) for row in segments)
  assert expected > BATCH  # some rows hold two examples
  model = LinearModel(TINY)
  _, metrics = model.loss_fn(linear_params(), {k: jnp.asarray(v) for k, v in batch.items()}, None)
  assert float(metrics['num_examples']) == expected
  del batch['decoder_segment_ids']  # unpacked: one example per row
  _, metrics = model.loss_fn(linear_params(), {k: jnp.asarray(v) for k, v in batch.items()}, None)
  assert float(metrics['num_examples']) == BATCH


def test_microbatch_without_targets_adds_nothing():
  """Rows 0, 2, 4, 6 (micro-batch 0 of 2) have no real targets: its 0/0 loss must not leak."""
  model = LinearModel(TINY, loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  batch = make_batch(target_lengths=(0, 5, 0, 3, 0, 4, 0, 2))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  results, _ = _linear_steps(model, batch, (1, 2))
  (full_state, full_metrics), (state, metrics) = results[1], results[2]
  assert np.isfinite(metrics['loss'])
  np.testing.assert_allclose(metrics['loss'], full_metrics['loss'], **TOL)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), state.params,
                         full_state.params)


def test_dropout_key_folds_in_the_step():
  """Same batch, params and key: equal at equal steps, different masks at another step."""
  model = LinearModel(TINY)
  model.dropout = True
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
  params = jax.tree_util.tree_map(jnp.asarray, linear_params())
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  step = jax.jit(lambda s, b, r: train_step_lib.train_step(s, b, r, model=model,
                                                           optimizer=optimizer))
  loss = {}
  for name, step_number in (('a', 0), ('b', 0), ('c', 1)):
    state = train_state_lib.TrainState(step=jnp.asarray(step_number, jnp.int32), params=params,
                                       opt_state=optimizer.init(params))
    loss[name] = float(step(state, batch, jax.random.key(5))[1]['loss'])
  assert loss['a'] == loss['b']
  assert loss['a'] != loss['c']


def test_microbatch_takes_strided_rows():
  batch = {'x': np.arange(8)}
  assert train_step_lib.microbatch(batch, 1, 4)['x'].tolist() == [1, 5]
  assert train_step_lib.microbatch(batch, 0, 2)['x'].tolist() == [0, 2, 4, 6]


def test_uneven_microbatches_are_refused():
  model = LinearModel(TINY)
  with pytest.raises(ValueError, match='num_microbatches=3'):
    _linear_steps(model, {k: jnp.asarray(v) for k, v in make_batch().items()}, (3,))


# -- optimizers and schedules --------------------------------------------------------------------


@pytest.mark.parametrize('schedule,checks', [
    ('constant', {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 100: 1.0}),
    ('linear', {0: 0.0, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}),
    ('cosine', {0: 0.0, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}),
    ('rsqrt', {0: 1.0, 10: 1.0, 40: 0.5, 1000: 0.1}),
])
def test_schedules_hit_documented_values(schedule, checks):
  config = optimizers.OptimizerConfig(schedule=schedule, learning_rate=1.0, warmup_steps=10,
                                      end_learning_rate_fraction=0.1)
  fn = optimizers.make_schedule(config, num_train_steps=100)
  for step, expected in checks.items():
    assert float(fn(step)) == pytest.approx(expected, abs=1e-6), (schedule, step)


def test_decay_steps_overrides_run_length():
  config = optimizers.OptimizerConfig(schedule='linear', learning_rate=2.0, warmup_steps=0,
                                      decay_steps=20)
  fn = optimizers.make_schedule(config, num_train_steps=1000)
  assert float(fn(10)) == pytest.approx(1.0) and float(fn(20)) == pytest.approx(0.0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='sgd'), "name='sgd'"),
    (dict(schedule='exp'), "schedule='exp'"),
    (dict(learning_rate=0.0), 'learning_rate=0.0'),
    (dict(schedule='rsqrt', warmup_steps=0), 'warmup_steps=0'),
    (dict(gradient_clip_norm=-1.0), 'gradient_clip_norm=-1.0'),
])
def test_bad_optimizer_settings_name_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optimizers.OptimizerConfig(**kwargs)


def test_decay_must_end_after_warmup():
  config = optimizers.OptimizerConfig(schedule='cosine', warmup_steps=50)
  with pytest.raises(ValueError, match='num_train_steps=40'):
    optimizers.make_schedule(config, num_train_steps=40)


def test_adafactor_state_is_factored_for_matrices():
  config = optimizers.OptimizerConfig(name='adafactor', adafactor_min_dim_size_to_factor=8)
  optimizer = optimizers.make_optimizer(config, NUM_TRAIN_STEPS)
  shapes = jax.eval_shape(optimizer.init, network.param_shapes(TINY))
  factored = shapes.inner_state[0]
  pick = lambda tree: tree['encoder']['layers_0']['mlp']['wi_0']['kernel'].shape  # [16, 32]
  assert pick(factored.v_row) == (16,) and pick(factored.v_col) == (32,)
  assert pick(factored.v) == (1,)  # the full second moment is not kept
  norm = factored.v['encoder']['encoder_norm']['scale']
  assert norm.shape == (16,)  # vectors keep a full second moment
  # Logical axes follow the reduced dimensions: v_col keeps 'mlp', v_row keeps 'embed'.
  axes = train_state_lib.state_logical_axes(TINY, optimizer).opt_state.inner_state[0]
  P = jax.sharding.PartitionSpec
  assert axes.v_col['encoder']['layers_0']['mlp']['wi_0']['kernel'] == P('mlp')
  assert axes.v_row['encoder']['layers_0']['mlp']['wi_0']['kernel'] == P('embed')
  assert axes.v['encoder']['layers_0']['mlp']['wi_0']['kernel'] == P(None)


def test_adafactor_update_is_relative_to_parameter_scale():
  """T5X's Adafactor: the first update of a matrix has RMS lr * max(RMS(param), 1e-3)."""
  config = optimizers.OptimizerConfig(name='adafactor', learning_rate=0.01, warmup_steps=0,
                                      adafactor_min_dim_size_to_factor=8)
  optimizer = optimizers.make_optimizer(config, NUM_TRAIN_STEPS)
  params = {'w': jnp.full((16, 32), 3.0)}
  grads = {'w': jax.random.normal(jax.random.key(0), (16, 32))}
  updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
  rms = float(jnp.sqrt(jnp.mean(updates['w'] ** 2)))
  assert rms == pytest.approx(0.01 * 3.0, rel=1e-3)


def test_gradient_clipping_bounds_the_update():
  config = dataclasses.replace(OPTIMIZER_CONFIG, name='adamw', gradient_clip_norm=1e-3,
                               weight_decay=0.0)
  clipped = optimizers.make_optimizer(config, NUM_TRAIN_STEPS)
  params = {'w': jnp.zeros((4,))}
  grads = {'w': jnp.array([3.0, 4.0, 0.0, 0.0])}
  state = clipped.init(params)
  # The clip runs first: the Adam moments see the clipped gradient (norm 1e-3, not 5).
  _, state = clipped.update(grads, state, params)
  mu = state[1].inner_state[0].mu['w']
  np.testing.assert_allclose(mu, 0.1 * np.array([3.0, 4.0, 0, 0]) / 5.0 * 1e-3, rtol=1e-5)


def test_learning_rate_is_read_from_the_state():
  config = optimizers.OptimizerConfig(schedule='linear', learning_rate=1.0, warmup_steps=4)
  optimizer = optimizers.make_optimizer(config, NUM_TRAIN_STEPS)
  params = {'w': jnp.zeros((2,))}
  state = optimizer.init(params)
  rates = []
  for step in range(3):
    _, state = optimizer.update({'w': jnp.ones((2,))}, state, params)
    rates.append(float(optimizers.current_learning_rate(state)))
  assert rates == pytest.approx([0.0, 0.25, 0.5])


@pytest.mark.slow
def test_skipping_padding_micro_batches_keeps_fsdp_gathers_out_of_the_loop(t5_model):
  """The original's batching skips a step's all-padding micro-batches with a loop of traced length,
  and XLA still gathers the FSDP-sharded weights before the micro-batch loop, as without skipping
  (a `lax.cond` per micro-batch kept every gather inside its branch: one per micro-batch)."""
  model = models.EncoderDecoderModel(TINY)
  mesh, rules = make_mesh(4, 1), partitioning.fsdp_logical_axis_rules()
  optimizer = optimizers.make_optimizer(OPTIMIZER_CONFIG, NUM_TRAIN_STEPS)
  state, shardings = train_state_lib.create_train_state(
      model, optimizer, mesh, rules, jax.random.key(0),
      init_params_fn=lambda: random_params(TINY))
  batch = partitioning.global_batch(
      {name: np.concatenate([value] * 2) for name, value in make_batch().items()}, mesh)
  gathers = {}
  for skip in (False, True):
    step = train_step_lib.make_train_step(model, optimizer, shardings, mesh, 4, rules=rules,
                                          skip_empty_microbatches=skip)
    gathers[skip] = hlo.collectives_outside_and_inside_loops(
        step.lower(state, batch, jax.random.key(1)).compile().as_text())
  outside, inside = gathers[False]
  assert outside > inside  # FSDP: most weights are gathered once, before the loop
  assert gathers[True] == gathers[False]


# -- where the gradient is reduced over the data axis (GRADIENT_REDUCTION) ------------------------

REDUCTION_MICROBATCHES = (2, 4)


def _sixteen_rows():
  """16 rows, so 4 micro-batches split over 4 data shards; rows 8 and 12 have no targets, so in
  micro-batch 0 of 4 (rows 0, 4, 8, 12: one per shard) two shards have no real target tokens."""
  second = make_batch(seed=1, target_lengths=(0, 5, 2, 5, 0, 4, 1, 5))
  return {name: np.concatenate([value, second[name]]) for name, value in make_batch().items()}


@pytest.fixture(scope='module')
def fsdp_steps_by_reduction(t5_model):
  """`{(gradient_reduction, num_microbatches): (gradient, metrics, compiled HLO text)}` of one
  step of the tiny T5 under the FSDP rules on 4 data shards; SGD with rate 1, so the params
  before minus after the step are the gradient."""
  mesh, rules = make_mesh(4, 1), partitioning.fsdp_logical_axis_rules()
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  params = random_params(TINY)
  batch = partitioning.global_batch(_sixteen_rows(), mesh)
  results = {}
  for reduction in train_step_lib.GRADIENT_REDUCTIONS:
    for num_microbatches in REDUCTION_MICROBATCHES:
      state, shardings = train_state_lib.create_train_state(
          t5_model, optimizer, mesh, rules, jax.random.key(0), init_params_fn=lambda: params)
      step = train_step_lib.make_train_step(t5_model, optimizer, shardings, mesh,
                                            num_microbatches, rules=rules,
                                            gradient_reduction=reduction)
      compiled = step.lower(state, batch, jax.random.key(1)).compile()
      state, metrics = compiled(state, batch, jax.random.key(1))
      gradient = jax.tree_util.tree_map(lambda a, b: a - b, params, jax.device_get(state.params))
      results[reduction, num_microbatches] = (gradient, jax.device_get(metrics),
                                              compiled.as_text())
  return results


@pytest.mark.slow
@pytest.mark.parametrize('num_microbatches', REDUCTION_MICROBATCHES)
def test_reducing_once_per_step_equals_reducing_every_micro_batch(fsdp_steps_by_reduction,
                                                                  num_microbatches):
  """'once' (per-shard partial gradients, reduced after the loop) == 'per_microbatch': the
  gradient and every metric, with micro-batches whose shards hold no real targets."""
  gradient, metrics, _ = fsdp_steps_by_reduction['per_microbatch', num_microbatches]
  once_gradient, once_metrics, _ = fsdp_steps_by_reduction['once', num_microbatches]
  assert set(once_metrics) == set(metrics)
  for name in sorted(metrics):
    np.testing.assert_allclose(once_metrics[name], metrics[name], **TOL, err_msg=name)
  assert np.isfinite(metrics['loss']) and float(metrics['grad_norm']) > 0.1
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), once_gradient,
                         gradient)


@pytest.mark.slow
def test_reducing_once_per_step_leaves_no_reduction_in_the_micro_batch_loop(
    fsdp_steps_by_reduction):
  """Collectives of the compiled step, `(outside loops, inside)`, in ops and in the arrays they
  carry. XLA's CPU compiler writes the reduce-scatter to the parameters' FSDP sharding as an
  all-reduce (then a slice) and combines a step's all-reduces into one op over many arrays, so
  both kinds are counted. Measured with jaxlib 0.10.2 on 4 CPU devices (the tiny T5):
    per_microbatch, 2 and 4 micro-batches: all-reduce ops (1, 2), arrays (50, 58);
    once, 2 and 4 micro-batches: all-reduce ops (2, 0), arrays (108, 0); no reduce-scatter op.
  """
  def reductions(reduction, num_microbatches, arrays):
    text = fsdp_steps_by_reduction[reduction, num_microbatches][2]
    counts = [hlo.collectives_outside_and_inside_loops(text, op, arrays=arrays)
              for op in ('all-reduce', 'reduce-scatter')]
    return tuple(map(sum, zip(*counts)))

  for arrays in (False, True):
    for num_microbatches in REDUCTION_MICROBATCHES:
      assert reductions('per_microbatch', num_microbatches, arrays)[1] > 0
      assert reductions('once', num_microbatches, arrays)[1] == 0
    # One reduction per step whatever the micro-batch count.
    assert reductions('once', 4, arrays) == reductions('once', 2, arrays)
    # What left the loop is reduced after it, not dropped.
    assert reductions('once', 2, arrays)[0] > reductions('per_microbatch', 2, arrays)[0]
  # The FSDP weight gathers stay out of the loop as before.
  gathers = {key: hlo.collectives_outside_and_inside_loops(text)
             for key, (_, _, text) in fsdp_steps_by_reduction.items()}
  assert gathers['once', 4] == gathers['per_microbatch', 4]


def _linear_state_and_shardings(mesh, optimizer):
  """The linear model's params sharded as FSDP would (`embed` on both axes), and its state."""
  P = jax.sharding.PartitionSpec
  params = jax.tree_util.tree_map(jnp.asarray, linear_params())
  param_specs = {'embed': P(None, ('data', 'model')), 'out': P('data', 'model')}
  replicated = partitioning.replicated(mesh)
  state = train_state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                     opt_state=optimizer.init(params))
  shardings = train_state_lib.TrainState(
      step=replicated,
      params={name: jax.sharding.NamedSharding(mesh, spec) for name, spec in param_specs.items()},
      opt_state=jax.tree_util.tree_map(lambda _: replicated, state.opt_state))
  return jax.device_put(state, shardings), shardings


def _originals_batch():
  """The original's batching in miniature: per-token weights scaled per micro-batch and the last
  of 4 micro-batches (rows 3 and 7) all padding, skipped."""
  batch = make_batch(seed=5, target_lengths=(3, 5, 2, 0, 4, 1, 5, 0))
  scale = np.random.default_rng(6).uniform(0.1, 1.0, (BATCH, 1)).astype(np.float32)
  batch['decoder_loss_weights'] = batch['decoder_loss_weights'] * scale
  return batch


@pytest.mark.parametrize('factor', [None, 'NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS',
                                    'AVERAGE_PER_SEQUENCE', 'originals_batching'])
def test_reducing_once_per_step_equals_reducing_every_micro_batch_for_every_factor(factor):
  """The linear model on data=2 x model=2, 2 and 4 micro-batches: packed segments and teacher
  distributions (every factor), or the original's batching weights with a skipped micro-batch."""
  originals = factor == 'originals_batching'
  model = LinearModel(TINY, loss_normalizing_factor=None if originals else factor, z_loss=1e-2,
                      label_smoothing=0.1, loss_type='distribution', distribution_ce_weight=0.5)
  mesh = make_mesh(2, 2)
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  host_batch = _originals_batch() if originals else _packed_batch()
  if originals:
    teacher = (distillation_loss.TEACHER_TOPK_IDS, distillation_loss.TEACHER_TOPK_LOGPROBS)
    host_batch.update({name: _packed_batch()[name] for name in teacher})
  batch = partitioning.global_batch(host_batch, mesh)
  results = {}
  for reduction in train_step_lib.GRADIENT_REDUCTIONS:
    for num_microbatches in REDUCTION_MICROBATCHES:
      state, shardings = _linear_state_and_shardings(mesh, optimizer)
      step = train_step_lib.make_train_step(model, optimizer, shardings, mesh, num_microbatches,
                                            skip_empty_microbatches=originals,
                                            gradient_reduction=reduction)
      results[reduction, num_microbatches] = jax.device_get(
          step(state, batch, jax.random.key(0)))
  for num_microbatches in REDUCTION_MICROBATCHES:
    state, metrics = results['per_microbatch', num_microbatches]
    once_state, once_metrics = results['once', num_microbatches]
    for name in sorted(metrics):
      np.testing.assert_allclose(once_metrics[name], metrics[name], **TOL,
                                 err_msg=f'{name}, k={num_microbatches}')
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                           once_state.params, state.params)


def test_partial_gradients_shard_on_data_first_and_like_the_params_without_data():
  mesh = make_mesh(4, 2)
  P = jax.sharding.PartitionSpec
  specs = [P('data', 'model'), P(None, ('data', 'model')), P(('model', 'data')), P('model'), P()]
  partial = train_step_lib.partial_gradient_shardings(
      [jax.sharding.NamedSharding(mesh, spec) for spec in specs])
  assert [s.spec for s in partial] == [P('data', None, 'model'), P('data', None, 'model'),
                                       P('data', 'model'), P('data', 'model'), P('data')]


def test_an_unknown_gradient_reduction_names_the_choices(t5_model):
  mesh = make_mesh(4, 1)
  optimizer = optimizers.make_optimizer(OPTIMIZER_CONFIG, NUM_TRAIN_STEPS)
  _, shardings = train_state_lib.abstract_train_state(
      t5_model, optimizer, mesh, partitioning.STANDARD_LOGICAL_AXIS_RULES)
  match = r"gradient_reduction='twice' is not one of 'per_microbatch', 'once'"
  with pytest.raises(errors.ConfigError, match=match):
    train_step_lib.make_train_step(t5_model, optimizer, shardings, mesh, 2,
                                   gradient_reduction='twice')
