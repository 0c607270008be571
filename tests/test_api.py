"""The Python API (segmenter.Segmenter) and predict.py --engine onnx, on a tiny phantom model.

The API is checked on an array whose affine is oblique (20 degrees about the scanner's z axis) and
anisotropic: its labels lie on that grid, equal predict.py --input on the same image written as
NIfTI, and equal labels computed here by hand (the checkpoint's network through MONAI's sliding
window, then scipy's trilinear interpolation at every input voxel centre mapped through the two
affines, the arg-max, and scipy's connected components). --engine onnx is compared with
--engine torch label for label, with ONNX Runtime's run counted to show it did the windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

from pelvicseg import phantom  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from dataset import cases_in, find_cases, preprocessing  # noqa: E402
from pelvicseg.segmenter import Segmenter  # noqa: E402

# 12^3 windows on a 24 x 20 x 16 preprocessed volume: several overlapping windows, each padded to
# the network's multiple of 16 (inside the network for PyTorch, by the ONNX engine for ONNX).
TINY = ["--epochs", "1", "--spatial-size", "24", "20", "16", "--patch-size", "12", "12", "12", "--channels", "4", "8",
        "8", "8", "--workers", "0", "--device", "cpu", "--no-amp"]
ONNX_DISAGREEMENT = 0.001  # fraction of voxels --engine onnx may label differently from --engine torch


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("api")
    data = base / "data"
    phantom.write_phantom(data, patients=5, weeks=2, shape=(20, 18, 12), seed=0)
    run_dir = base / "run"
    assert run_cli(train.main, train.get_args(["--data-root", str(data), "--out", str(run_dir), *TINY])) == 0
    split = json.loads((run_dir / "splits.json").read_text())
    return {"base": base, "data": data, "run": run_dir, "test_cases": cases_in(find_cases(data), split["test"])}


def oblique_affine(spacing, degrees=20.0, origin=(40.0, -30.0, 12.0)) -> np.ndarray:
    """Stored LPS-like (first two axes towards -x, -y), turned about the z axis."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine[:3, 3] = origin
    return affine


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def predict_cli(argv: list[str], capsys) -> None:
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err


def labels_by_hand(run_dir: Path, scan: Path, affine: np.ndarray, largest_component: list[str]) -> np.ndarray:
    """The expected labels of ``scan``, computed without the project's ensemble, evaluation or
    way back to the source grid."""
    from monai.inferers import sliding_window_inference

    state = load_checkpoint(run_dir / "best.pt")
    network = model_from_checkpoint(state).eval()
    config, names = state["config"], state["class_names"]
    image = preprocessing(config["spacing"], len(names))({"image": str(scan)})["image"]
    with torch.no_grad():
        logits = sliding_window_inference(image.as_tensor()[None], tuple(config["roi_size"]), 2, network, overlap=0.5,
                                          mode="gaussian")
    probabilities = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].numpy()
    shape = nib.load(str(scan)).shape
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=0).reshape(3, -1)
    mapping = np.linalg.inv(np.asarray(image.affine, dtype=np.float64)) @ affine  # input voxel -> preprocessed voxel
    points = mapping[:3, :3] @ voxels + mapping[:3, 3:]
    resampled = np.stack([ndimage.map_coordinates(p, points, order=1, mode="nearest") for p in probabilities])
    labels = resampled.argmax(axis=0).reshape(shape).astype(np.uint8)
    for name in largest_component:
        c = names.index(name)
        components, count = ndimage.label(labels == c, structure=np.ones((3, 3, 3)))
        if count > 1:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            labels[(components > 0) & (components != largest)] = 0
    return labels


