"""The T5 network: T5X parameter tree, sizes, masking, packing, cached decoding, dtypes and
sharding."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specialize_jax.model import config as config_lib
from specialize_jax.model import network
from tests.support import tiny_model
from tests.support.golden_files import check_golden

GOLDEN = 't5_tiny_param_axes.txt'
TINY = config_lib.get_config('tiny', vocab_size=64, dropout_rate=0.0)
ATOL = 1e-5


random_params = tiny_model.random_params


@pytest.fixture(scope='module')
def params():
  return random_params(TINY)


@functools.partial(jax.jit, static_argnums=1)
def _jit_forward(params, cfg, batch):
  return network.Transformer(cfg).apply({'params': params}, enable_dropout=False, **batch)


def _forward(params, cfg=TINY, **batch):
  return _jit_forward(params, cfg, batch)


def _batch(rng, batch_size, input_length, target_length, vocab=64):
  """Random ids in [2, vocab) with per-row padding at the end (at least 2 real tokens)."""
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  enc = jax.random.randint(k1, (batch_size, input_length), 2, vocab)
  tgt = jax.random.randint(k2, (batch_size, target_length), 2, vocab)
  enc_len = jax.random.randint(k3, (batch_size, 1), 2, input_length + 1)
  tgt_len = jax.random.randint(k4, (batch_size, 1), 2, target_length + 1)
  enc = jnp.where(jnp.arange(input_length) < enc_len, enc, 0)
  tgt = jnp.where(jnp.arange(target_length) < tgt_len, tgt, 0)
  dec_in = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=tgt)


def test_param_tree_matches_golden():
  """Names, shapes and logical axes of tiny (full T5 vocabulary) equal the reviewed golden file."""
  check_golden(GOLDEN, network.format_param_axes(config_lib.PRESETS['tiny']))


def test_params_are_plain_float32_and_axes_tree_matches(params):
  leaves = jax.tree_util.tree_leaves(params)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
  axes = network.logical_axes(TINY)
  is_tuple = lambda x: isinstance(x, tuple)
  assert (jax.tree_util.tree_structure(axes, is_leaf=is_tuple) ==
          jax.tree_util.tree_structure(params))
  allowed = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'joined_kv', 'relpos_buckets'}
  for names, leaf in zip(jax.tree_util.tree_leaves(axes, is_leaf=is_tuple), leaves):
    assert len(names) == leaf.ndim and set(names) <= allowed


def _expected_num_params(cfg):
  e, v, hd, m, b, h = (cfg.emb_dim, cfg.vocab_size, cfg.num_heads * cfg.head_dim, cfg.mlp_dim,
                       cfg.relative_attention_num_buckets, cfg.num_heads)
  mlp = len(cfg.mlp_activations) * e * m + m * e
  encoder_layer = 4 * e * hd + mlp + 2 * e
  decoder_layer = 8 * e * hd + mlp + 3 * e
  return (2 * v * e + 2 * h * b + 2 * e + cfg.num_encoder_layers * encoder_layer +
          cfg.num_decoder_layers * decoder_layer)


@pytest.mark.parametrize('name,approx', [('small', 77e6), ('base', 248e6), ('large', 783e6),
                                         ('xl', 2.85e9), ('xxl', 11.1e9)])
def test_preset_param_counts_without_allocating(name, approx):
  cfg = config_lib.PRESETS[name]
  count = network.num_params(cfg)  # jax.eval_shape: no parameter memory is allocated
  assert count == _expected_num_params(cfg)
  assert abs(count - approx) / approx < 0.01


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match='dtype'):
    config_lib.T5Config(dtype='float16')
  with pytest.raises(ValueError, match='Unknown T5 preset'):
    config_lib.get_config('medium')


def _numpy_bucket(relative, bidirectional, num_buckets, max_distance):
  """Mesh TensorFlow's bucketing rule, written out in numpy float32 for one distance."""
  n = -relative
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  ratio = np.log(np.float32(n) / np.float32(max_exact) + np.finfo(np.float32).eps)
  large = max_exact + int(np.float32(ratio / np.float32(np.log(max_distance / max_exact)) *
                                     np.float32(num_buckets - max_exact)))
  return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_buckets(bidirectional):
  relative = np.arange(-300, 301)
  got = np.asarray(network.relative_position_bucket(relative, bidirectional, 32, 128))
  want = [_numpy_bucket(int(r), bidirectional, 32, 128) for r in relative]
  np.testing.assert_array_equal(got, want)
  bucket = lambda r: int(got[r + 300])
  if bidirectional:  # key before the query: 0..15; after: 16..31
    assert [bucket(0), bucket(-1), bucket(1), bucket(-8), bucket(-16), bucket(-127),
            bucket(-128), bucket(300)] == [0, 1, 17, 8, 10, 15, 15, 31]
  else:
    assert [bucket(5), bucket(-5), bucket(-16), bucket(-1000 // 4)] == [0, 5, 16, 31]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_bias_gradient_is_each_buckets_float32_sum(dtype, bidirectional):
  """The table's gradient sums the cotangents of all (query, key) pairs in each bucket, in float32
  also under bfloat16 compute (autodiff of the gather summed in bfloat16: off by 3.4 and 11.2
  here, on sums up to ~70)."""
  module = network.RelativePositionBias(32, 128, 4, dtype)
  positions = jnp.arange(128)[None, :]
  apply = lambda p: module.apply(p, positions, positions, bidirectional=bidirectional)
  params = module.init(jax.random.PRNGKey(0), positions, positions, bidirectional=bidirectional)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 128, 128)).astype(dtype)
  grad = nn.meta.unbox(jax.vjp(apply, params)[1](cotangent)[0])['params']['rel_embedding']
  buckets = network.relative_position_bucket(positions[:, None, :] - positions[:, :, None],
                                             bidirectional, 32, 128)
  expected = np.zeros((32, 4))
  np.add.at(expected, np.asarray(buckets).ravel(),
            np.asarray(cotangent.astype(jnp.float32), np.float64).reshape(4, -1).T)
  assert grad.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(grad), expected.T, rtol=0, atol=2e-4)


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_bucket_sums_on_each_backends_path(backend):
  """The scatter (CPU) and one-hot (accelerators) forms give each bucket's sum, in float32 for
  bfloat16 values too."""
  rng = np.random.default_rng(0)
  buckets = rng.integers(0, 8, size=(1, 40, 40))
  values = jnp.asarray(rng.standard_normal((3, 1, 40, 40)), jnp.bfloat16)
  expected = np.zeros((8, 3))
  np.add.at(expected, buckets.ravel(), np.asarray(values, np.float64).reshape(3, -1).T)
  got = network.bucket_sums(values, jnp.asarray(buckets), 8, backend)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected.T, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_padding_does_not_change_real_logits(params):
  """Extra encoder and target padding leave the logits of real target positions unchanged."""
  batch = _batch(jax.random.key(2), 4, 8, 6)
  padded = {k: jnp.pad(v, ((0, 0), (0, 5 if k == 'encoder_input_tokens' else 4)))
            for k, v in batch.items()}
  logits, padded_logits = _forward(params, **batch), _forward(params, **padded)
  # Padded target positions attend to nothing real, so only real targets are compared.
  real = np.asarray(batch['decoder_target_tokens'] > 0)
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(padded_logits)[:, :6][real],
                             atol=ATOL)


