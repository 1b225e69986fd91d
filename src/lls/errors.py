"""The one exception type a user is meant to see.

Anything raised as :class:`LLSError` is a problem with the user's input or environment (a missing
file, an unknown name, a shape that cannot work). The CLI prints its message as one line and exits
with a non-zero status; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class LLSError(Exception):
    """A user-facing error whose message names the problem and the fix."""
