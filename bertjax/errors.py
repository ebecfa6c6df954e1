"""The one exception a user's mistake raises, and how every verb reports it.

A `UserError` is bad input that the user can fix: a missing file, a column that is not there, a
damaged checkpoint, a workdir another process holds. `bertjax` prints its message as one line
(`bertjax VERB: MESSAGE`) and exits with status 1, without a traceback; `--verbose` (or
`BERTJAX_VERBOSE=1`) shows the traceback for debugging. The message names the input (file, line,
key) and, where there is one, the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message names the input and the fix, on one line."""


class MissingInputError(UserError, FileNotFoundError):
    """A file, directory or checkpoint step the user named is not there (still a FileNotFoundError to callers)."""


# Exit statuses of `bertjax`: 0 done, 1 a user error (bad input, a failed arm), 2 bad usage
# (unknown verb or flag), 130 interrupted by Ctrl-C.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
