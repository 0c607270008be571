"""Every file a command writes goes through here: written under a hidden temporary name in its
own folder, flushed to disk (fsync), then renamed onto its final name (``os.replace``, atomic on
POSIX). A reader, or a run killed at any moment, never finds a half-written file under a final
name; it finds the old file, the new one, or none.

The temporary name is ``.partial-<pid>-<name>``: hidden, tied to the process that wrote it, and
ending in the final name's suffixes (nibabel and matplotlib choose the format from them). A killed
process leaves it behind; ``remove_partials`` clears them when the next run opens the folder.

A write that fails (a full disk, a file-size limit) raises ``WriteError``, one line naming the
final file; the temporary file is removed, and any earlier file under the final name is kept.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pelvicseg.errors import WriteError

PARTIAL_PREFIX = ".partial-"


def partial_name(path: Path) -> Path:
    return path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{path.name}")


def _write_error(path: Path, error: OSError) -> WriteError:
    reason = os.strerror(error.errno) if error.errno else str(error)
    hint = {errno.ENOSPC: "; free some space", errno.EFBIG: "; the file-size limit (ulimit -f) is too low",
            errno.EDQUOT: "; the disk quota is used up"}.get(error.errno, "")
    return WriteError(error.errno or errno.EIO, f"{path}: could not be written ({reason}){hint}; no partial file "
                      "was left under that name")


def _fsync_folder(folder: Path) -> None:
    """The rename itself reaches the disk (a crash right after cannot undo it)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is still atomic
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The temporary path to write ``path``'s content to (with any library's own save function);
    on leaving the block it is synced and renamed onto ``path``, or removed if the block failed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _fsync_folder(path.parent)


class _RecordingFile(io.BufferedIOBase):
    """A binary file whose first failed write is remembered: torch.save reports a failed write as a
    RuntimeError of its own ("unexpected pos ..."), which would hide a full disk behind it."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **options) -> Iterator:
    """``open(path, mode)`` ("w" or "wb") whose content appears under ``path`` only when the block
    completes; ``options`` as for ``open`` (encoding, newline)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as raw:
            recording = _RecordingFile(raw)
            try:
                if mode == "wb":
                    yield recording
                else:
                    text = io.TextIOWrapper(recording, encoding=options.get("encoding", "utf-8"),
                                            newline=options.get("newline"))
                    try:
                        yield text
                        text.flush()
                    finally:
                        text.detach()
            except Exception as error:
                if recording.error is not None and not isinstance(error, OSError):
                    raise recording.error from None
                raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | Path, value) -> Path:
    """Indented JSON with a final newline; ``allow_nan=False``: a NaN would not be JSON (pass the
    value through ``metrics.json_ready`` first)."""
    return write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def remove_partials(folder: str | Path) -> list[Path]:
    """The temporary files that killed runs left in ``folder`` and its subfolders (never this
    process's own): removed, and returned. Call it while holding the folder's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = f"{PARTIAL_PREFIX}{os.getpid()}-"
    removed = []
    for path in sorted(folder.rglob(f"{PARTIAL_PREFIX}*")):
        if path.is_file() and not path.name.startswith(mine):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def is_partial(path: str | Path) -> bool:
    return Path(path).name.startswith(PARTIAL_PREFIX)
