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
from pelvicseg.errors import DataError
from pelvicseg.evaluation import evaluate_volume
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


class Segmenter:
    """The checkpoints' networks with their preprocessing, sliding window, ensemble average,
    post-processing and way back to the input's grid, as predict.py runs them.

    ``device``: auto, cpu, cuda or cuda:N (``engine="onnx"``: always the CPU). ``tta`` averages with
    the left-right mirrored prediction. ``postprocessing``: True applies the largest-component
    step decided on the members' validation patients (predict.py's decision), False none, or a
    decision dict. ``amp``: None autocasts as the checkpoint was trained (bf16/fp16 on CUDA, bf16
    on CPUs with native bf16, unless trained with --no-amp).
    """

    def __init__(self, members: Sequence[Member], device: str | torch.device = "auto", tta: bool = False,
                 overlap: float = PREDICTION_OVERLAP, postprocessing: bool | dict = True, engine: str = "torch",
                 amp: bool | None = None):
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

    @classmethod
    def from_checkpoints(cls, checkpoints: str | Path | Sequence[str | Path], **options) -> Segmenter:
        """best.pt/last.pt files or run folders (several: an ensemble); ``options`` as for the class."""
        paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        return cls(load_members(paths), **options)

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
                          hd95: bool = True, probabilities: bool = False) -> dict:
        """``evaluate`` of an image ``prepare`` has preprocessed."""
        predicted = self.ensemble.probabilities(item["image"][None], self.roi_size, self.overlap, self.tta)[0]
        result = evaluate_volume(predicted, item["image"], source, self.class_names, self.largest_component, target,
                                 hd95=hd95, keep_probabilities=probabilities)
        result["source"] = source
        return result

    def __call__(self, image, affine=None, probabilities: bool = False):
        """Labels of ``image`` (a NIfTI path, a nibabel image, or an array with ``affine``) as a
        uint8 Nifti1Image on its own grid, with its affine and header; with ``probabilities``,
        also the class probabilities ``(C, X, Y, Z)`` float32 on that grid."""
        result = self.evaluate(image, affine, hd95=False, probabilities=probabilities)
        labels = prediction_image(result["labels"], result["source"])
        if probabilities:
            return labels, result["probabilities"].numpy()
        return labels
