"""export.py: two tiny folds trained on a phantom, exported as a MONAI Bundle (one model, and the
two as an ensemble), then run as a user runs a bundle: ``python -m monai.bundle run`` in a
subprocess whose working directory is outside the repository and whose Python path holds none
of it. Its labels are compared voxel for voxel with predict.py's on the same images (one in
another orientation, one on a coarser grid); metadata against the checkpoint; TorchScript and
ONNX against the network rebuilt here from the checkpoint; MONAI's own bundle checks run on it;
members that disagree are refused in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

import export  # noqa: E402
from pelvicseg import phantom  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from dataset import preprocessing  # noqa: E402

# Phantom volumes shrink to 32 x 24 x 16 (area averaging) and are predicted in overlapping 16^3
# windows, so Gaussian blending and the way back to the source grid are part of what is compared.
PHANTOM_SHAPE = (40, 32, 24)
TINY = ["--spatial-size", "32", "24", "16", "--patch-size", "16", "16", "16", "--channels", "4", "8", "8", "8",
        "--epochs", "2", "--lr", "3e-3", "--workers", "0", "--device", "cpu", "--no-amp"]
AGREEMENT = 0.999
RELATIVE_TOLERANCE = 1e-3
TIMEOUT_S = 300
# The fields the MONAI Bundle specification requires of metadata.json, and those of a tensor in
# network_data_format: the schema verify_metadata checks against when the published one (a
# download) cannot be had. BUNDLE_META_SCHEMA=path/to/meta_schema_20240725.json uses that instead.
REQUIRED_METADATA = ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "task", "description", "authors", "copyright",
                     "network_data_format"]
REQUIRED_TENSOR = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one CPU thread for tiny networks


def outside_env() -> dict:
    """The environment of a user's shell: no PYTHONPATH, so nothing of the repository is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_outside(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert REPO not in cwd.resolve().parents and cwd.resolve() != REPO
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=outside_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-4000:]}"


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def reoriented(image: nib.Nifti1Image, axcodes=("S", "R", "A")) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels in mm, stored in another array order (nibabel's own reorientation)."""
    data = np.asanyarray(image.dataobj)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                                nib.orientations.axcodes2ornt(axcodes))
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    assert nib.aff2axcodes(affine) == axcodes
    return nib.orientations.apply_orientation(data, transform), affine


