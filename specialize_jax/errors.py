"""The error for a configured value that cannot work (a gin binding, a flag, a config field).

Validation code raises `ConfigError` (a `ValueError`, so callers that catch `ValueError` still do)
with a message naming the value, where it is set and the fix; the `specialize` command prints that
message as one line and exits 2, keeping tracebacks for bugs.
"""


class ConfigError(ValueError):
  """A configured value is invalid; the message says what, the value, where and the fix."""
