"""Tiny generated demo data for trainer tests, with the demo tasks registered over it."""
import contextlib
import os

from specialize_jax.demo import synthetic


@contextlib.contextmanager
def tiny_demo_data(tmp_path_factory, num_train: int = 2000, num_eval: int = 32):
  """Writes the demo data at tiny sizes and points `SPECIALIZE_DATA_DIR` (so the CLI's `import
  tasks` finds it too) and the demo tasks at it; restores both afterwards."""
  data = tmp_path_factory.mktemp('data')
  directory = data / 'demo'
  synthetic.write_demo_data(directory, num_train=num_train, num_eval=num_eval, seed=0)
  old = os.environ.get('SPECIALIZE_DATA_DIR')
  os.environ['SPECIALIZE_DATA_DIR'] = str(data)
  # Importing `tasks` registers every task (the demo's over the default directory) ...
  from specialize_jax.tasks import demo  # pylint: disable=g-import-not-at-top
  # ... then the demo's move to this directory.
  demo.register_demo_tasks(str(directory))
  try:
    yield directory
  finally:
    if old is None:
      os.environ.pop('SPECIALIZE_DATA_DIR', None)
    else:
      os.environ['SPECIALIZE_DATA_DIR'] = old
    demo.register_demo_tasks()  # Back to the default directory for later tests.
