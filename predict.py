"""Segment pelvic MRI with one trained model or an ensemble, and with labels report per-class 3D
Dice and HD95. A thin CLI over segmenter.py (the Python API: each case is one Segmenter call) and
metrics.py; under torchrun the cases are split over the processes and rank 0 writes the reports.

    python predict.py --checkpoint runs/demo/best.pt --data-root data/phantom --split test --out preds/demo
    python predict.py --checkpoint runs/fold0 runs/fold1 runs/fold2 --input scans/ --out preds/new
    torchrun --standalone --nproc_per_node=4 predict.py --checkpoint runs/demo --input scans/ --out preds/new
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pelvicseg.cli import run_cli
from dataset import Case, LoadValidated, cases_from_input, cases_in, drop_trailing_singletons, find_cases
from pelvicseg.atomic import write_json
from pelvicseg.distributed import gather_lists, setup_distributed
from pelvicseg.errors import CheckpointError, DataError, FolderLocked
from pelvicseg.lock import FolderLock
from pelvicseg.dicom.outputs import absent_classes, parse_roi_names, write_rtstruct, write_seg
from pelvicseg.dicom.pixels import series_to_nifti
from pelvicseg.dicom.series import SkippedSeries, check_output_requirements, is_dicom_folder, scan_series, select_series
from pelvicseg.inference import (PREDICTION_OVERLAP, load_members, load_source, pooled_validation_volumes,
                       write_prediction)
from pelvicseg.longitudinal import (LONGITUDINAL_CSV, VOLUME_CHANGE, patient_weeks, summary_line, volume_change_fraction,
                          write_longitudinal)
from pelvicseg.metrics import json_ready, nan_mean, print_table, summarise, write_rows
from pelvicseg.progress import progress
from pelvicseg.records import (case_status, made_with, read_record, record_path, result_from_record,
                               write_record)
from pelvicseg.report import write_report
from pelvicseg.guard import guard_flags
from pelvicseg.segmenter import ENGINES, Segmenter
from pelvicseg.uncertainty import (describe_held_out, fit_from_volumes, flag_case, rank_correlation, review_settings,
                         voxel_error_auroc, write_uncertainty)


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Segment pelvic MRI with a trained 3D Improved UNet (or an "
                                     "ensemble); with labels, report per-class 3D Dice and HD95.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="best.pt/last.pt files or run folders written by train.py; several are an ensemble "
                        "(their probabilities are averaged)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="a HipMRI-layout folder; use with --split")
    source.add_argument("--input", help="one NIfTI image, a folder of them (labels used when paired), or a DICOM "
                        "folder as the scanner or PACS writes it (one case per usable series, or per echo, b-value, "
                        "... where a series interleaves them; the other series are listed as skipped, with why)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                        help="which patients of the checkpoint's own split to predict (with --data-root); an "
                        "ensemble takes the test patients its models share and refuses train and val, which some "
                        "of its models trained or validated on")
    parser.add_argument("--out", required=True, help="folder for predictions, metrics and figures")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--tta", action="store_true", help="average with the left-right mirrored prediction")
    parser.add_argument("--engine", default="torch", choices=ENGINES,
                        help="what runs the sliding windows: torch (PyTorch on --device) or onnx (each model exported "
                        "to ONNX as export.py exports it, run by ONNX Runtime on the CPU in float32); everything "
                        "else is the same")
    parser.add_argument("--overlap", type=float, default=PREDICTION_OVERLAP,
                        help="sliding-window overlap in [0, 1); training's final validation uses the same, so the "
                        "review rule fitted there applies as it is")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="skip the post-processing decided on the validation patients (postprocessing.json)")
    parser.add_argument("--output-format", nargs="+", choices=OUTPUT_FORMATS, default=["nifti"],
                        help="nifti: <case>_pred.nii.gz (always written); rtstruct: <case>_rtstruct.dcm, an RT "
                        "Structure Set for planning systems; seg: <case>_seg.dcm, a DICOM Segmentation. rtstruct "
                        "and seg need a DICOM series as --input, since they refer to its images")
    parser.add_argument("--series", nargs="+", metavar="SERIES",
                        help="with a DICOM --input: predict only these series, each named by SeriesInstanceUID, "
                        "SeriesNumber or a SeriesDescription pattern (shell wildcards, any case, e.g. '*t2*')")
    parser.add_argument("--allow-modality", nargs="+", default=[], metavar="MODALITY",
                        help="with a DICOM --input: also predict series of these modalities (e.g. CT), which the "
                        "model (trained on its checkpoint's modality, MR) has never seen; the report says so")
    parser.add_argument("--roi-names", nargs="+", default=[], metavar="CLASS=NAME",
                        help="RTSTRUCT ROI and SEG segment names instead of the TG-263 ones (body=External, "
                        "bone=Bone, bladder=Bladder, rectum=Rectum, prostate=Prostate), e.g. bone=Bone_Pelvic")
    parser.add_argument("--patient-of", metavar="REGEX",
                        help="group the cases by patient for longitudinal.csv and the report: a regular expression "
                        "searched in each case id (the image name without .nii(.gz) and _LFOV) with a named group "
                        "(?P<patient>...) and optionally (?P<week>...), a whole number, e.g. "
                        "'(?P<patient>P\\d+)_scan(?P<week>\\d+)'; without a week group a patient's cases are "
                        "numbered 0, 1, ... in case-id order (numbers in the ids compared as numbers). A case it "
                        "does not match stops the run before anything is written. Default: HipMRI names "
                        "(Case_004_Week0, K004_Week0); other names are then left out of longitudinal.csv")
    parser.add_argument("--volume-change", type=volume_change_fraction, default=VOLUME_CHANGE, metavar="FRACTION",
                        help="flag, in longitudinal.csv and the report, a week whose predicted organ volume differs "
                        "from the patient's first (lowest) week's by more than this fraction of it (0.3: 30 %%). A "
                        "fraction of the first week: on HipMRI that is Week0, the scan before treatment that later "
                        "weeks are compared with, and the organs differ in size by a factor of hundreds (prostate "
                        "tens of ml, body litres), so one fraction fits them all where a change in ml would not")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files already in --out (with --continue: predict again the cases made with "
                        "other checkpoints or settings, instead of refusing them)")
    parser.add_argument("--continue", dest="continue_run", action="store_true",
                        help="finish a run in --out that was stopped (killed, out of disk): predict only the cases "
                        "not complete (a case is complete when its <case>_record.json names these checkpoints and "
                        "settings and all its files exist), then rebuild metrics, summary and report from all of them; "
                        "a case made with other checkpoints or settings is refused unless --overwrite")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures (the report then has none)")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slow metric)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


OUTPUT_FORMATS = ("nifti", "rtstruct", "seg")
DICOM_AS_NIFTI = "dicom_as_nifti"  # the DICOM series as NIfTI, the grid the NIfTI prediction lies on


def dicom_cases(args: argparse.Namespace, modality: str) -> tuple[list[Case], dict, list[SkippedSeries], list[str]]:
    """Cases for the usable DICOM series under --input (dicom_series.scan_series), each predicted
    from a NIfTI copy written to OUT/dicom_as_nifti/; {case id: series} for the DICOM outputs; the
    skipped series; warnings for series of a modality the model (trained on ``modality``) never
    saw. Before anything is written: --series applied, nothing usable refused, and every series
    checked for what the requested RTSTRUCT or SEG must refer to."""
    allowed = {modality.upper(), *(m.upper() for m in args.allow_modality)}
    scan = select_series(scan_series(args.input, allowed), args.series)
    if not scan.usable:
        raise scan.nothing_usable()
    check_output_requirements(scan.usable, [f for f in args.output_format if f != "nifti"])
    warnings = [f"{s.where()}: modality {s.modality}, allowed with --allow-modality; the model was trained on "
                f"{modality} only, so these labels are outside anything it was trained or validated on"
                for s in scan.usable if s.modality.upper() != modality.upper()]
    folder = Path(args.out) / DICOM_AS_NIFTI
    return ([Case(str(folder / f"{s.case_id}.nii.gz"), None, s.case_id, "", 0) for s in scan.usable],
            {s.case_id: s for s in scan.usable}, scan.skipped, warnings)


def convert_series(cases: Sequence[Case], series_by_case: dict) -> list[SkippedSeries]:
    """Each DICOM case's NIfTI copy; a series whose pixel data cannot be decoded is skipped with
    the decoder's reason, which names its file."""
    undecodable = []
    for case in cases:
        series = series_by_case.get(case.case_id)
        if series is None:
            continue
        try:
            series_to_nifti(series, case.image)
        except DataError as error:
            undecodable.append(SkippedSeries(series.folder, series.describe(), str(error), len(set(series.files))))
    return undecodable


