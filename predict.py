"""Inference and evaluation: sliding-window prediction, per-class 3D Dice and HD95, NIfTI outputs
and figures. Training's validation calls the same functions.

    python predict.py --checkpoint runs/demo/best.pt --data-root data/phantom --split test --out preds/demo
    python predict.py --checkpoint runs/demo/best.pt --input scans/ --out preds/new
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import compute_hausdorff_distance

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from dataset import (CLASS_NAMES, ORIENTATION, Case, DataError, cases_from_input, cases_in,
                     drop_trailing_singletons, find_cases, preprocessing,
                     unwrap_data_error)

log = logging.getLogger("hipmri")


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
    """Mixed precision: bf16 where the GPU supports it, else fp16 (with a GradScaler); on the CPU
    bf16 only where it has native bf16 instructions. None means full float32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int],
                          overlap: float = 0.5, tta: bool = False, amp_dtype: torch.dtype | None = None,
                          sw_batch_size: int = 2) -> torch.Tensor:
    """Softmax probabilities ``(B, C, D, H, W)`` for ``image (B, 1, D, H, W)`` by Gaussian-weighted
    sliding-window inference; ``tta`` averages with the left-right mirrored prediction (the only
    flip used in training, so the only one the network has learned to be invariant to)."""
    device = next(model.parameters()).device
    image = image.to(device)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model(window).float()

    def run(volume: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(volume, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size,
                                          predictor=predictor, overlap=overlap, mode="gaussian")
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)

    probabilities = run(image)
    if tta:
        probabilities = (probabilities + run(image.flip(2)).flip(2)) / 2
    return probabilities


# ----------------------------------------------------------------------------- metrics

