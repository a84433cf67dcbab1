"""Greedy decoding throughput (generated tokens/s): our JAX decoder beside transformers `generate`
on the same random weights, in one run, on CPU.

  python tools/bench_decode.py [--preset small --batch 32 --new_tokens 128 --input_length 64]

The default model is t5-small-sized T5 v1.1 (the `small` preset: 8+8 layers, width 512, 6 heads,
gated MLP 1024, vocabulary 32,128), float32. Every row generates exactly `--new_tokens` tokens:
our decoder gets an EOS id that never occurs (-1) and `generate` gets `min_new_tokens`, so neither
stops early. Our first call (compile + one decode) and the compile time alone are reported apart
from the steady-state rate. The sides take turns (`side_by_side.py`: two runs per turn, the second
timed). Run it on an otherwise idle machine; it prints one JSON object.
"""
import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import side_by_side  # tools/, beside this script


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='small', help='specialize_jax.model.config preset')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--input_length', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3, help='turns: timed runs per side (median)')
  parser.add_argument('--torch_threads', type=int, default=0, help='0: torch default')
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from specialize_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.apply()  # As `specialize` runs.

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from specialize_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import config as config_lib  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import models  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import network  # pylint: disable=g-import-not-at-top

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  config = dataclasses.replace(config_lib.get_config(args.preset), dropout_rate=0.0)
  params = jax.tree.map(np.asarray, network.init_params(config, jax.random.key(0)))

  rng = np.random.RandomState(0)
  inputs = rng.randint(2, min(config.vocab_size, 32000), (args.batch, args.input_length))
  inputs[:, -1] = 1  # EOS, as SeqIO and the HF tokenizer end inputs
  generated_tokens = args.batch * args.new_tokens

  # Ours.
  model = models.EncoderDecoderModel(config, eos_id=-1)
  device_params = jax.device_put(params)
  batch = {'encoder_input_tokens': jnp.asarray(inputs, jnp.int32)}

  def ours():
    return jax.block_until_ready(model.predict_batch(
        device_params, batch, max_decode_length=args.new_tokens, decode_method='greedy'))

  start = time.perf_counter()
  ours_tokens = np.asarray(ours())
  first_call_s = time.perf_counter() - start

  # transformers, on the same weights (exported and reloaded as a user would).
  with tempfile.TemporaryDirectory() as tmp:
    directory = hf.save_hf(params, config, os.path.join(tmp, 'hf'))
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
  input_ids = torch.tensor(inputs)
  attention_mask = torch.tensor(inputs != 0)

  def theirs(new_tokens):
    with torch.no_grad():
      return hf_model.generate(
          input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
          use_cache=config.num_encoder_layers == config.num_decoder_layers)

  hf_tokens = theirs(args.new_tokens).numpy()
  times = side_by_side.time_in_turns({'ours': ours, 'theirs': lambda: theirs(args.new_tokens)},
                                     args.repeats)
  ours_s = statistics.median(times['ours'])
  hf_s = statistics.median(times['theirs'])
  if hf_tokens.shape[1] != args.new_tokens + 1:
    raise RuntimeError(f'transformers generated {hf_tokens.shape[1] - 1} tokens, not '
                       f'{args.new_tokens}; the comparison would be unfair.')

  ours_rate = generated_tokens / ours_s
  hf_rate = generated_tokens / hf_s
  print(json.dumps({
      'preset': args.preset, 'batch': args.batch, 'input_length': args.input_length,
      'new_tokens': args.new_tokens, 'jax_backend': jax.default_backend(),
      'torch_threads': torch.get_num_threads(),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES'),
      'ours_tokens_per_s': round(ours_rate, 1),
      'transformers_tokens_per_s': round(hf_rate, 1),
      'ours_over_transformers': round(ours_rate / hf_rate, 3),
      'ratio_per_turn': [round(h / o, 3) for o, h in zip(times['ours'], times['theirs'])],
      'ours_first_call_s': round(first_call_s, 2),
      'ours_compile_s': round(max(first_call_s - ours_s, 0.0), 2),
      # Greedy tokens should agree until min_new_tokens suppresses an EOS transformers would
      # otherwise pick (random weights rarely pick it).
      'token_agreement': round(float(np.mean(ours_tokens == hf_tokens[:, 1:])), 4),
  }))


if __name__ == '__main__':
  main()