def test_packed_equals_unpacked(params):
  """Two examples packed in one row (segment ids + positions) give each one's own logits."""
  enc = jnp.array([[5, 6, 7, 1], [10, 11, 1, 0]])
  tgt = jnp.array([[8, 9, 1, 0], [12, 13, 14, 1]])
  dec_in = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  unpacked = _forward(params, encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                      decoder_target_tokens=tgt)
  # Row 0 keeps 4 input / 3 target tokens, row 1 keeps 3 / 4; two padding slots at the end.
  pack = lambda x, n0, n1: jnp.concatenate([x[0, :n0], x[1, :n1], jnp.zeros(2, x.dtype)])[None]
  segments = lambda n0, n1: jnp.array([[1] * n0 + [2] * n1 + [0, 0]])
  positions = lambda n0, n1: jnp.array([list(range(n0)) + list(range(n1)) + [0, 0]])
  packed = _forward(params, encoder_input_tokens=pack(enc, 4, 3),
                    decoder_input_tokens=pack(dec_in, 3, 4),
                    decoder_target_tokens=pack(tgt, 3, 4),
                    encoder_segment_ids=segments(4, 3), decoder_segment_ids=segments(3, 4),
                    encoder_positions=positions(4, 3), decoder_positions=positions(3, 4))
  np.testing.assert_allclose(packed[0, :3], unpacked[0, :3], atol=ATOL)
  np.testing.assert_allclose(packed[0, 3:7], unpacked[1, :4], atol=ATOL)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _init_cache(params, cfg, enc, max_length):
  """Encodes once and returns the decode cache (cross-attention keys/values filled)."""
  model = network.Transformer(cfg)
  encoded = model.apply({'params': params}, enc, enable_dropout=False, method=model.encode)
  _, variables = model.apply({'params': params}, encoded, enc,
                             jnp.zeros((enc.shape[0], max_length), jnp.int32), decode=True,
                             enable_dropout=False, mutable=['cache'], method=model.decode)
  return variables['cache']


