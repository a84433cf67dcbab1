"""Training checkpoints: round trip, sharded restore, last-N + best-N retention, bad steps,
interrupted saves, the restore order, and reading a trainer MODEL_DIR with `load_checkpoint`.

The train state here is a stand-in with TrainState's fields (step, params, opt_state = adamw
state) on the tiny T5's parameter tree, so these tests do not depend on `train_state.py`.
"""
import dataclasses
import functools
import logging
import os
import shutil

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import specialize_jax
from specialize_jax.checkpoints import directories
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.checkpoints import param_tree
from specialize_jax.model.config import PRESETS
from specialize_jax.training import checkpoint_manager

# Inference cannot recover relative_attention_max_distance; the preset's 128 is T5X's default.
CONFIG = dataclasses.replace(PRESETS['tiny'], vocab_size=64)
TX = optax.adamw(1e-2)
METRIC = 'gsm8k_dev_icl_cot/accuracy'


class State(flax.struct.PyTreeNode):
  step: jax.Array
  params: dict
  opt_state: optax.OptState


# A few leaves named like T5X's, for the tests that do not load params as a model (restoring
# time grows with the number of leaves).
TOY_SHAPES = {'token_embedder/embedding': (64, 16), 'encoder/layers_0/mlp/wo/kernel': (32, 16),
              'encoder/encoder_norm/scale': (16,)}


def _random_params(seed, shapes=None):
  """Float32 params (default: the tiny T5's tree), drawn in numpy (no model init to compile)."""
  rng = np.random.RandomState(seed)
  shapes = shapes or param_tree.t5x_param_shapes(CONFIG)
  flat = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
  return param_tree.unflatten_params(flat)


@functools.partial(jax.jit, static_argnums=2)
def _train(params, seed, updates):
  """`updates` adamw steps on a fixed gradient, so the moments are non-zero (one compile)."""
  opt_state = TX.init(params)
  grads = jax.tree.map(lambda p: jnp.sin(p) + seed, params)
  for _ in range(updates):
    deltas, opt_state = TX.update(grads, opt_state, params)
    params = optax.apply_updates(params, deltas)
  return params, opt_state


def _state(seed, step=0, updates=1, t5=False):
  params = _random_params(seed, shapes=None if t5 else TOY_SHAPES)
  params, opt_state = _train(params, jnp.float32(seed), updates)
  return State(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)


@pytest.fixture(scope='module')
def mesh():
  return jax.make_mesh((2, 4), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _abstract(state, mesh, sharded=True):
  """ShapeDtypeStructs with shardings: 2-D leaves on ('data', 'model') where divisible."""
  def leaf(x):
    spec = P()
    if sharded and x.ndim == 2 and x.shape[0] % 2 == 0 and x.shape[1] % 4 == 0:
      spec = P('data', 'model')
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(leaf, state)


def _assert_identical(a, b):
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _checkpointer(path, **config):
  config.setdefault('period', 1)
  config.setdefault('async_save', False)
  return checkpoint_manager.TrainCheckpointer(path, checkpoint_manager.CheckpointConfig(**config))


def test_round_trip_is_bit_identical_and_period_decides(tmp_path, mesh):
  state = _state(seed=1, step=4, updates=2)
  position = {'batches_consumed': 4, 'seed': 3, 'source': 'gsm8k', 'fraction': 0.1}
  ckpt = _checkpointer(tmp_path, period=4, async_save=True)
  assert not ckpt.save(3, state, position)  # 3 % 4 != 0
  assert ckpt.save(4, state, position, metrics={METRIC: np.float32(0.25)})
  ckpt.wait_until_finished()
  assert ckpt.save(5, _state(seed=2, step=5), {'batches_consumed': 5, 'seed': 3}, force=True)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_4', 'checkpoint_5']
  assert sorted(os.listdir(tmp_path / 'checkpoint_4')) == [
      '_CHECKPOINT_METADATA', 'commit_success.txt', 'meta', 'state']

  reader = checkpoint_manager.TrainCheckpointer(tmp_path, read_only=True)
  assert reader.all_steps() == [4, 5] and reader.latest_step() == 5
  restored, data_position, step = reader.restore(_abstract(state, mesh, sharded=False))
  assert step == 5 and data_position == {'batches_consumed': 5, 'seed': 3}
  _assert_identical(restored, _state(seed=2, step=5))

  # The older step restores once the newer one is gone; its metrics and position are intact.
  shutil.rmtree(tmp_path / 'checkpoint_5')
  reader = checkpoint_manager.TrainCheckpointer(tmp_path, read_only=True)
  restored, data_position, step = reader.restore(_abstract(state, mesh, sharded=False))
  assert step == 4 and data_position == position
  _assert_identical(restored, state)
  assert int(restored.opt_state[0].count) == 2
  assert np.abs(np.asarray(restored.opt_state[0].nu['encoder']['layers_0']['mlp']['wo']
                           ['kernel'])).min() > 0
  meta = (tmp_path / 'checkpoint_4' / 'meta' / 'metadata').read_text()
  assert '"metrics": {"gsm8k_dev_icl_cot/accuracy": 0.25}' in meta
  with pytest.raises(ValueError, match='read-only'):
    reader.save(8, state, position, force=True)


def test_restore_into_mesh_shardings(tmp_path, mesh):
  state = _state(seed=3, step=2)
  ckpt = _checkpointer(tmp_path)
  ckpt.save(2, state, {'batches_consumed': 2})
  ckpt.close()
  abstract = _abstract(state, mesh)
  restored, _, _ = checkpoint_manager.TrainCheckpointer(tmp_path, read_only=True).restore(abstract)
  _assert_identical(restored, state)
  kernel = restored.params['encoder']['layers_0']['mlp']['wo']['kernel']  # [mlp=32, embed=16]
  assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P('data', 'model')), 2)
  assert {s.data.shape for s in kernel.addressable_shards} == {(16, 4)}
  num_sharded = 0
  for (path, leaf), (_, want) in zip(jax.tree_util.tree_leaves_with_path(restored),
                                     jax.tree_util.tree_leaves_with_path(abstract)):
    assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), jax.tree_util.keystr(path)
    num_sharded += want.sharding.spec == P('data', 'model')
  assert num_sharded == 6  # embedding and kernel in params and both adam moments