def overlap_counts(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                   num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` true positives, false positives and false negatives per class; summed
    over volumes or batches they give a pooled Dice (training's per-epoch train Dice)."""
    prediction = torch.as_tensor(prediction).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long().to(prediction.device)
    counts = np.zeros((num_classes, 3), dtype=np.float64)
    for c in range(num_classes):
        predicted, actual = prediction == c, target == c
        counts[c] = [float((predicted & actual).sum()), float((predicted & ~actual).sum()),
                     float((~predicted & actual).sum())]
    return counts


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class from ``overlap_counts``; NaN where the class is absent from both."""
    true_positive, false_positive, false_negative = np.asarray(counts, dtype=np.float64).T
    denominator = 2 * true_positive + false_positive + false_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * true_positive / denominator, np.nan)


def dice_per_class(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                   num_classes: int) -> np.ndarray:
    """3D Dice of one volume for each class, from summed true/false positives and negatives.

    Written here (as in nnU-Net) because MONAI's DiceMetric gives either 1.0 or NaN for an empty
    ground truth whatever the prediction; here a class absent from both is NaN (left out of
    means, never counted as 1.0) and a class predicted where there is none scores 0.
    """
    return dice_from_counts(overlap_counts(prediction, target, num_classes))


def hd95_per_class(prediction: np.ndarray, target: np.ndarray, num_classes: int,
                   spacing: Sequence[float]) -> np.ndarray:
    """95th percentile Hausdorff distance in mm per class (MONAI); NaN where either mask is empty."""
    prediction = torch.as_tensor(np.asarray(prediction)).long()
    target = torch.as_tensor(np.asarray(target)).long()
    result = np.full(num_classes, np.nan)
    for c in range(num_classes):
        predicted, actual = prediction == c, target == c
        if not predicted.any() or not actual.any():
            continue
        distance = compute_hausdorff_distance(predicted[None, None], actual[None, None], include_background=True,
                                              percentile=95, spacing=[float(s) for s in spacing])
        result[c] = float(distance.reshape(-1)[0])
    return result


def nan_mean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


# ----------------------------------------------------------------------------- one case

def load_source(path: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    source = nib.load(path)
    data = np.asanyarray(source.dataobj)
    data = drop_trailing_singletons(data)
    return data, source


def to_source_grid(probabilities: torch.Tensor, preprocessed_image: MetaTensor) -> np.ndarray:
    """Labels on the source image's voxel grid from probabilities ``(C, X, Y, Z)`` on the
    preprocessed grid: probabilities are resampled linearly to the source size (as nnU-Net does;
    arg-max after interpolation never invents a class), then the LPS reorientation is undone.

    Written by hand rather than with MONAI's Invertd because Invertd would upsample with the
    image's forward mode ("area", i.e. nearest when enlarging) and give blocky organ borders.
    """
    source_affine = np.asarray(preprocessed_image.meta["original_affine"], dtype=float)
    source_shape = tuple(int(s) for s in preprocessed_image.meta["spatial_shape"][:3])
    source_orientation = nib.orientations.io_orientation(source_affine)
    lps = nib.orientations.axcodes2ornt(ORIENTATION)
    to_lps = nib.orientations.ornt_transform(source_orientation, lps)
    lps_shape = nib.orientations.apply_orientation(np.empty(source_shape, dtype=bool), to_lps).shape  # a view
    upsampled = torch.nn.functional.interpolate(torch.as_tensor(probabilities)[None].float(), size=lps_shape,
                                                mode="trilinear", align_corners=False)[0]
    labels = upsampled.argmax(0).to(torch.uint8).cpu().numpy()
    back = nib.orientations.ornt_transform(lps, source_orientation)
    return np.ascontiguousarray(nib.orientations.apply_orientation(labels, back))


def write_prediction(labels: np.ndarray, source: nib.Nifti1Image, path: Path) -> None:
    """uint8 labels with the source image's affine and orientation codes, so they open over it."""
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    image = nib.Nifti1Image(labels.astype(np.uint8), source.affine, header=header)
    image.set_qform(source.affine, code=int(source.header["qform_code"]) or 1)
    image.set_sform(source.affine, code=int(source.header["sform_code"]) or 1)
    nib.save(image, path)


# ----------------------------------------------------------------------------- figures

def run_figures(*args, **kwargs):
    from figures import save_case_figures  # matplotlib only when figures are drawn
    return save_case_figures(*args, **kwargs)


# ----------------------------------------------------------------------------- CLI

def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Segment pelvic MRI with a trained 3D Improved UNet; "
                                     "with labels, report per-class 3D Dice and HD95.")
    parser.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by train.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="a HipMRI-layout folder; use with --split")
    source.add_argument("--input", help="one NIfTI image, or a folder of them (labels used when paired)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                        help="which patients of the checkpoint's own split to predict (with --data-root)")
    parser.add_argument("--out", required=True, help="folder for predictions, metrics and figures")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--tta", action="store_true", help="average with the left-right mirrored prediction")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slow metric)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def select_cases(args: argparse.Namespace, state: dict) -> list[Case]:
    if args.input:
        return cases_from_input(args.input)
    cases = find_cases(args.data_root)
    if args.split == "all":
        return cases
    split = state.get("split")
    if not split:
        raise CheckpointError(f"{args.checkpoint}: holds no data split; use --split all or --input")
    selected = cases_in(cases, split[args.split])
    if not selected:
        raise DataError(f"{args.data_root}: none of the {args.split} patients {split[args.split]} are there")
    return selected


def check_output_folder(out: Path, input_folders: Sequence[str | None], cases: Sequence[Case], overwrite: bool) -> None:
    """Never write into the data: refuse an --out inside an input folder or beside an input file,
    and refuse to replace earlier outputs unless --overwrite."""
    out_resolved = out.resolve()
    for folder in (Path(p).resolve() for p in input_folders if p and Path(p).is_dir()):
        if out_resolved == folder or folder in out_resolved.parents:
            raise DataError(f"{out}: refusing to write predictions inside the input folder {folder}")
    for path in [c.image for c in cases] + [c.label for c in cases if c.label]:
        if Path(path).resolve().parent == out_resolved:
            raise DataError(f"{out}: refusing to write predictions into the folder of input {path}")
    if overwrite or not out.exists():
        return
    planned = [out / f"{c.case_id}_pred.nii.gz" for c in cases] + [out / "metrics.csv", out / "summary.json"]
    existing = [p for p in planned if p.exists()]
    if existing:
        raise DataError(f"{existing[0]}: already exists ({len(existing)} output files would be replaced); "
                        "pass --overwrite or choose another --out")


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state, args.checkpoint).to(device).eval()
    config = state.get("config", {})
    class_names = list(state.get("class_names", CLASS_NAMES))
    num_classes = len(class_names)
    spatial_size = config["spatial_size"]
    roi_size = config.get("patch_size") or spatial_size
    amp_dtype = autocast_dtype(device, enabled=not config.get("no_amp", False))

    cases = select_cases(args, state)
    out = Path(args.out)
    check_output_folder(out, [args.data_root, args.input], cases, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict_config.json").write_text(json.dumps({**vars(args), "spatial_size": spatial_size,
                                                          "roi_size": roi_size}, indent=2) + "\n")
    transform = preprocessing(spatial_size, num_classes)
    print(f"Predicting {len(cases)} volume(s) with {args.checkpoint} on {device} "
          f"(size {tuple(spatial_size)}, window {tuple(roi_size)}, overlap {args.overlap}, tta {args.tta})")

    rows, dice_rows, hd95_rows = [], [], []
    for case in cases:
        item = transform(case.as_dict())
        probabilities = predict_probabilities(model, item["image"][None], roi_size, args.overlap, args.tta,
                                              amp_dtype)[0].cpu()
        labels = to_source_grid(probabilities, item["image"])
        image_data, source = load_source(case.image)
        write_prediction(labels, source, out / f"{case.case_id}_pred.nii.gz")
        target = None
        if case.label is not None:
            target = load_source(case.label)[0].astype(np.int64)
            spacing = source.header.get_zooms()[:3]
            voxel_ml = float(np.prod(spacing)) / 1000.0
            dice = dice_per_class(labels, target, num_classes)
            hd95 = (np.full(num_classes, np.nan) if args.no_hd95
                    else hd95_per_class(labels, target, num_classes, spacing))
            dice_rows.append(dice)
            hd95_rows.append(hd95)
            for c, name in enumerate(class_names):
                rows.append({"case": case.case_id, "class": name, "dice": dice[c], "hd95": hd95[c],
                             "gt_volume_ml": float((target == c).sum()) * voxel_ml,
                             "pred_volume_ml": float((labels == c).sum()) * voxel_ml})
            print(f"  {case.case_id}: " + "  ".join(f"{n} {d:.3f}" for n, d in zip(class_names[1:], dice[1:])))
        else:
            print(f"  {case.case_id}: written")
        if not args.no_figures:
            run_figures(image_data, target, labels, source.affine, class_names, out / "figures", case.case_id)

    summary = {}
    if dice_rows:
        summary = summarise(np.array(dice_rows), np.array(hd95_rows), class_names, args.checkpoint)
        write_metrics(rows, out / "metrics.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not args.no_figures:
            from figures import save_dice_boxplot
            save_dice_boxplot(np.array(dice_rows), class_names, out / "figures" / "dice_boxplot.png")
        print_table(summary, class_names)
    print(f"Outputs in {out}")
    return summary


def summarise(dice: np.ndarray, hd95: np.ndarray, class_names: Sequence[str], checkpoint: str) -> dict:
    def column_stat(values: np.ndarray, fn) -> dict:
        out = {}
        for c, name in enumerate(class_names):
            finite = values[:, c][np.isfinite(values[:, c])]
            out[name] = float(fn(finite)) if finite.size else None
        return out

    per_class = column_stat(dice, np.mean)
    foreground = [per_class[n] for n in class_names[1:] if per_class[n] is not None]
    return {
        "per_class_dice": per_class,
        "per_class_dice_std": column_stat(dice, np.std),
        "mean_foreground_dice": float(np.mean(foreground)) if foreground else None,
        "per_class_hd95": column_stat(hd95, np.mean),
        "n_cases": int(dice.shape[0]),
        "checkpoint": str(checkpoint),
    }


def write_metrics(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "class", "dice", "hd95", "gt_volume_ml", "pred_volume_ml"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def print_table(summary: dict, class_names: Sequence[str]) -> None:
    print(f"\nPer-class 3D Dice over {summary['n_cases']} volume(s) (mean ± std; HD95 mm)")
    for name in class_names:
        mean, std = summary["per_class_dice"][name], summary["per_class_dice_std"][name]
        hd = summary["per_class_hd95"][name]
        text = "n/a" if mean is None else f"{mean:.4f} ± {std:.4f}"
        print(f"  {name:<12} {text:<18} {'' if hd is None else f'{hd:.2f}'}")
    if summary["mean_foreground_dice"] is not None:
        print(f"  {'foreground':<12} {summary['mean_foreground_dice']:.4f}")


def run_cli(main_fn, args: argparse.Namespace) -> int:
    """Bad input ends in one line naming the file and the problem, exit code 2 (--debug: traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        main_fn(args)
    except (DataError, CheckpointError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        data_error = unwrap_data_error(error)
        if data_error is None or getattr(args, "debug", False):
            raise
        print(f"error: {data_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
