"""A prediction run that survives being killed: predict.py is started as a user starts it (a
subprocess) on four phantom cases and killed with SIGKILL at points a seeded generator picks (after
the n-th output file, or the instant a temporary file appears, i.e. in the middle of a write).
After every kill each file in the output folder must load (NIfTI, JSON, CSV, PNG, HTML); then
``--continue`` must finish the run, with labels, uncertainty maps (arrays and headers), metrics.csv,
summary.json, longitudinal.csv and report.html identical to those of a run never stopped.

Also: a case made with other settings is refused under --continue in one line naming the case
and the setting; a folder another live command holds is refused, a lock left by a dead process
taken over; a file-size limit (RLIMIT_FSIZE) in the middle of a run ends it with one line naming
the file, and no partial file under a final name.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg import phantom  # noqa: E402
from pelvicseg.atomic import PARTIAL_PREFIX  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from pelvicseg.lock import LOCK_NAME  # noqa: E402
from conftest import run_in_process_group  # noqa: E402

TINY = ["--epochs", "1", "--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0",
        "--device", "cpu", "--no-amp"]
TRIALS = 6
SEED = 31
RUN_TIMEOUT_S = 120
# The files a run compares with the uninterrupted one, besides every case's NIfTI outputs.
RUN_FILES = ("metrics.csv", "summary.json", "longitudinal.csv", "report.html")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny model, and four test cases (one test patient, four weeks) predicted without a stop."""
    root = tmp_path_factory.mktemp("survive")
    data = root / "data"
    phantom.write_phantom(data, patients=5, weeks=4, shape=(20, 18, 12), seed=0)
    run_dir = root / "run"
    assert run_cli(train.main, train.get_args(["--data-root", str(data), "--out", str(run_dir), *TINY])) == 0
    command = ["--checkpoint", str(run_dir), "--data-root", str(data), "--split", "test", "--device", "cpu", "--no-figures",
               "--no-hd95"]
    reference = root / "reference"
    assert run_cli(predict.main, predict.get_args([*command, "--out", str(reference)])) == 0
    return {"root": root, "command": command, "reference": reference}


class ForkedPredict:
    """predict.py's entry point (``run_cli(predict.main, predict.get_args(argv))``, what ``python
    predict.py`` runs) in a process forked from this one, which has imported everything already:
    a trial then costs no interpreter start (12 s on the shared 2-core machine). The same process
    API as subprocess.Popen for what the trials use."""

    def __init__(self, command: list[str], out: Path):
        context = multiprocessing.get_context("fork")
        self.process = context.Process(target=self.run, args=([*command, "--out", str(out)],))
        self.process.start()
        self.pid = self.process.pid

    @staticmethod
    def run(argv: list[str]) -> None:
        with open(os.devnull, "w") as quiet:
            os.dup2(quiet.fileno(), 1)
            os.dup2(quiet.fileno(), 2)
        os._exit(run_cli(predict.main, predict.get_args(argv)))

    def poll(self):
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self):
        self.process.join()
        return self.process.exitcode

    def communicate(self, timeout=None):
        self.process.join(timeout)
        return "", ""


def predict_process(command: list[str], out: Path, **options) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "predict.py", *command, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def names_in(folder: Path) -> list[str]:
    """The file names in ``folder`` and figures/, cheaply (the kill loop polls this)."""
    names = []
    for sub in (folder, folder / "figures"):
        try:
            names += [entry.name for entry in os.scandir(sub) if entry.is_file()]
        except FileNotFoundError:
            pass
    return names


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def partials(folder: Path) -> list[Path]:
    return sorted(folder.rglob(f"{PARTIAL_PREFIX}*"))


def assert_every_file_loads(folder: Path) -> None:
    """Every file under a final name is whole: read through the library a user would read it with."""
    for path in visible_files(folder):
        name = path.name
        if name.endswith(".nii.gz"):
            image = nib.load(str(path))
            np.asanyarray(image.dataobj)  # decompresses every byte
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".csv"):
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
            assert rows and all(len(row) == len(rows[0]) for row in rows), f"{path}: ragged CSV"
        elif name.endswith(".png"):  # with figures (not in these runs, to keep the test short)
            with Image.open(path) as picture:
                picture.load()
        elif name.endswith(".html"):
            assert path.read_text().rstrip().endswith("</html>"), f"{path}: cut short"
        else:
            pytest.fail(f"{path}: a file of a kind this test does not know how to check")


def assert_same_as_reference(out: Path, reference: Path) -> None:
    names = [str(p.relative_to(reference)) for p in visible_files(reference)]
    assert [str(p.relative_to(out)) for p in visible_files(out)] == names
    niftis = [n for n in names if n.endswith(".nii.gz")]
    assert len(niftis) == 8  # four cases: labels and uncertainty
    for name in niftis:
        got, expected = nib.load(str(out / name)), nib.load(str(reference / name))
        assert got.header.binaryblock == expected.header.binaryblock, name
        np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(expected.dataobj), err_msg=name)
    for name in RUN_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def kill_at(process: subprocess.Popen, out: Path, kind: str, number: int) -> dict:
    """SIGKILL ``process`` when the ``number``-th output file has appeared ("file"), or when a
    temporary file appears after that ("write"): polled as fast as the loop runs."""
    deadline = time.time() + RUN_TIMEOUT_S
    while process.poll() is None and time.time() < deadline:
        names = names_in(out)
        done = sum(not name.startswith(".") for name in names)
        if out.is_dir() and done >= number and (kind == "file" or any(n.startswith(PARTIAL_PREFIX) for n in names)):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return {"files_before_kill": done, "killed": True}
    process.communicate(timeout=RUN_TIMEOUT_S)
    return {"files_before_kill": len(visible_files(out)), "killed": False}


