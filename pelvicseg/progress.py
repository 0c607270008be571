"""Progress of long steps: a tqdm bar on a terminal, a plain line now and then otherwise, so a log
file is neither noisy nor silent."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
LOG_INTERVAL_S = 20.0  # at most one plain line per this many seconds (plus the first and the last)


def progress(items: Iterable[Item], description: str, total: int | None = None, enabled: bool = True,
             stream=None, quiet_for_s: float = 0.0, interval_s: float = LOG_INTERVAL_S) -> Iterator[Item]:
    """Yield ``items``, showing progress on ``stream`` (stderr by default).

    On a terminal: a tqdm bar that disappears when done. Otherwise: ``description: i of n`` for the
    first item, then at most every ``interval_s`` seconds, and for the last one. With
    ``quiet_for_s``, a log gets no line until that many seconds have passed since the start, so a
    step that repeats often (a training epoch) is silent when it is short and reports when it is
    long (the default settings on a CPU). ``enabled`` False (another rank, a quiet caller) shows
    nothing.
    """
    stream = sys.stderr if stream is None else stream
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not enabled:
        yield from items
        return
    if stream.isatty():
        yield from tqdm(items, desc=description, total=total, leave=False, file=stream, dynamic_ncols=True)
        return
    of_total = f" of {total}" if total is not None else ""
    start = time.monotonic()
    last_shown = None
    count = 0
    for count, item in enumerate(items, start=1):
        now = time.monotonic()
        if last_shown is None:
            due = now - start >= quiet_for_s  # with no quiet time: the first item
        else:
            due = now - last_shown >= interval_s
        if due:
            print(f"{description}: {count}{of_total}", file=stream, flush=True)
            last_shown = now
        yield item
    if last_shown is not None and count == total and count > 1:
        print(f"{description}: {count}{of_total} done", file=stream, flush=True)
