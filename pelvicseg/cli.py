"""What every script does at its edge: bad input ends in one line naming the file and the
problem (exit code 2; --debug shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import sys

from pelvicseg.errors import CheckpointError, DataError, TrainingDiverged, unwrap_data_error


def run_cli(main_fn, args: argparse.Namespace) -> int:
    # Libraries (highdicom, MONAI) log at WARNING unless --debug: their INFO lines would flood
    # stderr; the project's own logger keeps its INFO lines.
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("hipmri").setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        main_fn(args)
    except (DataError, CheckpointError, TrainingDiverged) as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        data_error = unwrap_data_error(error)
        if data_error is None or getattr(args, "debug", False):
            raise
        print(f"error: {data_error}", file=sys.stderr)
        return 2
    return 0


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations the user actually gave on the command line (defaults left out)."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given = parser.parse_args(argv)
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]
    return set(vars(given))
