"""Ray's forwarded lines, told apart from a command's own: a test that asserts what a `rae` command
printed compares the command's lines, not whatever Ray's raylet or workers had to say meanwhile.

When a test captures the streams the command leaves them alone (``jobs.cli.app._log_routing``), so
Ray's log monitor prints there too: ``(raylet) ... is over 95% full`` on a CI machine with a full
disk, a worker's warning, a ``[repeated 2x across cluster]`` summary. Their shape is Ray's
``print_worker_logs``: an optional colour, then ``(raylet)`` or ``(<task or actor> pid=N[, ip=A])``, where an actor's name may hold
parentheses (``MapWorker(MapBatches(EncoderActor)) pid=12``).
"""
from __future__ import annotations

import re

_FORWARDED = re.compile(
    r"^(?:\x1b\[[0-9;]*m)*"                                # the colour Ray gives the source
    r"\((?:raylet|autoscaler|[^\n]*?\bpid=\d+)(?:, ip=[0-9a-fA-F.:]+)?\)"  # actor names hold parentheses
    r"(?:\x1b\[[0-9;]*m)*(?: |$)")


def is_ray_forwarded(line: str) -> bool:
    return _FORWARDED.match(line) is not None


def without_ray_lines(text: str) -> str:
    """``text`` without the lines Ray's log monitor forwarded; the command's own lines as they were."""
    return "".join(line for line in text.splitlines(keepends=True) if not is_ray_forwarded(line))
