"""Training throughput (target tokens/s): our trainer's jitted step beside Hugging Face
`transformers` + PyTorch on the same model size, batch and lengths, AdamW, in one run.

  python tools/bench_train.py [--preset small --batch 8 --inputs 512 --targets 256 --steps 5]
  python tools/bench_train.py --preset base --dtype bfloat16 --batch 64   # on a GPU

Prints one JSON object: both rates, their ratio, our first-step (compile) time, peak host memory
(ru_maxrss) after our part and after the peer's, and the model FLOPs rate: 6 x params x tokens per
step, the encoder's params on input tokens, the decoder's (with the output projection) on target
tokens; the token embedding is a lookup and attention scores are left out, as usual for MFU. On an
accelerator that rate gives model FLOPs utilisation, for both sides (the peer runs on the GPU when
ours does, with bf16 autocast for `--dtype bfloat16`), with our device memory peak. On CPU, beside
the peer, the script also times a 2048^3 float32 matrix product in both libraries, the rate a
training step could at best approach, so a target ratio can be checked against what the machine
does. The sides take turns
(`side_by_side.py`: two steps per turn, the second timed). Run it on an otherwise idle machine.

`--variants remat=full,attention=auto,logits=compute,remat=minimal+attention=cudnn` adds our step
under other settings as further sides of the same turns (`T5Config.remat_policy`,
`attention_kernel`, `float32_attention_logits=False` for `logits=compute`; `+` combines), each
reported with its rate, model FLOPs rate (MFU on an accelerator: model FLOPs count no
recomputation), first-step time, device memory peak and its ratio to the default step.
"""
import argparse
import json
import os
import resource
import statistics
import time

import side_by_side  # tools/, beside this script

PEAK_TFLOPS = {  # dense bf16 peak per chip, for MFU
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5e": 197.0,
    "TPU v5p": 459.0,
}


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def random_batch(np, batch, inputs, targets, vocab, seed=0):
  """A numpy batch of random ids with SeqIO's encoder-decoder feature names (targets end in EOS)."""
  rng = np.random.default_rng(seed)
  encoder = rng.integers(2, vocab, size=(batch, inputs), dtype=np.int32)
  target = rng.integers(2, vocab, size=(batch, targets), dtype=np.int32)
  target[:, -1] = 1
  decoder_input = np.concatenate([np.zeros((batch, 1), np.int32), target[:, :-1]], axis=1)
  return {"encoder_input_tokens": encoder, "decoder_input_tokens": decoder_input,
          "decoder_target_tokens": target,
          "decoder_loss_weights": np.ones((batch, targets), np.float32)}


# --variants keys -> T5Config fields.
VARIANT_FIELDS = {"remat": ("remat_policy", str), "attention": ("attention_kernel", str),
                  "logits": ("float32_attention_logits", lambda v: {"float32": True,
                                                                    "compute": False}[v])}


def parse_variants(text: str) -> dict:
  """`{name: T5Config overrides}` of `--variants` (see the module docstring)."""
  variants = {}
  for name in filter(None, (part.strip() for part in text.split(","))):
    overrides = {}
    for setting in name.split("+"):
      key, _, value = setting.partition("=")
      if key not in VARIANT_FIELDS:
        raise SystemExit(f"--variants: unknown setting {key!r} in {name!r}; use "
                         f"{sorted(VARIANT_FIELDS)}.")
      field, convert = VARIANT_FIELDS[key]
      overrides[field] = convert(value)
    variants[name] = overrides
  return variants


def our_step(args, np_batch, overrides=None):
  """`(step() -> loss, info)`: our jitted train step on `np_batch`, compiled by a first step;
  `overrides`: T5Config fields (a `--variants` entry)."""
  import jax  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import models  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import optimizers  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import partitioning  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import train_state  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import train_step  # pylint: disable=g-import-not-at-top

  config = model_config.get_config(args.preset, dtype=args.dtype, dropout_rate=0.0,
                                   **(overrides or {}))
  model = models.EncoderDecoderModel(config)
  tx = optimizers.make_optimizer(optimizers.OptimizerConfig(learning_rate=1e-4,
                                                            schedule="constant", warmup_steps=0),
                                 num_train_steps=1000)
  partitioner = partitioning.PartitioningConfig()
  mesh = partitioning.make_mesh(partitioner)
  rules = partitioner.logical_axis_rules
  state, shardings = train_state.create_train_state(model, tx, mesh, rules, jax.random.PRNGKey(0))
  step_fn = train_step.make_train_step(model, tx, shardings, mesh, rules=rules)
  batch = partitioning.global_batch(np_batch, mesh)
  rng = jax.random.PRNGKey(1)
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch, rng)
    return float(jax.block_until_ready(metrics)["loss"])

  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  peak_gb = round(stats["peak_bytes_in_use"] / 2**30, 1) if "peak_bytes_in_use" in stats else None
  return step, {"first_step_s": first, "device_peak_gb": peak_gb,
                "encoder_params": count(state.params["encoder"]),
                "decoder_params": count(state.params["decoder"]),
                "device": jax.devices()[0].device_kind, "backend": jax.default_backend()}


