"""Errors in what a user gave: a file, an argument, a config key or value.

`kosmos-jax` prints them as one line (`kosmos-jax CMD: error: ...`, exit
status 2) instead of a traceback, so each message must name what to fix. A
ValueError: through the Python API they are bad values like any other.
"""


class UserError(ValueError):
  """Bad input; the message names the file, record, argument or key."""