def test_restore_needs_shardings(tmp_path):
  state = _state(seed=0)
  ckpt = _checkpointer(tmp_path)
  ckpt.save(1, state, {})
  with pytest.raises(ValueError, match=r"has no sharding.*abstract_train_state"):
    ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  ckpt.close()


@pytest.mark.parametrize('mode,values,kept', [
    # max: 2 and 3 tie at 0.9 (the later, 3, is kept); 5 has no eval metrics.
    ('max', [0.5, 0.9, 0.9, 0.1, None], [3, 4, 5]),
    # min: the best (1) is older than the last two.
    ('min', [0.2, 0.9, 0.9, 0.5, None], [1, 4, 5]),
])
def test_keeps_last_n_and_best_n(tmp_path, mode, values, kept):
  state = _state(seed=0)
  ckpt = _checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric=METRIC, best_mode=mode)
  for step, value in enumerate(values, start=1):
    metrics = None if value is None else {METRIC: value, 'gsm8k_dev_icl_cot/loss': 1.0}
    assert ckpt.save(step, state, {'batches_consumed': step}, metrics=metrics)
  ckpt.close()
  assert ckpt.all_steps() == kept
  assert sorted(os.listdir(tmp_path)) == [f'checkpoint_{s}' for s in kept]
  if mode == 'max':
    # A new checkpointer reads the stored metrics: step 3 (0.9) stays best over step 6 (0.05).
    ckpt = _checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric=METRIC)
    ckpt.save(6, state, {'batches_consumed': 6}, metrics={METRIC: 0.05})
    ckpt.close()
    assert ckpt.all_steps() == [3, 5, 6]


def test_best_metric_must_be_in_the_metrics(tmp_path):
  with pytest.raises(ValueError, match='best_metric'):
    checkpoint_manager.CheckpointConfig(keep_best=1)
  ckpt = _checkpointer(tmp_path, keep_best=1, best_metric=METRIC)
  with pytest.raises(ValueError, match=r"closest: \['gsm8k_dev_icl_cot/accuracy_'\]"):
    ckpt.save(1, _state(seed=0), {}, metrics={'gsm8k_dev_icl_cot/accuracy_': 0.5})
  assert ckpt.all_steps() == []
  ckpt.close()


def _truncate_arrays(step_dir):
  """Truncates every array data file of the step's state item (OCDBT `d/` files)."""
  count = 0
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(root) == 'd':
      for name in files:
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(8)
        count += 1
  assert count


