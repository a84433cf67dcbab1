"""Learning curve beside Hugging Face `transformers` + PyTorch: the same initial weights, the same demo
batches, AdamW with the same settings, step by step, in one run.

  python tools/compare_learning_curve.py [--steps 120 --lr 2e-3 --batch 64]

Both sides start from our initialisation (converted with `hf.params_to_hf`), train on
unpacked `demo_train_cot` batches (the demo data must exist: `specialize demo --only_data`), and
print one JSON object with the per-token cross-entropy of both every 10 steps. Equal curves (up to
float drift that grows with the steps) show the trainer learns exactly as the reference framework
does; `--hf_init` starts PyTorch from transformers' own initialisation instead.
"""
import argparse
import json
import os


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--weight_decay", type=float, default=0.01)
  parser.add_argument("--hf_init", action="store_true", help="PyTorch keeps transformers' init")
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from specialize_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.apply()
  # pylint: disable=g-import-not-at-top
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  import transformers
  import specialize_jax.tasks  # pylint: disable=unused-import  (registers the demo tasks)
  from specialize_jax.data import feature_converters
  from specialize_jax.model import config as model_config
  from specialize_jax.checkpoints import hf
  from specialize_jax.model import models
  from specialize_jax.training import input_pipeline
  # pylint: enable=g-import-not-at-top

  config = model_config.get_config("demo", dtype="float32", dropout_rate=0.0)
  model = models.EncoderDecoderModel(config, z_loss=0.0)
  data = input_pipeline.DatasetConfig("demo_train_cot", {"inputs": 128, "targets": 64},
                                      args.batch, pack=False, seed=0)
  feature_converters.check_vocabulary_fits(input_pipeline.mixture_or_task(data), config.vocab_size)
  iterator = input_pipeline.TrainIterator(data, shards=[(0, 1)])
  batches = [next(iterator) for _ in range(args.steps)]
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 8)}
  params = flax.core.meta.unbox(
      model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])

  hf_config = transformers.T5Config(**hf.config_to_hf(config))
  hf_config.dropout_rate = 0.0
  hf_config.tie_word_embeddings = False  # transformers 5.x ties it in the constructor
  peer = transformers.T5ForConditionalGeneration(hf_config)
  if not args.hf_init:
    state = hf.params_to_hf(jax.tree.map(np.asarray, params), config)
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      state[name] = state["shared.weight"]  # separate tensors when built from a config
    peer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})

  tx = optax.adamw(args.lr, weight_decay=args.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    grads, metrics = jax.grad(lambda p: model.loss_fn(p, batch, None), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            metrics["cross_ent_loss"] / metrics["num_tokens"])

  peer_optimizer = torch.optim.AdamW(peer.parameters(), lr=args.lr,
                                     weight_decay=args.weight_decay)
  ours, theirs = [], []
  for batch in batches:
    # Ours sums the token losses, PyTorch averages them: AdamW is invariant to that scale.
    params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(v) for k, v in batch.items()})
    ours.append(float(loss))
    labels = torch.from_numpy(batch["decoder_target_tokens"]).long()
    labels[labels == 0] = -100
    peer_optimizer.zero_grad()
    out = peer(input_ids=torch.from_numpy(batch["encoder_input_tokens"]).long(),
               attention_mask=torch.from_numpy(batch["encoder_input_tokens"] > 0).long(),
               decoder_input_ids=torch.from_numpy(batch["decoder_input_tokens"]).long(),
               labels=labels)
    out.loss.backward()
    peer_optimizer.step()
    theirs.append(out.loss.item())
  every = sorted(set(range(0, args.steps, 10)) | {args.steps - 1})
  print(json.dumps({"steps": args.steps, "lr": args.lr, "batch": args.batch,
                    "peer_init": "transformers" if args.hf_init else "ours",
                    "ours": {i: round(ours[i], 4) for i in every},
                    "transformers": {i: round(theirs[i], 4) for i in every}}))


if __name__ == "__main__":
  main()
