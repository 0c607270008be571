"""Inference shared by training's validation and predict.py: device and precision, Gaussian
sliding-window prediction with flip TTA, ensembles of models (in PyTorch or through ONNX
Runtime), resampling back to the source grid through the affines, and connected-component
post-processing learned on validation.

Data flows one way: train.py and predict.py import this module; it imports neither.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from scipy import ndimage

from pelvicseg.atomic import atomic_path
from pelvicseg.checkpoint import load_checkpoint
from pelvicseg.errors import CheckpointError
from dataset import drop_trailing_singletons
from pelvicseg.metrics import dice_per_class, hd95_per_class, nan_mean
from modules import ImprovedUNet3D
from pelvicseg.uncertainty import expected_dice_deficit

# Sliding-window overlap of prediction, and so of training's final validation, which fits the
# post-processing and the review rule on what predict.py computes. Per-epoch model selection may
# use less (train.py --overlap): it only ranks epochs.
PREDICTION_OVERLAP = 0.5

MEMORY_FLAGS = ("--patch-size (smaller crops and windows), --spacing (coarser voxels), --channels (narrower "
                "network), --checkpointing, --batch-size 1")


def out_of_memory_message(stage: str, patch_size) -> str:
    return (f"error: out of GPU memory in {stage} (window {list(patch_size) if patch_size else 'whole volume'}); "
            f"reduce memory with {MEMORY_FLAGS}")


# ----------------------------------------------------------------------------- devices

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast runs 3D
    convolutions about twice as fast as float32; elsewhere it would be slower, so it stays off."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """Mixed precision: bf16 where the GPU runs it natively, else fp16 (training adds a
    GradScaler); on the CPU bf16 only with native bf16 instructions. None means float32.

    ``including_emulation=False``: PyTorch otherwise reports bf16 as supported on GPUs that only
    emulate it (pre-Ampere), where it is far slower than fp16."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


# ----------------------------------------------------------------------------- sliding window

def window_size(roi_size: Sequence[int] | None, image: torch.Tensor) -> tuple[int, ...]:
    """The sliding window: the run's ``roi_size``, or the whole volume where none is set."""
    return tuple(int(s) for s in (roi_size or image.shape[2:]))


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int] | None,
                          overlap: float = 0.5, tta: bool = False, amp_dtype: torch.dtype | None = None,
                          sw_batch_size: int = 2) -> torch.Tensor:
    """Softmax probabilities ``(B, C, X, Y, Z)`` for ``image (B, 1, X, Y, Z)`` by Gaussian-weighted
    sliding-window inference (MONAI); ``tta`` averages with the left-right mirrored prediction
    (the only flip used in training, so the only one the network has learned to be invariant to)."""
    device = next(model.parameters()).device
    image = torch.as_tensor(image).to(device)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model(window).float()

    return sliding_window_probabilities(predictor, image, roi_size, overlap, tta, sw_batch_size)


@torch.no_grad()
def sliding_window_probabilities(predictor: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                                 roi_size: Sequence[int] | None, overlap: float = 0.5, tta: bool = False,
                                 sw_batch_size: int = 2) -> torch.Tensor:
    """predict_probabilities for any ``predictor`` of window logits (a network, an ONNX Runtime
    session): the windows, their Gaussian blending, the softmax and the flip are the same for all."""

    def run(volume: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(volume, roi_size=window_size(roi_size, volume), sw_batch_size=sw_batch_size,
                                          predictor=predictor, overlap=overlap, mode="gaussian")
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)

    probabilities = run(image)
    if tta:
        probabilities = (probabilities + run(image.flip(2)).flip(2)) / 2
    return probabilities


# ----------------------------------------------------------------------------- ensembles

# Ensemble members must predict the same classes on one grid. Spacings within 2 % (folds whose
# spacing came from their own training patients' median) are one grid: the ensemble runs at the
# first member's, a scale difference far inside training's +-10 % scale augmentation.
SPACING_TOLERANCE = 0.02


@dataclass
class Member:
    """One model of an ensemble, held on the CPU until its turn on the device."""
    path: str
    model_args: dict
    weights: dict
    config: dict
    run_dir: Path
    split: dict | None
    modality: str = "MR"  # what it was trained on; checkpoints from before train.py stored it were MR
    adaptation: dict | None = None  # an adapted model's record (adapt.py): its parent, per-organ decision, guard


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its best.pt)."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path


