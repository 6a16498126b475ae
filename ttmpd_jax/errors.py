"""Errors that mean "the user asked for something wrong", as opposed to bugs.

``launch/main.py`` prints these as one line and exits non-zero without a traceback; everything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad flags, missing or mismatched files, impossible requests."""
