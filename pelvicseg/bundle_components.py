"""The bundle's own components: MONAI transforms around the project's functions (probabilities
back to the input's grid, arg-max, largest connected component, NIfTI out with the input's
header), the ensemble network and its sliding-window inferer, and the input listing.

Here they import the project's functions. export.py writes their source into the bundle's
scripts/hipmri.py after the source of every project function they need, so the bundle runs
without this repository while the repository keeps one copy of each function; the names in
``__all__`` are what configs/inference.json refers to.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference
from torch import nn

from dataset import LABEL_NAME, LoadValidated, ResampleToSpacingd, case_id_from_path
from pelvicseg.inference import keep_largest_component, labels_from_probabilities, to_source_grid, write_prediction
from modules import ImprovedUNet3D

__all__ = ["EnsembleSlidingWindowInferer", "ImprovedUNet3D", "KeepLargestComponentd", "LabelsFromProbabilitiesd",
           "LoadValidated", "ResampleToSpacingd", "SaveLabelsd", "SoftmaxEnsemble", "ToSourceGridd", "images_in"]


def images_in(folder: str) -> list[str]:
    """The .nii and .nii.gz images directly in ``folder``, sorted, without the files whose names
    look like labels (predict.py's rule); an error naming the folder when there are none (an
    empty run would otherwise finish without a word)."""
    found = {*glob.glob(os.path.join(folder, "*.nii")), *glob.glob(os.path.join(folder, "*.nii.gz"))}
    paths = sorted(p for p in found if os.path.isfile(p) and not LABEL_NAME.search(os.path.basename(p)))
    if not paths:
        raise FileNotFoundError(f"{folder}: no .nii or .nii.gz images (set --dataset_dir to a folder of NIfTI images)")
    return paths


def plain_cpu(tensor) -> torch.Tensor:
    tensor = tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)
    return tensor.detach().float().cpu()


class ToSourceGridd(mt.MapTransform):
    """Class probabilities ``(C, ...)`` on the preprocessed grid -> ``(C, *input shape)`` on the
    input's own voxel grid, through the two affines that ``reference_key``'s preprocessed image
    carries (the project's ``to_source_grid``)."""

    def __init__(self, keys, reference_key: str = "image"):
        super().__init__(keys)
        self.reference_key = reference_key

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        reference = item[self.reference_key]
        reference = reference.cpu() if isinstance(reference, torch.Tensor) else reference
        for key in self.key_iterator(item):
            item[key] = to_source_grid(plain_cpu(item[key]), reference)
        return item


class LabelsFromProbabilitiesd(mt.MapTransform):
    """Arg-max over classes, first class on ties -> uint8 labels (numpy)."""

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        for key in self.key_iterator(item):
            item[key] = labels_from_probabilities(item[key])
        return item


class KeepLargestComponentd(mt.MapTransform):
    """Only the largest 26-connected component of each class index in ``classes`` is kept, the
    rest becomes background (the project's post-processing, decided on validation patients)."""

    def __init__(self, keys, classes: Sequence[int] = ()):
        super().__init__(keys)
        self.classes = [int(c) for c in classes]

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        if self.classes:
            for key in self.key_iterator(item):
                item[key] = keep_largest_component(item[key], self.classes)
        return item


class SaveLabelsd(mt.MapTransform):
    """Labels as ``OUTPUT_DIR/<case>_pred.nii.gz`` (named as predict.py names them), uint8 with
    the input file's own affine, header and orientation codes, so they open over the input."""

    def __init__(self, keys, output_dir: str, reference_key: str = "image", postfix: str = "_pred"):
        super().__init__(keys)
        self.output_dir, self.reference_key, self.postfix = Path(output_dir), reference_key, postfix

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        source_path = str(item[self.reference_key].meta["filename_or_obj"])
        if Path(source_path).resolve().parent == self.output_dir.resolve():
            # As predict.py: never into the data, where the labels would also read as new images.
            raise ValueError(f"{self.output_dir}: refusing to write labels into the folder of the input {source_path}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for key in self.key_iterator(item):
            path = self.output_dir / f"{case_id_from_path(source_path)}{self.postfix}.nii.gz"
            write_prediction(item[key], nib.load(source_path), path)
            item[f"{key}_path"] = str(path)
        return item


class SoftmaxEnsemble(nn.Module):
    """Several ImprovedUNet3D (one per ``model_args``), whose forward is the mean of their
    softmax: ``(B, 1, X, Y, Z) -> (B, C, X, Y, Z)`` class probabilities."""

    def __init__(self, members: Sequence[dict]):
        super().__init__()
        self.members = nn.ModuleList(ImprovedUNet3D(**dict(args)) for args in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.softmax(self.members[0](x).float(), dim=1)
        for member in self.members[1:]:
            total = total + torch.softmax(member(x).float(), dim=1)
        return total / len(self.members)


class EnsembleSlidingWindowInferer(Inferer):
    """A SoftmaxEnsemble over a whole volume as predict.py runs one: each member's Gaussian
    sliding window blends that member's logits, then the softmax of each is averaged. (Blending
    the ensemble's per-window probabilities instead would differ where windows overlap.)"""

    def __init__(self, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 2, mode: str = "gaussian"):
        super().__init__()
        self.roi_size, self.overlap, self.sw_batch_size, self.mode = tuple(roi_size), overlap, sw_batch_size, mode

    def __call__(self, inputs: torch.Tensor, network: SoftmaxEnsemble, *args, **kwargs) -> torch.Tensor:
        total = None
        for member in network.members:
            logits = sliding_window_inference(inputs, self.roi_size, self.sw_batch_size, member, overlap=self.overlap,
                                              mode=self.mode)
            probabilities = torch.softmax(torch.as_tensor(logits).float(), dim=1)
            total = probabilities if total is None else total + probabilities
        return total / len(network.members)
