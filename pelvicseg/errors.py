"""The project's errors, in one place: each message is one line naming the file (or run) and the
problem, which ``cli.run_cli`` prints as ``error: ...`` with exit code 2 (--debug: the traceback).
Nothing here imports anything, so dataset.py and the DICOM reader can use them without pulling in
MONAI or torch."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data: the message is one line naming the file and the problem."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message is one line naming the file."""


class TrainingDiverged(RuntimeError):
    """Training cannot go on (the loss or gradients stay non-finite): the message is one line."""


class ExportError(RuntimeError):
    """The project's code or the exported models cannot be carried into the bundle as they are."""


class WriteError(OSError):
    """A file that could not be written (a full disk, a file-size limit): the message is one line
    naming it and why."""

    def __str__(self) -> str:
        return str(self.strerror)


class FolderLocked(ValueError):
    """Another live process writes into the folder: the message is one line naming it."""


def unwrap_data_error(error: BaseException) -> DataError | None:
    """MONAI wraps errors raised inside transforms; find our DataError in the chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DataError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