def _matmul_rates(turns: int = 3, n: int = 2048, repeats: int = 5) -> dict:
  """GFLOP/s of an `n`^3 float32 matrix product in JAX (as configured) and in PyTorch, in turns."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  a, b = (np.random.default_rng(i).random((n, n), np.float32) for i in (0, 1))
  jax_a, jax_b = jax.device_put(a), jax.device_put(b)
  torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
  product = jax.jit(lambda x, y: x @ y)
  sides = {"jax": lambda: [jax.block_until_ready(product(jax_a, jax_b)) for _ in range(repeats)],
           "torch": lambda: [torch.mm(torch_a, torch_b) for _ in range(repeats)]}
  times = side_by_side.time_in_turns(sides, turns)
  return {name: round(repeats * 2 * n**3 / statistics.median(t) / 1e9, 1)
          for name, t in times.items()}


def _peer(args, np_batch, on_accelerator: bool):
  """PyTorch's step; on the GPU when ours runs on one (bf16 autocast when `--dtype bfloat16`)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  from specialize_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  config = model_config.get_config(args.preset, dropout_rate=0.0)
  hf_config = transformers.T5Config(**hf.config_to_hf(config))
  hf_config.dropout_rate = 0.0
  device = "cuda" if on_accelerator and torch.cuda.is_available() else "cpu"
  model = transformers.T5ForConditionalGeneration(hf_config).to(device)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  inputs = {
      "input_ids": torch.from_numpy(np_batch["encoder_input_tokens"]).long().to(device),
      "decoder_input_ids": torch.from_numpy(np_batch["decoder_input_tokens"]).long().to(device),
      "labels": torch.from_numpy(np_batch["decoder_target_tokens"]).long().to(device)}
  # f32 parameters, bf16 products: the same mixed precision as our `compute_dtype`.
  autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if (
      args.dtype == "bfloat16") else contextlib.nullcontext

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())  # waits for the device

  step()  # warm-up
  return step, {"threads": torch.get_num_threads(), "torch_device": device}


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
  """The model and batch flags of a benchmarked step (also `profile_train_step.py`'s)."""
  parser.add_argument("--preset", default="small")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=512)
  parser.add_argument("--targets", type=int, default=256)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_step_arguments(parser)
  parser.add_argument("--steps", type=int, default=5, help="turns: timed steps per side (median)")
  parser.add_argument("--skip_peer", action="store_true", help="ours only (e.g. on a GPU)")
  parser.add_argument("--variants", default="", help="more of our steps under other settings, "
                      "e.g. remat=full,attention=auto,logits=compute")
  args = parser.parse_args()
  variants = parse_variants(args.variants)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if not args.skip_peer:  # On a GPU, leave PyTorch room beside JAX's pool (75 % by default).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  from specialize_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  from specialize_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top
  allocator.reexec_with_tunables()  # As `specialize train` runs; both sides share it.
  xla_flags.apply()  # As `specialize` runs.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  vocab = model_config.get_config(args.preset).vocab_size
  np_batch = random_batch(np, args.batch, args.inputs, args.targets, vocab)
  target_tokens = args.batch * args.targets
  ours_step, ours = our_step(args, np_batch)
  peak_after_ours = _peak_rss_mb()
  peer_step, peer = (None, None) if args.skip_peer else _peer(args, np_batch,
                                                               ours["backend"] != "cpu")
  sides = {"ours": ours_step} if peer_step is None else {"ours": ours_step, "peer": peer_step}
  variant_info = {}
  for name, overrides in variants.items():
    sides[name], variant_info[name] = our_step(args, np_batch, overrides)
  times = side_by_side.time_in_turns(sides, args.steps)
  ours_s = statistics.median(times["ours"])
  result = {"preset": args.preset, "dtype": args.dtype, "batch": args.batch,
            "inputs": args.inputs, "targets": args.targets, "backend": ours["backend"],
            "device": ours["device"],
            "ours_target_tokens_per_s": round(target_tokens / ours_s, 1),
            "ours_first_step_s": round(ours["first_step_s"], 2),
            "peak_rss_mb_after_ours": round(peak_after_ours),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
  flops = 6 * (ours["encoder_params"] * args.batch * args.inputs +
               ours["decoder_params"] * args.batch * args.targets)
  result["model_gflop_per_step"] = round(flops / 1e9, 1)
  result["ours_model_gflops_per_s"] = round(flops / ours_s / 1e9, 1)
  peak = None if ours["backend"] == "cpu" else next(
      (v for k, v in PEAK_TFLOPS.items() if k.lower() in ours["device"].lower()), None)
  if ours["backend"] != "cpu":
    achieved = flops / ours_s / 1e12
    result.update({"model_tflops_per_s": round(achieved, 1),
                   "mfu_percent": round(100 * achieved / peak, 1) if peak else None,
                   "device_peak_gb": ours["device_peak_gb"]})
  if peer_step is not None:
    peer_s = statistics.median(times["peer"])
    result.update({
        "transformers_target_tokens_per_s": round(target_tokens / peer_s, 1),
        "torch_threads": peer["threads"], "torch_device": peer["torch_device"],
        "ours_over_transformers": round(peer_s / ours_s, 3),
        "ratio_per_turn": [round(p / o, 3) for o, p in zip(times["ours"], times["peer"])],
        "transformers_model_gflops_per_s": round(flops / peer_s / 1e9, 1),
        "transformers_mfu_percent": round(100 * flops / peer_s / 1e12 / peak, 1) if peak else None,
        "peak_rss_mb_after_peer": round(_peak_rss_mb())})
    if ours["backend"] == "cpu":
      result["matmul_2048_gflops_per_s"] = _matmul_rates()
  if variants:
    result["variants"] = {}
    for name, info in variant_info.items():
      seconds = statistics.median(times[name])
      result["variants"][name] = {
          "target_tokens_per_s": round(target_tokens / seconds, 1),
          "over_default": round(ours_s / seconds, 3),
          "model_gflops_per_s": round(flops / seconds / 1e9, 1),
          "mfu_percent": round(100 * flops / seconds / 1e12 / peak, 1) if peak else None,
          "first_step_s": round(info["first_step_s"], 2), "device_peak_gb": info["device_peak_gb"]}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
