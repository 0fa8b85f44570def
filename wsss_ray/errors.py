"""The errors a user's input causes, and how a job reports them.

A file, dataset or checkpoint the user gave that cannot be used as it is raises a subclass of
:class:`UserInputError` whose message names the file and what to fix. Jobs run their work
inside :func:`user_errors`, which prints that message as one line on stderr and exits with
status 2: never a traceback for user error (issue 24). The same error raised inside a Ray task
or actor reaches the driver as Ray's wrapper, which is also an instance of the original class;
its original message is printed, not Ray's traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserInputError(ValueError):
    """A problem with what the user gave; the message names the file and what to fix."""


def message(err: BaseException) -> str:
    """The one-line message of ``err``, unwrapped from Ray's task-error wrapper."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        return message(cause)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a job's work: a :class:`UserInputError` becomes ``error: ...`` and exit status 2."""
    try:
        yield
    except UserInputError as err:
        print(f"error: {message(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
