"""One-line errors for the project's command lines.

A user who mistypes a flag, points at a missing folder or feeds a dataset built for another taxonomy
gets one line on stderr naming what is wrong and what to do, and a non-zero exit code; a traceback
only with ``SAFEMT_DEBUG=1`` in the environment (an environment variable rather than a ``--debug``
flag: ``TrainingArguments`` already has a ``--debug`` field). Bugs (any other exception) keep their
traceback.

Adopting it in an entry point::

    from moderator.cli import InputError, run_cli, one_line_parser_errors

    def main(argv: list[str] | None = None) -> int:
        parser = one_line_parser_errors(argparse.ArgumentParser(prog="python -m eval.run"))
        args = parser.parse_args(argv)
        if not Path(args.config).is_file():
            raise MissingInputError(f"{args.config}: config not found")
        ...
        return 0

    if __name__ == "__main__":
        sys.exit(run_cli(main))

Raise :class:`UsageError` for a bad command line or config field, :class:`InputError` for an input
that exists but cannot be used, :class:`MissingInputError` for a file or folder that is not there.
They subclass ``ValueError`` / ``FileNotFoundError``, so callers and tests that catch those still do.
Errors a module already defines for its users (e.g. ``ExportError``) can be passed to
``run_cli(main, user_errors=(ExportError,))`` instead of being rewritten.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

DEBUG_ENV = "SAFEMT_DEBUG"
USER_ERROR_EXIT_CODE = 2  # argparse's code for a bad command line; used for every user error
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class CLIError(Exception):
    """An error the user can fix from its message alone: ``run_cli`` prints it as one line."""


class UsageError(CLIError, ValueError):
    """The command line or a config file asks for something invalid (unknown flag, misspelt field, bad value)."""


class InputError(CLIError, ValueError):
    """An input exists but cannot be used (wrong format, other taxonomy, empty split, torn checkpoint)."""


class MissingInputError(CLIError, FileNotFoundError):
    """A file or folder the command needs does not exist; the message says how to make it."""


def one_line(message: object) -> str:
    """``message`` on one line: its non-empty lines joined by ``"; "``."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


P = TypeVar("P", bound=argparse.ArgumentParser)


def one_line_parser_errors(parser: P) -> P:
    """Make ``parser`` raise :class:`UsageError` instead of printing its usage block and exiting.

    Works for ``argparse.ArgumentParser`` and its subclasses (``HfArgumentParser``, ``TrlParser``);
    ``--help`` still prints the full help.
    """

    def error(message: str) -> None:
        raise UsageError(f"{message} (see {parser.prog} --help)")

    parser.error = error  # type: ignore[method-assign]
    return parser


def debug_requested() -> bool:
    """Whether tracebacks of user errors were asked for: ``SAFEMT_DEBUG`` set to a true value."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_cli(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run ``main(argv)`` and return its exit code; a user error becomes ``error: <one line>`` and code 2.

    ``argv`` defaults to ``sys.argv[1:]``. ``user_errors`` adds a module's own exception types to
    :class:`CLIError`. With ``SAFEMT_DEBUG=1`` the traceback is printed before the line. Other
    exceptions propagate with their traceback: they are bugs, not input problems.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested()
    try:
        code = main(args)
    except (CLIError, *user_errors) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    return 0 if code is None else int(code)
