"""The user's stderr for progress bars and notices: the terminal, even while a command points the
process's own streams (file descriptors 1 and 2) at Ray's log file. :mod:`jobs.console` sets it;
until then (and with ``--verbose``) it is ``sys.stderr``."""
from __future__ import annotations

import sys
from typing import TextIO

_terminal_err: TextIO | None = None


def user_stderr() -> TextIO:
    return _terminal_err if _terminal_err is not None else sys.stderr


def set_user_stderr(stream: TextIO | None) -> None:
    """``stream`` for the user's lines from now on; None: ``sys.stderr`` again."""
    global _terminal_err
    _terminal_err = stream
