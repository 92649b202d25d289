"""The paths a user types, made absolute once, at the command line.

A relative path means "relative to where I ran the command", but the code that opens it may run
elsewhere: Ray Train workers run in Ray's session folder, Ray Data tasks in their worker's. So
every command makes each path it was given absolute before anything else sees it; URLs with a
scheme (``s3://``, ``gs://``, ``memory://``, ``file://``) are kept as they are.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


def absolute_location(text: str) -> str:
    """``text`` as every process reads it the same way: a local path made absolute (``~``
    expanded), a URL with a scheme (or an empty value, meaning "not given") unchanged. Also the
    argparse type of path flags that are not config fields (``--storage``, ``rae store info URL``)."""
    if not text or "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


@dataclass(frozen=True)
class PathField:
    """A config field (dotted name) that holds a user's path or URL. ``words`` are values it may
    hold that name no file and are kept as given (``--inception offline``)."""

    field: str
    words: tuple[str, ...] = ()


def as_path_fields(fields: Sequence[str | PathField]) -> tuple[PathField, ...]:
    return tuple(item if isinstance(item, PathField) else PathField(item) for item in fields)