def named_for_series(error: DataError, cases: Sequence[Case], series_by_case: dict) -> DataError:
    """A problem found in a DICOM case's NIfTI copy, told by the series' folder and name: the copy
    in OUT/dicom_as_nifti/ is an intermediate file the user never made."""
    text = str(error)
    for case in cases:
        series = series_by_case.get(case.case_id)
        if series is not None and case.image in text:
            return DataError(text.replace(case.image, series.where()))
    return error


def evaluation_split(members, split: str) -> dict | None:
    """The split this run evaluates. One model: its own. An ensemble can be evaluated only on
    patients none of its models trained or validated on: --split test takes the test patients
    the models share and refuses models whose test patients differ; --split val and train are
    refused (each model's validation patients picked its best epoch, and in folds they are the
    other models' training patients), not evaluated out of fold."""
    if len(members) == 1 or split == "all" or any(not m.split for m in members):
        return members[0].split
    if split != "test":
        raise DataError(f"--split {split} with {len(members)} models: each model trained or validated on some of "
                        f"these patients, so the ensemble's Dice on them would be optimistic; predict each model "
                        f"alone with --split {split}, or the ensemble with --split test")
    tests = [sorted(m.split.get("test", [])) for m in members]
    for member, test in zip(members[1:], tests[1:]):
        if test != tests[0]:
            raise DataError(f"--split test: the models' test patients differ ({members[0].path}: "
                            f"{', '.join(tests[0]) or 'none'}; {member.path}: {', '.join(test) or 'none'}); an "
                            "ensemble is evaluated only on patients none of its models trained or validated on")
    return {"test": tests[0]}


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
    and refuse to replace earlier outputs unless ``overwrite`` (--overwrite or --continue)."""
    out_resolved = out.resolve()
    owners: dict[str, Case] = {}
    for case in cases:  # file systems that ignore case would write both into one file
        first = owners.setdefault(case.case_id.lower(), case)
        if first is not case:
            raise DataError(f"{case.image}: its outputs ({out / case.case_id}_pred.nii.gz, ...) would overwrite those "
                            f"of {first.image}; rename one of them")
    for folder in (Path(p).resolve() for p in input_folders if p and Path(p).is_dir()):
        if out_resolved == folder or folder in out_resolved.parents:
            raise DataError(f"{out}: refusing to write predictions inside the input folder {folder}")
    for path in [c.image for c in cases] + [c.label for c in cases if c.label]:
        if Path(path).resolve().parent == out_resolved:
            raise DataError(f"{out}: refusing to write predictions into the folder of input {path}")
    if overwrite or not out.exists():
        return
    planned = ([out / f"{c.case_id}_{kind}.nii.gz" for c in cases for kind in ("pred", "uncertainty")]
               + [out / f"{c.case_id}_{kind}.dcm" for c in cases for kind in ("rtstruct", "seg")]
               + [record_path(out, c.case_id) for c in cases]
               + [out / name for name in ("metrics.csv", "summary.json", "report.html", LONGITUDINAL_CSV)])
    existing = [p for p in planned if p.exists()]
    if existing:
        raise DataError(f"{existing[0]}: already exists ({len(existing)} output files would be replaced); "
                        "pass --continue to finish a stopped run, --overwrite to predict everything again, or "
                        "choose another --out")


def review_rule_for(members, class_names: Sequence[str], settings: dict, segmenter: Segmenter) -> dict | None:
    """The uncertainty thresholds that flag a case for review, fitted on the members' pooled
    validation volumes (uncertainty.json) as this run computes its scores. Training fitted them
    under its own settings (post-processing, no TTA, the default overlap); where this run's
    differ, each member's validation volumes are evaluated again with this run's settings and the
    rule is refitted on those. None where a member's run has no uncertainty.json, or its
    validation data is not there to refit."""
    volumes, files = pooled_validation_volumes(members, "uncertainty.json")
    if volumes is None:
        return None
    stored = [json.loads(Path(path).read_text()).get("settings") for path in files]
    if any(fitted != settings for fitted in stored):
        fitted = next((f for f in stored if f != settings), None)
        print(f"Review rule: fitted in training with {describe_settings(fitted)}; this run uses "
              f"{describe_settings(settings)}, so it is refitted on the members' validation volumes with these.",
              flush=True)
        volumes = revalidate(members, class_names, settings, segmenter)
        if volumes is None:
            return None
    rule = fit_from_volumes(volumes, class_names)
    rule["source"] = files
    rule["settings"] = settings
    print(f"Review rule: {describe_held_out(rule['held_out'])}.", flush=True)
    return rule


def describe_settings(settings: dict | None) -> str:
    if not settings:
        return "unrecorded settings"
    return (f"score {settings.get('score', 'unrecorded (an older version)')}, tta {settings['tta']}, "
            f"overlap {settings['overlap']}, largest component kept for "
            f"{', '.join(settings['largest_component']) or 'no organ'}")


def revalidate(members, class_names: Sequence[str], settings: dict, segmenter: Segmenter) -> list[dict] | None:
    """Each member's own validation volumes evaluated by that member alone (it never trained on
    them) with ``settings``, through the same Segmenter call as the cases of this run (its device,
    precision and engine)."""
    records = []
    for member in members:
        validation = (member.split or {}).get("val") or []
        root = member.config.get("data_root")
        try:
            cases = cases_in(find_cases(root), validation) if root and validation else []
        except DataError:
            cases = []
        if not cases:
            print(f"Review rule: {member.path}'s validation data ({root}) is not there to refit on; no case is "
                  "flagged in this run.", flush=True)
            return None
        alone = Segmenter([member], segmenter.device, settings["tta"], settings["overlap"],
                          {"largest_component": settings["largest_component"]}, segmenter.engine,
                          amp=segmenter.amp_dtype is not None)
        for case in progress(cases, f"refitting the review rule on {Path(member.path).parent.name}'s validation"):
            result = alone.evaluate(case.image, target=load_source(case.label)[0], hd95=False)
            records.append({"case": case.case_id, "patient": case.patient, "uncertainty": result["uncertainty"],
                            "dice": result["dice"]})
    return records


def predict_case(case: Case, segmenter: Segmenter, args, rule: dict | None, out: Path) -> dict:
    """One case, one call of the Python API (so through ``evaluation.evaluate_volume``): prediction
    and uncertainty NIfTIs on the source grid, per-organ figures, flags."""
    target = load_source(case.label)[0].astype(np.int64) if case.label is not None else None
    evaluated = segmenter.evaluate(case.image, target=target, hd95=not args.no_hd95)
    class_names, kept, source = segmenter.class_names, segmenter.largest_component, evaluated["source"]
    labels, entropy = evaluated["labels"], evaluated["entropy"]
    prediction_path, uncertainty_path = out / f"{case.case_id}_pred.nii.gz", out / f"{case.case_id}_uncertainty.nii.gz"
    write_prediction(labels, source, prediction_path)
    write_uncertainty(entropy, source, uncertainty_path)
    scores = np.asarray(evaluated["uncertainty"], dtype=float)
    flags = (flag_case(scores, rule, class_names) if rule else []) + guard_flags(evaluated["fallbacks"])
    result = {"case": case, "flags": flags, "rows": [], "dice": None, "hd95": None, "misses": None, "labels": labels}
    if target is not None:
        result["dice"] = np.asarray(evaluated["dice"], dtype=float)
        result["hd95"] = np.asarray(evaluated["hd95"], dtype=float)
        result["misses"] = np.asarray(evaluated["misses"])
        result["scores"] = scores
        # how well the voxel uncertainty finds the wrong voxels inside the (true) body
        result["voxel_auroc"] = voxel_error_auroc(entropy, labels, target, body_mask=target > 0)
    for c, name in enumerate(class_names):
        row = {"case": case.case_id, "class": name}
        if target is not None:
            row.update({"dice": result["dice"][c], "hd95": result["hd95"][c], "missed": int(result["misses"][c]),
                        "gt_volume_ml": evaluated["gt_volume_ml"][c]})
        row.update({"pred_volume_ml": evaluated["pred_volume_ml"][c], "uncertainty": scores[c],
                    "flagged": int(any(f["organ"] == name for f in flags)),
                    "postprocessing": "largest_component" if name in kept else "none"})
        result["rows"].append(row)
    figures = []
    if not args.no_figures:
        from pelvicseg.figures import save_case_figures, save_uncertainty_figure  # matplotlib only when figures are drawn
        image_data = drop_trailing_singletons(np.asanyarray(source.dataobj))
        save_case_figures(image_data, target, labels, source.affine, class_names, out / "figures", case.case_id)
        save_uncertainty_figure(image_data, entropy, source.affine, out / "figures" / f"{case.case_id}_uncertainty.png",
                                prediction=labels, class_names=class_names, title=f"{case.case_id}: uncertainty",
                                scores=scores)
        figures = [f"figures/{case.case_id}_best_slices.png", f"figures/{case.case_id}_uncertainty.png",
                   f"figures/{case.case_id}_overview.png"]
    result["report"] = {"case_id": case.case_id, "prediction_path": prediction_path.name,
                        "uncertainty_path": uncertainty_path.name, "image_path": str(Path(case.image).resolve()),
                        "figures": figures, "flags": flags,
                        "metrics": {row["class"]: {k: row[k] for k in ("dice", "hd95", "gt_volume_ml",
                                                                         "pred_volume_ml", "uncertainty") if k in row}
                                    for row in result["rows"]}}
    text = "  ".join(f"{n} {d:.3f}" for n, d in zip(class_names[1:], result["dice"][1:])) if target is not None \
        else "written"
    flagged = "; ".join(f"{f['organ']} {f['reason']}" for f in flags)
    print(f"  {case.case_id}: {text}" + (f"  REVIEW: {flagged}" if flags else ""), flush=True)
    return result


def check_inputs(cases: Sequence[Case], num_classes: int) -> None:
    """Every image (and label) read and checked before anything is written, so a bad file among
    good ones stops the run with one line naming it and leaves no half-written output."""
    loader = LoadValidated(("image", "label"), num_classes)
    for case in progress(cases, "checking inputs"):
        loader(case.as_dict())


def write_dicom_outputs(labels: np.ndarray, series, formats: Sequence[str], class_names: Sequence[str], out: Path,
                        report_entry: dict, roi_names: dict | None = None) -> None:
    """RTSTRUCT and DICOM-SEG referring to the input series, in the figures' colours; the report
    entry names the series and the organs the RTSTRUCT leaves out for want of a voxel."""
    from pelvicseg.palette import class_colours
    colours = class_colours(len(class_names))
    report_entry["dicom_series"] = series.where()
    if "rtstruct" in formats:
        path = write_rtstruct(labels, series, class_names, out / f"{series.case_id}_rtstruct.dcm", colours=colours,
                              roi_names=roi_names)
        report_entry["rtstruct_path"] = path.name
        report_entry["rtstruct_absent"] = absent_classes(labels, class_names)
    if "seg" in formats:
        path = write_seg(labels, series, class_names, out / f"{series.case_id}_seg.dcm", colours=colours,
                         roi_names=roi_names)
        report_entry["seg_path"] = path.name


def evaluate_uncertainty(labelled: list[dict], class_names: Sequence[str], rule: dict | None = None) -> dict:
    """How well the uncertainty tracks errors on labelled cases: voxel AUROC (wrong vs right voxels
    inside the body), Spearman's rank correlation of organ scores with Dice (negative: more
    uncertain, lower Dice), and the flags' precision and recall against two meanings of a poor
    organ: Dice below that organ's median over these cases, and (with ``rule``, whose organs carry
    their validation ``dice_median``) Dice below its median on the validation volumes the rule was
    fitted on, which is the question a flag asks ("worse than on validation?")."""
    auroc = np.array([r["voxel_auroc"] for r in labelled], dtype=float)
    scores = np.array([r["scores"] for r in labelled], dtype=float)[:, 1:]
    dice = np.array([r["dice"] for r in labelled], dtype=float)[:, 1:]
    flagged = np.array([[any(f["organ"] == name for f in r["flags"]) for name in class_names[1:]] for r in labelled])
    medians = np.array([np.median(column[np.isfinite(column)]) if np.isfinite(column).any() else np.nan
                        for column in dice.T])
    below = dice < medians[None, :]
    evaluation = {
        "voxel_auroc_mean": nan_mean(auroc),
        "voxel_auroc_min": float(np.nanmin(auroc)) if np.isfinite(auroc).any() else None,
        "organ_score_dice_spearman": rank_correlation(scores, dice),
        "organ_score_dice_spearman_per_class": {name: rank_correlation(scores[:, c], dice[:, c])
                                                for c, name in enumerate(class_names[1:])},
        "flagged_organs": int(flagged.sum()), "flagged_organs_below_median_dice": int((flagged & below).sum()),
        "unflagged_organs": int((~flagged).sum()), "unflagged_organs_below_median_dice": int((~flagged & below).sum()),
        # flags against "Dice below the organ's median over these cases": how many flags point at
        # a poor organ (precision), how many poor organs are flagged (recall)
        **precision_recall(flagged, below, "")}
    organs = (rule or {}).get("organs", {})
    validation_medians = [(organs.get(name) or {}).get("dice_median") for name in class_names[1:]]
    if rule is not None and all(m is not None for m in validation_medians):
        below_validation = dice < np.array(validation_medians, dtype=float)[None, :]
        evaluation["organs_below_validation_median_dice"] = int(below_validation.sum())
        evaluation.update(precision_recall(flagged, below_validation, "_vs_validation"))
    return evaluation


def precision_recall(flagged: np.ndarray, poor: np.ndarray, suffix: str) -> dict:
    """``flag_precision``/``flag_recall`` (+ suffix): the share of flags on poor organs, and of poor organs
    flagged; None where there is no flag, or no poor organ."""
    hits = int((flagged & poor).sum())
    return {f"flag_precision{suffix}": hits / int(flagged.sum()) if flagged.any() else None,
            f"flag_recall{suffix}": hits / int(poor.sum()) if poor.any() else None}


@dataclass
class Run:
    """What the steps of one prediction run share."""
    out: Path
    members: list
    class_names: list
    cases: list  # every case of the run, in order: the reports cover them all
    todo: list  # the cases this command predicts: all, or under --continue those not complete
    made_with: dict  # checkpoints (sha256) and settings, as each case's record states them
    series_by_case: dict
    skipped: list
    warnings: list
    weeks: dict
    roi_names: dict


def main(args: argparse.Namespace) -> dict:
    # ONNX Runtime runs on the CPU, so its processes talk over gloo whatever --device says.
    ranks = setup_distributed(args.device if args.engine == "torch" else "cpu")
    lock = FolderLock(args.out)
    try:
        run = open_run(args, ranks, lock)
        segmenter, rule = prepare_prediction(args, ranks, run)
        records = predict_cases(args, ranks, run, segmenter, rule)
        summary = write_run_files(args, run, segmenter, rule, records) if ranks.is_main else {}
    finally:
        lock.release()
    ranks.close()
    return summary


def open_run(args: argparse.Namespace, ranks, lock: FolderLock) -> Run:
    """The checkpoints, the cases (NIfTI or DICOM), --out checked and locked, and the cases to
    predict; every input read and checked before anything is written."""
    members = load_members(args.checkpoint)
    class_names = list(members[0].config["class_names"])
    roi_names = parse_roi_names(args.roi_names, class_names)
    cases, series_by_case, skipped, warnings = input_cases(args, members)
    out = Path(args.out)
    weeks = claim_out_folder(args, ranks, lock, cases)
    wanted, todo_ids = ranks.from_main(lambda: plan_cases(args, ranks, members, cases, series_by_case))
    todo = [c for c in cases if c.case_id in todo_ids]
    undecodable = ranks.from_main(lambda: convert_series(todo, series_by_case)) if series_by_case else []
    if undecodable:
        gone = {s.series for s in undecodable}
        cases = [c for c in cases if series_by_case.get(c.case_id) is None
                 or series_by_case[c.case_id].describe() not in gone]
        todo = [c for c in todo if c in cases]
        skipped = sorted(skipped + undecodable, key=lambda s: (str(s.folder), s.series))
        if not cases:
            raise DataError(f"{args.input}: no usable image series ("
                            + "; ".join(f"{s.series}: {s.reason}" for s in skipped) + ")")
    if ranks.is_main:
        for line in [s.line() for s in skipped] + [f"warning: {w}" for w in warnings]:
            print(line, flush=True)
    error = None
    try:
        check_inputs(ranks.share(todo), len(class_names))
    except DataError as problem:
        error = named_for_series(problem, cases, series_by_case)
    ranks.raise_first(error)
    return Run(out, members, class_names, cases, todo, wanted, series_by_case, skipped, warnings, weeks, roi_names)


def claim_out_folder(args: argparse.Namespace, ranks, lock: FolderLock, cases: Sequence[Case]) -> dict:
    """--out checked (never in the data; earlier outputs replaced only with --overwrite or
    --continue) and locked by rank 0; returns the cases' patients and weeks (a --patient-of that
    misses a case stops the run here, before anything is written)."""
    out, inputs = Path(args.out), [args.data_root, args.input]
    check_output_folder(out, inputs, cases, overwrite=True)  # not into the data: checked before the lock is made
    existed = ranks.from_main(out.exists)  # decided once: rank 0 may make the folder while another rank looks
    if existed:  # a command still writing there is named before the outputs it is writing
        ranks.raise_first(take(lock) if ranks.is_main else None)
    check_output_folder(out, inputs, cases, args.overwrite or args.continue_run)
    weeks = patient_weeks(cases, args.patient_of)
    if not existed:
        ranks.raise_first(take(lock) if ranks.is_main else None)
    return weeks


def take(lock: FolderLock) -> FolderLocked | None:
    try:
        lock.acquire()
    except FolderLocked as error:
        return error
    return None


def input_cases(args: argparse.Namespace, members) -> tuple[list[Case], dict, list[SkippedSeries], list[str]]:
    """The cases: one per usable series of a DICOM --input, else the NIfTI images of --input or of
    the checkpoint's --split of --data-root."""
    if args.input and is_dicom_folder(args.input):
        return dicom_cases(args, members[0].modality)
    if set(args.output_format) - {"nifti"}:
        raise DataError(f"{args.input or args.data_root}: --output-format "
                        f"{' '.join(sorted(set(args.output_format) - {'nifti'}))} needs a DICOM series as --input "
                        "(an RTSTRUCT or SEG must refer to the images it was drawn on)")
    if args.series or args.allow_modality:
        raise DataError(f"{args.input or args.data_root}: --series and --allow-modality choose among DICOM "
                        "series, and this input is not a DICOM folder")
    return select_cases(args, evaluation_split(members, args.split), members[0].path), {}, [], []