def test_predict_killed_anywhere_continues_to_the_uninterrupted_result(trained, capsys):
    reference = trained["reference"]
    total = len(visible_files(reference))
    rng = np.random.default_rng(SEED)
    trials = []
    for trial in range(TRIALS):
        out = trained["root"] / f"trial{trial}"  # beside the reference: report.html links the images relatively
        kind = ("write", "file")[trial % 2]  # half of the kills in the middle of a write
        number = int(rng.integers(0, total))
        # the first trial as a user starts it; the others forked, to keep the test short
        process = predict_process(trained["command"], out) if trial == 0 else ForkedPredict(trained["command"], out)
        outcome = kill_at(process, out, kind, number)
        outcome.update(kind=kind, number=number, partials_left=len(partials(out)),
                       stale_lock=(out / LOCK_NAME).exists())
        trials.append(outcome)
        assert outcome["killed"], f"trial {trial}: the run ended before its kill point {kind} {number}"
        assert_every_file_loads(out)
        capsys.readouterr()
        code = run_cli(predict.main, predict.get_args([*trained["command"], "--out", str(out), "--continue"]))
        captured = capsys.readouterr()
        assert code == 0, captured.out[-2000:] + captured.err[-2000:]
        assert "Continuing" in captured.out
        assert not partials(out) and not (out / LOCK_NAME).exists(), "temporary files or the lock left behind"
        assert_same_as_reference(out, reference)
    print("\nchaos trials (kill kind, n-th file, files when killed, temporary files left, stale lock):")
    for t in trials:
        print(f"  {t['kind']:5s} {t['number']:3d} {t['files_before_kill']:3d} {t['partials_left']} {t['stale_lock']}")
    assert sum(t["partials_left"] > 0 for t in trials) >= 1, "no kill landed in the middle of a write"
    assert sum(t["stale_lock"] for t in trials) == len(trials)


def test_continue_refuses_a_case_made_with_other_settings(trained, capsys):
    out = trained["root"] / "other_settings"
    shutil.copytree(trained["reference"], out)
    before = {p: p.stat().st_mtime_ns for p in visible_files(out)}
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args([*trained["command"], "--out", str(out), "--continue", "--tta"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "_record.json" in lines[0] and "--tta False (this run: True)" in lines[0] and "--overwrite" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in visible_files(out)} == before
    # without --continue the folder is refused too, and the line says how to go on
    code = run_cli(predict.main, predict.get_args([*trained["command"], "--out", str(out)]))
    assert code == 2 and "--continue" in capsys.readouterr().err


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(trained, capsys):
    out = trained["root"] / "locked"
    shutil.copytree(trained["reference"], out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                 "started": "earlier", "command": "predict.py (test)"}))
        capsys.readouterr()
        code = run_cli(predict.main, predict.get_args([*trained["command"], "--out", str(out), "--continue"]))
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f"in use by pid {holder.pid}" in lines[0], lines
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale, and taken over
    code = run_cli(predict.main, predict.get_args([*trained["command"], "--out", str(out), "--continue"]))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "0 to predict" in captured.out and not (out / LOCK_NAME).exists()


def test_a_file_size_limit_ends_the_run_in_one_line_naming_the_file(trained):
    out = trained["root"] / "size_limit"
    # Above every file written before the first case's record (predict_config.json, the NIfTIs),
    # below the record: the limit strikes in the middle of the run.
    reference = trained["reference"]
    limit = max(p.stat().st_size for p in [reference / "predict_config.json", *reference.glob("*.nii.gz")]) + 64
    assert limit < min(p.stat().st_size for p in reference.glob("*_record.json"))

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = predict_process(trained["command"], out, preexec_fn=limited)
    stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    lines = [line for line in stderr.splitlines() if not line.startswith(("checking inputs", "predicting"))]
    assert process.returncode == 2, f"exit {process.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert len(lines) == 1 and "File too large" in lines[0], lines
    named = Path(lines[0].removeprefix("error: ").split(": could not be written")[0])
    assert named.name.endswith("_record.json") and named.parent == out and not named.exists()
    assert not partials(out)
    assert_every_file_loads(out)
    # and once the limit is gone, --continue finishes the run
    assert run_cli(predict.main, predict.get_args([*trained["command"], "--out", str(out), "--continue"])) == 0
    assert_same_as_reference(out, trained["reference"])


def test_continue_under_torchrun_predicts_only_the_missing_cases(trained):
    """Two gloo ranks finish a run that lacks two of its cases (one a record short: killed between
    its files and its record): the same files as the uninterrupted run."""
    out = trained["root"] / "torchrun"
    shutil.copytree(trained["reference"], out)
    for case in sorted(p.name[:-len("_record.json")] for p in out.glob("*_record.json"))[1:3]:
        (out / f"{case}_record.json").unlink()
    (out / "Case_005_Week2_pred.nii.gz").unlink()
    for name in RUN_FILES:
        (out / name).unlink()
    result = run_in_process_group(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                                   "predict.py", *trained["command"], "--out", str(out), "--continue"], RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 of 4 case(s) complete, 2 to predict" in result.stdout and "x 2 process(es)" in result.stdout
    assert result.stderr.count("predicting: 1 of 1") == 2  # one case on each rank
    assert_same_as_reference(out, trained["reference"])