def load_members(paths: Sequence[str | Path]) -> list[Member]:
    """Checkpoints (or run folders) of one ensemble; refuses, in one line, members that disagree
    on classes or preprocessing, since their outputs could not be averaged voxel for voxel."""
    members = []
    for given in paths:
        path = checkpoint_path(given)
        state = load_checkpoint(path)
        config = dict(state.get("config", {}))
        config["class_names"] = list(state.get("class_names", config.get("class_names", [])))
        if "spacing" not in config:
            raise CheckpointError(f"{path}: holds no preprocessing spacing (written by an older version); retrain")
        members.append(Member(str(path), state["model_args"], state["model"], config, path.parent,
                              state.get("split"), str(state.get("modality") or "MR"), state.get("adaptation")))
    reference = members[0]
    for member in members[1:]:
        if member.config["class_names"] != reference.config["class_names"]:
            raise CheckpointError(f"{member.path}: class_names {member.config['class_names']} differ from "
                                  f"{reference.path}'s {reference.config['class_names']}; models of one ensemble "
                                  "must share classes and preprocessing")
        spacing, reference_spacing = np.asarray(member.config["spacing"]), np.asarray(reference.config["spacing"])
        if np.any(np.abs(spacing - reference_spacing) > SPACING_TOLERANCE * reference_spacing):
            raise CheckpointError(f"{member.path}: spacing {member.config['spacing']} mm differs from "
                                  f"{reference.path}'s {reference.config['spacing']} mm by more than "
                                  f"{SPACING_TOLERANCE:.0%}; models of one ensemble must share classes and preprocessing")
    return members


class Ensemble:
    """Averages the softmax of its members (and their TTA flips) on the preprocessed grid.

    Memory stays bounded however many members: one network lives on the device at a time and the
    outputs are a running sum. Members that share an architecture reuse one network object."""

    def __init__(self, members: Sequence[Member], device: torch.device, amp_dtype: torch.dtype | None):
        self.members, self.device, self.amp_dtype = list(members), device, amp_dtype
        self._networks: dict[str, torch.nn.Module] = {}

    def network(self, member: Member) -> torch.nn.Module:
        key = json.dumps(member.model_args, sort_keys=True)
        if key not in self._networks:
            try:
                self._networks[key] = ImprovedUNet3D(**member.model_args).eval()
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{member.path}: model arguments do not fit ImprovedUNet3D ({error})") from None
        network = self._networks[key]
        try:
            network.load_state_dict(member.weights)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{member.path}: weights do not fit ImprovedUNet3D ({first_line[:160]})") from None
        return network

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor, roi_size, overlap: float, tta: bool) -> torch.Tensor:
        total = None
        for member in self.members:
            probabilities = self.member_probabilities(member, image, roi_size, overlap, tta)
            total = probabilities if total is None else total + probabilities
        return total / len(self.members)

    def member_probabilities(self, member: Member, image: torch.Tensor, roi_size, overlap: float,
                             tta: bool) -> torch.Tensor:
        network = self.network(member).to(self.device)
        probabilities = predict_probabilities(network, image, roi_size, overlap, tta, self.amp_dtype).cpu()
        network.to("cpu")
        return probabilities


# ----------------------------------------------------------------------------- ONNX

ONNX_OPSET = 17
# The example input of tracing (TorchScript and ONNX): a multiple of 16 on every axis, so the
# network's padding branch is not recorded.
TRACE_SHAPE = (1, 1, 32, 32, 32)