def case_settings(args: argparse.Namespace, device) -> dict:
    """The settings that decide a case's outputs, by flag, as its record states them."""
    return {"--tta": args.tta, "--overlap": args.overlap, "--engine": args.engine,
            "--no-postprocessing": args.no_postprocessing, "--output-format": sorted(args.output_format),
            "--roi-names": sorted(args.roi_names), "--no-hd95": args.no_hd95, "--no-figures": args.no_figures,
            "--device": "cpu" if args.engine == "onnx" else device.type}


def input_of(case: Case, series_by_case: dict) -> dict:
    """Which input a case was predicted from, as its record states it."""
    series = series_by_case.get(case.case_id)
    if series is not None:
        return {"series": series.where()}
    return {"image": str(Path(case.image).resolve()), "label": str(Path(case.label).resolve()) if case.label else None}


def plan_cases(args, ranks, members, cases: Sequence[Case], series_by_case: dict) -> tuple[dict, list[str]]:
    """(what each case's record states, the ids of the cases to predict): every case, or under
    --continue those not complete. A complete case made otherwise is refused, naming the case and
    the setting, unless --overwrite (then it is predicted again)."""
    wanted = made_with([m.path for m in members], case_settings(args, ranks.device))
    if not args.continue_run:
        return wanted, [c.case_id for c in cases]
    todo = []
    for case in cases:
        status, why = case_status(Path(args.out), case.case_id, wanted, input_of(case, series_by_case))
        if status == "different" and not args.overwrite:
            raise DataError(f"{record_path(Path(args.out), case.case_id)}: {case.case_id} was predicted with {why}; "
                            "pass --overwrite to predict it again with this run's settings, or choose another --out")
        if status != "complete":
            todo.append(case.case_id)
    print(f"Continuing {args.out}: {len(cases) - len(todo)} of {len(cases)} case(s) complete, {len(todo)} to predict",
          flush=True)
    return wanted, todo


