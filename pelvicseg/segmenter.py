"""One trained model (or an ensemble) as a Python object: loaded once, then called on a NIfTI
file, a nibabel image or a numpy array with its 4x4 affine, as predict.py segments each case.

    from pelvicseg.segmenter import Segmenter
    segment = Segmenter.from_checkpoints(["runs/demo/best.pt"])        # several: an ensemble
    labels = segment("scan.nii.gz")                   # nibabel Nifti1Image, uint8, on the scan's grid
    labels, probabilities = segment(array, affine, probabilities=True)  # (C, X, Y, Z) on that grid

Its own module, not part of inference.py: it evaluates through evaluation.evaluate_volume, and
evaluation imports inference, so inside inference it would be an import cycle. predict.py and
notebooks import this module alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dataset import preprocessing, read_nifti_header
from pelvicseg.checkpoint import file_sha256
from pelvicseg.errors import CheckpointError, DataError
from pelvicseg.evaluation import evaluate_volume
from pelvicseg.guard import combine
from pelvicseg.inference import (PREDICTION_OVERLAP, Ensemble, Member, OnnxEnsemble, autocast_dtype, load_members,
                       postprocessing_for, prediction_image, resolve_device)

ENGINES = ("torch", "onnx")


def as_nifti(image, affine=None) -> nib.Nifti1Image | str:
    """A path as it is (preprocessing reads it), a nibabel image as it is, an array with its affine
    as the NIfTI image a file of it would be (both header forms the affine, code 1, as nibabel
    writes a scan)."""
    if isinstance(image, (str, Path)):
        if affine is not None:
            raise TypeError("affine is given with an array; a file brings its own")
        return str(image)
    if isinstance(image, nib.spatialimages.SpatialImage):
        if affine is not None:
            raise TypeError("affine is given with an array; a nibabel image brings its own")
        return image
    if affine is None:
        raise TypeError("an array needs its 4x4 voxel-to-mm affine (RAS, as nibabel's)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"in-memory image: the affine has shape {affine.shape}, not (4, 4)")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    nifti = nib.Nifti1Image(np.asarray(image), affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    return nifti


def guarding_parent(members: Sequence[Member]) -> tuple[Member | None, dict, dict | None]:
    """The parent that guards an adapted model, from its adaptation record: (parent, per-organ
    decision, guard thresholds); (None, {}, None) for a model that is not adapted or whose record
    predates the guard. The parent file must be the one adapted from (its SHA-256)."""
    records = [m.adaptation for m in members if m.adaptation and m.adaptation.get("guard") is not None]
    if not records:
        return None, {}, None
    if len(members) > 1:
        raise CheckpointError(f"{members[0].path}: an adapted model is predicted alone (its parent guards it), "
                              "not in an ensemble")
    record = records[0]
    path = Path(record["parent"])
    if not path.is_file():
        raise CheckpointError(f"{members[0].path}: its parent {path} is missing; an adapted model is predicted "
                              "with its parent, which guards each organ")
    if record.get("parent_sha256") and file_sha256(path) != record["parent_sha256"]:
        raise CheckpointError(f"{members[0].path}: its parent {path} has changed since the adaptation (SHA-256 "
                              "differs); an adapted model is predicted with the parent it was adapted from")
    parent = load_members([path])[0]
    if parent.config["class_names"] != members[0].config["class_names"]:
        raise CheckpointError(f"{path}: the parent's classes differ from the adapted model's")
    return parent, dict(record.get("organs") or {}), record["guard"]


class Segmenter:
    """The checkpoints' networks with their preprocessing, sliding window, ensemble average,
    post-processing and way back to the input's grid, as predict.py runs them.

    ``device``: auto, cpu, cuda or cuda:N (``engine="onnx"``: always the CPU). ``tta`` averages with
    the left-right mirrored prediction. ``postprocessing``: True applies the largest-component
    step decided on the members' validation patients (predict.py's decision), False none, or a
    decision dict. ``amp``: None autocasts as the checkpoint was trained (bf16/fp16 on CUDA, bf16
    on CPUs with native bf16, unless trained with --no-amp).

    An adapted model (adapt.py; its checkpoint records its parent) is guarded by its parent
    (``guard.combine``): each scan also runs the parent, whose organ replaces the adapted one where
    the adaptation decided so or where the two disagree grossly; ``evaluate`` then returns those
    ``fallbacks`` (to flag the case) and every organ's ``agreement``. ``guard=False`` turns it off;
    ``parent`` (with ``organs`` and ``thresholds``, see ``guard.combine``) gives the parent explicitly.
    """

    def __init__(self, members: Sequence[Member], device: str | torch.device = "auto", tta: bool = False,
                 overlap: float = PREDICTION_OVERLAP, postprocessing: bool | dict = True, engine: str = "torch",
                 amp: bool | None = None, guard: bool = True, parent: Member | None = None,
                 organs: dict | None = None, thresholds: dict | None = None):
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap {overlap}: must be in [0, 1)")
        self.members = list(members)
        config = self.members[0].config
        self.class_names = list(config["class_names"])
        self.spacing, self.roi_size = config["spacing"], config.get("roi_size")
        self.tta, self.overlap, self.engine = tta, overlap, engine
        self.device = torch.device("cpu") if engine == "onnx" else (
            resolve_device(device) if isinstance(device, str) else torch.device(device))
        self.postprocessing = (dict(postprocessing) if isinstance(postprocessing, dict)
                               else postprocessing_for(self.members, self.class_names, skip=not postprocessing))
        self.transform = preprocessing(self.spacing, len(self.class_names))
        if engine == "onnx":
            self.amp_dtype = None
            self.ensemble: Ensemble = OnnxEnsemble(self.members)
        else:
            self.amp_dtype = autocast_dtype(self.device, enabled=(not config.get("no_amp", False)) if amp is None
                                            else amp)
            self.ensemble = Ensemble(self.members, self.device, self.amp_dtype)
        self.parent, self.organs, self.thresholds = None, dict(organs or {}), thresholds
        if parent is None and guard:
            parent, self.organs, self.thresholds = guarding_parent(self.members)
        if parent is not None:
            if engine != "torch":
                raise CheckpointError(f"{self.members[0].path}: an adapted model is predicted with its parent "
                                      "guarding it, on the torch engine only (not onnx)")
            self.parent = Ensemble([parent], self.device, self.amp_dtype)

    @classmethod
    def from_checkpoints(cls, checkpoints: str | Path | Sequence[str | Path], **options) -> Segmenter:
        """best.pt/last.pt files or run folders (several: an ensemble); ``options`` as for the class."""
        paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        return cls(load_members(paths), **options)

    @property
    def adaptation(self) -> dict | None:
        """For an adapted model guarded by its parent: the parent and which organs are delivered
        from the adapted model ("adapted") or always from the parent ("parent"); else None."""
        if self.parent is None:
            return None
        return {"parent": self.parent.members[0].path,
                "organs": {name: self.organs.get(name, "adapted") for name in self.class_names[1:]},
                "guard": self.thresholds is not None}

    @property
    def largest_component(self) -> list[str]:
        return list(self.postprocessing.get("largest_component", []))

    def evaluate(self, image, affine=None, target: np.ndarray | None = None, hd95: bool = True,
                 probabilities: bool = False) -> dict:
        """``evaluation.evaluate_volume``'s record of one image (labels, entropy, volumes, and with
        ``target`` Dice, HD95 and misses), plus ``source``: the input as a nibabel image, the one
        geometry of everything returned. ``probabilities`` adds them on the input's grid."""
        return self.evaluate_prepared(*self.prepare(image, affine), target, hd95=hd95, probabilities=probabilities)

    def prepare(self, image, affine=None) -> tuple[dict, nib.Nifti1Image]:
        """The preprocessed image (``item["image"]``) and the input as a nibabel image: what
        ``evaluate_prepared`` needs, made once where several models evaluate one image."""
        given = as_nifti(image, affine)
        source = read_nifti_header(given) if isinstance(given, str) else given
        return self.transform({"image": given}), source

    def evaluate_prepared(self, item: dict, source: nib.Nifti1Image, target: np.ndarray | None = None,
                          hd95: bool = True, probabilities: bool = False,
                          parent_probabilities: torch.Tensor | None = None) -> dict:
        """``evaluate`` of an image ``prepare`` has preprocessed. ``parent_probabilities``: the
        guarding parent's on this image, where the caller has them already."""
        predicted = self.ensemble.probabilities(item["image"][None], self.roi_size, self.overlap, self.tta)[0]
        fallbacks, agreement = [], None
        if self.parent is not None:
            if parent_probabilities is None:
                parent_probabilities = self.parent_probabilities(item)
            predicted, fallbacks, agreement = combine(torch.as_tensor(predicted), torch.as_tensor(parent_probabilities),
                                                      self.class_names, self.organs, self.thresholds, self.spacing)
        result = evaluate_volume(predicted, item["image"], source, self.class_names, self.largest_component, target,
                                 hd95=hd95, keep_probabilities=probabilities)
        result["source"] = source
        result["fallbacks"], result["agreement"] = fallbacks, agreement
        return result

    def parent_probabilities(self, item: dict) -> torch.Tensor:
        """The guarding parent's class probabilities ``(C, X, Y, Z)`` of a prepared image."""
        return torch.as_tensor(self.parent.probabilities(item["image"][None], self.roi_size, self.overlap,
                                                         self.tta)[0])

    def __call__(self, image, affine=None, probabilities: bool = False):
        """Labels of ``image`` (a NIfTI path, a nibabel image, or an array with ``affine``) as a
        uint8 Nifti1Image on its own grid, with its affine and header; with ``probabilities``,
        also the class probabilities ``(C, X, Y, Z)`` float32 on that grid."""
        result = self.evaluate(image, affine, hd95=False, probabilities=probabilities)
        labels = prediction_image(result["labels"], result["source"])
        if probabilities:
            return labels, result["probabilities"].numpy()
        return labels
