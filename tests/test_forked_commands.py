"""The test support that forks `specialize` commands from a server (`tests/support/forked_commands.py`)
refuses a command whose import-time environment differs from the server's."""
import pytest

from tests.support import forked_commands


def test_a_command_cannot_change_what_the_server_read_at_import():
  server = {'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': 'x', 'TF_CPP_MIN_LOG_LEVEL': '3', 'A': '1'}
  forked_commands.check_same_start(server, dict(server, A='2', XLA_FLAGS='--y'))
  for changed in ({'JAX_PLATFORMS': 'tpu'}, {'JAX_ENABLE_X64': '1'}, {'GLIBC_TUNABLES': ''}):
    with pytest.raises(ValueError, match='cannot change'):
      forked_commands.check_same_start(server, dict(server, **changed))