def prepare_prediction(args: argparse.Namespace, ranks, run: Run) -> tuple[Segmenter, dict | None]:
    """The Segmenter, the review rule (fitted on rank 0, shared), predict_config.json and the banner."""
    segmenter = Segmenter(run.members, ranks.device, args.tta, args.overlap, not args.no_postprocessing, args.engine)
    settings = review_settings(args.tta, args.overlap, segmenter.largest_component)
    rule = ranks.from_main(lambda: review_rule_for(run.members, run.class_names, settings, segmenter))
    if ranks.is_main:
        config = run.members[0].config
        write_json(run.out / "predict_config.json", json_ready({
            **vars(args), "checkpoints": [m.path for m in run.members], "spacing": config["spacing"],
            "roi_size": config.get("roi_size"), "postprocessing": segmenter.postprocessing, "review_rule": rule,
            "processes": ranks.world_size}))
        engine = "ONNX Runtime (CPU, float32)" if args.engine == "onnx" else "PyTorch"
        print(f"Predicting {len(run.todo)} volume(s) with {len(run.members)} model(s) on {segmenter.device} x "
              f"{ranks.world_size} process(es), {engine} (spacing {[round(s, 3) for s in config['spacing']]} mm, "
              f"window {config.get('roi_size')}, overlap {args.overlap}, tta {args.tta}; largest component kept for "
              f"{', '.join(segmenter.largest_component) or 'no class'})", flush=True)
    ranks.barrier()  # figures/ and the DICOM outputs go into the folder rank 0 made
    return segmenter, rule


