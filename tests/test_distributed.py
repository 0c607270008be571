"""DistributedDataParallel training on the CPU (gloo): two ranks started by torchrun train one
epoch of a tiny network on a phantom; both must end with the same weights, rank 0 alone writes the
run folder, validation volumes split over the ranks are gathered into the same numbers a single
process computes, and the checkpoint serves single-process prediction and --resume.

Only rank 0 writes checkpoints, so rank 1's weights are compared inside the run:
``train.check_replicas_identical`` all-gathers a SHA-256 of every rank's state dict and prints
'DDP check: weights identical on N ranks' (or raises on every rank). A separate test starts two
ranks with deliberately different weights to show that the check does fail.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

from pelvicseg import phantom  # noqa: E402
from pelvicseg import inference  # noqa: E402
from pelvicseg import metrics  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from pelvicseg.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from conftest import distributed_environment as environment, run_in_process_group  # noqa: E402
from dataset import CLASS_NAMES, cases_in, find_cases, preprocessing  # noqa: E402

NUM_CLASSES = len(CLASS_NAMES)
TIMEOUT_S = 300
# float32: on CPUs with native bf16 (AVX512-BF16) the default bf16 autocast is not reproducible, the
# weight gradient of the bottleneck's second convolution differs from call to call on the same input
# (oneDNN's bf16 kernel), and once in five DDP runs a step came out non-finite and was skipped, so the
# step counts asserted below were off by one.
TINY = ["--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu",
        "--no-amp"]


def run(args: list[str], timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_in_process_group(args, timeout)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def metrics_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """5 patients x 2 weeks (train 6 volumes = 3 per rank, val 2 volumes = 1 per rank)."""
    base = tmp_path_factory.mktemp("ddp")
    data = base / "data"
    phantom.write_phantom(data, patients=5, weeks=2, shape=(20, 18, 12), seed=0)
    run_dir = base / "run"
    result = run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "train.py",
                  "--data-root", str(data), "--out", str(run_dir), "--epochs", "1", *TINY])
    return {"base": base, "data": data, "run": run_dir, "result": result}


def test_ddp_training_ends_with_identical_weights_on_both_ranks(ddp_run):
    result = ddp_run["result"]
    assert result.returncode == 0, explain(result)
    assert "DDP check: weights identical on 2 ranks" in result.stdout, explain(result)
    assert "cpu x 2 process(es)" in result.stdout  # really two ranks, not a single-process fallback


def test_ddp_rank_zero_alone_writes_the_run_folder(ddp_run):
    result, run_dir = ddp_run["result"], ddp_run["run"]
    assert result.returncode == 0, explain(result)
    # one banner and one epoch line: the second rank prints nothing of its own
    assert result.stdout.count("3D Improved UNet training") == 1, explain(result)
    assert sum(line.lstrip().startswith("epoch   1/1") for line in result.stdout.splitlines()) == 1
    for name in ("config.json", "splits.json", "metrics.csv", "training_curves.png", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), f"{name} missing"
    assert [r["epoch"] for r in metrics_rows(run_dir / "metrics.csv")] == ["1"]  # one row, not one per rank
    assert not list(run_dir.glob(".partial-*")), "temporary checkpoint files left behind"
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"]), "DDP wrapper prefix saved in the weights"
    assert state["epoch"] == 1
    assert state["split"] == json.loads((run_dir / "splits.json").read_text())


def test_ddp_validation_gathers_every_volume_from_both_ranks(ddp_run):
    """metrics.csv's validation Dice (volumes split over two ranks, gathered) must equal the Dice a
    single process computes from last.pt over all validation volumes, on the preprocessed grid
    against the preprocessed labels (per-epoch model selection; the source grid is for best.pt's
    final validation)."""
    assert ddp_run["result"].returncode == 0, explain(ddp_run["result"])
    run_dir = ddp_run["run"]
    state = load_checkpoint(run_dir / "last.pt")
    model = model_from_checkpoint(state).eval()
    config = state["config"]
    val_cases = cases_in(find_cases(ddp_run["data"]), state["split"]["val"])
    assert len(val_cases) == 2  # one per rank
    transform = preprocessing(config["spacing"], NUM_CLASSES)
    per_volume = []
    for case in val_cases:
        item = transform(case.as_dict())
        # The precision training validated with (float32 here: TINY has --no-amp).
        amp_dtype = inference.autocast_dtype(torch.device("cpu"), enabled=not config["no_amp"])
        probabilities = inference.predict_probabilities(model, item["image"][None], config["roi_size"],
                                                        config["overlap"], amp_dtype=amp_dtype)
        labels = probabilities[0].argmax(0).numpy()
        target = item["label"][0].numpy()
        per_volume.append(metrics.dice_per_class(labels, target, NUM_CLASSES))
    per_volume = np.array(per_volume)
    assert per_volume[0, 0] != pytest.approx(per_volume[1, 0], abs=1e-4), \
        "both validation volumes score alike: the check below could not tell one from two"
    row = metrics_rows(run_dir / "metrics.csv")[0]
    for c, name in enumerate(CLASS_NAMES):
        expected = metrics.nan_mean(per_volume[:, c])
        written = float(row[f"dice_{name}"])
        if np.isnan(expected):
            assert np.isnan(written), name
        else:
            assert written == pytest.approx(expected, rel=1e-4, abs=1e-6), name


def test_ddp_checkpoint_serves_single_process_prediction(ddp_run, tmp_path, capsys):
    assert ddp_run["result"].returncode == 0, explain(ddp_run["result"])
    out = tmp_path / "predictions"
    code = run_cli(predict.main, predict.get_args([
        "--checkpoint", str(ddp_run["run"] / "best.pt"), "--data-root", str(ddp_run["data"]), "--split", "test",
        "--out", str(out), "--device", "cpu", "--no-figures", "--no-hd95"]))
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    split = json.loads((ddp_run["run"] / "splits.json").read_text())
    test_cases = cases_in(find_cases(ddp_run["data"]), split["test"])
    assert len(test_cases) == 2
    for case in test_cases:
        written, source = nib.load(out / f"{case.case_id}_pred.nii.gz"), nib.load(case.image)
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 2


def test_single_process_resume_continues_a_ddp_run(ddp_run, tmp_path, capsys, monkeypatch):
    """--resume without size or width flags: they come back from the checkpoint's config. Run
    in this (single) process through train.py's CLI entry point, which returns the exit code."""
    assert ddp_run["result"].returncode == 0, explain(ddp_run["result"])
    run_dir = tmp_path / "resumed"
    shutil.copytree(ddp_run["run"], run_dir)
    before = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    code = run_cli(train.main, train.get_args([
        "--data-root", str(ddp_run["data"]), "--out", str(run_dir), "--resume", "--epochs", "2", "--workers", "0",
        "--device", "cpu"]))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    assert "Resuming" in stdout and "after epoch 1" in stdout, stdout
    assert "cpu x 1 process(es)" in stdout and "DDP check" not in stdout  # one process: no replicas
    rows = metrics_rows(run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == metrics_rows(ddp_run["run"] / "metrics.csv")[0]  # the DDP epoch's row is kept as it was
    after = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert after["epoch"] == 2
    assert after["model_args"] == before["model_args"]
    assert after["config"]["spatial_size"] == [16, 16, 16] and after["config"]["channels"] == [4, 8, 8, 8]
    assert after["config"]["spacing"] == before["config"]["spacing"]
    # Adam's state came back and went on: the step count holds the DDP epoch's 3 steps per rank plus
    # the resumed epoch's 6 single-process steps (a fresh optimizer would count 6).
    steps = lambda state: {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps(before) == {3} and steps(after) == {3 + 6}
    # and epoch 2 followed the schedule of a 2-epoch run of 6 steps an epoch: its last step is the
    # run's last, at a hundredth of --lr
    assert float(rows[1]["lr"]) == pytest.approx(1e-3 * 0.01, rel=1e-5)


REPLICA_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from modules import ImprovedUNet3D
    from train import check_replicas_identical

    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = ImprovedUNet3D(in_channels=1, out_channels=6, channels=[4, 8, 8, 8])
    print("same:", check_replicas_identical(model), flush=True)
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-6  # one weight, one rank, a tiny step
    try:
        check_replicas_identical(model)
        print("perturbed: not detected", flush=True)
    except RuntimeError as error:
        print("perturbed: raised", error, flush=True)
    dist.destroy_process_group()
""")


def test_replica_check_fails_on_every_rank_when_weights_differ(tmp_path):
    script = tmp_path / "replicas.py"
    script.write_text(REPLICA_SCRIPT)
    env = {**environment(), "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for process in ranks:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            outputs.append((process.returncode, stdout, stderr))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    for rank, (code, stdout, stderr) in enumerate(outputs):
        assert code == 0, f"rank {rank}: exit {code}\n{stdout}\n{stderr[-3000:]}"
        assert "same: DDP check: weights identical on 2 ranks" in stdout, stdout
        assert "perturbed: raised DDP check: weights differ between ranks" in stdout, stdout


def test_torchrun_with_one_process_uses_the_process_group(tmp_path):
    """Under torchrun the process group is made even for one process, so that a one-GPU run goes
    through every collective (the per-epoch sums, the stop agreement, the replica check)."""
    data = tmp_path / "data"
    phantom.write_phantom(data, patients=5, weeks=1, shape=(20, 18, 12), seed=0)
    result = run(["-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", "train.py",
                  "--data-root", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY])
    assert result.returncode == 0, explain(result)
    assert "DDP check: weights identical on 1 ranks" in result.stdout, explain(result)


def test_sigterm_to_torchrun_stops_both_ranks_at_the_same_step_and_resume_continues(ddp_run, tmp_path, capsys,
                                                                                    monkeypatch):
    """SIGTERM goes to the launcher, which passes it on to both ranks; they agree to stop at the
    same step (no rank left waiting in a gradient all-reduce), exit cleanly well within torchrun's
    grace period, keep an intact last.pt, and --resume continues the run (single process, through
    train.py's entry point in this process)."""
    assert ddp_run["result"].returncode == 0, explain(ddp_run["result"])
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "train.py",
               "--data-root", str(ddp_run["data"]), "--out", str(run_dir), "--epochs", "30", *TINY]
    process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline and process.poll() is None and not (run_dir / "last.pt").exists():
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.5)  # into the next epoch's steps
        process.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler or Ctrl-C would
        stopped_at = time.time()
        stdout, stderr = process.communicate(timeout=60)
        seconds = time.time() - stopped_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert seconds < 60
    assert "Interrupted" in stdout, stdout[-3000:] + stderr[-3000:]
    # Both ranks reached the end together: the replica check is a collective every rank must join.
    assert "DDP check: weights identical on 2 ranks" in stdout, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr.split("SIGTERM")[0]
    state = load_checkpoint(run_dir / "last.pt")  # intact: loads with weights_only=True
    done = int(state["epoch"])
    assert done >= 1 and [r["epoch"] for r in metrics_rows(run_dir / "metrics.csv")] == [str(e) for e in range(1, done + 1)]
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    code = run_cli(train.main, train.get_args(["--data-root", str(ddp_run["data"]), "--out", str(run_dir), "--resume",
                                               "--epochs", str(done + 1), "--workers", "0", "--device", "cpu"]))
    resumed = capsys.readouterr()
    assert code == 0, resumed.out[-3000:] + resumed.err[-3000:]
    assert f"after epoch {done}" in resumed.out
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == done + 1
