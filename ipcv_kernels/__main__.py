"""Command line: ``python -m ipcv_kernels <subcommand> [options]`` (also the ``ipcv-kernels`` script).

Every subcommand is a module that exposes ``add_arguments(parser)`` (its flags, each with help
text) and ``run(args) -> int`` (the exit status); its docstring's first paragraph, as plain text
(``ipcv_kernels._help_text``), is its line in the top-level help and the description of its own
``--help``. Adding one is one entry in
``SUBCOMMANDS``. ``run`` also finds ``args.command_line``, the invocation as a shell command, for
result files to record.

Without a subcommand the top-level help goes to stderr and the exit status is 2, as for any other
usage error (an unknown subcommand, a bad flag); ``--help`` prints to stdout and exits with 0.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NoReturn

from . import demo, fidelity
from ._help_text import help_summary
from .bench import vit
from .bench import vllm as bench_vllm

PROG = "python -m ipcv_kernels"
# name -> the module implementing it (see the module docstring).
SUBCOMMANDS: dict[str, ModuleType] = {"demo": demo, "bench": vit, "bench-vllm": bench_vllm, "fidelity": fidelity}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except ``None`` (such a flag's help says what happens unset)
    and that of on/off switches (always off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """A command line that does not parse; ``main`` prints it with the parser's usage."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises ``UsageError`` instead of exiting, so that ``main``
    returns the exit status to its caller (``--help`` still exits, with status 0)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def summary(module: ModuleType) -> str:
    """The first paragraph of ``module``'s docstring, on one line, without its markup."""
    return help_summary(module.__doc__)


def build_parser() -> Parser:
    """The whole command line: one subparser per ``SUBCOMMANDS`` entry."""
    parser = Parser(
        prog=PROG,
        description="IPCV token compression for the vision towers of multimodal LLMs. "
        "Run a subcommand; '<subcommand> --help' lists its options.",
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="<subcommand>", title="subcommands")
    for name, module in SUBCOMMANDS.items():
        sub = subparsers.add_parser(
            name,
            help=summary(module),
            description=summary(module),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        error.parser.print_usage(sys.stderr)
        print(f"{error.parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if args.subcommand is None:
        parser.print_help(sys.stderr)
        return 2
    args.command_line = shlex.join([*PROG.split(), *argv])
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
