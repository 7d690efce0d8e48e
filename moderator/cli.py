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

Every entry point reads its configuration the same way, with :func:`parse_config`: dataclasses whose
fields are the flags (``--field_name`` or ``--field-name``), ``--config FILE.yaml`` setting any of them,
a flag overriding the file, ``--help`` listing every field with its help text::

    def main(argv: list[str]) -> int:
        (args,) = parse_config((ExportArguments,), argv, prog="python -m export")
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import traceback
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

DEBUG_ENV = "SAFEMT_DEBUG"
# Every entry point's exit codes, defined once (the README's "Exit codes" table is checked against these).
USER_ERROR_EXIT_CODE = 2  # argparse's code for a bad command line; used for every user error
CHECK_FAILED_EXIT_CODE = 3  # the run finished but a check on its result failed (judge failures, shortcut check)
BUSY_EXIT_CODE = 4  # another process holds the output folder (eval's out_dir lock)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: training saved a checkpoint and stopped; rerun the same command


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


CONFIG_FLAG = "--config"


@dataclasses.dataclass
class ConfigRest:
    """What :func:`parse_config` left to its caller (``nested``): YAML keys and ``--part.key value`` flags of
    the nested parts it named (``--part value``, ``--part.key value``), in order.

    ``options`` holds the values of flags the caller added to its own ``parser``.
    """

    config: str | None
    keys: dict[str, Any]
    args: list[str]
    options: argparse.Namespace


def _closest(name: str, known: Sequence[str]) -> str | None:
    """The one of ``known`` that ``name`` (a flag or key) is most likely a typo of, compared without dashes."""
    bare = {option.lstrip("-"): option for option in known}
    close = difflib.get_close_matches(name.lstrip("-"), bare, n=1)
    return bare[close[0]] if close else None


def _nested_flags(args: Sequence[str], nested: Collection[str]) -> tuple[list[str], list[str]]:
    """``(flags of the nested parts with their values, everything else)`` from argparse's leftover ``args``.

    A nested flag is ``--part value`` (the whole part) or ``--part.key value`` (``=value`` too) whose ``part``
    is one of ``nested``.
    """
    kept: list[str] = []
    other: list[str] = []
    i = 0
    while i < len(args):
        name, equals, _ = args[i].partition("=")
        part = name[2:].replace("-", "_").split(".", 1)[0] if name.startswith("--") else None
        if part in nested:
            width = 1 if equals or i + 1 == len(args) else 2
            kept += args[i : i + width]
            i += width
        else:
            other.append(args[i])
            i += 1
    return kept, other


def _read_yaml_config(path: str, see: str) -> dict[str, Any]:
    import yaml

    if not Path(path).is_file():
        raise UsageError(f"{path}: config file not found {see}")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = getattr(exc, "problem", None) or exc
        raise UsageError(f"{path}: not a readable YAML file ({one_line(problem)}) {see}") from None
    if not isinstance(data, dict | None):
        raise UsageError(f"{path}: expected a mapping of field: value at the top level {see}")
    return data or {}


