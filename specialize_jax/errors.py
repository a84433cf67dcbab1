"""The errors for problems the user can fix, as opposed to bugs.

`UserError` is the family: a wrong flag or gin value, a missing or malformed input file, a run
directory without what the command needs. Its message names what is wrong, where it is set or
found, and the fix. The `specialize` command prints such a message as one line and exits 2; any
other exception is a bug and ends in a traceback.

`ConfigError` is the kind for a configured value that cannot work (a gin binding, a flag, a config
field). It is also a `ValueError`, so library callers that catch `ValueError` still do. Modules with
their own error kinds for malformed inputs (teacher data, predictions, data files) derive them from
`UserError` and `ValueError` likewise.
"""


class UserError(Exception):
  """A problem the user can fix; the message says what, where and the fix."""


class ConfigError(UserError, ValueError):
  """A configured value is invalid; the message says what, the value, where and the fix."""
