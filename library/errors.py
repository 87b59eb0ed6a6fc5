"""The project's exception for bad user input.

Anything a user can fix (a config key, a path, a value) raises ``UserError`` with a message
that names the file, key or value and says what to do. The entry points print the message
without a traceback and exit with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: the message alone must be enough to fix it."""


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """The valid name closest to a mistyped one, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or an empty string, for the end of an error message."""
    best = closest_name(name, candidates)
    return f" (did you mean '{best}'?)" if best else ""