def test_api_on_an_oblique_array_labels_its_grid_as_predict_input_does(trained, tmp_path, capsys):
    case = trained["test_cases"][0]
    source = nib.load(case.image)
    array = np.asanyarray(source.dataobj).astype(np.float32)
    # The phantom's own voxel size (the anatomy stays the size the model knows), made more anisotropic.
    spacing = np.sqrt((source.affine[:3, :3] ** 2).sum(axis=0)) * (1.0, 1.25, 0.9)
    affine = oblique_affine(spacing)
    segment = Segmenter.from_checkpoints(trained["run"], device="cpu")
    labels, probabilities = segment(array, affine, probabilities=True)

    assert isinstance(labels, nib.Nifti1Image) and labels.get_data_dtype() == np.uint8
    assert labels.shape == array.shape
    np.testing.assert_allclose(labels.affine, affine, atol=1e-6)
    predicted = np.asanyarray(labels.dataobj)
    assert len(np.unique(predicted)) >= 2, np.unique(predicted)  # a constant answer would agree with anything
    assert probabilities.shape == (6, *array.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)

    scan = save(tmp_path / "scans" / "oblique.nii.gz", array, affine)
    predict_cli(["--checkpoint", str(trained["run"]), "--input", str(scan), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-figures", "--no-hd95"], capsys)
    written = nib.load(str(tmp_path / "out" / "oblique_pred.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), predicted)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)

    expected = labels_by_hand(trained["run"], scan, affine, segment.largest_component)
    agreement = float((predicted == expected).mean())
    assert agreement >= 0.999, f"{agreement:.5f} of voxels agree with the labels computed by hand"
    raw = np.asanyarray(Segmenter.from_checkpoints(trained["run"], device="cpu", postprocessing=False)(
        array, affine).dataobj)
    np.testing.assert_array_equal(raw, probabilities.argmax(axis=0))  # the probabilities the labels came from


def test_api_takes_a_path_a_nibabel_image_and_an_array_alike(trained):
    case = trained["test_cases"][1]
    source = nib.load(case.image)
    array = np.asanyarray(source.dataobj)
    segment = Segmenter.from_checkpoints([trained["run"] / "best.pt"], device="cpu")
    from_path = segment(case.image)
    from_image = segment(nib.Nifti1Image(array, source.affine, source.header.copy()))
    from_array = segment(array, source.affine)
    for result in (from_path, from_image, from_array):
        assert result.shape == source.shape
        np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(from_image.dataobj), np.asanyarray(from_path.dataobj))
    np.testing.assert_array_equal(np.asanyarray(from_array.dataobj), np.asanyarray(from_path.dataobj))
    with pytest.raises(TypeError, match="affine"):
        segment(array)


def test_onnx_engine_labels_as_the_torch_engine(trained, tmp_path, capsys, monkeypatch):
    """The same phantom test cases through predict.py with each engine. Both run float32 (the model
    was trained with --no-amp, so PyTorch does not autocast); they differ only in rounding
    (ONNX Runtime's kernels sum in another order, ~1e-6 of a logit), so a voxel can only change
    label where two classes tie to within that."""
    import onnxruntime

    runs = {"calls": 0}
    original = onnxruntime.InferenceSession.run

    def counted(self, *args, **kwargs):
        runs["calls"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", counted)
    common = ["--checkpoint", str(trained["run"]), "--data-root", str(trained["data"]), "--split", "test",
              "--device", "cpu", "--no-figures", "--no-hd95"]
    predict_cli([*common, "--out", str(tmp_path / "torch")], capsys)
    assert runs["calls"] == 0
    predict_cli([*common, "--out", str(tmp_path / "onnx"), "--engine", "onnx"], capsys)
    # Per case, 12^3 windows at a step of 6 over the preprocessed 24 x 20 x 16: 3 x 3 x 2 = 18,
    # run two at a time (predict.py's sw_batch_size): 9 runs, and no window left to PyTorch.
    assert runs["calls"] == len(trained["test_cases"]) * 9, runs

    differing = total = 0
    for case in trained["test_cases"]:
        name = f"{case.case_id}_pred.nii.gz"
        by_torch = np.asanyarray(nib.load(str(tmp_path / "torch" / name)).dataobj)
        by_onnx = np.asanyarray(nib.load(str(tmp_path / "onnx" / name)).dataobj)
        assert len(np.unique(by_torch)) >= 2, np.unique(by_torch)
        assert by_onnx.shape == by_torch.shape == nib.load(case.image).shape
        differing += int((by_onnx != by_torch).sum())
        total += by_torch.size
    assert differing <= ONNX_DISAGREEMENT * total, f"{differing} of {total} voxels differ between the engines"
    config = json.loads((tmp_path / "onnx" / "predict_config.json").read_text())
    assert config["engine"] == "onnx"
