"""`specialize demo`: the paper's experiment in miniature (a generated world, a pretrained and an
instruction-tuned student, a served teacher, specialization and its ablations, the findings
report), offline on CPU."""
# The demo trains models: its handler imports JAX and the tasks when it runs.
# pylint: disable=g-import-not-at-top
import argparse

from specialize_jax.cli import common
from specialize_jax.errors import ConfigError


def add_arguments(sub) -> None:
  """Declares `demo` on the `specialize` subparsers `sub`."""
  p = sub.add_parser("demo", help="the paper in miniature: pretrain and instruction-tune a small "
                     "student, serve and sample a teacher, specialize (and ablate), report the "
                     "paper's findings (no download)")
  p.add_argument("--output_dir", default="runs/demo")
  p.add_argument("--world_dir", default=None, help="the world and its cached stages (default: "
                 "<data dir>/world, <data dir>/world_quick with --quick)")
  p.add_argument("--seeds", type=int, default=1, help="specialization seeds (0..N-1); findings "
                 "are judged on the seed mean")
  p.add_argument("--quick", action="store_true", help="a tiny world and a few steps per stage: "
                 "every stage in minutes (the numbers mean nothing)")
  p.add_argument("--only_data", action="store_true", help="write the world (and the arithmetic "
                 "set of gin/experiments/demo_cpu*.gin) and stop")
  p.set_defaults(fn=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
  from specialize_jax.data import data_dir
  from specialize_jax.demo import miniature
  from specialize_jax.tasks import world as world_tasks  # Registers every task, the world's too.
  from specialize_jax.training import preemption
  if args.seeds < 1:
    raise ConfigError(f"--seeds {args.seeds}: give at least 1.")
  seeds = tuple(range(args.seeds))
  settings = (miniature.DemoSettings.quick(seeds) if args.quick else
              miniature.DemoSettings(seeds=seeds))
  world_dir = args.world_dir or str(data_dir.data_dir() / ("world_quick" if args.quick else
                                                           world_tasks.WORLD_SUBDIR))
  if args.only_data:
    from specialize_jax.demo import synthetic
    from specialize_jax.tasks import demo as demo_tasks
    synthetic.write_demo_data(demo_tasks.default_demo_dir())
  try:
    return miniature.run_demo(args.output_dir, world_dir, world_tasks.register_world_tasks,
                              settings, only_data=args.only_data)
  except preemption.Preempted as e:
    return common.report_preempted(e)