def parse_config(
    types: Sequence[type],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
    *,
    positional: Sequence[str] = (),
    parser: argparse.ArgumentParser | None = None,
    nested: Collection[str] = (),
) -> tuple[Any, ...]:
    """Parse ``argv`` into one instance of each dataclass in ``types``: the project's one config convention.

    ``trl.TrlParser`` (an ``HfArgumentParser``) makes every field a flag, ``--field_name`` or
    ``--field-name``, typed and with its ``metadata["help"]`` in ``--help``. ``--config FILE.yaml`` (a
    mapping of field: value; an ``env:`` mapping sets environment variables, as TRL does) sets fields, a
    flag overrides the file, the dataclass default applies to the rest. Fields named in ``positional`` may
    also be given bare, in that order (``python -m serve DIR``). Abbreviated flags are refused, so a
    misspelt flag cannot silently match another one.

    Every problem (an unknown flag, a YAML key that is no field, a bad value, a missing required field, a
    config file that is not there, a ``ValueError`` from a dataclass's ``__post_init__``) raises
    :class:`UsageError` with one line ending ``(see PROG --help)``; ``run_cli`` prints it, exit code 2.

    ``parser``: a ``TrlParser`` the caller built (over the dataclasses it parses; ``types`` is then
    ignored), e.g. with flags of its own or its own ``error`` method. ``nested``: names of nested parts the caller parses itself
    (eval's ``targets``, ``defences``, ``judge``): their YAML keys and their dotted flags (``--judge.kind x``)
    are not errors but come back, after the dataclasses, as a :class:`ConfigRest`; anything else unknown is
    the same one-line error as always.
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or TrlParser(list(types), prog=prog, description=description, allow_abbrev=False)
    types, see = parser.dataclass_types, f"(see {parser.prog} --help)"
    if "error" not in vars(parser):  # a caller's parser may raise its own one-line error type
        one_line_parser_errors(parser)
    if CONFIG_FLAG not in parser._option_string_actions:
        help_text = "YAML file (field: value) setting any of these fields; a flag overrides it"
        parser.add_argument(CONFIG_FLAG, metavar="FILE", default=argparse.SUPPRESS, help=help_text)
    fields = {f.name: f for cls in types for f in dataclasses.fields(cls) if f.init}
    bare = []
    for name in positional:  # DIR or --name DIR: the flag is no longer required, one of the two is
        for action in parser._actions:
            action.required = action.required and action.dest != name
        help_text = f"{fields[name].metadata.get('help', '')} (or --{name})".strip()
        bare.append(
            parser.add_argument(name, nargs="?", default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)
        )

    locate = one_line_parser_errors(argparse.ArgumentParser(prog=parser.prog, add_help=False, allow_abbrev=False))
    locate.add_argument(CONFIG_FLAG, action="append", default=[])
    locate.add_argument("-h", "--help", action="store_true")
    located = locate.parse_known_args(argv)[0]
    if located.help:
        parser.parse_args(["--help"])  # prints the help and exits 0, before any file is read
    if len(located.config) > 1:
        raise UsageError(f"{CONFIG_FLAG} given {len(located.config)} times, one file is read {see}")
    config = located.config[0] if located.config else None
    data = _read_yaml_config(config, see) if config else {}
    if isinstance(data.get("env"), dict) and "env" not in fields:
        os.environ.update({str(key): str(value) for key, value in data.pop("env").items()})
    dests = sorted({action.dest for action in parser._actions} - {"help", "config"})
    unknown = {key: value for key, value in data.items() if key not in dests}
    rest_keys = {key: value for key, value in unknown.items() if key in nested}
    unknown = {key: value for key, value in unknown.items() if key not in nested}
    if unknown:
        close = _closest(str(next(iter(unknown))), dests)
        hint = f"; did you mean {close!r}?" if close and len(unknown) == 1 else ""
        keys = ", ".join(repr(key) for key in unknown)
        raise UsageError(f"{config}: unknown key{'s' * (len(unknown) > 1)} {keys}{hint} {see}")
    parser.set_defaults_with_config(**{key: value for key, value in data.items() if key in dests})
    for action in bare:
        action.default = argparse.SUPPRESS  # a YAML value lives in the flag's default

    namespace, remaining = parser.parse_known_args(argv)
    rest_args, remaining = _nested_flags(remaining, nested)
    if remaining:
        flag = next((arg.split("=")[0] for arg in remaining if arg.startswith("--")), "")
        close = _closest(flag, sorted(parser._option_string_actions)) if flag else None
        hint = f"; did you mean {close}?" if close else ""
        raise UsageError(f"unrecognized arguments: {' '.join(remaining)}{hint} {see}")
    required = [
        name for name in positional if dataclasses.MISSING is fields[name].default is fields[name].default_factory
    ]
    missing = [name for name in required if getattr(namespace, name, None) is None]
    if missing:
        names = ", ".join(f"{name.upper()} (or --{name})" for name in missing)
        raise UsageError(f"the following arguments are required: {names} {see}")
    parsed: list[Any] = []
    for cls in types:
        try:
            parsed.append(cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}))
        except ValueError as exc:  # __post_init__ refusing a value (a UsageError too)
            raise UsageError(f"{one_line(exc)} {see}") from exc
    if nested:
        options = {key: value for key, value in vars(namespace).items() if key not in fields and key != "config"}
        parsed.append(ConfigRest(config, rest_keys, rest_args, argparse.Namespace(**options)))
    return tuple(parsed)


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
