"""Training that survives being killed: train.py (float32, --no-amp) is SIGKILLed at points a seeded
generator picks (during an epoch, or the instant a temporary file appears: in the middle of writing
metrics.csv, last.pt, best.pt or the curves). After every kill metrics.csv holds whole rows only
and last.pt and best.pt load; --resume then finishes the run, and metrics.csv holds the same rows
as an uninterrupted run's (the seconds columns excepted: time is not reproducible).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from pelvicseg.atomic import PARTIAL_PREFIX  # noqa: E402
from pelvicseg.checkpoint import load_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from pelvicseg.lock import LOCK_NAME  # noqa: E402

EPOCHS = 3
TINY = ["--epochs", str(EPOCHS), "--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers",
        "0", "--device", "cpu", "--no-amp"]
TRIALS = 5
SEED = 31
TIMEOUT_S = 300
TIMES = ("seconds", "train_seconds", "val_seconds", "elapsed_seconds")  # the clocks


def train_args(data: Path, out: Path, *extra: str):
    return train.get_args(["--data-root", str(data), "--out", str(out), *TINY, *extra])


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(training_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_survive") / "uninterrupted"
    assert run_cli(train.main, train_args(training_root, out)) == 0
    return out


def forked_train(data: Path, out: Path) -> multiprocessing.Process:
    """train.py's entry point (``run_cli(train.main, train.get_args(argv))``) in a process forked
    from this one: no interpreter start per trial."""
    def run() -> None:
        with open(os.devnull, "w") as quiet:
            os.dup2(quiet.fileno(), 1)
            os.dup2(quiet.fileno(), 2)
        os._exit(run_cli(train.main, train_args(data, out)))

    process = multiprocessing.get_context("fork").Process(target=run)
    process.start()
    return process


def kill_at(process: multiprocessing.Process, out: Path, kind: str, rows: int, delay_s: float) -> dict:
    """SIGKILL once metrics.csv has ``rows`` rows, after ``delay_s`` ("time"), or at the first
    temporary file seen after that ("write")."""
    deadline = time.time() + TIMEOUT_S
    reached = None
    while process.exitcode is None and time.time() < deadline:
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            continue
        if reached is None and (rows == 0 or ("metrics.csv" in names and len(rows_of(out / "metrics.csv")) >= rows)):
            reached = time.time()
        if reached is None:
            continue
        if (kind == "time" and time.time() - reached >= delay_s) or (
                kind == "write" and any(n.startswith(PARTIAL_PREFIX) for n in names)):
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            return {"killed": True, "partials": sum(n.startswith(PARTIAL_PREFIX) for n in os.listdir(out))}
    process.join(TIMEOUT_S)
    return {"killed": False, "partials": 0}


def killed_before_the_end(data: Path, out: Path, kind: str, rows: int, delay_s: float) -> dict:
    """One trial's kill. A fast machine can finish the tiny run before a drawn kill point (a delay
    longer than the run's last epoch and final validation, or writes quicker than the poll): then
    the folder is cleared and the run tried again at an earlier point of the same kind (the delay
    quartered), and at last at the row itself (delay 0), which always precedes the end."""
    tries = [(kind, delay_s), (kind, delay_s / 4), ("time", 0.0)]
    for number, (try_kind, try_delay_s) in enumerate(tries, start=1):
        shutil.rmtree(out, ignore_errors=True)
        outcome = kill_at(forked_train(data, out), out, try_kind, rows, try_delay_s)
        if outcome["killed"]:
            return {**outcome, "kind": try_kind, "delay_s": try_delay_s, "tries": number}
    return {**outcome, "kind": kind, "delay_s": delay_s, "tries": len(tries)}


def test_training_killed_anywhere_resumes_to_the_uninterrupted_rows(uninterrupted, training_root, tmp_path, capsys):
    expected = rows_of(uninterrupted / "metrics.csv")
    assert [int(r["epoch"]) for r in expected] == list(range(1, EPOCHS + 1))
    rng = np.random.default_rng(SEED)
    trials = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        kind = ("write", "time")[trial % 2]
        rows, delay_s = int(rng.integers(0, EPOCHS)), float(rng.uniform(0.0, 1.5))
        outcome = killed_before_the_end(training_root, out, kind, rows, delay_s)
        assert outcome["killed"], f"trial {trial}: every try ended before its kill point"
        done = rows_of(out / "metrics.csv") if (out / "metrics.csv").exists() else []
        for row in done:  # whole rows only: every column, every number readable
            assert None not in row.values() and all(float(v) == float(v) or v == "nan" for v in row.values()), row
        for name in ("last.pt", "best.pt"):
            if (out / name).exists():
                load_checkpoint(out / name)
        last_epoch = load_checkpoint(out / "last.pt")["epoch"] if (out / "last.pt").exists() else 0
        trials.append({**outcome, "rows": rows, "rows_at_kill": len(done), "last_epoch": last_epoch})
        capsys.readouterr()
        assert run_cli(train.main, train_args(training_root, out, "--resume")) == 0, capsys.readouterr().err[-3000:]
        assert without_times(rows_of(out / "metrics.csv")) == without_times(expected), f"trial {trial}"
        assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary files or the lock left behind"
    print("\ntraining kills (kind, after rows, delay s, tries, rows at kill, last.pt epoch, temporary files left):")
    for t in trials:
        print(f"  {t['kind']:5s} {t['rows']} {t['delay_s']:.2f} {t['tries']} {t['rows_at_kill']} {t['last_epoch']} "
              f"{t['partials']}")
    assert any(t["partials"] for t in trials), "no kill landed in the middle of a write"


def test_training_into_a_folder_in_use_is_refused_in_one_line(training_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                 "started": "earlier", "command": "train.py (test)"}))
        capsys.readouterr()
        code = run_cli(train.main, train_args(training_root, out))
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and len(lines) == 1 and f"{out}: in use by pid {holder.pid}" in lines[0], lines
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing else was written
