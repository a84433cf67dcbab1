"""`specialize serve`: an OpenAI-compatible `/v1/completions` endpoint for any checkpoint."""
# The server loads a model: its handler imports JAX when it runs.
# pylint: disable=g-import-not-at-top
import argparse
import os
import signal
import threading

from specialize_jax.errors import ConfigError

API_KEY_ENV = "SPECIALIZE_SERVE_API_KEY"


def add_arguments(sub) -> None:
  """Declares `serve` on the `specialize` subparsers `sub`."""
  p = sub.add_parser("serve", help="serve a checkpoint as an OpenAI-compatible /v1/completions "
                     "endpoint (any OpenAI client, `specialize teacher`, evaluation harnesses)")
  p.add_argument("checkpoint", help="HF directory, T5X or orbax checkpoint (a run directory "
                 "serves its latest step)")
  p.add_argument("--vocab", required=True, help="the model's SentencePiece model")
  p.add_argument("--model_name", default=None, help="the `model` clients ask for (default: the "
                 "checkpoint directory's name)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; "
                 "0.0.0.0 exposes it: set a key)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--api_key", default=None, help=f"require `Authorization: Bearer KEY` (default "
                 f"${API_KEY_ENV}; unset: no key)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--max_prompt_tokens", type=int, default=1024)
  p.add_argument("--max_tokens", type=int, default=512, help="most tokens one choice may ask for")
  p.add_argument("--max_n", type=int, default=64)
  p.add_argument("--max_logprobs", type=int, default=20)
  p.add_argument("--max_batch_rows", type=int, default=64, help="rows (prompts x n) per decode")
  p.add_argument("--batch_window_ms", type=float, default=10.0, help="how long a decode waits for "
                 "more requests to batch with")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
  from specialize_jax.checkpoints import pretrained
  from specialize_jax.serving import completions
  from specialize_jax.serving import server as server_lib
  if args.host not in ("127.0.0.1", "localhost", "::1") and not (
      args.api_key or os.environ.get(API_KEY_ENV)):
    raise ConfigError(f"--host {args.host} exposes the server beyond this machine; give it a key "
                      f"(--api_key or ${API_KEY_ENV}).")
  model = pretrained.load_pretrained(args.checkpoint, dtype=args.dtype, vocabulary=args.vocab)
  name = args.model_name or os.path.basename(os.path.normpath(str(args.checkpoint)))
  limits = completions.Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                              max_n=args.max_n, max_logprobs=args.max_logprobs,
                              max_prompts=args.max_batch_rows, max_rows=args.max_batch_rows)
  engine = completions.CompletionEngine(model, name, limits, seed=args.seed)
  config = server_lib.ServeConfig(host=args.host, port=args.port,
                                  api_key=args.api_key or os.environ.get(API_KEY_ENV),
                                  batch_window_s=args.batch_window_ms / 1000.0,
                                  max_batch_rows=args.max_batch_rows)
  server = server_lib.CompletionServer(engine, config).start()
  print(f"Serving {name!r} at {server.url} (POST /v1/completions, GET /v1/models"
        f"{'; key required' if config.api_key else ''}). Ctrl-C or SIGTERM stops it.", flush=True)
  stopped = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stopped.set())
  try:
    stopped.wait()
  except KeyboardInterrupt:
    pass
  server.stop()
  return 0
