"""Where a `rae` command's lines go: the user's own on the console, Ray's in a log file.

Quiet (the default for the commands that start Ray): the process's file descriptors 1 and 2 are
pointed at the run's log file, so whatever Ray writes there (its Python loggers, Ray Data's
execution logs, the C++ core_worker / gcs_server lines, the workers' lines that ``log_to_driver``
forwards, Train's controller and TrainingReport lines) is kept in that file and off the console.
``sys.stdout`` keeps the terminal, so the commands' own ``print`` lines still show; the project's
log lines, progress bars and errors go to :func:`err`, the terminal's stderr. Rank 0's training
progress reaches the driver through a Ray queue (:class:`ProgressDisplay`), not through the
forwarded worker output. ``--verbose`` or ``RAE_VERBOSE=1``: nothing is routed, everything shows as before.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipelines.user_console import set_user_stderr, user_stderr

VERBOSE_ENV = "RAE_VERBOSE"


@dataclass(frozen=True)
class _Routing:
    log_path: Path


_routing: _Routing | None = None


def verbose_requested(flag: bool) -> bool:
    """``--verbose`` or ``RAE_VERBOSE`` set to anything but empty or 0."""
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def full_log_note() -> str:
    """`` (full log: PATH)`` for a line that reports a failure while routed; empty otherwise."""
    return f" (full log: {_routing.log_path})" if _routing is not None else ""


def err() -> TextIO:
    """The user's stderr: the terminal even while fd 2 goes to the log file."""
    return user_stderr()


def say(message: str) -> None:
    """One of the command's own lines on the console."""
    print(message, flush=True)


def new_log_path(folder: Path, command: str) -> Path:
    """``<folder>/rae-<command>-<UTC time>.log``: a new file for each run, older ones kept."""
    return folder / f"rae-{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"


@contextlib.contextmanager
def routed_to_log(path: Path) -> Iterator[Path]:
    """Ray's lines to ``path`` for the duration (see the module's docstring); the streams are as
    before afterwards, and a Ray this process joined meanwhile is shut down (or left) before they are.
    Announces the file on the console first."""
    global _routing
    path.parent.mkdir(parents=True, exist_ok=True)
    say(f"Ray's log: {path} (--verbose shows it here)")
    sys.stdout.flush()
    sys.stderr.flush()
    saved_stdout, saved_fds = sys.stdout, (os.dup(1), os.dup(2))
    terminal_out = os.fdopen(os.dup(1), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = terminal_out
    restore_workers = _worker_lines_to_log()
    previous_env = {name: os.environ.get(name) for name in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    data_context = _ray_data_context()
    previous_bars = data_context.enable_progress_bars
    data_context.enable_progress_bars = False
    _routing = _Routing(path)
    set_user_stderr(terminal_err)
    try:
        yield path
    finally:
        _disconnect_ray()
        _routing = None
        set_user_stderr(None)
        data_context.enable_progress_bars = previous_bars
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        restore_workers()
        sys.stdout = saved_stdout
        for stream in (terminal_out, terminal_err):
            stream.flush()
        sys.stderr.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        terminal_out.close()
        terminal_err.close()


def _disconnect_ray() -> None:
    """Ray's shutdown while its lines still go to the log (at exit it would write to the terminal)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


# Ray Data's progress bars redrawn into a file only bloat it (off here and, through the environment
# the workers inherit, in its actors); its execution logs are kept.
_QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def _ray_data_context() -> Any:
    import ray.data

    return ray.data.DataContext.get_current()


def _worker_lines_to_log():
    """Make the workers' forwarded lines (both streams) go to the log file rather than to
    ``sys.stdout`` (the terminal). Ray 2.60 picks ``ray._private.worker.print_to_stdstream`` when
    it connects; without it (another Ray), their stdout lines would show on the console."""
    try:
        from ray._private import worker as ray_worker
        original = ray_worker.print_to_stdstream
        print_worker_logs = ray_worker.print_worker_logs
    except (ImportError, AttributeError):
        return lambda: None

    def to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        print_worker_logs(data, sys.__stderr__ if sys.stderr is None else sys.stderr, ignore_prefix)

    ray_worker.print_to_stdstream = to_log

    def restore() -> None:
        ray_worker.print_to_stdstream = original

    return restore


@dataclass(frozen=True)
class ProgressLine:
    """What rank 0 sends the driver: a line, or a step of a run (drawn as that run's bar)."""

    text: str
    run: str | None = None
    step: int | None = None
    total: int | None = None
    postfix: str = ""


class ProgressDisplay:
    """The driver's side of the workers' progress while routed: a thread that drains a Ray queue,
    drawing one tqdm bar per run (rate and ETA) and printing other lines above it."""

    def __init__(self) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a queue on a worker node dies with it (an elastic run losing a GPU node
        # lost its queue, and with it rank 0's next line and the run).
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._stop = threading.Event()
        self._bars: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._drain, name="rae-progress", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor is gone (Ray shut down): nothing more will come
                return
            self._show(item)

    def _show(self, item: ProgressLine) -> None:
        from tqdm.auto import tqdm

        if item.run is None or item.step is None or item.total is None:
            tqdm.write(item.text, file=err())
            return
        bar = self._bars.get(item.run)
        if bar is None:
            bar = self._bars[item.run] = tqdm(total=item.total, desc=item.run, unit="step", file=err(),
                                              initial=item.step, mininterval=1.0)
        bar.update(item.step - bar.n)
        bar.set_postfix_str(item.postfix, refresh=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for bar in self._bars.values():
            bar.close()
        with contextlib.suppress(Exception):
            import ray

            ray.kill(self.queue.actor)


@contextlib.contextmanager
def worker_progress() -> Iterator[Any]:
    """A queue for rank 0's progress while routed (None otherwise: workers print it, as before)."""
    if _routing is None:
        yield None
        return
    display = ProgressDisplay()
    try:
        yield display.queue
    finally:
        display.close()
