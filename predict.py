"""Segment pelvic MRI with one trained model or an ensemble, and with labels report per-class 3D
Dice and HD95. A thin CLI over inference.py and metrics.py.

    python predict.py --checkpoint runs/demo/best.pt --data-root data/phantom --split test --out preds/demo
    python predict.py --checkpoint runs/fold0 runs/fold1 runs/fold2 --input scans/ --out preds/new
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from checkpoint import CheckpointError
from cli import run_cli
from dataset import Case, DataError, cases_from_input, cases_in, find_cases, preprocessing
from inference import (Ensemble, apply_postprocessing, autocast_dtype, decide_postprocessing, labels_from_probabilities,
                       load_members, load_source, resolve_device, to_source_grid, write_prediction)
from metrics import dice_per_class, hd95_per_class, misses_per_class, print_table, summarise, write_rows


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Segment pelvic MRI with a trained 3D Improved UNet (or an "
                                     "ensemble); with labels, report per-class 3D Dice and HD95.")
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="best.pt/last.pt files or run folders written by train.py; several are an ensemble "
                        "(their probabilities are averaged)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="a HipMRI-layout folder; use with --split")
    source.add_argument("--input", help="one NIfTI image, or a folder of them (labels used when paired)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                        help="which patients of the (first) checkpoint's own split to predict (with --data-root)")
    parser.add_argument("--out", required=True, help="folder for predictions, metrics and figures")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--tta", action="store_true", help="average with the left-right mirrored prediction")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="skip the post-processing decided on the validation patients (postprocessing.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slow metric)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def select_cases(args: argparse.Namespace, split: dict | None, checkpoint: str) -> list[Case]:
    if args.input:
        return cases_from_input(args.input)
    cases = find_cases(args.data_root)
    if args.split == "all":
        return cases
    if not split:
        raise CheckpointError(f"{checkpoint}: holds no data split; use --split all or --input")
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


def postprocessing_for(members, class_names: Sequence[str], skip: bool) -> dict:
    """The largest-component decision, made afresh from the validation figures of every member's
    run (postprocessing.json): one model uses its own validation patients, an ensemble of folds
    the pooled validation patients of all its folds, as nnU-Net does."""
    if skip:
        return {"largest_component": [], "source": "skipped with --no-postprocessing"}
    volumes, files = [], []
    for member in members:
        path = member.run_dir / "postprocessing.json"
        if not path.is_file():
            return {"largest_component": [], "source": f"none: {path} does not exist"}
        try:
            volumes += json.loads(path.read_text())["volumes"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: not a valid post-processing file ({error})") from None
        files.append(str(path))
    decision = decide_postprocessing(volumes, class_names)
    decision["source"] = files
    return decision


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    members = load_members(args.checkpoint)
    config = members[0].config
    class_names = list(config["class_names"])
    num_classes = len(class_names)
    spacing, roi_size = config["spacing"], config.get("roi_size")
    amp_dtype = autocast_dtype(device, enabled=not config.get("no_amp", False))
    first_checkpoint = members[0].path
    cases = select_cases(args, members[0].split, first_checkpoint)
    out = Path(args.out)
    check_output_folder(out, [args.data_root, args.input], cases, args.overwrite)
    postprocessing = postprocessing_for(members, class_names, args.no_postprocessing)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict_config.json").write_text(json.dumps({**vars(args), "checkpoints": [m.path for m in members],
                                                          "spacing": spacing, "roi_size": roi_size,
                                                          "postprocessing": postprocessing}, indent=2) + "\n")
    transform = preprocessing(spacing, num_classes)
    ensemble = Ensemble(members, device, amp_dtype)
    kept = postprocessing.get("largest_component", [])
    print(f"Predicting {len(cases)} volume(s) with {len(members)} model(s) on {device} (spacing "
          f"{[round(s, 3) for s in spacing]} mm, window {roi_size}, overlap {args.overlap}, tta {args.tta}; "
          f"largest component kept for {', '.join(kept) or 'no class'})")

    rows, dice_rows, hd95_rows, miss_rows = [], [], [], []
    for case in cases:
        item = transform(case.as_dict())
        probabilities = ensemble.probabilities(item["image"][None], roi_size, args.overlap, args.tta)[0]
        source_probabilities = to_source_grid(probabilities, item["image"])
        labels = apply_postprocessing(labels_from_probabilities(source_probabilities), postprocessing, class_names)
        image_data, source = load_source(case.image)
        write_prediction(labels, source, out / f"{case.case_id}_pred.nii.gz")
        target = None
        if case.label is not None:
            target = load_source(case.label)[0].astype(np.int64)
            spacing_mm = source.header.get_zooms()[:3]
            voxel_ml = float(np.prod(spacing_mm)) / 1000.0
            dice = dice_per_class(labels, target, num_classes)
            hd95 = (np.full(num_classes, np.nan) if args.no_hd95
                    else hd95_per_class(labels, target, num_classes, spacing_mm))
            misses = misses_per_class(labels, target, num_classes)
            dice_rows.append(dice)
            hd95_rows.append(hd95)
            miss_rows.append(misses)
            for c, name in enumerate(class_names):
                rows.append({"case": case.case_id, "class": name, "dice": dice[c], "hd95": hd95[c],
                             "missed": int(misses[c]),
                             "gt_volume_ml": float((target == c).sum()) * voxel_ml,
                             "pred_volume_ml": float((labels == c).sum()) * voxel_ml,
                             "postprocessing": "largest_component" if name in kept else "none"})
            print(f"  {case.case_id}: " + "  ".join(f"{n} {d:.3f}" for n, d in zip(class_names[1:], dice[1:])))
        else:
            print(f"  {case.case_id}: written")
        if not args.no_figures:
            from figures import save_case_figures  # matplotlib only when figures are drawn
            save_case_figures(image_data, target, labels, source.affine, class_names, out / "figures", case.case_id)

    summary = {}
    if dice_rows:
        applied = {"largest_component": kept, "source": postprocessing.get("source")}
        summary = summarise(np.array(dice_rows), np.array(hd95_rows), np.array(miss_rows), class_names,
                            [m.path for m in members] if len(members) > 1 else first_checkpoint, applied)
        summary["tta"] = args.tta
        write_rows(rows, out / "metrics.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not args.no_figures:
            from figures import save_dice_boxplot
            save_dice_boxplot(np.array(dice_rows), class_names, out / "figures" / "dice_boxplot.png")
        print_table(summary, class_names)
    print(f"Outputs in {out}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
