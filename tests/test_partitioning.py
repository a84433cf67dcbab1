"""Partitioning: logical-axis rules, meshes, born-sharded train states (actual `.sharding` of
every leaf on a 4x2 mesh of fake CPU devices), FSDP, batch sharding and the errors users hit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from specialize_jax.model import config as config_lib
from specialize_jax.model import models
from specialize_jax.model import network
from specialize_jax.training import optimizers
from specialize_jax.runtime import distributed
from specialize_jax.training import partitioning
from specialize_jax.training import train_state as train_state_lib
from specialize_jax.training import train_step as train_step_lib
from tests.test_train_step import TINY, make_batch, make_mesh, random_params

STANDARD = partitioning.STANDARD_LOGICAL_AXIS_RULES
OPTIMIZER = optimizers.make_optimizer(optimizers.OptimizerConfig(), num_train_steps=10)

# Expected mesh placement of representative parameters (T5X's standard rules).
EXPECTED_STANDARD = {
    ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel'): P(None, 'model'),  # [embed, mlp]
    ('decoder', 'layers_1', 'mlp', 'wo', 'kernel'): P('model', None),  # [mlp, embed]
    ('encoder', 'layers_1', 'attention', 'query', 'kernel'): P(None, 'model'),  # [embed, joined_kv]
    ('decoder', 'layers_0', 'self_attention', 'out', 'kernel'): P('model', None),
    ('token_embedder', 'embedding'): P('model', None),  # [vocab, embed]
    ('decoder', 'logits_dense', 'kernel'): P(None, 'model'),  # [embed, vocab]
    ('encoder', 'relpos_bias', 'rel_embedding'): P('model', None),  # [heads, relpos_buckets]
    ('encoder', 'encoder_norm', 'scale'): P(None),  # [embed]
}
EXPECTED_FSDP = {
    ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel'): P('data', 'model'),
    ('decoder', 'layers_1', 'mlp', 'wo', 'kernel'): P('model', 'data'),
    ('token_embedder', 'embedding'): P('model', 'data'),
    ('decoder', 'logits_dense', 'kernel'): P('data', 'model'),
    ('encoder', 'relpos_bias', 'rel_embedding'): P('model', None),
    ('encoder', 'encoder_norm', 'scale'): P('data'),
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _flat(tree):
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -- rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('rules,axes,expected', [
    (STANDARD, ('batch', 'length', 'embed'), P('data', None, None)),
    (STANDARD, ('batch', 'length', 'heads', 'kv'), P('data', None, 'model', None)),
    (STANDARD, ('batch', 'length', 'vocab'), P('data', None, 'model')),
    (STANDARD, ('embed', 'mlp'), P(None, 'model')),
    (STANDARD, ('vocab', 'embed'), P('model', None)),
    (STANDARD, ('heads', 'relpos_buckets'), P('model', None)),
    (partitioning.fsdp_logical_axis_rules(), ('embed', 'mlp'), P('data', 'model')),
    # Activations keep `embed` unsharded: `batch` claims `data` first.
    (partitioning.fsdp_logical_axis_rules(), ('batch', 'length', 'embed'), P('data', None, None)),
    (partitioning.standard_logical_axis_rules(2, 1), ('batch', 'length', 'embed'),
     P('data', None, 'model')),
])
def test_rules_resolve_like_t5x(rules, axes, expected):
  assert nn.logical_to_mesh_axes(axes, rules) == expected


def test_unsupported_partitioning_dims_are_refused():
  with pytest.raises(ValueError, match='parameter_partitioning_dims=3'):
    partitioning.standard_logical_axis_rules(1, 3)


def test_config_normalizes_and_checks_rules():
  config = partitioning.PartitioningConfig(logical_axis_rules=[['batch', 'data'], ['mlp', None]])
  assert config.logical_axis_rules == (('batch', 'data'), ('mlp', None))
  hash(config)  # a jit static argument must be hashable
  with pytest.raises(ValueError, match="mesh axis 'tensor'"):
    partitioning.PartitioningConfig(logical_axis_rules=(('mlp', 'tensor'),))
  with pytest.raises(ValueError, match='num_partitions=0'):
    partitioning.PartitioningConfig(num_partitions=0)


# -- meshes and batches --------------------------------------------------------------------------


def test_mesh_shape_names_and_axis_types():
  mesh = partitioning.make_mesh(partitioning.PartitioningConfig(num_partitions=2))
  assert dict(mesh.shape) == {'data': 4, 'model': 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
  single = make_mesh(1, 1)
  assert dict(single.shape) == {'data': 1, 'model': 1}


def test_mesh_refuses_a_partition_count_that_does_not_divide_the_devices():
  with pytest.raises(ValueError, match=r'num_partitions=3 does not divide the 8 devices'):
    partitioning.make_mesh(partitioning.PartitioningConfig(num_partitions=3))


def test_bad_batch_size_message():
  mesh = make_mesh(8, 1)
  with pytest.raises(ValueError) as error:
    partitioning.check_batch_divisible(30, mesh)
  assert str(error.value) == ('BATCH_SIZE=30 is not divisible by the data axis (8 devices); set '
                              '--gin.BATCH_SIZE to a multiple of 8.')
  partitioning.check_batch_divisible(32, mesh, num_microbatches=4)
  with pytest.raises(ValueError, match='multiple of 32'):
    partitioning.check_batch_divisible(24, mesh, num_microbatches=4)


def test_global_batch_is_split_on_data():
  mesh = make_mesh(4, 2)
  host = make_batch()
  batch = partitioning.global_batch(host, mesh)
  tokens = batch['encoder_input_tokens']
  assert tokens.sharding == NamedSharding(mesh, P('data'))
  assert tokens.shape == host['encoder_input_tokens'].shape
  assert {s.data.shape for s in tokens.addressable_shards} == {(2, tokens.shape[1])}
  np.testing.assert_array_equal(np.asarray(tokens), host['encoder_input_tokens'])
  with pytest.raises(ValueError, match='BATCH_SIZE=6'):
    partitioning.global_batch({'x': np.zeros((6, 3))}, mesh)


def test_joining_a_multi_host_job_is_a_no_op_unless_configured():
  assert distributed.initialize() is False
  with pytest.raises(ValueError, match='process_id'):
    distributed.initialize('127.0.0.1:1234', num_processes=2)


# -- born-sharded train states -------------------------------------------------------------------


@pytest.fixture(scope='module')
def sharded_state():
  """A real (initializer-run) train state on a 4x2 mesh."""
  mesh = make_mesh(4, 2)
  state, shardings = train_state_lib.create_train_state(
      models.EncoderDecoderModel(TINY), OPTIMIZER, mesh, STANDARD, jax.random.key(0))
  return mesh, state, shardings


def test_parameters_are_born_sharded_by_the_rules(sharded_state):
  mesh, state, shardings = sharded_state
  for path, spec in EXPECTED_STANDARD.items():
    leaf = _get(state.params, path)
    assert leaf.sharding.spec == spec, path
  # Every parameter sits where its logical axes say, and each device holds only its shard.
  axes = _flat(partitioning.as_logical_specs(network.logical_axes(TINY)))
  for path, leaf in _flat(state.params).items():
    expected = NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes[path]), STANDARD))
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), path
    assert _get(shardings.params, path) == leaf.sharding
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}, path
  wi_0 = _get(state.params, ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel'))
  assert wi_0.addressable_shards[0].data.shape == (16, 16)  # [16, 32] split on 'model'
  assert 0.1 < float(jnp.std(wi_0)) < 1.0  # the initializer ran
  assert state.step.sharding.spec == P() and int(state.step) == 0


def test_optimizer_state_mirrors_parameter_shardings(sharded_state):
  _, state, _ = sharded_state
  adam = state.opt_state.inner_state[0]  # inject_hyperparams -> adamw chain -> scale_by_adam
  for path, spec in EXPECTED_STANDARD.items():
    assert _get(adam.mu, path).sharding.spec == spec, path
    assert _get(adam.nu, path).sharding.spec == spec, path
  assert adam.count.sharding.spec == P()
  assert state.opt_state.hyperparams['learning_rate'].sharding.spec == P()


def test_fsdp_rules_shard_embed_on_data():
  mesh = make_mesh(4, 2)
  params = random_params(TINY)
  state, _ = train_state_lib.create_train_state(
      models.EncoderDecoderModel(TINY), OPTIMIZER, mesh, partitioning.fsdp_logical_axis_rules(),
      jax.random.key(0), init_params_fn=lambda: params)
  for path, spec in EXPECTED_FSDP.items():
    leaf = _get(state.params, path)
    assert leaf.sharding.spec == spec, path
    np.testing.assert_array_equal(np.asarray(leaf), _get(params, path))
    assert _get(state.opt_state.inner_state[0].mu, path).sharding.spec == spec
  wi_0 = _get(state.params, ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel'))
  assert wi_0.addressable_shards[0].data.shape == (4, 16)  # [16, 32] over 4 x 2 devices


def test_adafactor_factored_moments_take_reduced_axes():
  mesh = make_mesh(4, 2)
  optimizer = optimizers.make_optimizer(
      optimizers.OptimizerConfig(name='adafactor', adafactor_min_dim_size_to_factor=8), 10)
  abstract, _ = train_state_lib.abstract_train_state(TINY, optimizer, mesh,
                                                     partitioning.fsdp_logical_axis_rules())
  factored = abstract.opt_state.inner_state[0]
  path = ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel')  # [embed, mlp] -> [data, model]
  assert _get(factored.v_row, path).sharding.spec == P('data')  # mlp reduced
  assert _get(factored.v_col, path).sharding.spec == P('model')  # embed reduced
  assert _get(factored.v, path).sharding.spec == P(None)  # placeholder
  assert _get(factored.v, ('encoder', 'encoder_norm', 'scale')).sharding.spec == P('data')


def test_abstract_state_allocates_nothing_and_matches_shardings():
  mesh = make_mesh(4, 2)
  abstract, shardings = train_state_lib.abstract_train_state(TINY, OPTIMIZER, mesh, STANDARD)
  leaves = jax.tree_util.tree_leaves(abstract)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert [x.sharding for x in leaves] == jax.tree_util.tree_leaves(shardings)
  embedding = abstract.params['token_embedder']['embedding']
  assert embedding.shape == (128, 16) and embedding.dtype == jnp.float32
  assert embedding.sharding.spec == P('model', None)


def test_initial_params_must_match_the_model():
  wrong = random_params(config_lib.get_config('tiny', vocab_size=64))
  with pytest.raises(ValueError, match=r'logits_dense/kernel has shape \(16, 64\), the model '
                                       r'expects \(16, 128\)'):
    train_state_lib.create_train_state(TINY, OPTIMIZER, make_mesh(4, 2), STANDARD,
                                       jax.random.key(0), init_params_fn=lambda: wrong)


def test_unshardable_dimensions_fail_before_compiling():
  """tiny has 2 heads: 8 model partitions cannot split the relative-position table."""
  with pytest.raises(ValueError, match=r"rel_embedding.*num_partitions"):
    train_state_lib.abstract_train_state(TINY, OPTIMIZER, make_mesh(1, 8), STANDARD)


# -- activation constraints ----------------------------------------------------------------------


def test_partitioning_context_turns_logical_constraints_on():
  mesh = make_mesh(4, 2)

  def annotated(x):
    return nn.with_logical_constraint(x * 2, ('batch', 'length', 'embed')) + 1

  def in_context(x):
    with partitioning.partitioning_context(mesh, STANDARD):
      return annotated(x)

  x = jnp.ones((8, 4, 2))
  assert 'sharding_constraint' not in jax.jit(annotated).lower(x).as_text()
  text = jax.jit(in_context).lower(x).as_text()
  assert 'sharding_constraint' in text and '[{"data"}, {}, {}]' in text


def test_train_step_traces_the_model_constraints():
  """The model's activation annotations reach the compiled step (lowering only)."""
  mesh = make_mesh(4, 2)
  model = models.EncoderDecoderModel(TINY)
  abstract, shardings = train_state_lib.abstract_train_state(model, OPTIMIZER, mesh, STANDARD)
  step = train_step_lib.make_train_step(model, OPTIMIZER, shardings, mesh)
  text = step.lower(abstract, make_batch(), jax.random.key(0)).as_text()
  # [batch, length, mlp] hidden activations: batch on data, mlp on model.
  assert '[{"data"}, {}, {"model"}]' in text


