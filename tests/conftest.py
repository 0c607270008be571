"""Shared fixtures: tiny HipMRI-layout folders written with nibabel into temporary folders.

Volumes are small (24 x 20 x 16 voxels), stored LPS like HipMRI (affine diag(-1.7, -1.7, 1.56)),
with all six label classes drawn as nested ellipsoids so every class is present and rare ones
are a few voxels. Helpers reach tests through the ``hipmri`` fixture (a namespace), so test files
need not import this module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

# One CPU thread per test process (subprocesses inherit it): tiny networks on a shared 2-core
# machine run many times faster than with competing thread pools spinning against each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project is a set of scripts, not an installed package
    sys.path.insert(0, str(REPO))

SHAPE = (24, 20, 16)
AFFINE = np.diag([-1.7, -1.7, 1.56, 1.0])
# (image folder, label folder, image name, label name) per layout; see dataset.py's docstring
LAYOUTS = {
    "public": ("semantic_MRs_anon", "semantic_labels_anon",
               "Case_{p:03d}_Week{w}_LFOV.nii.gz", "Case_{p:03d}_Week{w}_SEMANTIC_LFOV.nii.gz"),
    "course": ("semantic_MRs", "semantic_labels_only",
               "K{p:03d}_Week{w}_LFOV.nii.gz", "K{p:03d}_Week{w}_SEMANTIC.nii.gz"),
}


# The files whose tests take longest (seconds on the 2-core CPU with pytest-xdist, measured: gpu_check
# 165, reliability 76, distributed 72, spacing 69, training_flags 60, engine 48, export 42,
# predict 34, bench 24, predict_torchrun 21; every other file under 15). Under ``-n 2 --dist
# loadfile`` each file runs whole on one worker, in collection order: these go first, longest
# first, so that no long file starts while the other worker runs out of files.
LONGEST_FIRST = ("test_gpu_check.py", "test_mutations.py", "test_reliability.py", "test_distributed.py",
                 "test_spacing.py", "test_training_flags.py", "test_engine.py", "test_export.py", "test_predict.py",
                 "test_bench.py", "test_cli_flags.py", "test_predict_torchrun.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist's own order (most tests first) would override ours


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def distributed_environment() -> dict:
    """The environment without torchrun's variables, so a child starts its own process group."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_in_process_group(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``python ARGS`` in its own process group, so a hung torchrun is ended with all of its
    worker ranks (a plain timeout would end the launcher and leave the ranks holding the pipes)."""
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=distributed_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(args[:6])} ...\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def synthetic_case(shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) of ``shape``: body, two bones, bladder, rectum, prostate."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    shift = rng.uniform(-0.08, 0.08, size=3)

    def ellipsoid(centre, radii):
        centre = np.asarray(centre, dtype=float) + shift
        return (((grid - centre[:, None, None, None]) / np.asarray(radii)[:, None, None, None]) ** 2).sum(0) <= 1

    label = np.zeros(shape, dtype=np.uint8)
    label[ellipsoid((0, 0, 0), (0.85, 0.8, 1.2))] = 1
    label[ellipsoid((-0.55, 0.1, 0), (0.22, 0.3, 0.9))] = 2
    label[ellipsoid((0.55, 0.1, 0), (0.22, 0.3, 0.9))] = 2
    label[ellipsoid((0, -0.35, 0.3), (0.3, 0.3, 0.4))] = 3
    label[ellipsoid((0, 0.45, -0.1), (0.15, 0.15, 0.5))] = 4
    label[ellipsoid((0, 0.05, -0.35), (0.2, 0.2, 0.25))] = 5
    brightness = np.array([5.0, 300.0, 80.0, 900.0, 150.0, 450.0], dtype=np.float32)
    image = brightness[label] + rng.normal(0, 20, size=shape).astype(np.float32)
    return np.abs(image).astype(np.float32), label


def write_nifti(path, array, affine=AFFINE, dtype=None, units=None) -> Path:
    """Save ``array`` as NIfTI-1 (.nii or .nii.gz from the name) with LPS q/s-forms."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=float))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if units:
        image.header.set_xyzt_units(units)
    nib.save(image, str(path))
    return path


def case_paths(root, patient: int, week: int, layout: str = "public") -> tuple[Path, Path]:
    image_dir, label_dir, image_name, label_name = LAYOUTS[layout]
    root = Path(root)
    return (root / image_dir / image_name.format(p=patient, w=week),
            root / label_dir / label_name.format(p=patient, w=week))


def write_case(root, patient: int, week: int, layout: str = "public", shape=SHAPE, seed=None,
               image=None, label=None, affine=AFFINE, label_affine=None, label_dtype=np.uint8,
               write_image=True, write_label=True) -> tuple[Path, Path]:
    """Write one image/label pair in ``layout``; arrays default to ``synthetic_case``."""
    default_image, default_label = synthetic_case(shape, patient * 100 + week if seed is None else seed)
    image = default_image if image is None else image
    label = default_label if label is None else label
    image_path, label_path = case_paths(root, patient, week, layout)
    if write_image:
        write_nifti(image_path, image, affine, units="mm")
    if write_label:
        # HipMRI labels leave the units 'unknown' where the image says 'mm'
        write_nifti(label_path, label, affine if label_affine is None else label_affine, dtype=label_dtype)
    return image_path, label_path


def write_dataset(root, patients=(4, 5, 6), weeks=(0, 1), layout="public", shape=SHAPE) -> Path:
    for patient in patients:
        for week in weeks:
            write_case(root, patient, week, layout, shape)
    return Path(root)


@pytest.fixture
def hipmri():
    """The helpers above, for tests: ``hipmri.write_case(tmp_path, 4, 0)`` and so on."""
    return SimpleNamespace(SHAPE=SHAPE, AFFINE=AFFINE, LAYOUTS=LAYOUTS, REPO=REPO, synthetic_case=synthetic_case,
                           write_nifti=write_nifti, case_paths=case_paths, write_case=write_case,
                           write_dataset=write_dataset)


@pytest.fixture
def public_root(tmp_path) -> Path:
    """Public-release layout: 3 patients x 2 weeks."""
    return write_dataset(tmp_path / "HipMRI_study_complete_release_v1", layout="public")


@pytest.fixture
def course_root(tmp_path) -> Path:
    """Course-copy layout: 3 patients x 2 weeks."""
    return write_dataset(tmp_path / "course", layout="course")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One CPU thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on a machine whose cores are busy, two OpenMP threads spinning at their barriers run these tiny
    networks 10-50x slower than one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def training_root(tmp_path_factory) -> Path:
    """5 patients x 2 weeks (split 3:1:1 by patient), shared by the slow training tests."""
    return write_dataset(tmp_path_factory.mktemp("training_data"), patients=range(4, 9), weeks=(0, 1))
