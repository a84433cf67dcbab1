"""Checkpoint import/export: the T5X legacy, orbax and HF layouts, errors, conversion, loading.

No torch here: HF directories are written by our exporter (tests/test_hf_parity.py checks them
against transformers itself).
"""
import dataclasses
import functools
import json
import os
import shutil

from flax import serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import numpy as safetensors_numpy

import specialize_jax
from specialize_jax.checkpoints import directories
from specialize_jax.checkpoints import hf
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.checkpoints import param_tree
from specialize_jax.checkpoints import t5x_legacy
from specialize_jax.checkpoints import convert as convert_lib
from specialize_jax.model import network
from specialize_jax.model.config import PRESETS
from specialize_jax.checkpoints.pretrained import load_pretrained

# Inference cannot recover relative_attention_max_distance, so 128 (T5X's) keeps configs equal.
CONFIG = dataclasses.replace(PRESETS['tiny'], vocab_size=96, num_decoder_layers=3)
ODD_CONFIG = dataclasses.replace(
    PRESETS['tiny'], vocab_size=80, num_heads=3, head_dim=5, num_encoder_layers=1,
    mlp_activations=('relu',), relative_attention_num_buckets=10,
    relative_attention_max_distance=20, logits_via_embedding=True)


def _random_params(config, seed=0):
  """Random float32 params of the T5X tree, drawn in numpy (no JAX init to compile)."""
  rng = np.random.RandomState(seed)
  flat = {}
  for name, shape in param_tree.t5x_param_shapes(config).items():
    scale = 1.0 if len(shape) == 1 or name == 'token_embedder/embedding' else shape[0]**-0.5
    flat[name] = (rng.normal(size=shape) * scale).astype(np.float32)
  return param_tree.unflatten_params(flat)


def _assert_same(a, b):
  flat_a, flat_b = param_tree.flatten_params(a), param_tree.flatten_params(b)
  assert sorted(flat_a) == sorted(flat_b)
  for name, value in flat_a.items():
    assert flat_b[name].dtype == np.float32, name
    np.testing.assert_array_equal(flat_b[name], value, err_msg=name)


@pytest.fixture(scope='module')
def params():
  return _random_params(CONFIG)


def _rewrite_msgpack(step_dir, fn):
  path = os.path.join(step_dir, t5x_legacy.CHECKPOINT_FILE)
  with open(path, 'rb') as f:
    contents = serialization.msgpack_restore(f.read())
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(fn(contents)))


@pytest.mark.parametrize('config', [CONFIG, ODD_CONFIG], ids=['v1_1', 'odd'])
def test_param_shapes_are_the_networks(config):
  ours = param_tree.t5x_param_shapes(config)
  theirs = {k: tuple(v.shape) for k, v in
            param_tree.flatten_params(network.param_shapes(config)).items()}
  assert ours == theirs


def test_t5x_legacy_roundtrip(params, tmp_path):
  step_dir = str(tmp_path / 'model' / 'checkpoint_7')
  # Small chunks so several arrays span many zarr chunks; norm scales (16 values) go inline.
  t5x_legacy.save_t5x(params, step_dir, step=7, inline_max_size=16, chunk_bytes=512,
                      durable=False)
  with open(os.path.join(step_dir, 'checkpoint'), 'rb') as f:
    contents = serialization.msgpack_restore(f.read())
  assert contents['version'] == 3 and set(contents['optimizer']) == {'target', 'state'}
  spec = contents['optimizer']['target']['encoder']['layers_0']['attention']['key']['kernel']
  assert spec['driver'] == 'zarr' and spec['metadata']['shape'] == [16, 16]
  assert spec['kvstore']['path'].rstrip('/') == 'target.encoder.layers_0.attention.key.kernel'
  assert os.path.isdir(os.path.join(step_dir, 'target.encoder.layers_0.attention.key.kernel'))
  assert isinstance(contents['optimizer']['target']['encoder']['encoder_norm']['scale'],
                    np.ndarray)
  assert os.path.isdir(os.path.join(step_dir, 'state.param_states.token_embedder.embedding.v_row'))

  # The public FlanT5 checkpoints were written through gfile.
  def as_published(node):
    if t5x_legacy._is_ts_spec(node):  # pylint: disable=protected-access
      return dict(node, kvstore=dict(node['kvstore'], driver='gfile'))
    if isinstance(node, dict):
      return {k: as_published(v) for k, v in node.items()}
    return node

  _rewrite_msgpack(step_dir, as_published)
  assert directories.detect_format(tmp_path / 'model') == 't5x'
  config, restored = loading.load_checkpoint(tmp_path / 'model')  # latest step of the dir
  assert config == CONFIG
  _assert_same(params, restored)
  # The msgpack file itself is accepted too.
  _, restored = loading.load_checkpoint(os.path.join(step_dir, 'checkpoint'))
  _assert_same(params, restored)