class _Device:
  """A stand-in for a jax.Device in a device grid: the layout reads only `process_index`."""

  def __init__(self, process_index):
    self.process_index = process_index


def _grid(num_processes, devices_per_process, data):
  """A `[data, model]` grid of `num_processes` hosts' devices in host order (jax.make_mesh's)."""
  flat = [_Device(p) for p in range(num_processes) for _ in range(devices_per_process)]
  return np.array(flat, dtype=object).reshape(data, -1)


@pytest.mark.parametrize('data,expected', [
    # 4 hosts x 2 devices: data 8 x model 1 -> one block per host.
    (8, [((0, 1),), ((2, 3),), ((4, 5),), ((6, 7),)]),
    # data 2 x model 4: the model axis spans two hosts, which are replicas of one block.
    (2, [((0,),), ((0,),), ((1,),), ((1,),)]),
    # data 1 x model 8: every host feeds the whole batch.
    (1, [((0,),)] * 4),
])
def test_data_layout_follows_the_data_coordinates_of_each_process(data, expected):
  grid = _grid(4, 2, data)
  layouts = [partitioning.layout_of_grid(grid, 16, p) for p in range(4)]
  assert [l.coordinates for l in [*layouts]] == [e[0] for e in expected]
  assert [l.shards for l in layouts] == [((l.coordinates[0] // len(l.coordinates),
                                           data // len(l.coordinates)),) for l in layouts]
  assert {l.local_batch_size for l in layouts} == {16 // data * len(expected[0][0])}


def test_data_layout_feeds_interleaved_coordinates_as_their_rows_in_global_order():
  """A TPU host's chips at interleaved data coordinates: host 0 holds 0 and 2, host 1 1 and 3."""
  grid = np.array([[_Device(0)], [_Device(1)], [_Device(0)], [_Device(1)]], dtype=object)
  layouts = [partitioning.layout_of_grid(grid, 8, p) for p in range(2)]
  assert [l.coordinates for l in layouts] == [(0, 2), (1, 3)]
  assert [l.row_ranges for l in layouts] == [((0, 2), (4, 6)), ((2, 4), (6, 8))]
  np.testing.assert_array_equal(layouts[1].row_indices, [2, 3, 6, 7])
  assert [l.shards for l in layouts] == [((0, 4), (2, 4)), ((1, 4), (3, 4))]
  assert layouts[0].describe() == 'rows 0-1, 4-5 of 8 (data coordinates [0, 2] of 4)'
  # Aligned pairs merge into blocks of two coordinates: (0, 1) and (4, 5) of 8.
  pairs = np.array([[_Device(p)] for p in (0, 0, 1, 1, 0, 0, 1, 1)], dtype=object)
  assert partitioning.layout_of_grid(pairs, 16, 0).shards == ((0, 4), (2, 4))
  with pytest.raises(ValueError, match='BATCH_SIZE=6 is not divisible by the data axis'):
    partitioning.layout_of_grid(_grid(4, 2, 8), 6, 0)


def test_global_batch_takes_this_shards_rows_with_the_global_shape():
  mesh = make_mesh(4, 2)
  layout = partitioning.data_layout(mesh, 8)
  assert (layout.shards, layout.local_batch_size) == (((0, 1),), 8)
  with pytest.raises(ValueError, match='has 4 rows; this process feeds 8 of the global batch'):
    partitioning.global_batch({'x': np.zeros((4, 3))}, mesh, layout)
  batch = partitioning.global_batch({'x': np.arange(24.).reshape(8, 3)}, mesh, layout)
  assert batch['x'].shape == (8, 3)
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(24.).reshape(8, 3))