def _uncommit(step_dir):
  os.remove(os.path.join(step_dir, 'commit_success.txt'))
  os.remove(os.path.join(step_dir, '_CHECKPOINT_METADATA'))


def _step_locations(model_dir):
  """{step directory name: where it is}: in MODEL_DIR itself or moved into `bad_checkpoints/`."""
  found = {name: 'in place' for name in os.listdir(model_dir) if name.startswith('checkpoint_')}
  bad = os.path.join(model_dir, checkpoint_manager.BAD_SUBDIR)
  for name in (os.listdir(bad) if os.path.isdir(bad) else ()):
    found.setdefault(name.split('.')[0], f'moved to {name}')
  return found


def _warnings(caplog):
  return '\n'.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_bad_latest_steps_fall_back_with_warnings(tmp_path, mesh, caplog):
  """An unreadable (truncated) and an uncommitted step are skipped, named in the log and moved
  aside, never deleted; the resumed run may then save their step numbers again."""
  states = {step: _state(seed=step, step=step) for step in (1, 2, 3)}
  ckpt = _checkpointer(tmp_path, keep_last=3)
  for step, state in states.items():
    ckpt.save(step, state, {'batches_consumed': step})
  ckpt.wait_until_finished()
  _truncate_arrays(tmp_path / 'checkpoint_3')
  _uncommit(tmp_path / 'checkpoint_2')
  assert ckpt.all_steps() == [1, 3]

  with caplog.at_level(logging.WARNING):
    restored, data_position, step = ckpt.restore(_abstract(states[1], mesh))
  assert step == 1 and data_position == {'batches_consumed': 1}
  _assert_identical(restored, states[1])
  warnings = _warnings(caplog)
  assert 'Checkpoint step 3' in warnings and 'OUT_OF_RANGE' in warnings
  assert 'Checkpoint step 2' in warnings and 'not committed' in warnings
  locations = _step_locations(tmp_path)
  assert locations['checkpoint_1'] == 'in place'
  assert locations['checkpoint_2'].startswith('moved to checkpoint_2.uncommitted-')
  assert locations['checkpoint_3'].startswith('moved to checkpoint_3.unreadable-')
  assert f'moved it to {tmp_path / checkpoint_manager.BAD_SUBDIR / locations["checkpoint_3"][9:]}' in (
      warnings)

  # The resumed run's next save is not blocked by their numbers.
  assert ckpt.save(2, _state(seed=9, step=2), {'batches_consumed': 2})
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == [checkpoint_manager.BAD_SUBDIR, 'checkpoint_1',
                                          'checkpoint_2']
  restored, _, step = checkpoint_manager.TrainCheckpointer(tmp_path, read_only=True).restore(
      _abstract(states[1], mesh))
  assert step == 2
  _assert_identical(restored, _state(seed=9, step=2))


def test_no_good_step_raises_with_reasons(tmp_path, mesh):
  ckpt = _checkpointer(tmp_path)
  ckpt.save(1, _state(seed=1), {})
  ckpt.save(2, _state(seed=2), {})
  ckpt.close()
  _truncate_arrays(tmp_path / 'checkpoint_1')
  os.remove(tmp_path / 'checkpoint_2' / 'state' / '_METADATA')
  reader = checkpoint_manager.TrainCheckpointer(tmp_path, read_only=True)
  with pytest.raises(ValueError) as error:
    reader.restore(_abstract(_state(seed=0), mesh))
  message = str(error.value)
  assert f'No checkpoint step in {tmp_path} restores' in message
  assert 'step 1: ' in message and 'OUT_OF_RANGE' in message and 'step 2: ' in message
  with pytest.raises(ValueError, match='holds step 2 >= step 2'):
    _checkpointer(tmp_path).save(2, _state(seed=0), {})


def _saved_steps(path, steps=(1, 2, 3), **config):
  ckpt = _checkpointer(path, **config)
  states = {step: _state(seed=step, step=step) for step in steps}
  for step, state in states.items():
    ckpt.save(step, state, {'batches_consumed': step})
  return ckpt, states


def _fail_reads(monkeypatch, times, error=OSError('UNAVAILABLE: injected storage error')):
  """Makes orbax's next `times` restores raise `error`; returns the list of calls."""
  calls = []
  restore = checkpoint_manager.ocp.CheckpointManager.restore

  def flaky(manager, step, *args, **kwargs):
    calls.append(step)
    if len(calls) <= times:
      raise error
    return restore(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint_manager.ocp.CheckpointManager, 'restore', flaky)
  return calls