def predict_cases(args: argparse.Namespace, ranks, run: Run, segmenter: Segmenter, rule: dict | None) -> dict:
    """Each rank its share of the cases to predict: the case's files, then its record (last, so a
    case with a record is whole). Returns every rank's new records by case id, gathered over the
    process group (the ranks' --out need not be one shared folder)."""
    mine, records = ranks.share(run.todo), {}
    for case in progress(mine, "predicting") if not sys.stderr.isatty() else mine:
        # The old record goes first: a case killed half-way through being predicted again must not
        # pass for complete on the strength of the record of its earlier outputs.
        record_path(run.out, case.case_id).unlink(missing_ok=True)
        try:
            result = predict_case(case, segmenter, args, rule, run.out)
        except DataError as problem:
            raise named_for_series(problem, run.cases, run.series_by_case) from None
        labels = result.pop("labels")
        if case.case_id in run.series_by_case:
            write_dicom_outputs(labels, run.series_by_case[case.case_id], args.output_format, run.class_names,
                                run.out, result["report"], run.roi_names)
        report = result["report"]
        outputs = [report["prediction_path"], report["uncertainty_path"], *report["figures"],
                   *[report[key] for key in ("rtstruct_path", "seg_path") if key in report]]
        records[case.case_id] = write_record(run.out, case.case_id, run.made_with, input_of(case, run.series_by_case),
                                             outputs, result)
    return {case_id: record for part in gather_lists([records], ranks) for case_id, record in part.items()}