@contextlib.contextmanager
def quiet_tracing():
    """The tracing exporters' expected chatter (deprecation notices, TracerWarnings about the
    shape checks and the padding branch, which is exact for multiples of 16) kept off the console."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        yield


def export_onnx(network: torch.nn.Module, path: Path, properties: dict[str, str] | None = None) -> None:
    """The TorchScript-based exporter (dynamo=False). Both of torch 2.13's exporters give this
    network dynamic batch and spatial axes, but torch.export's symbolic-shape tracing took 30-50 s
    for even a 40k-parameter network on a 2-core CPU against 3-4 s here, and it needs onnxscript;
    the outputs agree with PyTorch to ~1e-6 either way. Traced at a multiple of 16, the padding
    branch is left out, so the graph takes multiples of 16, which the metadata states. (With the
    dynamo exporter, sizes declared as 16 * Dim also need an example of at least 32 per axis: an
    example of 16 specialises the axis to 16.)"""
    import onnx
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with quiet_tracing(), torch.no_grad():
        torch.onnx.export(network, (torch.zeros(TRACE_SHAPE),), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["pred"], dynamic_axes={"image": axes, "pred": axes})
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    if properties:
        onnx.helper.set_model_props(model, properties)
        onnx.save(model, str(path))


class OnnxEnsemble(Ensemble):
    """An Ensemble whose windows run through ONNX Runtime on the CPU: each member exported once with
    export_onnx (the bundle's model.onnx), the rest (windows, blending, softmax, flips, the
    average) as for PyTorch. Always float32: ONNX Runtime's CPU kernels have no bf16 autocast."""

    def __init__(self, members: Sequence[Member], threads: int | None = None):
        super().__init__(members, torch.device("cpu"), None)
        try:
            import onnxruntime
        except ImportError:
            raise CheckpointError("--engine onnx needs onnxruntime (pip install -r requirements.txt)") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads or torch.get_num_threads(), 1
        # Idle threads sleep rather than spin between kernels, so ranks or tests sharing the cores
        # do not slow each other down.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.multiple = 2 ** ImprovedUNet3D.depth
        self.sessions = {}  # by id(member): members hold tensors, so == between them is no test
        # The sessions hold the graphs in memory: the exported files are gone when this returns,
        # and nothing is written beside the user's checkpoints.
        with tempfile.TemporaryDirectory(prefix="hipmri-onnx-") as folder:
            for number, member in enumerate(self.members):
                path = Path(folder) / f"member{number}.onnx"
                export_onnx(self.network(member), path)
                self.sessions[id(member)] = onnxruntime.InferenceSession(str(path), options,
                                                                         providers=["CPUExecutionProvider"])

    def member_probabilities(self, member: Member, image: torch.Tensor, roi_size, overlap: float,
                             tta: bool) -> torch.Tensor:
        session = self.sessions[id(member)]

        def predictor(window: torch.Tensor) -> torch.Tensor:
            # The graph takes multiples of 16 (see export_onnx): padded and cropped as the network
            # pads and crops any other size itself.
            window = window.as_tensor() if isinstance(window, MetaTensor) else torch.as_tensor(window)
            spatial = window.shape[2:]
            padding = [p for size in reversed(spatial) for p in (0, (-size) % self.multiple)]
            padded = torch.nn.functional.pad(window, padding) if any(padding) else window
            logits = session.run(None, {"image": padded.detach().float().cpu().contiguous().numpy()})[0]
            return torch.from_numpy(logits)[(..., *(slice(0, s) for s in spatial))]

        return sliding_window_probabilities(predictor, torch.as_tensor(image).cpu(), roi_size, overlap, tta)


# ----------------------------------------------------------------------------- back to the source grid