def test_a_read_error_is_retried_and_the_latest_step_restores(tmp_path, mesh, monkeypatch,
                                                              caplog):
  ckpt, states = _saved_steps(tmp_path, restore_backoff_s=0.01)
  calls = _fail_reads(monkeypatch, times=1)
  with caplog.at_level(logging.WARNING):
    restored, _, step = ckpt.restore(_abstract(states[3], mesh))
  ckpt.close()
  assert step == 3 and calls == [3, 3]
  _assert_identical(restored, states[3])
  assert 'failed (try 1 of 4: OSError: UNAVAILABLE: injected' in _warnings(caplog)
  assert _step_locations(tmp_path) == {f'checkpoint_{s}': 'in place' for s in (1, 2, 3)}


@pytest.mark.parametrize('cause', ['storage', 'changed_state'])
def test_persistent_read_errors_fail_loudly_and_move_nothing(tmp_path, mesh, monkeypatch, cause):
  """Storage that keeps failing, or a train state that no longer matches the checkpoint (before,
  either made the step 'bad' and the next save deleted it): retried, then raised; every step stays
  where it is."""
  ckpt, states = _saved_steps(tmp_path, restore_attempts=3, restore_backoff_s=0.0)
  abstract = _abstract(states[3], mesh)
  if cause == 'storage':
    calls = _fail_reads(monkeypatch, times=100)
  else:
    calls = []
    shapes = dict(TOY_SHAPES, **{'encoder/encoder_norm/scale': (24,)})  # another model width
    abstract = _abstract(_state(seed=0, step=3).replace(params=_random_params(0, shapes)), mesh)
    abstract = abstract.replace(opt_state=_abstract(states[3], mesh).opt_state)
  with pytest.raises(checkpoint_manager.CheckpointReadError,
                     match=r'step 3 of .* failed 3 times.*Nothing was skipped, moved or deleted'):
    ckpt.restore(abstract)
  if cause == 'storage':
    assert calls == [3, 3, 3]
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_1', 'checkpoint_2', 'checkpoint_3']


def test_interrupted_save_is_ignored(tmp_path, mesh):
  """A crash mid-save leaves `checkpoint_<step>.orbax-checkpoint-tmp-<n>`: never read."""
  good = _state(seed=1, step=1)
  ckpt = _checkpointer(tmp_path)
  ckpt.save(1, good, {'batches_consumed': 1})
  ckpt.close()
  torn = tmp_path / 'checkpoint_2.orbax-checkpoint-tmp-1795832581'
  shutil.copytree(tmp_path / 'checkpoint_1', torn)
  _uncommit(torn)
  _truncate_arrays(torn)

  reader = checkpoint_manager.TrainCheckpointer(tmp_path, read_only=True)
  assert reader.all_steps() == [1] and reader.uncommitted_steps() == {}
  restored, _, step = reader.restore(_abstract(good, mesh))
  assert step == 1
  _assert_identical(restored, good)
  assert directories.resolve_checkpoint(tmp_path) == (
      'orbax', tmp_path / 'checkpoint_1' / 'state')
  assert torn.exists()  # a reader changes nothing
  # A writer removes leftovers of interrupted saves (by its first save at the latest).
  writer = _checkpointer(tmp_path)
  writer.save(2, good, {'batches_consumed': 2})
  writer.close()
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_1', 'checkpoint_2']


