"""Errors that mean "the user asked for something wrong", as opposed to bugs.

``launch/main.py`` prints these as one line (``error: <message>``) and exits with status 2
without a traceback; everything else is a bug and keeps its traceback.

Design choice: one base type, ``UserError``, with a few subclasses that say *what* was wrong
(data, output paths, a busy output folder). The data subclasses also derive from the built-in
type a library caller would expect (``ValueError``, ``FileNotFoundError``), so code that catches
those keeps working. Messages are one line and name the file or setting and the fix; the library
names config fields (``data_dir``), the launcher maps them to flags.
"""


class UserError(Exception):
  """Bad flags, missing or mismatched files, impossible requests."""


class DataError(UserError, ValueError):
  """A data file or dataset name is malformed, non-finite, out of range or unknown."""


class OutputError(UserError, OSError):
  """An output path cannot be written (not a folder, read-only, disk full...)."""


class ConfigError(UserError, ValueError):
  """A configuration field holds an invalid value; ``field`` names it (a launcher maps it to
  its flag)."""

  def __init__(self, field: str, message: str):
    super().__init__(f'{field}: {message}')
    self.field = field
    self.detail = message


class OutputLockedError(UserError):
  """Another live run holds the lock on the output folder."""


def one_line(text: object, limit: int = 400) -> str:
  """``text`` collapsed onto one line and shortened to ``limit`` characters (for messages)."""
  line = ' '.join(str(text).split())
  return line if len(line) <= limit else line[:limit - 3] + '...'