def test_t5x_placeholder_leaves(tmp_path):
  """T5X's orbax-aggregate era: leaves are 'PLACEHOLDER://<zarr dir>' strings under _optimizer."""
  params = _random_params(ODD_CONFIG, seed=1)
  step_dir = str(tmp_path / 'checkpoint_1')
  t5x_legacy.save_t5x(params, step_dir, optimizer_state=False, durable=False)

  def to_placeholders(contents):
    target = contents['optimizer']['target']
    is_spec = t5x_legacy._is_ts_spec  # pylint: disable=protected-access
    flat = param_tree.flatten_params(target, is_leaf=is_spec)
    refs = {n: 'PLACEHOLDER://' + v['kvstore']['path'].rstrip('/') for n, v in flat.items()}
    return {'_optimizer': {'target': param_tree.unflatten_params(refs), 'state': {}},
            'flax_mutables': None}

  _rewrite_msgpack(step_dir, to_placeholders)
  config, restored = loading.load_checkpoint(step_dir, config=ODD_CONFIG)
  assert config == ODD_CONFIG
  _assert_same(params, restored)


def test_orbax_params_roundtrip_keeps_config(tmp_path):
  params = _random_params(ODD_CONFIG)
  orbax_pytree.save_orbax(params, ODD_CONFIG, tmp_path / 'ckpt')
  assert directories.detect_format(tmp_path / 'ckpt') == 'orbax'
  config, restored = loading.load_checkpoint(tmp_path / 'ckpt', dtype='bfloat16')
  # max_distance 20 and ReLU are not inferable from shapes: they come from the metadata.
  assert config == dataclasses.replace(ODD_CONFIG, dtype='bfloat16')
  _assert_same(params, restored)
  with pytest.raises(ValueError, match='exists'):
    orbax_pytree.save_orbax(params, ODD_CONFIG, tmp_path / 'ckpt')


def test_compute_dtype_is_the_given_or_stored_configs(params, tmp_path):
  """Import keeps the dtype of `config=` or of the config an orbax export stored (else float32);
  only `dtype=` replaces it. Params stay float32 (`_assert_same`)."""
  bf16 = dataclasses.replace(CONFIG, dtype='bfloat16')
  t5x_dir = str(tmp_path / 't5x' / 'checkpoint_0')
  t5x_legacy.save_t5x(params, t5x_dir, durable=False)
  hf_dir = hf.save_hf(params, CONFIG, tmp_path / 'hf')
  for path in (t5x_dir, hf_dir):
    assert loading.load_checkpoint(path)[0] == CONFIG
    config, restored = loading.load_checkpoint(path, config=bf16)
    assert config == bf16
    _assert_same(params, restored)
    assert loading.load_checkpoint(path, config=bf16, dtype='float32')[0] == CONFIG
  orbax_dir = orbax_pytree.save_orbax(params, bf16, tmp_path / 'orbax')
  config, restored = loading.load_checkpoint(orbax_dir)
  assert config == bf16
  _assert_same(params, restored)
  assert loading.load_checkpoint(orbax_dir, dtype='float32')[0] == CONFIG
  assert loading.load_checkpoint(orbax_dir, config=CONFIG)[0] == CONFIG


