"""predict.py under torchrun: two gloo processes on the CPU split four phantom cases (rank 0 takes
cases 0 and 2, rank 1 cases 1 and 3) and rank 0 gathers them; every file must be what one process
writes, and metrics.csv identical byte for byte (so rows in the single run's case order, not in
the order the ranks held them). Run as tests/test_distributed.py runs torchrun: in its own process
group, killed with all of its ranks on a timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

from pelvicseg import phantom  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from conftest import run_in_process_group  # noqa: E402

TIMEOUT_S = 180
TINY = ["--epochs", "1", "--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0",
        "--device", "cpu"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    result = run_in_process_group(args, TIMEOUT_S)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_two_processes_write_what_one_process_writes(tmp_path, capsys):
    """The single-process reference through predict.py's entry point in this process; the two
    ranks under torchrun."""
    data = tmp_path / "data"
    phantom.write_phantom(data, patients=5, weeks=4, shape=(20, 18, 12), seed=0)  # 1 test patient: 4 cases
    run_dir = tmp_path / "run"
    assert run_cli(train.main, train.get_args(["--data-root", str(data), "--out", str(run_dir), *TINY])) == 0
    command = ["predict.py", "--checkpoint", str(run_dir), "--data-root", str(data), "--split", "test", "--device",
               "cpu", "--no-figures"]
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args([*command[1:], "--out", str(tmp_path / "single")]))
    single = capsys.readouterr()
    assert code == 0, f"exit {code}\n{single.out[-3000:]}\n{single.err[-3000:]}"
    double = run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *command,
                  "--out", str(tmp_path / "double")])
    one, two = tmp_path / "single", tmp_path / "double"

    assert "x 2 process(es)" in double.stdout and "x 1 process(es)" in single.out
    # Each rank predicted its two cases (progress goes to stderr, one line set per rank).
    assert double.stderr.count("predicting: 2 of 2 done") == 2, double.stderr[-3000:]
    assert json.loads((two / "predict_config.json").read_text())["processes"] == 2

    assert files(one) == files(two)
    predictions = [name for name in files(one) if name.endswith("_pred.nii.gz")]
    assert len(predictions) == 4
    metrics = (one / "metrics.csv").read_text()
    assert (two / "metrics.csv").read_bytes() == (one / "metrics.csv").read_bytes()
    # the single run's rows come case by case in sorted case order, six classes each
    order = [line.split(",")[0] for line in metrics.splitlines()[1:]]
    cases = sorted(name.replace("_pred.nii.gz", "") for name in predictions)
    assert order == [case for case in cases for _ in range(6)]
    assert json.loads((two / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())
    assert (two / "report.html").read_bytes() == (one / "report.html").read_bytes()
    for name in files(one):
        if name.endswith(".nii.gz"):
            a, b = nib.load(str(one / name)), nib.load(str(two / name))
            np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj), err_msg=name)
            np.testing.assert_array_equal(a.affine, b.affine)
