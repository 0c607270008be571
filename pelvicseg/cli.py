"""What every script does at its edge: bad input ends in one line naming the file and the
problem (exit code 2; --debug shows the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import sys

from pelvicseg.errors import CheckpointError, DataError, FolderLocked, TrainingDiverged, WriteError, unwrap_data_error


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def run_cli(main_fn, args: argparse.Namespace) -> int:
    # Libraries (highdicom, MONAI) log at WARNING unless --debug: their INFO lines would flood
    # stderr; the project's own logger keeps its INFO lines.
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("hipmri").setLevel(logging.DEBUG if debug else logging.INFO)
    if hasattr(signal, "SIGXFSZ"):
        # Past a file-size limit (ulimit -f) the write then fails with EFBIG, which names the file in
        # one line below, instead of the kernel killing the process with no word.
        with contextlib.suppress(ValueError):  # signals can be set from the main thread only
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        main_fn(args)
    except (DataError, CheckpointError, TrainingDiverged, WriteError, FolderLocked) as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if isinstance(error, OSError) and error.errno in DISK_FULL and not debug:
            # a write outside pelvicseg.atomic (a library's own file): still one line naming the file
            print(f"error: {error.filename or 'a file'}: could not be written ({error.strerror})", file=sys.stderr)
            return 2
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