def test_orbax_t5x_train_state_layout(params, tmp_path):
  """Current T5X: model_dir/checkpoint_<step>/state holds {'target': params, 'state': ...}."""
  moments = jax.tree.map(lambda x: np.zeros(x.shape[:1], np.float32), params)
  tree = {'target': params, 'state': {'step': np.int32(3), 'param_states': moments}}
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  checkpointer.save(tmp_path / 'model' / 'checkpoint_3' / 'state', args=ocp.args.PyTreeSave(tree))
  config, restored = loading.load_checkpoint(tmp_path / 'model', fmt='orbax')
  assert config == CONFIG
  _assert_same(params, restored)


def test_orbax_checkpoint_manager_layout(params, tmp_path):
  """A CheckpointManager step (model_dir/<step>/default) with params beside optimizer mirrors."""
  tree = {'opt_state': {'mu': params, 'count': np.int32(4)}, 'params': params}
  manager = ocp.CheckpointManager(tmp_path / 'model')
  manager.save(4, args=ocp.args.StandardSave(tree))
  manager.wait_until_finished()
  assert directories.resolve_checkpoint(tmp_path / 'model') == (
      'orbax', tmp_path / 'model' / '4' / 'default')
  config, restored = loading.load_checkpoint(tmp_path / 'model')
  assert config == CONFIG
  _assert_same(params, restored)


def test_model_dir_resolves_to_the_latest_committed_step(params, tmp_path, caplog):
  """A save cut short (step metadata without a commit marker or timestamp) is skipped."""
  manager = ocp.CheckpointManager(tmp_path / 'model')
  manager.save(4, args=ocp.args.StandardSave({'params': params}))
  manager.wait_until_finished()
  torn = tmp_path / 'model' / '8'
  shutil.copytree(tmp_path / 'model' / '4', torn)
  (torn / directories.COMMIT_MARKER).unlink(missing_ok=True)
  metadata = torn / directories.STEP_METADATA_FILE
  metadata.write_text(json.dumps({k: v for k, v in json.loads(metadata.read_text()).items()
                                  if k != 'commit_timestamp_nsecs'}))
  assert not directories.is_committed_step_dir(torn)
  assert directories.is_committed_step_dir(tmp_path / 'model' / '4')
  with caplog.at_level('WARNING'):
    assert directories.resolve_checkpoint(tmp_path / 'model') == (
        'orbax', tmp_path / 'model' / '4' / 'default')
  assert 'did not finish' in caplog.text and str(torn) in caplog.text


def test_hf_roundtrip_without_torch(params, tmp_path):
  first = hf.save_hf(params, CONFIG, tmp_path / 'hf')
  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf_config['tie_word_embeddings'] is False and hf_config['scale_decoder_outputs'] is False
  assert hf_config['feed_forward_proj'] == 'gated-gelu'
  config, restored = loading.load_checkpoint(first)
  assert config == CONFIG
  _assert_same(params, restored)
  second = hf.save_hf(restored, config, tmp_path / 'hf2')
  a = safetensors_numpy.load_file(os.path.join(first, 'model.safetensors'))
  b = safetensors_numpy.load_file(os.path.join(second, 'model.safetensors'))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf', 'hf2']  # no temporary leftovers


def test_hf_tied_scaled_head_is_logits_via_embedding(tmp_path):
  params = _random_params(ODD_CONFIG)
  hf.save_hf(params, ODD_CONFIG, tmp_path / 'hf')
  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf_config['tie_word_embeddings'] is True and hf_config['scale_decoder_outputs'] is True
  assert hf_config['feed_forward_proj'] == 'relu'
  assert 'lm_head.weight' not in safetensors_numpy.load_file(
      str(tmp_path / 'hf' / 'model.safetensors'))
  config, restored = loading.load_checkpoint(tmp_path / 'hf')
  assert config == ODD_CONFIG
  _assert_same(params, restored)


