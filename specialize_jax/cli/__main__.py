"""`python -m specialize_jax.cli ...`: the `specialize` command."""
import sys

from specialize_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
