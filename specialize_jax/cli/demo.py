"""`specialize demo`: a CoT and an answer-only tiny student trained on generated arithmetic
problems and compared, with no download."""
# The demo trains models: its handler imports JAX and the tasks when it runs.
# pylint: disable=g-import-not-at-top
import argparse

from specialize_jax.cli import common


def add_arguments(sub) -> None:
  """Declares `demo` on the `specialize` subparsers `sub`."""
  p = sub.add_parser("demo", help="train a CoT and an answer-only tiny student on generated "
                     "arithmetic problems and compare them (no download)")
  p.add_argument("--output_dir", default="runs/demo")
  p.add_argument("--only_data", action="store_true", help="write the demo data and stop")
  p.add_argument("--train_steps", type=int, default=None, help="override TRAIN_STEPS")
  p.set_defaults(fn=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
  from specialize_jax.demo import miniature
  from specialize_jax.tasks import demo as demo_tasks  # Registers the demo tasks, among others.
  from specialize_jax.training import preemption
  try:
    return miniature.run_demo(args.output_dir, str(demo_tasks.default_demo_dir()),
                              only_data=args.only_data, train_steps=args.train_steps)
  except preemption.Preempted as e:
    return common.report_preempted(e)
