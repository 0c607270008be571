"""Bad input: every damaged or inconsistent file ends in one DataError/CheckpointError line naming
it (exit code 2 from the CLIs, no traceback); checkpoints refuse code; an interrupted training run
resumes to the same numbers as an uninterrupted one."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.dummy import DummyProcess
from pathlib import Path

import numpy as np
import pytest
import torch

from pelvicseg.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from dataset import DataError, LoadValidated, cached_dataset, find_cases, preprocessing, split_patients
from pelvicseg.errors import unwrap_data_error
from modules import ImprovedUNet3D

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.55, 2.125, 1.56)  # conftest volumes (24 x 20 x 16 at 1.7, 1.7, 1.56 mm) become 16 x 16 x 16


def data_error_of(item: dict) -> DataError:
    """Run the real preprocessing on ``item``; return the DataError it raises (MONAI wraps it)."""
    with pytest.raises(Exception) as caught:
        preprocessing(SPACING)(item)
    error = unwrap_data_error(caught.value)
    assert error is not None, f"not a DataError: {caught.value!r}"
    return error


def assert_one_line_naming(error: Exception, path) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, f"{path} not named in: {message}"


# ----------------------------------------------------------------------------- finding files

def test_image_without_label_is_warned_and_skipped(tmp_path, hipmri, caplog):
    hipmri.write_case(tmp_path, 4, 0)
    lonely, _ = hipmri.write_case(tmp_path, 5, 0, write_label=False)
    with caplog.at_level(logging.WARNING, logger="hipmri"):
        cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Case_004_Week0"]
    assert any(str(lonely) in r.getMessage() and "without label" in r.getMessage() for r in caplog.records)


def test_no_pairs_at_all(tmp_path, hipmri):
    hipmri.write_case(tmp_path, 4, 0, write_label=False)
    hipmri.write_case(tmp_path, 5, 1, write_image=False)  # a label, but for another key
    with pytest.raises(DataError) as caught:
        find_cases(tmp_path)
    assert_one_line_naming(caught.value, tmp_path)
    assert "no image has a matching label" in str(caught.value)


def test_missing_data_root(tmp_path):
    with pytest.raises(DataError, match="does not exist") as caught:
        find_cases(tmp_path / "nowhere")
    assert_one_line_naming(caught.value, tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        find_cases(tmp_path / "file.txt")


def test_empty_folder(tmp_path):
    (tmp_path / "semantic_MRs_anon").mkdir()
    with pytest.raises(DataError, match="no HipMRI NIfTI files found") as caught:
        find_cases(tmp_path)
    assert_one_line_naming(caught.value, tmp_path)


# ----------------------------------------------------------------------------- damaged files

def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def text(path: Path) -> None:
    path.write_text("patient 004, week 0: see the scanner export\n")


def gzipped_text(path: Path) -> None:
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 20))


@pytest.mark.parametrize("damage", [truncated, random_bytes, text, gzipped_text])
@pytest.mark.parametrize("which", ["image", "label"])
def test_unreadable_file(tmp_path, hipmri, damage, which):
    image, label = hipmri.write_case(tmp_path, 4, 0)
    target = image if which == "image" else label
    damage(target)
    error = data_error_of({"image": str(image), "label": str(label)})
    assert_one_line_naming(error, target)
    assert "cannot be read as NIfTI" in str(error)


def bad_pair(hipmri, root, name):
    """(item, file that must be named, expected words) for one kind of inconsistent pair."""
    image, label = hipmri.synthetic_case(seed=1)
    kwargs = {}
    if name == "shape":
        kwargs["label"] = label[:, :, :-2]
    elif name == "affine":
        moved = hipmri.AFFINE.copy()
        moved[:3, 3] = (5.0, 0.0, 0.0)
        kwargs["label_affine"] = moved
    elif name in ("label 6", "label -1", "label 2.5", "label nan"):
        value = {"label 6": 6, "label -1": -1, "label 2.5": 2.5, "label nan": np.nan}[name]
        label = label.astype(np.float32)
        label[3, 4, 5] = value
        kwargs.update(label=label, label_dtype=np.float32 if name != "label -1" else np.int16)
    elif name in ("nan", "inf", "-inf"):
        image[1, 2, 3] = float(name)
        kwargs["image"] = image
    elif name == "huge":
        image[label == 1] = 3e38  # finite, but sums overflow float32
        kwargs["image"] = image
    elif name == "zero":
        kwargs["image"] = np.zeros_like(image)
    elif name == "constant":
        kwargs["image"] = np.full_like(image, 7.0)
    elif name == "thin":
        kwargs.update(image=image[:, :, :1], label=label[:, :, :1])
    elif name == "4d":
        kwargs.update(image=np.stack([image, image], -1), label=np.stack([label, label], -1))
    image_path, label_path = hipmri.write_case(root, 4, 0, **kwargs)
    named = image_path if name in ("nan", "inf", "-inf", "huge", "zero", "constant", "thin", "4d") else label_path
    words = {"shape": "differs from image shape", "affine": "affine differs", "label 6": "outside 0..5",
             "label -1": "outside 0..5", "label 2.5": "not whole numbers", "label nan": "not whole numbers",
             "nan": "NaN or infinite", "inf": "NaN or infinite", "-inf": "NaN or infinite",
             "huge": "intensities reach", "zero": "constant", "constant": "constant", "thin": "too small",
             "4d": "expected a 3D volume"}[name]
    return {"image": str(image_path), "label": str(label_path)}, named, words


BAD_PAIRS = ["shape", "affine", "label 6", "label -1", "label 2.5", "label nan", "nan", "inf", "-inf", "huge",
             "zero", "constant", "thin", "4d"]


@pytest.mark.parametrize("name", BAD_PAIRS)
def test_bad_pair_is_a_data_error(tmp_path, hipmri, name):
    item, named, words = bad_pair(hipmri, tmp_path, name)
    # directly: the transform raises our DataError itself ...
    with pytest.raises(DataError) as caught:
        LoadValidated(("image", "label"))(item)
    assert_one_line_naming(caught.value, named)
    assert words in str(caught.value)
    # ... and through the whole pipeline, where MONAI wraps it
    assert str(data_error_of(item)) == str(caught.value)


def test_shape_mismatch_names_both_files(tmp_path, hipmri):
    item, _, _ = bad_pair(hipmri, tmp_path, "shape")
    error = data_error_of(item)
    assert item["image"] in str(error) and item["label"] in str(error)


def test_image_alone_is_checked_too(tmp_path, hipmri):
    """Prediction loads images without labels: the same checks apply."""
    image = hipmri.write_nifti(tmp_path / "scan.nii.gz", np.full(hipmri.SHAPE, np.nan, dtype=np.float32))
    assert_one_line_naming(data_error_of({"image": str(image)}), image)


def test_failed_cache_leaves_no_loader_threads_running(tmp_path, hipmri):
    """MONAI's cache-filling ThreadPool is not joined on error; a thread still inside torch code
    when the CLI exits aborts the process (SIGABRT, not exit code 2). cached_dataset waits."""
    bad, _ = hipmri.write_case(tmp_path, 4, 0)
    for patient in range(5, 9):
        hipmri.write_case(tmp_path, patient, 0, shape=(64, 64, 48))  # work still running after the error
    truncated(bad)
    before = set(threading.enumerate())
    with pytest.raises(Exception) as caught:
        cached_dataset(find_cases(tmp_path), SPACING, workers=2)
    assert_one_line_naming(unwrap_data_error(caught.value), bad)
    running = [t for t in set(threading.enumerate()) - before if isinstance(t, DummyProcess) and t.is_alive()]
    assert not running


# ----------------------------------------------------------------------------- the CLI

def train_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# float32: bf16 convolutions on the CPU are not bit-reproducible between runs, and resume is checked to 1e-5
TINY = ["--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu", "--no-amp"]


def assert_cli_error(result: subprocess.CompletedProcess, named) -> None:
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert str(named) in errors[0]


@pytest.mark.parametrize("problem", ["truncated image", "label out of range", "missing root"])
def test_train_cli_reports_bad_data_in_one_line(tmp_path, hipmri, problem):
    root = hipmri.write_dataset(tmp_path / "data", patients=range(4, 9), weeks=(0,))
    split = split_patients([f"{p:03d}" for p in range(4, 9)], seed=0)
    image, label = hipmri.case_paths(root, int(split["train"][0]), 0)
    if problem == "truncated image":
        truncated(image)
        named = image
    elif problem == "label out of range":
        _, val_label = hipmri.case_paths(root, int(split["val"][0]), 0)
        values = hipmri.synthetic_case(seed=2)[1]
        values[0, 0, 0] = 9
        hipmri.write_nifti(val_label, values, dtype=np.uint8)
        named = val_label
    else:
        root = named = tmp_path / "not_there"
    result = train_cli("--data-root", root, "--out", tmp_path / "run", "--epochs", 1, *TINY)
    assert_cli_error(result, named)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_predict_cli_reports_corrupt_checkpoint(tmp_path, hipmri):
    # A text file named .pt: torch's legacy unpickler raised KeyError here (uncaught before the fix).
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_text("hello world\n")
    image, _ = hipmri.write_case(tmp_path / "data", 4, 0)
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--input", str(image),
                             "--out", str(tmp_path / "pred"), "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_cli_error(result, checkpoint)


# ----------------------------------------------------------------------------- checkpoints

def tiny_state(channels=(4, 8, 8, 8)) -> dict:
    torch.manual_seed(0)
    model = ImprovedUNet3D(channels=channels)
    return {"model": model.state_dict(), "model_args": {"channels": list(channels)}, "epoch": 3}


@pytest.mark.parametrize("kind", ["wrong shapes", "other network", "unknown argument", "bare state dict"])
def test_checkpoint_of_another_architecture(tmp_path, kind):
    path = tmp_path / "other.pt"
    state = tiny_state()
    if kind == "wrong shapes":
        state["model"] = tiny_state((8, 16, 16, 16))["model"]
    elif kind == "other network":
        state["model"] = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Linear(4, 2)).state_dict()
    elif kind == "unknown argument":
        state["model_args"]["width_multiplier"] = 2
    else:
        state = state["model"]
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError) as caught:
        model_from_checkpoint(load_checkpoint(path), path)
    assert_one_line_naming(caught.value, path)


def test_good_checkpoint_round_trip(tmp_path):
    path = tmp_path / "last.pt"
    state = tiny_state()
    save_checkpoint(state, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left behind
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["format_version"] >= 1
    model = model_from_checkpoint(loaded, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    # readable by plain torch.load(weights_only=True), as the README promises
    assert torch.load(path, weights_only=True)["model_args"] == {"channels": [4, 8, 8, 8]}


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(tiny_state(), path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"model": {}, "model_args": {}, "unpicklable": lambda: None}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def corrupt_checkpoints(good: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    flipped = bytearray(good)
    for position in rng.integers(0, 400, 12):
        flipped[position] ^= 0xFF
    return {
        "empty": b"",
        "random bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"hello world\n",  # KeyError from the legacy unpickler before the fix
        "memo lookup": b"\x80\x02h\x06.",  # KeyError
        "short int": b"\x80\x02J\x01",  # struct.error
        "truncated": good[: len(good) // 2],
        "truncated early": good[:100],
        "flipped header": bytes(flipped),
    }


def test_corrupt_checkpoint(tmp_path):
    save_checkpoint(tiny_state(), tmp_path / "good.pt")
    for name, data in corrupt_checkpoints((tmp_path / "good.pt").read_bytes()).items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as caught:
            model_from_checkpoint(load_checkpoint(path), path)
        assert_one_line_naming(caught.value, path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path):
    # The payload is real: plain pickle runs it.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    state = {"model": Payload(marker), "model_args": {"channels": [4, 8, 8, 8]}}
    torch_file = tmp_path / "evil_torch.pt"
    torch.save(state, torch_file)  # zip format, as train.py writes
    files = [torch_file]
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        files.append(tmp_path / f"evil_pickle{protocol}.pt")
        files[-1].write_bytes(pickle.dumps(state, protocol=protocol))
    for path in files:
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        assert_one_line_naming(caught.value, path)
        assert not marker.exists(), f"{path.name} ran its payload"


# ----------------------------------------------------------------------------- fuzzing the loader

FUZZ_SCRIPT = r'''
"""Damaged variants of a valid pair through preprocessing; one JSON line per variant."""
import gzip, json, signal, struct, sys, time, traceback
from pathlib import Path
import numpy as np, nibabel as nib, torch
repo, out, count, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, repo)
from dataset import preprocessing
from pelvicseg.errors import unwrap_data_error

rng = np.random.default_rng(seed)
shape, affine = (24, 20, 16), np.diag([-1.7, -1.7, 1.56, 1.0])
TARGET_SPACING = (2.55, 2.125, 1.56)  # 16 x 16 x 16 voxels for the intact header
label = np.zeros(shape, np.uint8)
label[4:20, 4:16, 3:13] = 1
label[8:14, 8:12, 6:10] = 3
label[10:12, 5:7, 5:8] = 5
image = (label * 100.0 + rng.normal(50, 10, shape)).astype(np.float32)

def nifti_bytes(array):
    nifti = nib.Nifti1Image(array, affine)
    nifti.set_qform(affine, 1)
    nifti.set_sform(affine, 1)
    return bytes(nifti.to_bytes())  # 348-byte header, 4 extension bytes, data

SOURCES = {"image": nifti_bytes(image), "label": nifti_bytes(label)}
DTYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 7, 99, 32767, -1]

def put(raw, fmt, offset, value):
    struct.pack_into(fmt, raw, offset, value)

def damage(raw, kind):
    raw = bytearray(raw)
    if kind == "flip header bytes":
        for _ in range(int(rng.integers(1, 5))):
            raw[int(rng.integers(0, 348))] ^= int(rng.integers(1, 256))
    elif kind == "dtype code":
        put(raw, "<h", 70, int(rng.choice(DTYPES)))
        if rng.random() < 0.5:
            put(raw, "<h", 72, int(rng.choice([0, 1, 8, 16, 32, 64, 128, -8])))  # bitpix
    elif kind == "dims":
        put(raw, "<h", 40 + 2 * int(rng.integers(0, 8)),
            int(rng.choice([0, 1, 2, 3, 4, 5, 7, 8, -1, -3, 31, 2000, 32767, -32768])))
    elif kind == "pixdim":
        put(raw, "<f", 76 + 4 * int(rng.integers(0, 8)), float(rng.choice([0.0, np.nan, np.inf, -1.0, 1e-30, 1e30])))
    elif kind == "scaling":
        put(raw, "<f", int(rng.choice([112, 116])), float(rng.choice([0.0, np.nan, np.inf, -1.0, 1e30, 4e35, 0.5])))
    elif kind == "vox_offset":
        put(raw, "<f", 108, float(rng.choice([0.0, 1.0, 351.0, 356.0, 1e9, -5.0, np.nan])))
    elif kind == "orientation":
        offset = int(rng.choice([252, 254] + list(range(256, 344, 4))))  # form codes, quaternions, srows
        if offset < 256:
            put(raw, "<h", offset, int(rng.choice([0, 1, 2, 3, 4, 5, -1, 99])))
        else:
            put(raw, "<f", offset, float(rng.choice([0.0, np.nan, np.inf, 1e30, -1e30])))
    elif kind == "magic":
        raw[344:348] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
    elif kind == "data bytes":
        positions = rng.integers(352, len(raw), size=max(1, (len(raw) - 352) // 50))
        for position in positions:
            raw[int(position)] = int(rng.integers(0, 256))
    elif kind == "huge intensities":
        put(raw, "<f", 112, 4e35)  # scl_slope: image values up to ~2e38, finite, overflowing sums
    return bytes(raw)

KINDS = ["truncate", "flip header bytes", "dtype code", "dims", "pixdim", "scaling", "vox_offset",
         "orientation", "magic", "data bytes", "huge intensities", "flip header bytes"]
TARGETS = ["image", "label", "image alone"]

class Timeout(Exception):
    pass

def on_alarm(*_):
    raise Timeout()

signal.signal(signal.SIGALRM, on_alarm)
for n in range(count):
    kind, which = KINDS[n % len(KINDS)], TARGETS[(n // len(KINDS)) % len(TARGETS)]
    target = "label" if which == "label" else "image"
    if kind == "huge intensities":
        target = which = "image"
    compress = bool(rng.random() < 0.6)
    raw = SOURCES[target] if kind == "truncate" else damage(SOURCES[target], kind)
    data = gzip.compress(raw, mtime=0) if compress else raw
    if kind == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
    suffix = ".nii.gz" if compress else ".nii"
    if rng.random() < 0.08:
        suffix = ".nii" if compress else ".nii.gz"  # name and content disagree
    paths = {}
    for key in ("image", "label"):
        path = out / f"case{n:03d}_{key}{suffix if key == target else '.nii.gz'}"
        path.write_bytes(data if key == target else gzip.compress(SOURCES[key], mtime=0))
        paths[key] = str(path)
    item = {"image": paths["image"]} if which == "image alone" else dict(paths)
    record = {"n": n, "kind": kind, "which": which, "gzip": compress, "file": paths[target]}
    started = time.time()
    signal.alarm(30)
    try:
        result = preprocessing(TARGET_SPACING)(item)
        signal.alarm(0)
        # Volumes keep their own field of view, so a damaged voxel size changes the shape; it must
        # stay a usable volume (the loader refuses anything outside 2..MAX_RESAMPLED_AXIS voxels).
        problems = [f"{key}: dtype {result[key].dtype}, shape {tuple(result[key].shape)}, "
                    f"finite {bool(torch.isfinite(result[key]).all())}" for key in item
                    if result[key].dtype != torch.float32 or result[key].ndim != 4
                    or not all(2 <= n <= 2048 for n in result[key].shape[1:])
                    or result[key].shape != result["image"].shape
                    or not torch.isfinite(result[key]).all()]
        record["outcome"] = "bad output: " + "; ".join(problems) if problems else "loaded"
    except Timeout:
        record["outcome"] = "timeout"
    except Exception as error:
        signal.alarm(0)
        data_error = unwrap_data_error(error)
        if data_error is None:
            record["outcome"] = "other exception: " + "".join(traceback.format_exception(error))[-2000:]
        else:
            record["outcome"], record["message"] = "data error", str(data_error)
    record["seconds"] = round(time.time() - started, 3)
    print(json.dumps(record), flush=True)
'''


def test_fuzzed_nifti_loads_or_raises_data_error(tmp_path):
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ_SCRIPT)
    (tmp_path / "cases").mkdir()
    count = 60
    result = subprocess.run([sys.executable, "-W", "ignore", str(script), str(REPO), str(tmp_path / "cases"),
                             str(count), "20240601"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == count
    failures = []
    for record in records:
        if record["outcome"] == "data error":
            message = record["message"]
            if "\n" in message or record["file"] not in message:
                failures.append(f"{record['kind']} ({record['which']}): message {message!r}")
        elif record["outcome"] != "loaded":
            failures.append(f"{record['kind']} ({record['which']}, gzip {record['gzip']}): {record['outcome']}")
    assert not failures, "\n".join(failures)
    outcomes = {r["outcome"] for r in records}
    assert outcomes == {"loaded", "data error"}  # the damage is varied enough to give both
    kinds_refused = {r["kind"] for r in records if r["outcome"] == "data error"}
    assert {"truncate", "magic", "huge intensities"} <= kinds_refused


# ----------------------------------------------------------------------------- interrupted training

EPOCHS = 4


def read_losses(run_dir: Path) -> dict[str, list[float]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) for r in rows] for key in ("epoch", "train_loss", "val_loss")}


@pytest.fixture(scope="module")
def uninterrupted_run(training_root, tmp_path_factory) -> Path:
    """The reference run, through train.py's entry point in this process (one CPU thread, as the
    subprocesses below: conftest sets OMP_NUM_THREADS=1 for both)."""
    import train
    from pelvicseg.cli import run_cli

    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert run_cli(train.main, train.get_args(["--data-root", str(training_root), "--out", str(out),
                                               "--epochs", str(EPOCHS), *TINY])) == 0
    return out


def test_interrupted_training_resumes_to_the_same_numbers(uninterrupted_run, training_root, tmp_path):
    out = tmp_path / "interrupted"
    command = [sys.executable, "train.py", "--data-root", str(training_root), "--out", str(out),
               "--epochs", str(EPOCHS), *TINY]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.csv"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # header + epochs 1, 2
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "Interrupted" in stdout and "Traceback" not in stderr
    done = read_losses(out)["epoch"]
    assert 2 <= len(done) < EPOCHS, f"interrupted after epochs {done}"
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == len(done)

    resumed = train_cli("--data-root", training_root, "--out", out, "--epochs", EPOCHS, "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"Resuming {out / 'last.pt'} after epoch {len(done)}" in resumed.stdout
    expected, got = read_losses(uninterrupted_run), read_losses(out)
    assert got["epoch"] == expected["epoch"] == [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(got["train_loss"], expected["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["val_loss"], expected["val_loss"], rtol=1e-5)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == EPOCHS


def test_training_into_a_finished_run_is_refused(uninterrupted_run, training_root):
    before = (uninterrupted_run / "last.pt").read_bytes()
    result = train_cli("--data-root", training_root, "--out", uninterrupted_run, "--epochs", EPOCHS, *TINY)
    assert_cli_error(result, uninterrupted_run)
    assert "--resume" in result.stderr
    assert (uninterrupted_run / "last.pt").read_bytes() == before
