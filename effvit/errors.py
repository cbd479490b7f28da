"""User-facing errors: one line that says what to change.

Entry points catch `EffvitError`, print `error: <message>` and exit with status 2.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class EffvitError(ValueError):
  """A mistake in the user's input (config, command line, files), not a bug."""
  exit_code = 2


class ConfigError(EffvitError):
  """An invalid or inconsistent configuration."""


class DataError(EffvitError):
  """A dataset that is missing, unprepared or unreadable."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
  """' (did you mean: a, b?)' or '' — for error messages about unknown names."""
  matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
  return f" (did you mean: {', '.join(matches)}?)" if matches else ""
