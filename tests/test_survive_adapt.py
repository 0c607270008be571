"""adapt.py --evaluate killed half-way: SIGKILL the moment the first test patient's part is kept
(RUN/adaptation_test_progress/<patient>.json); the next run takes that patient from it, adapts
only the other, and writes the records an uninterrupted run writes. A part made with another
setting is adapted again, and the run says so in one line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

import adapt  # noqa: E402
import train  # noqa: E402
from pelvicseg import phantom  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402

TIMEOUT_S = 300
EVALUATE = ["--steps", "1", "--lr", "1e-3", "--no-hd95", "--device", "cpu"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> dict:
    """10 patients x 2 weeks (split 6:2:2: two test patients), one float32 epoch of a tiny network."""
    base = tmp_path_factory.mktemp("adapt_survive")
    data = base / "data"
    phantom.write_phantom(data, patients=10, weeks=2, shape=(20, 18, 12), seed=0)
    run_dir = base / "run"
    assert run_cli(train.main, train.get_args([
        "--data-root", str(data), "--out", str(run_dir), "--epochs", "1", "--spatial-size", "16", "16", "16",
        "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu", "--no-amp"])) == 0
    assert len(json.loads((run_dir / "splits.json").read_text())["test"]) == 2
    return {"base": base, "run": run_dir}


def evaluate_in_process(run_dir: Path, capsys, *extra: str) -> tuple[dict, str]:
    capsys.readouterr()
    code = run_cli(adapt.main, adapt.get_args(["--evaluate", str(run_dir), *EVALUATE, *extra]))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads((run_dir / adapt.EVALUATION_FILE).read_text()), captured.out


def kept_parts(progress: Path) -> list[str]:
    """The patients whose part is kept under its final name (not a temporary file being written)."""
    return sorted(p.stem for p in progress.glob("*.json") if not p.name.startswith("."))


def records_without_time(result: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in result["records"]]


def test_evaluate_killed_after_one_patient_takes_it_on_the_next_run(parent, tmp_path, capsys):
    reference, _ = evaluate_in_process(parent["run"], capsys, "--overwrite")
    run_dir = tmp_path / "run"
    shutil.copytree(parent["run"], run_dir)
    (run_dir / adapt.EVALUATION_FILE).unlink()
    progress = run_dir / "adaptation_test_progress"

    def evaluate() -> None:
        with open(os.devnull, "w") as quiet:
            os.dup2(quiet.fileno(), 1)
            os.dup2(quiet.fileno(), 2)
        os._exit(run_cli(adapt.main, adapt.get_args(["--evaluate", str(run_dir), *EVALUATE])))

    process = multiprocessing.get_context("fork").Process(target=evaluate)
    process.start()
    deadline = time.time() + TIMEOUT_S
    while process.exitcode is None and time.time() < deadline and not kept_parts(progress):
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    kept = kept_parts(progress)
    assert len(kept) == 1 and not (run_dir / adapt.EVALUATION_FILE).exists(), "not killed between the patients"

    result, out = evaluate_in_process(run_dir, capsys)
    assert f"patient {kept[0]}: taken from" in out
    assert out.count("taken from") == 1  # the other patient was adapted in this run
    assert records_without_time(result) == records_without_time(reference)
    assert not progress.exists()  # the parts go once the whole file is written

    # a part made with another setting (here the seed) is adapted again, and the run says why
    progress.mkdir()
    (progress / f"{kept[0]}.json").write_text(json.dumps({"made_by": {"seed": 7}, "outcome": {}}))
    result, out = evaluate_in_process(run_dir, capsys, "--overwrite")
    assert f"patient {kept[0]}: {progress / kept[0]}.json was made with another" in out and "adapting again" in out
    assert records_without_time(result) == records_without_time(reference)
