"""One command at a time per output folder: ``.lock`` in the folder holds the pid, host, start time
and command of the process writing there. A second command is refused in one line naming the
holder; a lock whose process is gone (killed, crashed, the machine rebooted) is taken over.

The lock is made with O_CREAT | O_EXCL, so two commands starting at the same instant cannot both
get it. A take-over replaces the stale file atomically and then reads it back: of two commands
taking over the same stale lock, the one whose record is there holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from pelvicseg.atomic import remove_partials, write_json
from pelvicseg.errors import FolderLocked

LOCK_NAME = ".lock"
FRESH_S = 5.0  # an unreadable lock younger than this is being written by a starting command, not stale


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a pid reused by a later
    process is not taken for the lock's holder."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    pid = int(record.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    started = record.get("process_start")
    return started is None or _process_start(pid) in (None, started)


class FolderLock:
    """``with FolderLock(out, "predict.py"):`` (or ``acquire``/``release``). Acquiring also removes
    the temporary files that killed runs left in the folder (see atomic.remove_partials)."""

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.held = self.created = False

    def record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}

    def acquire(self) -> FolderLock:
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self.record()
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read()
            if holder is None and self._age_s() < FRESH_S:
                holder = {"pid": "?", "host": "?", "started": "just now", "command": "a command starting"}
            if holder is not None and (holder.get("pid") == "?" or _alive(holder)):
                raise FolderLocked(f"{self.folder}: in use by pid {holder.get('pid')} on {holder.get('host')} since "
                                   f"{holder.get('started')} ({holder.get('command')}); wait for it to end, or "
                                   f"choose another folder (a lock left by a process that is gone is taken over)"
                                   ) from None
            write_json(self.path, mine)  # stale (its process is gone, or unreadable): taken over
            if self._read() != mine:
                raise FolderLocked(f"{self.folder}: another command took over its stale lock at the same time; "
                                   "choose another folder") from None
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(mine, indent=2) + "\n")
        self.held = True
        remove_partials(self.folder)
        return self

    def _read(self) -> dict | None:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written by a process killed while making it: nobody holds it
        return record if isinstance(record, dict) else None

    def _age_s(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def release(self) -> None:
        if self.held:
            if (self._read() or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
            if self.created and not any(self.folder.iterdir()):
                self.folder.rmdir()  # a command that stopped before writing anything leaves no folder

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def lock_on_main_rank(folder: str | Path):
    """The folder's lock, taken by the one process of a run or by rank 0 under torchrun (RANK set
    before the process group exists); the other ranks write only where rank 0 tells them."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return FolderLock(folder)
