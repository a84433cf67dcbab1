"""`specialize convert`: a checkpoint between the HF, T5X and orbax formats."""
import argparse
import json


def add_arguments(sub) -> None:
  """Declares `convert` on the `specialize` subparsers `sub`."""
  p = sub.add_parser("convert", help="convert a checkpoint between HF, T5X and orbax formats")
  p.add_argument("--from", dest="src_format", choices=("hf", "t5x", "auto"), default="auto")
  p.add_argument("src")
  p.add_argument("--to", dest="dst_format", choices=("hf", "orbax", "t5x"), required=True,
                 help="t5x: T5X's legacy layout; name DST checkpoint_<step>")
  p.add_argument("dst")
  p.set_defaults(fn=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
  # Reading and writing checkpoints imports JAX and orbax: only when converting.
  from specialize_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  result = convert.convert(args.src, args.src_format, args.dst, args.dst_format)
  print(json.dumps(result) if isinstance(result, dict) else f"wrote {args.dst}")
  return 0