@pytest.mark.slow
def test_restore_or_initialize_sources(tmp_path, mesh, caplog):
  scratch = _state(seed=5, updates=0, t5=True)
  abstract = _abstract(scratch, mesh)
  sharded = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), scratch, abstract)
  calls = []

  def init_fn():
    calls.append('init')
    return sharded

  messages = []
  state, position, source = checkpoint_manager.restore_or_initialize(
      tmp_path / 'empty', abstract, init_fn, log=messages.append)
  assert source == 'scratch' and position is None and calls == ['init']
  _assert_identical(state, scratch)
  assert 'from scratch' in messages[-1]

  pretrained = _random_params(seed=7)
  orbax_pytree.save_orbax(pretrained, CONFIG, tmp_path / 'pretrained')
  state, position, source = checkpoint_manager.restore_or_initialize(
      tmp_path / 'empty', abstract, init_fn, initial_checkpoint_path=str(tmp_path / 'pretrained'),
      log=messages.append)
  assert source == 'initial_checkpoint' and position is None
  _assert_identical(state.params, pretrained)
  _assert_identical(state.opt_state, scratch.opt_state)  # fresh optimizer state
  assert int(state.step) == 0 and 'INITIAL_CHECKPOINT_PATH' in messages[-1]
  kernel = state.params['decoder']['layers_1']['mlp']['wo']['kernel']
  assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P('data', 'model')), 2)

  # init_from_params_fn receives the placed params.
  seen = []
  state, _, _ = checkpoint_manager.restore_or_initialize(
      tmp_path / 'empty', abstract, init_fn, initial_checkpoint_path=str(tmp_path / 'pretrained'),
      init_from_params_fn=lambda p: seen.append(p) or sharded.replace(params=p))
  assert seen[0] is state.params

  # Params of another architecture are refused, naming the parameters, before init_fn runs.
  wrong = dataclasses.replace(CONFIG, mlp_dim=48)
  wrong_params = param_tree.unflatten_params({
      name: jax.ShapeDtypeStruct(shape, jnp.float32)
      for name, shape in param_tree.t5x_param_shapes(wrong).items()})
  wrong_abstract = _abstract(
      State(step=jax.ShapeDtypeStruct((), jnp.int32), params=wrong_params, opt_state=()), mesh)
  with pytest.raises(param_tree.CheckpointMismatchError,
                     match=r'encoder/layers_0/mlp/wo/kernel.*expected shape \(48, 16\)'):
    checkpoint_manager.restore_or_initialize(tmp_path / 'empty', wrong_abstract, init_fn,
                                        initial_checkpoint_path=str(tmp_path / 'pretrained'))

  # A run directory with a committed step resumes, whatever INITIAL_CHECKPOINT_PATH says; an
  # uncommitted newer step is skipped with a warning.
  trained = _state(seed=8, step=30, t5=True)
  ckpt = _checkpointer(tmp_path / 'run', period=10)
  ckpt.save(30, trained, {'batches_consumed': 30, 'seed': 0})
  ckpt.save(40, _state(seed=9, step=40, t5=True), {'batches_consumed': 40, 'seed': 0})
  ckpt.close()
  _uncommit(tmp_path / 'run' / 'checkpoint_40')
  with caplog.at_level(logging.WARNING):
    state, position, source = checkpoint_manager.restore_or_initialize(
        tmp_path / 'run', abstract, init_fn, initial_checkpoint_path=str(tmp_path / 'pretrained'),
        log=messages.append)
  assert source == 'resume' and position == {'batches_consumed': 30, 'seed': 0}
  _assert_identical(state, trained)
  assert 'Resuming from step 30' in messages[-1]
  assert any('step 40' in r.getMessage() for r in caplog.records)
  assert calls == ['init'] * 2  # the initial checkpoint replaced params in init_fn()'s state

  assert (tmp_path / 'run' / 'checkpoint_40').exists()  # a read-only restore moves nothing

  # Only uncommitted steps: not a resume; the loop's checkpointer moves them aside.
  shutil.rmtree(tmp_path / 'run' / 'checkpoint_30')
  ckpt = _checkpointer(tmp_path / 'run', period=10)
  _, _, source = checkpoint_manager.restore_or_initialize(ckpt, abstract, init_fn)
  assert source == 'scratch'
  assert ckpt.save(10, sharded, {'batches_consumed': 10})
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'run')) == [checkpoint_manager.BAD_SUBDIR, 'checkpoint_10']
  assert _step_locations(tmp_path / 'run')['checkpoint_40'].startswith('moved to')


def test_load_checkpoint_reads_a_trainer_model_dir(tmp_path):
  ckpt = _checkpointer(tmp_path, period=100, async_save=True)
  ckpt.save(100, _state(seed=1, step=100, t5=True), {'batches_consumed': 100})
  latest = _state(seed=2, step=200, t5=True)
  ckpt.save(200, latest, {'batches_consumed': 200})
  ckpt.close()
  for path in (tmp_path, tmp_path / 'checkpoint_200'):
    assert directories.detect_format(path) == 'orbax'
    config, params = loading.load_checkpoint(path)
    assert config == CONFIG
    _assert_identical(params, jax.device_get(latest.params))
  model = specialize_jax.load_pretrained(tmp_path)
  assert model.config == CONFIG
  _assert_identical(model.params, jax.device_get(latest.params))