@functools.partial(jax.jit, static_argnums=1)
def _decode_step(params, cfg, cache, enc, tokens):
  model = network.Transformer(cfg)
  return model.apply({'params': params, 'cache': cache}, None, enc, tokens, decode=True,
                     enable_dropout=False, mutable=['cache'], method=model.decode)


def _incremental_logits(params, cfg, batch):
  """Logits from encode once + one cached decode step per target position."""
  enc, dec_in = batch['encoder_input_tokens'], batch['decoder_input_tokens']
  cache, steps = _init_cache(params, cfg, enc, dec_in.shape[1]), []
  for i in range(dec_in.shape[1]):
    logits, variables = _decode_step(params, cfg, cache, enc, dec_in[:, i:i + 1])
    cache = variables['cache']
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


def test_incremental_decode_equals_full_forward(params):
  batch = _batch(jax.random.key(3), 4, 8, 6)
  full = _forward(params, **batch)
  incremental = _incremental_logits(params, TINY, batch)
  real = np.asarray(batch['decoder_target_tokens'] > 0)
  np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(full)[real], atol=1e-4)


def test_cached_decode_step_rejects_several_tokens(params):
  enc = _batch(jax.random.key(3), 4, 8, 6)['encoder_input_tokens']
  cache = _init_cache(params, TINY, enc, 6)
  with pytest.raises(ValueError, match='one token per row'):
    _decode_step(params, TINY, cache, enc, jnp.zeros((4, 2), jnp.int32))


def test_bfloat16_compute_gives_float32_logits_close_to_float32(params):
  batch = _batch(jax.random.key(4), 4, 8, 6)
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  logits32, logits16 = _forward(params, **batch), _forward(params, bf16, **batch)
  assert logits16.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(logits32)))
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)
  assert not np.allclose(logits16, logits32, atol=1e-6)  # the compute dtype was really bf16


def test_dropout_uses_the_rng():
  # One layer per stack and an rbg key: dropout masks drawn with threefry compile slowly on CPU.
  cfg = dataclasses.replace(TINY, dropout_rate=0.3, num_encoder_layers=1, num_decoder_layers=1)
  params = random_params(cfg)
  batch = _batch(jax.random.key(5), 4, 8, 6)
  apply_jit = jax.jit(lambda key: network.Transformer(cfg).apply(
      {'params': params}, **batch, enable_dropout=True, rngs={'dropout': key}))
  apply = lambda seed: apply_jit(jax.random.key(seed, impl='rbg'))
  np.testing.assert_array_equal(apply(0), apply(0))
  assert not np.allclose(apply(0), apply(1))


def test_variants_logits_via_embedding_and_single_activation():
  cfg = dataclasses.replace(TINY, logits_via_embedding=True, mlp_activations=('relu',))
  params = random_params(cfg)
  assert 'logits_dense' not in params['decoder']
  assert set(params['encoder']['layers_0']['mlp']) == {'wi', 'wo'}
  logits = _forward(params, cfg, **_batch(jax.random.key(6), 4, 8, 6))
  assert logits.shape == (4, 6, 64) and logits.dtype == jnp.float32


def test_bad_input_rank_raises(params):
  with pytest.raises(ValueError, match=r'\[batch, length\]'):
    _forward(params, encoder_input_tokens=jnp.ones((4,), jnp.int32),
             decoder_input_tokens=jnp.ones((1, 2), jnp.int32),
             decoder_target_tokens=jnp.ones((1, 2), jnp.int32))


