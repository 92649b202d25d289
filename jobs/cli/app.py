"""The `rae` command line: one entry point, subcommands registered by the modules that own them.

Every subcommand is ``rae <command> [<subcommand>] [flags]`` and returns a process exit code. Errors
that are the user's (a missing file, a store made with another encoder, a bad flag) are printed as one
line naming the input at fault, without a traceback; ``RAE_DEBUG=1`` shows the traceback too.

The commands that start Ray print their own lines only; Ray's go to a log file named in their first
line and in any error line (:mod:`jobs.console`); ``--verbose`` or ``RAE_VERBOSE=1`` shows them all.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

# Modules that add subcommands, in the order they appear in `rae --help`.
_COMMAND_MODULES: tuple[str, ...] = ("jobs.demo.run", "jobs.cli.data", "jobs.cli.train", "jobs.cli.sample",
                                    "jobs.cli.evaluate", "jobs.cli.models_io", "jobs.cli.submit", "jobs.cli.cluster")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)

# The commands that start (or join) a Ray instance, whose lines go to a log file unless --verbose.
_RAY_COMMANDS = ("demo", "train", "encode", "sample", "eval")
LOCAL_LOGS = "rae-logs"  # where a Ray command's log goes when its output has no local folder


def _add_models_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list every preset with parameter count and GFLOPs per image",
        description="List the encoder, decoder and diffusion presets with parameter counts and compute "
                    "per image, measured on the meta device (no memory, no weights needed).",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--kind", choices=("encoder", "decoder", "dit"), action="append",
                        help="only this kind (repeatable); default: all")
    parser.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from rae.model_summary import all_summaries, format_table

    rows = all_summaries(tuple(args.kind or ("encoder", "decoder", "dit")))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rae",
        description="Diffusion transformers on Representation Autoencoders, on Ray. The chain: "
                    "shards -> encode -> latent store -> train decoder / train dit -> sample -> eval. "
                    "Start with `rae demo`; see `rae <command> --help` for each step.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own lines (workers, Ray Data, Ray Train) on the console too, rather "
                             "than only in the log file named in the first line (also: RAE_VERBOSE=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_models_command(subparsers)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    _accept_verbose_after_the_command(parser)
    return parser


def _accept_verbose_after_the_command(parser: argparse.ArgumentParser) -> None:
    """``rae demo --verbose`` as well as ``rae --verbose demo``: every subcommand takes the flag too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="show Ray's own lines on the console too (also: RAE_VERBOSE=1)")
                _accept_verbose_after_the_command(command)


class _OurLines(logging.Formatter):
    """Info lines as they are; warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to the user's stderr as it is at each line (the terminal while Ray's lines go to a file)."""

    def emit(self, record: logging.LogRecord) -> None:
        from jobs.console import err

        # Assigned, not setStream(): that flushes the previous stream first, which may be closed by
        # now (a stderr replaced and closed since the last line: pytest's capture, a routed command's end).
        self.stream = err()
        super().emit(record)


def show_our_log_lines() -> None:
    """The project's own log lines (decisions such as "encoder pool: 1..8 actors, 1 GPU each") on
    stderr at INFO; other libraries' loggers keep their own settings."""
    handler = _ConsoleHandler()
    handler.setFormatter(_OurLines("%(message)s"))
    for name in ("jobs", "pipelines", "rae"):
        logger = logging.getLogger(name)
        if not any(getattr(h, "_rae", False) for h in logger.handlers):
            handler._rae = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _user_message(error: Exception, args: argparse.Namespace, user_errors: tuple[type, ...]) -> str | None:
    """The one line for an error that is the user's or their storage's (a full disk, a store path that
    is a file, missing S3 credentials: see pipelines.storage_faults), or None for a bug (its traceback shows)."""
    from pipelines.storage_faults import describe_storage_fault, is_bare_os_error

    # A Ray worker's error comes wrapped with its whole traceback; its cause holds the message.
    raised = error.cause if type(error).__module__.startswith("ray.") and hasattr(error, "cause") else error
    if isinstance(raised, user_errors) and not is_bare_os_error(raised):
        return str(raised)
    fault = describe_storage_fault(error, [value for value in vars(args).values() if isinstance(value, str)])
    if fault is None and isinstance(raised, user_errors):
        return str(raised)
    return fault


def log_folder(args: argparse.Namespace) -> Path:
    """Where a Ray command's log goes: where the command says (``log_folder`` in its defaults: the
    demo's ``<workdir>/logs``); a training run's ``<storage>/<run>/logs`` when its storage is local;
    else ``./rae-logs``."""
    if getattr(args, "log_folder", None) is not None:
        return args.log_folder(args)
    storage, run = getattr(args, "storage", None), getattr(args, "run", None)
    if args.command == "train" and storage and run and urlparse(storage).scheme in ("", "file"):
        return Path(urlparse(storage).path if storage.startswith("file:") else storage).resolve() / run / "logs"
    return Path(LOCAL_LOGS).resolve()


def _log_routing(args: argparse.Namespace):
    """Ray's lines to a log file for a Ray command, unless verbose or the caller replaced the
    process's stdout (a test's capture, an embedding program: its streams are left alone)."""
    import contextlib

    from jobs import console

    if (args.command not in _RAY_COMMANDS or console.verbose_requested(args.verbose)
            or sys.stdout is not sys.__stdout__):
        return contextlib.nullcontext()
    return console.routed_to_log(console.new_log_path(log_folder(args), args.command))


def main(argv: list[str] | None = None) -> int:
    from rae.encoders import WeightsUnavailableError

    user_errors = USER_ERRORS + (WeightsUnavailableError,)
    parser = build_parser()
    args = parser.parse_args(argv)
    show_our_log_lines()
    full_log = ""
    try:
        with _log_routing(args) as log_path:
            full_log = f" (full log: {log_path})" if log_path else ""
            return int(args.func(args) or 0)
    except Exception as error:
        message = _user_message(error, args, user_errors)
        if message is None or os.environ.get("RAE_DEBUG"):
            if full_log:
                print(f"rae {args.command}: failed{full_log}", file=sys.stderr)
            raise
        print(f"rae {args.command}: error: {message}{full_log}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rae {args.command}: interrupted; rerun the same command to resume{full_log}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
