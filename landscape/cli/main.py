"""The ``landscape`` command: one module per subcommand, each exporting ``add_parser`` and ``run``.

User errors (:class:`landscape.core.errors.LandscapeError`) print one line and exit with status 2; an interruption
exits with 130; anything else is a bug and prints one line plus a hint to get the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from landscape import __version__
from landscape.cli import demo as demo_cmd
from landscape.cli import env as env_cmd
from landscape.cli import eval as eval_cmd
from landscape.cli import figures as figures_cmd
from landscape.cli import fisher as fisher_cmd
from landscape.cli import hessian as hessian_cmd
from landscape.cli import interpolate as interpolate_cmd
from landscape.cli import sharpness as sharpness_cmd
from landscape.cli import surface as surface_cmd
from landscape.cli import sweep as sweep_cmd
from landscape.cli import table as table_cmd
from landscape.cli import train as train_cmd
from landscape.cli import transfer as transfer_cmd
from landscape.core.errors import LandscapeError

COMMANDS = (
    demo_cmd,
    train_cmd,
    eval_cmd,
    env_cmd,
    figures_cmd,
    surface_cmd,
    interpolate_cmd,
    transfer_cmd,
    fisher_cmd,
    sharpness_cmd,
    hessian_cmd,
    sweep_cmd,
    table_cmd,
)


# argparse takes "-1e-3", "-inf" or "-.5e2" for an option (its own pattern knows only -12 and -1.5), so that
# `--lr -1e-3` fails with "expected one argument" instead of reaching the range check that names the value.
NEGATIVE_NUMBER = re.compile(r"^-(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # one line, exit status 2, as for every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="landscape", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"landscape {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A command that runs other commands (the demo) is handed this dispatcher instead of importing this module,
    # which imports every command module: no import cycle.
    args.dispatch = main
    try:
        return int(args.run(args) or 0)
    except LandscapeError as exc:
        # Under torchrun every process meets the same error (they check the same options and files): one says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"landscape {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except OSError as exc:  # a read-only --out, a full disk, a path that is a file: the user's environment
        where = f" {exc.filename}" if exc.filename else ""
        print(f"landscape {args.command}: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"landscape {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("LANDSCAPE_DEBUG"):
            raise
        print(
            f"landscape {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(set LANDSCAPE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