def load_source(path: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    source = nib.load(path)
    data = drop_trailing_singletons(np.asanyarray(source.dataobj))
    return data, source


def to_source_grid(probabilities: torch.Tensor, preprocessed_image: MetaTensor, slab: int = 16) -> torch.Tensor:
    """Class probabilities ``(C, X, Y, Z)`` on the preprocessed grid, resampled trilinearly to the
    source image's own voxel grid through the two affines: ``(C, *source shape)``.

    Each source voxel centre is mapped to the preprocessed grid (inverse preprocessed affine times
    the source affine), so reorientation, spacing and any field of view come back exactly; arg-max
    after interpolation never invents a class (as nnU-Net does). Written by hand because MONAI's
    Invertd would replay the forward resampling's mode ("area", i.e. nearest when enlarging) and
    give blocky borders. Where the mapping is a reorientation plus the field-of-view-keeping
    resize of preprocessing (every non-oblique case) it is one separable trilinear interpolation;
    otherwise a grid_sample over the mapped voxel centres, in slabs to bound memory.
    """
    probabilities = torch.as_tensor(probabilities).float()
    source_affine = np.asarray(preprocessed_image.meta["original_affine"], dtype=np.float64)
    source_shape = tuple(int(s) for s in preprocessed_image.meta["spatial_shape"][:3])
    target_affine = np.asarray(torch.as_tensor(preprocessed_image.affine), dtype=np.float64)
    source_to_target = np.linalg.inv(target_affine) @ source_affine
    separable = _separable_view(probabilities, source_to_target, source_shape)
    if separable is not None:
        return torch.nn.functional.interpolate(separable[None], size=source_shape, mode="trilinear",
                                               align_corners=False)[0]
    return _grid_sample(probabilities, source_to_target, source_shape, slab)


def _separable_view(probabilities: torch.Tensor, source_to_target: np.ndarray, source_shape) -> torch.Tensor | None:
    """The probabilities permuted and flipped into source axis order, when each source axis maps
    onto one target axis exactly as F.interpolate(align_corners=False) maps it (target position
    (i + 0.5) n_target / n_source - 0.5); None otherwise."""
    linear, offset = source_to_target[:3, :3], source_to_target[:3, 3]
    order, flips = [], []
    view = probabilities
    for source_axis in range(3):
        column = linear[:, source_axis]
        target_axis = int(np.argmax(np.abs(column)))
        if np.abs(np.delete(column, target_axis)).max() > 1e-6:
            return None
        order.append(target_axis)
        flips.append(column[target_axis] < 0)
    if sorted(order) != [0, 1, 2]:
        return None
    for source_axis, target_axis in enumerate(order):
        n_target, n_source = probabilities.shape[1 + target_axis], source_shape[source_axis]
        step, start = linear[target_axis, source_axis], offset[target_axis]
        if flips[source_axis]:
            step, start = -step, (n_target - 1) - start
        ratio = n_target / n_source
        if abs(step - ratio) > 1e-4 * ratio or abs(start - (0.5 * ratio - 0.5)) > 1e-3:
            return None
    view = view.permute(0, *[1 + t for t in order])
    flipped = [1 + axis for axis in range(3) if flips[axis]]
    return (view.flip(flipped) if flipped else view).contiguous()


def _grid_sample(probabilities: torch.Tensor, source_to_target: np.ndarray, source_shape, slab: int) -> torch.Tensor:
    target_shape = probabilities.shape[1:]
    # grid_sample's normalised coordinates (align_corners=True): -1 and 1 are the first and last voxel
    # centres; folded into the mapping so each slab costs one multiply-add per axis.
    scale = np.array([2.0 / max(n - 1, 1) for n in target_shape])
    mapping = torch.as_tensor(np.diag(np.append(scale, 1.0)) @ source_to_target, dtype=torch.float32)
    mapping[:3, 3] -= 1.0
    columns = mapping[:3, :3].T.flip(-1)  # grid_sample wants (z, y, x) = (W, H, D) order
    offset = mapping[:3, 3].flip(-1)
    yz = (torch.arange(source_shape[1], dtype=torch.float32)[:, None, None] * columns[1]
          + torch.arange(source_shape[2], dtype=torch.float32)[None, :, None] * columns[2] + offset)
    output = torch.empty((probabilities.shape[0], *source_shape), dtype=torch.float32)
    for start in range(0, source_shape[0], slab):
        x = torch.arange(start, min(start + slab, source_shape[0]), dtype=torch.float32)
        grid = (x[:, None, None, None] * columns[0] + yz[None])[None]
        output[:, start:start + len(x)] = torch.nn.functional.grid_sample(
            probabilities[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    return output


def labels_from_probabilities(probabilities: torch.Tensor) -> np.ndarray:
    """Arg-max over classes ``(C, ...) -> uint8 (...)``, first class on ties (as torch.argmax).
    A running comparison, one pass per class: several times faster than a strided argmax over
    the channel axis of a full-resolution volume."""
    probabilities = torch.as_tensor(probabilities)
    best = probabilities[0].clone()
    labels = torch.zeros(probabilities.shape[1:], dtype=torch.uint8)
    for c in range(1, probabilities.shape[0]):
        better = probabilities[c] > best
        labels[better] = c
        torch.maximum(best, probabilities[c], out=best)
    return labels.numpy()


def prediction_image(labels: np.ndarray, source: nib.Nifti1Image) -> nib.Nifti1Image:
    """uint8 labels with the source image's affine and orientation codes, so they open over it."""
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    image = nib.Nifti1Image(np.asarray(labels).astype(np.uint8), source.affine, header=header)
    image.set_qform(source.affine, code=int(source.header["qform_code"]) or 1)
    image.set_sform(source.affine, code=int(source.header["sform_code"]) or 1)
    return image


def write_prediction(labels: np.ndarray, source: nib.Nifti1Image, path: Path) -> None:
    with atomic_path(path) as temporary:
        nib.save(prediction_image(labels, source), temporary)


# ----------------------------------------------------------------------------- post-processing

def keep_largest_component(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep only the largest connected component (26-connectivity) of each class in ``classes``;
    the removed voxels become background, as in nnU-Net. The labelling is scipy.ndimage's
    (MONAI's KeepLargestConnectedComponent needs scikit-image on the CPU, one dependency more for
    the same labelling)."""
    result = np.array(labels, copy=True)
    for c in classes:
        mask = result == c
        largest, changed = largest_component_mask(mask)
        if changed:
            result[mask & ~largest] = 0
    return result


def largest_component_mask(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the largest 26-connected component of ``mask``, whether anything was removed)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask, False
    sizes = np.bincount(components.reshape(-1))[1:]
    return components == 1 + int(np.argmax(sizes)), True


def volume_figures(prediction: np.ndarray, target: np.ndarray | None, num_classes: int, spacing,
                   probabilities: torch.Tensor | None = None, hd95: bool = True) -> dict:
    """Per-class figures of one validation volume without and with each organ's largest-component
    step: Dice and HD95 (with ``target``) and the organ's review score (with ``probabilities``
    ``(C, X, Y, Z)``, the ones ``prediction`` is the arg-max of: ``expected_dice_deficit``, with
    the removed islands' probability taken from the organ as evaluate_volume does),
    ``dice``/``dice_lcc``, ``hd95``/``hd95_lcc``, ``uncertainty``/``uncertainty_lcc``; the
    per-volume figures a post-processing decision is made from. Foreground only: background
    entries are NaN. An organ in one piece has the same figures both ways, without recomputing."""
    nan = [float("nan")] * num_classes
    figures = {key: list(nan) for key in ("dice", "hd95", "uncertainty", "dice_lcc", "hd95_lcc", "uncertainty_lcc")}
    if target is not None:
        figures["dice"] = [float("nan")] + dice_per_class(prediction, target, num_classes).tolist()[1:]
        figures["hd95"] = (hd95_per_class(prediction, target, num_classes, spacing).tolist() if hd95 else list(nan))
    if probabilities is not None:
        figures["uncertainty"] = expected_dice_deficit(probabilities, prediction).tolist()
    for c in range(1, num_classes):
        mask = prediction == c
        largest, changed = largest_component_mask(mask)
        if not changed:
            for key in ("dice", "hd95", "uncertainty"):
                figures[f"{key}_lcc"][c] = figures[key][c]
            continue
        processed = np.where(mask & ~largest, 0, prediction).astype(prediction.dtype)
        if target is not None:
            actual = target == c
            figures["dice_lcc"][c] = float(dice_per_class(largest, actual, 2)[1])
            if hd95:
                figures["hd95_lcc"][c] = float(hd95_per_class(largest, actual, 2, spacing)[1])
        if probabilities is not None:
            figures["uncertainty_lcc"][c] = float(expected_dice_deficit(probabilities, processed,
                                                                        raw_labels=prediction)[c])
    return figures


def decide_postprocessing(volumes: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Per organ: keep "largest connected component only" unless, over the validation volumes,
    it lowers the organ's mean Dice (nnU-Net's determine_postprocessing likewise keeps a step that
    does not hurt). Every organ here is one connected structure, so a stray island is an error
    wherever it appears: validation volumes without islands leave the Dice unchanged, and the step
    is kept for the test volumes that have them; an organ truly in two parts loses Dice to the
    step and drops it. Removed voxels only become background, so no other organ can get worse.
    Returns the decision with the figures behind it."""
    decision = {"rule": "per organ, keep the largest connected component unless it lowers mean validation Dice",
                "n_volumes": len(volumes), "largest_component": [], "per_class": {}}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        dice_before = nan_mean([v["dice"][c] for v in volumes])
        dice_after = nan_mean([v["dice_lcc"][c] for v in volumes])
        hd_before = nan_mean([v["hd95"][c] for v in volumes])
        hd_after = nan_mean([v["hd95_lcc"][c] for v in volumes])
        keep = bool(volumes) and bool(dice_after >= dice_before - 1e-9)  # False when the organ never appears
        decision["per_class"][name] = {"dice": dice_before, "dice_largest_component": dice_after,
                                       "hd95": hd_before, "hd95_largest_component": hd_after, "keep": keep}
        if keep:
            decision["largest_component"].append(name)
    return decision


def pooled_validation_volumes(members: Sequence[Member], name: str) -> tuple[list[dict] | None, list[str]]:
    """The per-volume validation records that every member's run stored in ``name``, pooled (one
    model: its own validation patients; an ensemble of folds: all of theirs, as nnU-Net does), and
    the files read. None where a member's run has no such file."""
    volumes, files = [], []
    for member in members:
        path = member.run_dir / name
        if not path.is_file():
            return None, [str(path)]
        try:
            volumes += json.loads(path.read_text())["volumes"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: not a valid {name} of a training run ({error})") from None
        files.append(str(path))
    return volumes, files


def postprocessing_for(members: Sequence[Member], class_names: Sequence[str], skip: bool) -> dict:
    """The largest-component decision, made afresh from the pooled validation figures
    (postprocessing.json)."""
    if skip:
        return {"largest_component": [], "source": "skipped with --no-postprocessing"}
    volumes, files = pooled_validation_volumes(members, "postprocessing.json")
    if volumes is None:
        return {"largest_component": [], "source": f"none: {files[0]} does not exist"}
    decision = decide_postprocessing(volumes, class_names)
    decision["source"] = files
    return decision
