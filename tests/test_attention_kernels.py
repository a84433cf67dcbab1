"""Fused attention kernels: each is T5's attention, and 'auto' picks them or says why not.

The Pallas kernel runs in Pallas's TPU interpreter here (the same kernel code a TPU compiles).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specialize_jax.model import attention_kernels
from specialize_jax.model import models
from specialize_jax.model.attention_mask import AttentionMask
from specialize_jax.training import partitioning
from specialize_jax.training import train_state as train_state_lib
from specialize_jax.training import train_step as train_step_lib
from tests.support import hlo
from tests.support import tiny_model


def test_the_cudnn_call_is_t5_attention():
  """`cudnn_attention` (here through its XLA implementation) is T5's attention: no 1/sqrt(d)
  scale, the relative bias and the mask added to the logits."""
  rng = np.random.default_rng(2)
  query, key, value = (rng.standard_normal((2, length, 3, 8)).astype(np.float32)
                       for length in (4, 6, 6))
  bias = rng.standard_normal((1, 3, 4, 6)).astype(np.float32)
  mask = rng.random((2, 1, 4, 6)) < 0.8
  mask[..., 0] = True  # every query sees something
  logits = np.einsum('bqhd,bkhd->bhqk', query, key) + bias + np.where(mask, 0.0, -1e10)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum('bhqk,bkhd->bqhd', weights, value)
  got = attention_kernels.cudnn_attention(jnp.asarray(query), jnp.asarray(key),
                                          jnp.asarray(value), jnp.asarray(mask),
                                          jnp.asarray(bias), implementation='xla')
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_auto_falls_back_with_its_reason_and_an_explicit_kernel_names_what_is_missing(caplog):
  caplog.set_level('INFO')
  query = jnp.zeros((2, 5, 3, 12), jnp.bfloat16)
  auto = tiny_model.config(attention_kernel='auto', dtype='bfloat16')
  assert attention_kernels.choose(auto, query, query, dropout=False) == 'xla'
  assert any('attention_kernel=auto: xla (no fused kernel on cpu)' in r.getMessage()
             for r in caplog.records)
  cudnn = tiny_model.config(attention_kernel='cudnn', dtype='bfloat16')
  with pytest.raises(ValueError, match='not gpu.*head_dim 12 is not a multiple of 8'):
    attention_kernels.choose(cudnn, query, query, dropout=False)
  pallas = tiny_model.config(attention_kernel='pallas')
  assert attention_kernels.choose(pallas, query, query, dropout=False) == 'pallas'  # padded
  with pytest.raises(ValueError, match='attention dropout is on'):
    attention_kernels.choose(pallas, query, query, dropout=True)
  assert attention_kernels.choose(tiny_model.config(), query, query, dropout=True) == 'xla'


def test_the_pallas_kernel_is_t5_attention_with_packing_padding_and_causality():
  """Per-token ids and the causal flag mask what the dense mask masks; the output of every real
  query, and the gradients of the inputs and of the relative bias, equal the reference's."""
  rng = np.random.default_rng(3)
  query, key, value = (jnp.asarray(rng.standard_normal((2, 8, 2, 16)), jnp.float32)
                       for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((1, 2, 8, 8)), jnp.float32)
  # Row 0: two packed examples and padding; row 1: one example and padding.
  ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
  real = np.asarray(ids > 0)
  for causal in (False, True):
    mask = AttentionMask(ids, ids, causal=causal)

    def reference(q, k, v, b, mask=mask):
      dense = attention_kernels.cudnn_attention(q, k, v, mask.dense(), b, implementation='xla')
      return jnp.where(real[:, :, None, None], dense, 0.0)

    def pallas(q, k, v, b, mask=mask):
      out = attention_kernels.pallas_attention(q, k, v, mask, b)
      return jnp.where(real[:, :, None, None], out, 0.0)

    np.testing.assert_allclose(pallas(query, key, value, bias),
                               reference(query, key, value, bias), atol=1e-5)
    cotangent = jnp.asarray(rng.standard_normal(query.shape), jnp.float32)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2, 3))(
        query, key, value, bias) for f in (reference, pallas)]
    for want, got in zip(*grads):
      np.testing.assert_allclose(got, want, atol=1e-4)


def _batch(rows: int = 8):
  rng = np.random.default_rng(4)
  target_lengths = np.array([8, 3, 5, 1, 8, 6, 2, 7][:rows])
  targets = rng.integers(2, 64, (rows, 8)).astype(np.int32)
  targets = np.where(np.arange(8) < target_lengths[:, None], targets, 0)
  inputs = rng.integers(2, 64, (rows, 16)).astype(np.int32)
  inputs[::2, 12:] = 0
  return {'encoder_input_tokens': inputs, 'decoder_target_tokens': targets,
          'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          'decoder_loss_weights': (targets > 0).astype(np.float32)}


@pytest.mark.slow
@pytest.mark.parametrize('reduction', train_step_lib.GRADIENT_REDUCTIONS)
def test_a_pallas_train_step_equals_the_reference_on_a_two_axis_mesh(reduction):
  """One SGD step of the tiny T5 on a (data=2, model=2) mesh, heads split over `model`, two
  micro-batches: the Pallas kernel runs per shard and gives the reference step's loss and
  gradient, with either gradient reduction (the per-shard one vmaps the kernel), and the step
  gathers and reduces no more than the reference's. (Without `shard_map`, XLA replicates the
  kernel's operands: 44 all-gathers and 180 all-reduces in the loop instead of 2 and 14,
  measured on 4 CPU devices with jaxlib 0.10.2.)"""
  base = tiny_model.config(vocab_size=64)
  params = tiny_model.random_params(base, as_numpy=True)
  mesh = partitioning.make_mesh(partitioning.PartitioningConfig(num_partitions=2),
                                jax.devices()[:4])
  rules = partitioning.STANDARD_LOGICAL_AXIS_RULES
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  batch = partitioning.global_batch(_batch(), mesh)
  results = {}
  for kernel in ('xla', 'pallas'):
    model = models.EncoderDecoderModel(dataclasses.replace(base, attention_kernel=kernel))
    state, shardings = train_state_lib.create_train_state(
        model, optimizer, mesh, rules, jax.random.key(0), init_params_fn=lambda: params)
    step = train_step_lib.make_train_step(model, optimizer, shardings, mesh, 2, rules=rules,
                                          gradient_reduction=reduction)
    compiled = step.lower(state, batch, jax.random.key(1)).compile()
    state, metrics = compiled(state, batch, jax.random.key(1))
    gradient = jax.tree_util.tree_map(lambda a, b: a - b, params, jax.device_get(state.params))
    collectives = [hlo.collectives_outside_and_inside_loops(compiled.as_text(), op)
                   for op in ('all-gather', 'all-reduce')]
    results[kernel] = gradient, jax.device_get(metrics), collectives
  (want, want_metrics, want_collectives), (got, got_metrics, got_collectives) = (
      results['xla'], results['pallas'])
  for (got_outside, got_inside), (want_outside, want_inside) in zip(got_collectives,
                                                                    want_collectives):
    assert got_outside <= want_outside and got_inside <= want_inside, (got_collectives,
                                                                      want_collectives)
  np.testing.assert_allclose(got_metrics['loss'], want_metrics['loss'], rtol=1e-5)
  for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    # f32: the kernel's online softmax sums in another order.
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(want_leaf))))
