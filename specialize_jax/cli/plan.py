"""`specialize plan`: the per-device memory of a gin-configured training step on a target
topology, compiled abstractly on fake CPU devices, with a verdict and the fix."""
# Planning imports JAX, which must see the fake devices first: the handler imports it.
# pylint: disable=g-import-not-at-top
import argparse
import sys
from typing import List

from specialize_jax.cli import common
from specialize_jax.errors import ConfigError


def add_arguments(sub) -> None:
  """Declares `plan` on the `specialize` subparsers `sub`."""
  p = sub.add_parser("plan", help="per-device memory of the train step on a target topology "
                     "(compiled abstractly on fake CPU devices) and a verdict with the fix; exit 1 "
                     "when it does not fit")
  common.add_gin_flags(p, "gin file (repeatable; as `specialize train`)")
  p.add_argument("--topology", default=None,
                 help="e.g. v4-32 (16 chips), v5e-64, v5p-128, 8xH100, 8xA100-40 (default: the "
                 "one the gin file's `# Topology:` header line names)")
  p.add_argument("--no_compile", action="store_true",
                 help="analytic rows only (params, optimizer state, gradients): no XLA "
                 "temporaries, seconds instead of minutes")
  p.set_defaults(fn=cmd_plan, takes_extra=True)


def cmd_plan(args: argparse.Namespace, extra: List[str]) -> int:
  """Prints the plan; exit code 1 when the step does not fit the topology's memory."""
  import jax
  from specialize_jax.jobs import plan_config
  from specialize_jax.planning import memory_plan
  if not args.gin_file:
    raise ConfigError("give at least one --gin_file (e.g. gin/experiments/flan_t5_xl_gsm8k.gin).")
  search_paths = common.search_paths(args)
  topology = plan_config.gin_topology(args.gin_file, search_paths, args.topology)
  # Fake CPU devices, as many as the topology has chips, whatever this machine has: set before
  # anything starts a backend (main() starts none for this command).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", topology.num_devices)
  request = plan_config.plan_request(args.gin_file, extra, search_paths, topology)
  result = memory_plan.plan(request, compile_step=not args.no_compile,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
  print(memory_plan.format_plan(result))
  return 0 if result.fits else 1