def _drop_and_reshape(path, drop=None, reshape=None):
  tensors = safetensors_numpy.load_file(path)
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = np.zeros(tensors[reshape].shape[:-1] + (tensors[reshape].shape[-1] + 1,),
                                np.float32)
  safetensors_numpy.save_file(tensors, path)


def test_partial_hf_checkpoint_names_missing_and_wrong_shapes(params, tmp_path):
  directory = hf.save_hf(params, CONFIG, tmp_path / 'hf')
  weights = os.path.join(directory, 'model.safetensors')
  _drop_and_reshape(weights, drop='decoder.block.2.layer.2.DenseReluDense.wo.weight',
                    reshape='encoder.block.0.layer.0.SelfAttention.q.weight')
  with pytest.raises(param_tree.CheckpointMismatchError) as error:
    loading.load_checkpoint(directory)
  message = str(error.value)
  assert 'missing (1)' in message
  assert 'decoder.block.2.layer.2.DenseReluDense.wo.weight: expected shape (16, 32)' in message
  assert ('encoder.block.0.layer.0.SelfAttention.q.weight: expected shape (16, 16), found shape '
          '(16, 17)') in message
  assert error.value.missing == {'decoder.block.2.layer.2.DenseReluDense.wo.weight': (16, 32)}


def test_partial_t5x_checkpoint_names_missing_and_unexpected(params, tmp_path):
  step_dir = str(tmp_path / 'checkpoint_0')
  t5x_legacy.save_t5x(params, step_dir, optimizer_state=False, durable=False)

  def damage(contents):
    target = contents['optimizer']['target']
    del target['encoder']['layers_1']['mlp']['wo']
    target['encoder']['layers_1']['mlp']['wx'] = {'kernel': np.zeros((2, 2), np.float32)}
    return contents

  _rewrite_msgpack(step_dir, damage)
  with pytest.raises(param_tree.CheckpointMismatchError) as error:
    loading.load_checkpoint(step_dir)
  message = str(error.value)
  assert 'encoder/layers_1/mlp/wo/kernel: expected shape (32, 16)' in message
  assert 'unexpected (1)' in message and 'encoder/layers_1/mlp/wx/kernel: found shape (2, 2)' in (
      message)


def test_wrong_config_for_orbax_names_shapes(params, tmp_path):
  orbax_pytree.save_orbax(params, CONFIG, tmp_path / 'ckpt')
  wrong = dataclasses.replace(CONFIG, mlp_dim=48)
  with pytest.raises(param_tree.CheckpointMismatchError, match=(
      r'encoder/layers_0/mlp/wo/kernel: expected shape \(48, 16\), found shape \(32, 16\)')):
    loading.load_checkpoint(tmp_path / 'ckpt', config=wrong)


def test_unsupported_hf_configs_are_refused(params, tmp_path):
  directory = hf.save_hf(params, CONFIG, tmp_path / 'hf')
  config_path = os.path.join(directory, 'config.json')
  hf_config = json.loads(open(config_path).read())
  hf_config['feed_forward_proj'] = 'gelu'
  with open(config_path, 'w') as f:
    json.dump(hf_config, f)
  with pytest.raises(ValueError, match=r"feed_forward_proj='gelu' is not supported"):
    loading.load_checkpoint(directory)


