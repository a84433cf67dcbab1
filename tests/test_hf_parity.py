"""Parity with Hugging Face transformers (PyTorch, CPU) on tiny random T5s, and export back to HF.

Cases cover both conventions of HF's config.json for the output head: `flan_untied` has its own
head (a new `lm_head.weight`, the published-FlanT5 situation) and is also read with the
transformers-4.x config (`tie_word_embeddings: false`, no `scale_decoder_outputs`);
`v11_shared_head` is what transformers 5.x writes for `tie_word_embeddings=False` (no head tensor,
no output scaling); `original_t5` is tied, scaled and non-gated ReLU; `gated_silu` checks another
activation.
Shapes are deliberately awkward: d_kv * heads != d_model, unequal encoder/decoder depth,
8 buckets, max distance 20.
"""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from specialize_jax.checkpoints import hf
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import param_tree
from specialize_jax.checkpoints.pretrained import load_pretrained

# The tolerance for a whole model's logits in float32.
LOGITS_ATOL = 1e-4
VOCAB = 96
MAX_NEW_TOKENS = 12
CASES = {
    'flan_untied': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False, d_kv=6,
                        num_heads=3, num_layers=2, num_decoder_layers=3),
    'v11_shared_head': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False, d_kv=6,
                            num_heads=3, num_layers=3, num_decoder_layers=2),
    'original_t5': dict(feed_forward_proj='relu', d_kv=4, num_heads=4, num_layers=2,
                        num_decoder_layers=2),
    'gated_silu': dict(feed_forward_proj='gated-silu', tie_word_embeddings=False, d_kv=8,
                       num_heads=2, num_layers=1, num_decoder_layers=1),
}


@pytest.fixture(scope='module')
def torch():
  return pytest.importorskip('torch')


@pytest.fixture(scope='module')
def transformers(torch):
  del torch
  return pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def hf_models(torch, transformers, tmp_path_factory):
  """name -> (torch model in eval mode, directory written by save_pretrained)."""
  out = {}
  for name, overrides in CASES.items():
    torch.manual_seed(len(out))
    # HF's default initialization: larger weights make the float32 forward pass itself
    # ill-conditioned (HF float32 vs float64 differ by ~4e-2 at initializer_factor=3).
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=24, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0,
        **overrides)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if name == 'flan_untied':
      head = torch.randn(VOCAB, 16) * 3.0
      # EOS scores 5% above token 10, which greedy decoding picks in one row only: that row
      # stops early, the others run to the limit (the greedy test checks this).
      head[1] = head[10] * 1.05
      model.lm_head.weight = torch.nn.Parameter(head)
    directory = tmp_path_factory.mktemp('hf') / name
    model.save_pretrained(directory)
    out[name] = (model, directory)
  # The same weights with the transformers-4.x config convention of published FlanT5.
  model, directory = out['flan_untied']
  legacy = directory.parent / 'flan_untied_4x_config'
  shutil.copytree(directory, legacy)
  config = json.loads((legacy / 'config.json').read_text())
  config.pop('scale_decoder_outputs')
  config['tie_word_embeddings'] = False
  (legacy / 'config.json').write_text(json.dumps(config))
  out['flan_untied_4x_config'] = (model, legacy)
  return out


def _inputs():
  """Encoder ids with EOS and right padding of different lengths; decoder ids after BOS 0."""
  rng = np.random.RandomState(0)
  enc = rng.randint(2, VOCAB, (3, 9))  # [batch, length]
  enc[:, -1] = 1
  enc[1, 4], enc[1, 5:] = 1, 0
  enc[2, 2], enc[2, 3:] = 1, 0
  dec = np.concatenate([np.zeros((3, 1), int), rng.randint(2, VOCAB, (3, 6))], axis=1)
  return enc, dec


def _hf_logits(torch, model, enc, dec):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()


@pytest.mark.parametrize('case', sorted(CASES) + ['flan_untied_4x_config'])
def test_logits_match_transformers(case, hf_models, torch):
  model, directory = hf_models[case]
  ours = load_pretrained(directory)
  assert ours.config.logits_via_embedding == (case == 'original_t5')
  enc, dec = _inputs()
  expected = _hf_logits(torch, model, enc, dec)
  got = ours.logits(enc, dec)
  assert got.shape == expected.shape == (3, dec.shape[1], VOCAB)
  max_diff = float(np.abs(got - expected).max())
  print(f'{case}: max |logits diff| = {max_diff:.2e}, max |logits| {np.abs(expected).max():.2e}')
  assert max_diff < LOGITS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize('case', ['flan_untied', 'original_t5'])
def test_greedy_matches_generate(case, hf_models, torch):
  model, directory = hf_models[case]
  enc, _ = _inputs()
  # use_cache=False: cached generate fails for unequal encoder/decoder depth in transformers 5.x.
  with torch.no_grad():
    hf_ids = model.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                            do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                            use_cache=False).numpy()
  expected = np.zeros((3, MAX_NEW_TOKENS), np.int64)  # HF pads rows after EOS with pad id 0
  expected[:, :hf_ids.shape[1] - 1] = hf_ids[:, 1:]  # drop the decoder start token
  got = load_pretrained(directory).generate(enc, MAX_NEW_TOKENS)
  np.testing.assert_array_equal(got, expected)
  if case == 'flan_untied':
    # The case must exercise both stopping at EOS and running to the length limit.
    ended = (got == 1).any(axis=1)
    assert ended.any() and not ended.all(), got
    assert len({tuple(row) for row in got}) == 3 and len(set(got[0])) > 2, got


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_reloads_in_transformers(case, hf_models, torch, transformers, tmp_path):
  """HF -> ours -> HF: the same arrays, and transformers computes the same logits."""
  model, directory = hf_models[case]
  config, params = loading.load_checkpoint(directory)
  exported = hf.save_hf(params, config, tmp_path / 'export')
  original = model.state_dict()  # tied tensors appear under every name
  written = safetensors_numpy.load_file(os.path.join(exported, hf.SAFETENSORS_FILE))
  for name, value in written.items():
    np.testing.assert_array_equal(value, original[name].numpy(), err_msg=name)
  # Every tensor is written, except the embedding copies HF ties on load (and a tied head).
  assert set(original) - set(written) <= set(hf.EMBEDDING_COPIES) | (
      {'lm_head.weight'} if case == 'original_t5' else set())
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(exported).eval()
  enc, dec = _inputs()
  np.testing.assert_array_equal(_hf_logits(torch, reloaded, enc, dec),
                                _hf_logits(torch, model, enc, dec))


def test_sharded_safetensors_and_pytorch_bin(hf_models, torch, tmp_path):
  model, directory = hf_models['flan_untied']
  _, reference = loading.load_checkpoint(directory)
  sharded = tmp_path / 'sharded'
  model.save_pretrained(sharded, max_shard_size='20KB')
  assert (sharded / hf.SAFETENSORS_INDEX_FILE).exists()
  torch_dir = tmp_path / 'torch'
  torch_dir.mkdir()
  shutil.copy(directory / 'config.json', torch_dir / 'config.json')
  torch.save(model.state_dict(), torch_dir / hf.TORCH_FILE)
  for path in (sharded, torch_dir):
    _, params = loading.load_checkpoint(path)
    for name, value in param_tree.flatten_params(reference).items():
      np.testing.assert_array_equal(param_tree.flatten_params(params)[name], value,
                                    err_msg=f'{path.name}: {name}')