@pytest.fixture(scope="module")
def folds(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("export")
    data = base / "data"
    phantom.write_phantom(data, patients=5, weeks=2, shape=PHANTOM_SHAPE, seed=0)
    runs = [base / "fold0", base / "fold1"]
    for fold, run_dir in enumerate(runs):
        argv = ["--data-root", str(data), "--out", str(run_dir), "--folds", "2", "--fold", str(fold), *TINY]
        assert run_cli(train.main, train.get_args(argv)) == 0
    # Plain names (not HipMRI's), so predict.py takes every file of the folder, as the bundle does.
    test_patient = json.loads((runs[0] / "splits.json").read_text())["test"][0]
    inputs = base / "scans"
    inputs.mkdir()
    source = nib.load(str(data / "semantic_MRs_anon" / f"Case_{test_patient}_Week0_LFOV.nii.gz"))
    save(inputs / "scan_lps.nii.gz", np.asanyarray(source.dataobj), source.affine)
    save(inputs / "scan_sra.nii.gz", *reoriented(nib.load(str(data / "semantic_MRs_anon" /
                                                               f"Case_{test_patient}_Week1_LFOV.nii.gz"))))
    coarse, _, affine = phantom.make_case(int(test_patient), 0, (20, 16, 12), seed=0)  # enlarged: trilinear
    save(inputs / "scan_coarse.nii.gz", coarse, affine)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return {"base": base, "data": data, "runs": runs, "inputs": inputs, "elsewhere": elsewhere}


def export_bundle(runs: list[Path], out: Path) -> Path:
    assert run_cli(export.main, export.get_args(["--checkpoint", *map(str, runs), "--out", str(out)])) == 0
    return out


@pytest.fixture(scope="module")
def single(folds) -> Path:
    return export_bundle(folds["runs"][:1], folds["base"] / "bundle")


@pytest.fixture(scope="module")
def ensemble(folds) -> Path:
    return export_bundle(folds["runs"], folds["base"] / "bundle_ensemble")


def run_bundle(bundle: Path, inputs: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run_outside(["-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                        "--dataset_dir", str(inputs), "--output_dir", str(out)], cwd)


def predict_folder(checkpoints: list[Path], inputs: Path, out: Path) -> dict:
    argv = ["--checkpoint", *map(str, checkpoints), "--input", str(inputs), "--out", str(out), "--device", "cpu",
            "--no-figures", "--no-hd95"]
    assert run_cli(predict.main, predict.get_args(argv)) == 0
    return json.loads((out / "summary.json").read_text())


def assert_agrees_with_predict(bundle_out: Path, predict_out: Path, inputs: Path) -> None:
    scans = sorted(inputs.glob("*.nii.gz"))
    assert len(scans) == 3
    for scan in scans:
        name = scan.name.replace(".nii.gz", "_pred.nii.gz")
        ours, theirs, source = nib.load(str(bundle_out / name)), nib.load(str(predict_out / name)), nib.load(str(scan))
        labels, expected = np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)
        assert labels.dtype == np.uint8 and labels.shape == source.shape, name
        np.testing.assert_allclose(ours.affine, source.affine, atol=1e-5)
        assert nib.aff2axcodes(ours.affine) == nib.aff2axcodes(source.affine)
        # Several classes predicted: agreement on a constant volume would prove nothing.
        assert len(np.unique(expected)) >= 2, (name, np.unique(expected))
        agreement = float((labels == expected).mean())
        assert agreement >= AGREEMENT, f"{name}: {agreement:.5f} of voxels agree with predict.py"


def test_bundle_runs_outside_the_repository_and_agrees_with_predict(folds, single):
    out = folds["base"] / "bundle_labels"
    result = run_bundle(single, folds["inputs"], out, folds["elsewhere"])
    assert result.returncode == 0, explain(result)
    summary = predict_folder(folds["runs"][:1], folds["inputs"], folds["base"] / "predicted")
    assert_agrees_with_predict(out, folds["base"] / "predicted", folds["inputs"])
    # The bundle applies the post-processing predict.py decided from the run's postprocessing.json.
    inference = json.loads((single / "configs" / "inference.json").read_text())
    assert inference["largest_component"] == summary["postprocessing"]["largest_component"]
    assert summary["tta"] is False and inference["overlap"] == 0.5


def test_bundle_carries_its_code_and_passes_monai_checks_offline(folds, single, tmp_path):
    """One interpreter outside the repository: the project's modules are not importable there,
    verify_net_in_out builds network_def from the bundle's own scripts at two sizes, and
    verify_metadata accepts metadata.json and refuses it without a required field."""
    official = os.environ.get("BUNDLE_META_SCHEMA")
    schema = tmp_path / "schema.json"
    tensor = {"type": "object", "required": REQUIRED_TENSOR}
    schema.write_text(json.dumps({
        "$schema": "https://json-schema.org/draft/2019-09/schema", "type": "object", "required": REQUIRED_METADATA,
        "properties": {name: {"type": "string"} for name in REQUIRED_METADATA
                       if name not in ("required_packages_version", "network_data_format")}
        | {"required_packages_version": {"type": "object"},
           "network_data_format": {"type": "object", "required": ["inputs", "outputs"], "properties": {
               "inputs": {"type": "object", "additionalProperties": tensor},
               "outputs": {"type": "object", "additionalProperties": tensor}}}}}))
    broken = tmp_path / "broken_metadata.json"
    metadata = json.loads((single / "configs" / "metadata.json").read_text())
    broken.write_text(json.dumps({k: v for k, v in metadata.items() if k != "network_data_format"}))
    script = f"""
import importlib.util, sys
for name in ("dataset", "inference", "modules", "export", "pelvicseg"):
    assert importlib.util.find_spec(name) is None, f"{{name}} importable: the bundle could be using the repository"
from monai.bundle import verify_metadata, verify_net_in_out
bundle = {str(single)!r}
for n in (1, 2):
    verify_net_in_out(net_id="network_def", meta_file=bundle + "/configs/metadata.json",
                      config_file=bundle + "/configs/inference.json", device="cpu", n=n, bundle_root=bundle)
assert "scripts.modules" in sys.modules and sys.modules["scripts.modules"].__file__.startswith(bundle)
for schema in [s for s in ({str(schema)!r}, {official!r}) if s]:
    verify_metadata(meta_file=bundle + "/configs/metadata.json", filepath=schema)
    try:
        verify_metadata(meta_file={str(broken)!r}, filepath=schema)
    except ValueError:
        pass
    else:
        raise AssertionError("metadata without network_data_format passed " + schema)
    print("verified against", schema)
"""
    result = run_outside(["-c", script], folds["elsewhere"])
    assert result.returncode == 0, explain(result)
    assert result.stdout.count("verified against") == (2 if official else 1), explain(result)


def test_metadata_names_the_published_schema_it_was_checked_against(single):
    """metadata.json names the schema export.py was checked against, and its README tells the offline
    user which file to place; with BUNDLE_META_SCHEMA (a local copy of the published schema, a
    download) the file checked above is that one."""
    metadata = json.loads((single / "configs" / "metadata.json").read_text())
    assert metadata["schema"] == export.SCHEMA_URL
    schema_file = metadata["schema"].rsplit("/", 1)[-1]
    assert schema_file == "meta_schema_20240725.json"
    assert f"place a copy of `{schema_file}`" in (single / "docs" / "README.md").read_text()
    if os.environ.get("BUNDLE_META_SCHEMA"):
        assert Path(os.environ["BUNDLE_META_SCHEMA"]).name == export.SCHEMA_URL.rsplit("/", 1)[-1] == schema_file


def test_version_and_no_postprocessing_reach_the_bundle_and_a_full_out_needs_overwrite(folds, single, capsys):
    """--version is metadata.json's version, --no-postprocessing empties the bundle's largest-component
    step (the default export keeps what the run decided); a second export into a folder that is not
    empty is refused in one line and leaves it alone, and with --overwrite replaces it."""
    out = folds["base"] / "bundle_flags"
    argv = ["--checkpoint", str(folds["runs"][0]), "--out", str(out), "--version", "2.3.4", "--no-postprocessing"]
    assert run_cli(export.main, export.get_args(argv)) == 0
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert metadata["version"] == "2.3.4" and "2.3.4" in metadata["changelog"]
    assert inference["largest_component"] == [] and metadata["postprocessing"]["largest_component"] == []
    decided = json.loads((single / "configs" / "inference.json").read_text())["largest_component"]
    assert decided, "the run decided no post-processing: --no-postprocessing would change nothing here"

    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert run_cli(export.main, export.get_args(["--checkpoint", str(folds["runs"][0]), "--out", str(out)])) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line == f"error: {out}: already exists and is not empty; pass --overwrite or choose another --out"
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert run_cli(export.main, export.get_args(["--checkpoint", str(folds["runs"][0]), "--out", str(out),
                                                 "--overwrite"])) == 0
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    assert metadata["version"] == "0.1.0"  # the default, replacing the first export's
    assert json.loads((out / "configs" / "inference.json").read_text())["largest_component"] == decided


def test_metadata_names_classes_spacing_training_data_and_intended_use(folds, single):
    import monai
    state = load_checkpoint(folds["runs"][0] / "best.pt")
    metadata = json.loads((single / "configs" / "metadata.json").read_text())
    inference = json.loads((single / "configs" / "inference.json").read_text())
    names = state["class_names"]
    formats = metadata["network_data_format"]
    assert formats["inputs"]["image"]["num_channels"] == 1
    assert formats["outputs"]["pred"]["num_channels"] == len(names) == 6
    assert formats["outputs"]["pred"]["channel_def"] == {str(c): name for c, name in enumerate(names)}
    assert metadata["class_names"] == names == inference["class_names"]
    assert metadata["preprocessing"]["spacing_mm"] == state["config"]["spacing"] == inference["spacing"]
    assert metadata["preprocessing"]["orientation"] == "LPS"
    assert inference["roi_size"] == state["config"]["roi_size"] == [16, 16, 16]
    assert metadata["training"]["data_root"] == str(folds["data"]) == metadata["data_source"]
    assert "not for clinical use" in metadata["intended_use"].lower()
    assert (metadata["monai_version"], metadata["pytorch_version"], metadata["numpy_version"]) == (
        monai.__version__, torch.__version__.split("+")[0], np.__version__)
    assert metadata["postprocessing"]["largest_component"] == inference["largest_component"]
    assert "python -m monai.bundle run" in (single / "docs" / "README.md").read_text()


def phantom_windows(folds) -> list[torch.Tensor]:
    """Preprocessed phantom image as the network sees it: one 32 x 32 x 16 window (the volume,
    padded), and a batch of two 16^3 windows."""
    state = load_checkpoint(folds["runs"][0] / "best.pt")
    scan = str(next(folds["inputs"].glob("scan_lps.nii.gz")))
    volume = preprocessing(state["config"]["spacing"], 6)({"image": scan})["image"].as_tensor()[None]
    assert volume.shape == (1, 1, 32, 24, 16)
    padded = torch.nn.functional.pad(volume, (0, 0, 0, 8))
    crops = torch.cat([volume[..., :16, :16, :], volume[..., 16:, 8:, :]])
    return [padded, crops]


def run_onnx(path: Path, image: torch.Tensor) -> torch.Tensor:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": image.numpy()})[0])


def assert_close(output: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert output.shape == reference.shape, what
    error = float((output - reference).abs().max()) / float(reference.abs().max())
    assert error <= RELATIVE_TOLERANCE, f"{what}: {error:.2e} of the largest output"


def test_torchscript_and_onnx_match_the_checkpoints_network(folds, single):
    state = load_checkpoint(folds["runs"][0] / "best.pt")
    network = model_from_checkpoint(state).eval()
    saved = torch.load(single / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert saved.keys() == state["model"].keys()
    assert all(torch.equal(saved[k], state["model"][k]) for k in saved)
    scripted = torch.jit.load(str(single / "models" / "model.ts"), map_location="cpu")
    for image in phantom_windows(folds):
        with torch.no_grad():
            reference = network(image)
            assert_close(scripted(image), reference, f"TorchScript on {tuple(image.shape)}")
        assert_close(run_onnx(single / "models" / "model.onnx", image), reference, f"ONNX on {tuple(image.shape)}")


def test_ensemble_of_two_folds_exports_and_agrees_with_predict(folds, ensemble):
    metadata = json.loads((ensemble / "configs" / "metadata.json").read_text())
    assert [c["path"] for c in metadata["training"]["checkpoints"]] == [str(r / "best.pt") for r in folds["runs"]]
    assert metadata["network_data_format"]["outputs"]["pred"]["format"] == "probabilities"
    networks = [model_from_checkpoint(load_checkpoint(r / "best.pt")).eval() for r in folds["runs"]]
    scripted = torch.jit.load(str(ensemble / "models" / "model.ts"), map_location="cpu")
    image = phantom_windows(folds)[1]
    with torch.no_grad():
        reference = sum(torch.softmax(n(image), dim=1) for n in networks) / 2
        assert_close(scripted(image), reference, "ensemble TorchScript")
    assert_close(run_onnx(ensemble / "models" / "model.onnx", image), reference, "ensemble ONNX")

    out = folds["base"] / "bundle_ensemble_labels"
    result = run_bundle(ensemble, folds["inputs"], out, folds["elsewhere"])
    assert result.returncode == 0, explain(result)
    predict_folder(folds["runs"], folds["inputs"], folds["base"] / "predicted_ensemble")
    assert_agrees_with_predict(out, folds["base"] / "predicted_ensemble", folds["inputs"])


def altered_copy(run_dir: Path, path: Path, change) -> Path:
    state = load_checkpoint(run_dir / "best.pt")
    change(state)
    torch.save(state, path)
    return path


def renamed_class(state: dict) -> None:
    state["class_names"] = [*state["class_names"][:-1], "seminal_vesicles"]


def other_spacing(state: dict) -> None:
    state["config"]["spacing"] = [1.1 * s for s in state["config"]["spacing"]]


@pytest.mark.parametrize(("change", "what"), [(renamed_class, "class_names"), (other_spacing, "spacing")])
def test_members_that_disagree_are_refused_in_one_line(folds, tmp_path, capsys, change, what):
    other = altered_copy(folds["runs"][1], tmp_path / "other.pt", change)
    out = tmp_path / "bundle"
    capsys.readouterr()
    code = run_cli(export.main, export.get_args(["--checkpoint", str(folds["runs"][0]), str(other), "--out", str(out)]))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {other}: {what}"), lines[0]
    assert not out.exists() and not list(tmp_path.glob(".bundle.tmp-*"))


def test_bundle_inputs_skip_labels_and_outputs_never_go_into_the_data(tmp_path):
    from monai.data import MetaTensor

    from pelvicseg.bundle_components import SaveLabelsd, images_in
    for name in ("b.nii.gz", "a.nii", "a_SEMANTIC.nii.gz", "label_a.nii.gz", "a_seg.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert images_in(str(tmp_path)) == [str(tmp_path / "a.nii"), str(tmp_path / "b.nii.gz")]
    with pytest.raises(FileNotFoundError, match="no .nii or .nii.gz images"):
        images_in(str(tmp_path / "missing"))
    image = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": str(tmp_path / "b.nii.gz")})
    with pytest.raises(ValueError, match="refusing to write labels into the folder of the input"):
        SaveLabelsd("pred", str(tmp_path))({"image": image, "pred": np.zeros((2, 2, 2), np.uint8)})
    assert not (tmp_path / "b_pred.nii.gz").exists()