def test_detect_format_errors(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    directories.detect_format(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='No checkpoint in'):
    directories.detect_format(tmp_path / 'empty')
  with pytest.raises(ValueError, match='Unknown checkpoint format'):
    loading.load_checkpoint(tmp_path / 'empty', fmt='pickle')


@pytest.mark.slow
def test_convert_and_load_pretrained(params, tmp_path):
  step_dir = str(tmp_path / 't5x' / 'checkpoint_0')
  t5x_legacy.save_t5x(params, step_dir, durable=False)
  hf_dir = convert_lib.convert(tmp_path / 't5x', 't5x', tmp_path / 'hf', 'hf')
  orbax_dir = convert_lib.convert(hf_dir, 'auto', tmp_path / 'orbax', 'orbax')
  with pytest.raises(ValueError, match='exists'):
    convert_lib.convert(hf_dir, 'hf', tmp_path / 'orbax', 'orbax')
  with pytest.raises(ValueError, match='--to'):
    convert_lib.convert(hf_dir, 'hf', tmp_path / 'x', 'gguf')
  from_orbax = specialize_jax.load_pretrained(orbax_dir)
  from_t5x = load_pretrained(step_dir)
  _assert_same(params, jax.tree.map(np.asarray, from_orbax.params))
  rng = np.random.RandomState(0)
  enc = rng.randint(2, CONFIG.vocab_size, (2, 7))
  enc[:, -1], enc[1, 4:] = 1, 0
  dec = np.concatenate([np.zeros((2, 1), int), rng.randint(2, CONFIG.vocab_size, (2, 4))], 1)
  logits = from_orbax.logits(enc, dec)
  assert logits.shape == (2, 5, CONFIG.vocab_size) and logits.dtype == np.float32
  np.testing.assert_array_equal(logits, from_t5x.logits(enc, dec))
  # Greedy decoding is the argmax of teacher-forced logits along its own output.
  tokens = from_orbax.generate(enc, 4)
  assert tokens.shape == (2, 4)
  forced = from_orbax.logits(enc, np.concatenate([np.zeros((2, 1), int), tokens[:, :-1]], 1))
  ended = np.cumsum(tokens == 1, axis=1) - (tokens == 1) > 0  # positions after EOS hold 0
  np.testing.assert_array_equal(np.where(ended, 0, forced.argmax(-1)), tokens)
  # Sampling is reproducible from the seed.
  sample = functools.partial(from_orbax.generate, enc, 4, decode_method='sample', num_decodes=3,
                             topk=20, return_all_decodes=True)
  first, again, other = sample(seed=1), sample(seed=1), sample(seed=2)
  assert first.shape == (2, 3, 4)
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()


class _CharVocabulary:
  """ids 3.. for letters; enough to test the string path without loading TensorFlow."""

  def encode(self, text):
    return [3 + ord(c) - ord('a') for c in text]

  def decode(self, ids):
    return ''.join(chr(ord('a') + i - 3) if 3 <= i < 29 else '?' for i in ids)


@pytest.mark.slow
def test_generate_with_vocabulary(params, tmp_path):
  directory = hf.save_hf(params, CONFIG, tmp_path / 'hf')
  model = load_pretrained(directory, vocabulary=_CharVocabulary())
  texts = model.generate(['abc', 'hello'], 4)
  tokens = model.generate(np.array([[3, 4, 5, 1, 0, 0], [10, 7, 14, 14, 17, 1]]), 4)
  expected = [_CharVocabulary().decode(list(row[:list(row).index(1)] if 1 in row else row))
              for row in tokens]
  assert texts == expected
  with pytest.raises(ValueError, match='need a vocabulary'):
    load_pretrained(directory).generate('abc', 4)


@pytest.mark.slow
def test_generate_with_sentencepiece_path(vocab_path, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  config = PRESETS['tiny']  # the T5 vocabulary size
  directory = hf.save_hf(_random_params(config), config, tmp_path / 'hf')
  model = load_pretrained(directory, vocabulary=str(vocab_path))
  assert isinstance(model.vocabulary, seqio.SentencePieceVocabulary)
  texts = model.generate(['Hello world', 'Q: 2 + 3?'], 3, return_all_decodes=True)
  ids = [model.vocabulary.encode(t) + [1] for t in ('Hello world', 'Q: 2 + 3?')]
  tokens = model.generate(ids, 3, return_all_decodes=True)  # ragged lists are padded
  assert tokens.shape == (2, 1, 3)
  assert texts == [[model.vocabulary.decode([i for i in row[0] if i != 1])] for row in tokens]