def write_run_files(args: argparse.Namespace, run: Run, segmenter: Segmenter, rule: dict | None,
                    records: dict) -> dict:
    """metrics.csv, summary.json, longitudinal.csv, the run's figures and report.html, from the
    cases' records alone (this run's, and for the cases an earlier run completed, theirs on disk),
    so a continued run writes what an uninterrupted one does; then the tables on the console."""
    out, class_names, members = run.out, run.class_names, run.members
    results = [result_from_record(records.get(case.case_id) or read_record(record_path(out, case.case_id)), case)
               for case in run.cases]
    write_rows([row for r in results for row in r["rows"]], out / "metrics.csv")
    labelled = [r for r in results if r["dice"] is not None]
    checkpoint = [m.path for m in members] if len(members) > 1 else members[0].path
    applied = {"largest_component": segmenter.largest_component, "source": segmenter.postprocessing.get("source")}
    if labelled:
        summary = summarise(np.array([r["dice"] for r in labelled]), np.array([r["hd95"] for r in labelled]),
                            np.array([r["misses"] for r in labelled]), class_names, checkpoint, applied)
        summary["uncertainty_evaluation"] = evaluate_uncertainty(labelled, class_names, rule)
    else:
        summary = {"n_cases": 0, "checkpoint": checkpoint, "postprocessing": applied}
    summary["n_predicted"] = len(results)
    summary["tta"] = args.tta
    summary["review_rule"] = ("none: a member's run has no uncertainty.json" if rule is None
                              else {"rule": rule["rule"], "score": rule["score"], "source": rule["source"],
                                    "settings": rule["settings"], "held_out": rule["held_out"]})
    summary["flagged"] = [{"case": r["case"].case_id, "organ": f["organ"], "score": f["score"],
                           "threshold": f["threshold"], "reason": f["reason"]} for r in results for f in r["flags"]]
    if run.series_by_case:
        summary["skipped_series"] = [s.as_dict() for s in run.skipped]
        summary["warnings"] = run.warnings
        summary["left_out_of_rtstruct"] = {r["report"]["case_id"]: r["report"]["rtstruct_absent"] for r in results
                                           if r["report"].get("rtstruct_absent")}
    longitudinal = write_longitudinal(out, results, class_names, run.weeks, args.volume_change, not args.no_figures)
    summary["longitudinal"] = longitudinal["summary"]
    write_json(out / "summary.json", json_ready(summary))
    run_figures = []
    if labelled and not args.no_figures:
        from pelvicseg.figures import save_dice_boxplot
        save_dice_boxplot(np.array([r["dice"] for r in labelled]), class_names, out / "figures" / "dice_boxplot.png")
        run_figures = ["figures/dice_boxplot.png"]
    write_report(out, [r["report"] for r in results], summary if labelled else None, class_names,
                 title=f"Prediction report: {len(results)} volume(s), {len(members)} model(s)", run_figures=run_figures,
                 skipped=[s.as_dict() for s in run.skipped], warnings=run.warnings, longitudinal=longitudinal,
                 review_rule=summary["review_rule"] if isinstance(summary["review_rule"], dict) else None,
                 adaptation=segmenter.adaptation)
    print_outcome(out, summary, results, longitudinal, class_names, bool(labelled))
    return summary


def print_outcome(out: Path, summary: dict, results: list, longitudinal: dict, class_names, labelled: bool) -> None:
    if labelled:
        print_table(summary, class_names)
    flagged_cases = sorted({f["case"] for f in summary["flagged"]})
    print(f"Flagged for review: {len(flagged_cases)} of {len(results)} case(s)"
          + (f" ({', '.join(flagged_cases)})" if flagged_cases else ""))
    if summary_line(longitudinal["summary"]):
        print(summary_line(longitudinal["summary"]))
    print(f"Outputs in {out} (open {out / 'report.html'})")


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