def test_sharded_forward_matches_single_device(params):
  """Logical constraints resolve under a (data=4, model=2) mesh and do not change the result."""
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('batch', 'data'), ('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
           ('joined_kv', 'model'), ('embed', None), ('length', None), ('kv', None),
           ('relpos_buckets', None))
  batch = _batch(jax.random.key(7), 8, 6, 5)
  shardings = nn.logical_to_mesh_sharding(
      jax.tree_util.tree_map(lambda names: jax.sharding.PartitionSpec(*names),
                             network.logical_axes(TINY), is_leaf=lambda x: isinstance(x, tuple)),
      mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  assert sharded_params['decoder']['logits_dense']['kernel'].sharding.spec == (
      jax.sharding.PartitionSpec(None, 'model'))

  @jax.jit
  def forward(p, b):
    with nn.logical_axis_rules(rules):
      return _forward(p, **b)

  with jax.set_mesh(mesh):
    sharded = forward(sharded_params, batch)
  np.testing.assert_allclose(sharded, _forward(params, **batch), atol=1e-4)


def test_init_gives_plain_float32_and_folds_query_scale():
  """T5X folds 1/sqrt(head_dim) into the query initializer instead of scaling logits."""
  cfg = config_lib.get_config('tiny', vocab_size=64, head_dim=64, emb_dim=64)
  attention = network.MultiHeadAttention(cfg)
  x = jnp.ones((1, 2, 64))
  variables = jax.jit(attention.init)(jax.random.key(0), x, x)
  boxed = variables['params']['query']['kernel']
  assert isinstance(boxed, nn.LogicallyPartitioned) and boxed.names == ('embed', 'joined_kv')
  params = nn.meta.unbox(variables)['params']
  assert all(isinstance(v['kernel'], jax.Array) and v['kernel'].dtype == jnp.float32
             for v in params.values())
  ratio = float(jnp.std(params['query']['kernel']) / jnp.std(params['key']['kernel']))
  assert abs(ratio - 1 / 8) < 0.02


@pytest.fixture(scope='module')
def remat_steps():
  """`step(policy)`: the tiny T5's (loss, gradients) and compiled temporary bytes with that
  remat policy, computed once per policy."""
  from specialize_jax.model import models  # pylint: disable=g-import-not-at-top
  base = tiny_model.config(vocab_size=64, num_encoder_layers=2, num_decoder_layers=2)
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 64, (4, 7)).astype(np.int32)
  batch = {'encoder_input_tokens': rng.integers(2, 64, (4, 9)).astype(np.int32),
           'decoder_target_tokens': targets,
           'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           'decoder_loss_weights': np.ones_like(targets, np.float32)}
  params = tiny_model.random_params(base)

  @functools.lru_cache(maxsize=None)
  def step(policy):
    model = models.EncoderDecoderModel(dataclasses.replace(base, remat_policy=policy))
    initialized = jax.eval_shape(lambda: nn.meta.unbox(model.module.init(
        jax.random.key(0), batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'])['params']))
    assert jax.tree_util.tree_structure(initialized) == jax.tree_util.tree_structure(params)
    compiled = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])).lower(
        params).compile()
    return compiled(params), compiled.memory_analysis().temp_size_in_bytes
  return step


@pytest.mark.parametrize('policy', ['minimal', 'dots', 'full'])
def test_every_remat_policy_gives_the_same_loss_and_gradients(remat_steps, policy):
  """Rematerialization changes what the backward pass keeps, not what it computes: the loss and
  every gradient equal the plain network's (f32), with the same parameter tree; and the compiled
  step keeps fewer bytes alive (`full` recomputes whole layers)."""
  ((loss, grads), plain_bytes), ((loss_remat, grads_remat), remat_bytes) = (
      remat_steps('none'), remat_steps(policy))
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for got, want in zip(jax.tree_util.tree_leaves(grads_remat), jax.tree_util.tree_leaves(grads)):
    # f32: the recomputed activations sum in another order.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))
  if policy == 'full':
    assert remat_bytes < plain_bytes


def test_attention_logits_in_the_compute_dtype_are_a_switch():
  """`float32_attention_logits=False` (T5X's meaning): the same loss in float32, within bfloat16
  round-off in bfloat16."""
  from specialize_jax.model import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  targets = rng.integers(2, 64, (4, 6)).astype(np.int32)
  batch = {'encoder_input_tokens': rng.integers(2, 64, (4, 8)).astype(np.int32),
           'decoder_target_tokens': targets,
           'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0)))}
  for dtype, tolerance in (('float32', 1e-6), ('bfloat16', 2e-2)):
    base = tiny_model.config(vocab_size=64, dtype=dtype)
    params = tiny_model.random_params(base)
    losses = [float(jax.jit(models.EncoderDecoderModel(dataclasses.replace(
        base, float32_attention_logits=f32)).loss_fn)(params, batch, None)[0])
              for f32 in (True, False)]
    assert losses[1] == pytest.approx(losses[0], rel=tolerance), dtype
    if dtype == 'bfloat16':
      assert losses[1] != losses[0]  # the switch reaches the attention
