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
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pelvicseg.checkpoint import CheckpointError
from pelvicseg.cli import run_cli
from dataset import Case, DataError, LoadValidated, cases_from_input, cases_in, drop_trailing_singletons, find_cases
from pelvicseg.dicom.outputs import absent_classes, parse_roi_names, write_rtstruct, write_seg
from pelvicseg.dicom.pixels import series_to_nifti
from pelvicseg.dicom.series import SkippedSeries, check_output_requirements, is_dicom_folder, scan_series, select_series
from pelvicseg.inference import (PREDICTION_OVERLAP, load_members, load_source, pooled_validation_volumes, resolve_device,
                       write_prediction)
from pelvicseg.longitudinal import (LONGITUDINAL_CSV, VOLUME_CHANGE, patient_weeks, summary_line, volume_change_fraction,
                          write_longitudinal)
from pelvicseg.metrics import json_ready, nan_mean, print_table, summarise, write_rows
from pelvicseg.progress import progress
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
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out")
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
    and refuse to replace earlier outputs unless --overwrite."""
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
               + [out / name for name in ("metrics.csv", "summary.json", "report.html", LONGITUDINAL_CSV)])
    existing = [p for p in planned if p.exists()]
    if existing:
        raise DataError(f"{existing[0]}: already exists ({len(existing)} output files would be replaced); "
                        "pass --overwrite or choose another --out")


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
    from pelvicseg.figures import class_colours
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
class Ranks:
    """The processes of one prediction run: under torchrun the cases are split over them (rank r
    predicts cases r, r + N, ...) and rank 0 gathers the results in case order and writes the
    run's files; alone, one process does everything. NCCL with one GPU per process (cuda:LOCAL_RANK)
    where it predicts on CUDA, gloo otherwise, as train.py sets up its processes."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @classmethod
    def start(cls, device_name: str) -> Ranks:
        device = resolve_device(device_name)
        if "WORLD_SIZE" not in os.environ:
            return cls(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(device, dist.get_rank(), dist.get_world_size(), True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, cases: Sequence) -> list:
        return list(cases[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def from_main(self, compute: Callable[[], object]):
        """``compute()`` on rank 0 alone (it may print or refit), its result on every rank."""
        value = [compute() if self.is_main else None]
        if self.distributed:
            dist.broadcast_object_list(value, src=0)
        return value[0]

    def raise_first(self, error: DataError | None) -> None:
        """The error on every rank when any rank met one, so all stop before anything is written."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        errors = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else str(error))
        first = next((e for e in errors if e), None)
        if first:
            raise DataError(first)

    def gather(self, results: list) -> list | None:
        """Every rank's results on rank 0 in the order of the cases (None on the others)."""
        if not self.distributed:
            return results
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(results, parts, dst=0)
        if not self.is_main:
            return None
        total = sum(len(part) for part in parts)
        return [parts[i % self.world_size][i // self.world_size] for i in range(total)]

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


def main(args: argparse.Namespace) -> dict:
    # ONNX Runtime runs on the CPU, so its processes talk over gloo whatever --device says.
    ranks = Ranks.start(args.device if args.engine == "torch" else "cpu")
    members = load_members(args.checkpoint)
    config = members[0].config
    class_names = list(config["class_names"])
    spacing, roi_size = config["spacing"], config.get("roi_size")
    first_checkpoint = members[0].path
    out = Path(args.out)
    series_by_case, skipped, warnings = {}, [], []
    roi_names = parse_roi_names(args.roi_names, class_names)
    if args.input and is_dicom_folder(args.input):
        cases, series_by_case, skipped, warnings = dicom_cases(args, members[0].modality)
    else:
        if set(args.output_format) - {"nifti"}:
            raise DataError(f"{args.input or args.data_root}: --output-format "
                            f"{' '.join(sorted(set(args.output_format) - {'nifti'}))} needs a DICOM series as --input "
                            "(an RTSTRUCT or SEG must refer to the images it was drawn on)")
        if args.series or args.allow_modality:
            raise DataError(f"{args.input or args.data_root}: --series and --allow-modality choose among DICOM "
                            "series, and this input is not a DICOM folder")
        cases = select_cases(args, evaluation_split(members, args.split), first_checkpoint)
    check_output_folder(out, [args.data_root, args.input], cases, args.overwrite)
    weeks = patient_weeks(cases, args.patient_of)  # a --patient-of that misses a case stops here, before any write
    ranks.barrier()  # every rank has looked at --out before rank 0 writes into it
    undecodable = ranks.from_main(lambda: convert_series(cases, series_by_case)) if series_by_case else []
    if undecodable:
        gone = {s.series for s in undecodable}
        cases = [c for c in cases if series_by_case.get(c.case_id) is None
                 or series_by_case[c.case_id].describe() not in gone]
        skipped = sorted(skipped + undecodable, key=lambda s: (str(s.folder), s.series))
        if not cases:
            raise DataError(f"{args.input}: no usable image series ("
                            + "; ".join(f"{s.series}: {s.reason}" for s in skipped) + ")")
    if ranks.is_main:
        for line in [s.line() for s in skipped] + [f"warning: {w}" for w in warnings]:
            print(line, flush=True)
    ranks.barrier()
    error = None
    try:
        check_inputs(ranks.share(cases), len(class_names))
    except DataError as problem:
        error = named_for_series(problem, cases, series_by_case)
    ranks.raise_first(error)
    segmenter = Segmenter(members, ranks.device, args.tta, args.overlap, not args.no_postprocessing, args.engine)
    postprocessing, kept = segmenter.postprocessing, segmenter.largest_component
    settings = review_settings(args.tta, args.overlap, kept)
    rule = ranks.from_main(lambda: review_rule_for(members, class_names, settings, segmenter))
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "predict_config.json").write_text(json.dumps(json_ready({
            **vars(args), "checkpoints": [m.path for m in members], "spacing": spacing, "roi_size": roi_size,
            "postprocessing": postprocessing, "review_rule": rule, "processes": ranks.world_size}), indent=2) + "\n")
        engine = "ONNX Runtime (CPU, float32)" if args.engine == "onnx" else "PyTorch"
        print(f"Predicting {len(cases)} volume(s) with {len(members)} model(s) on {segmenter.device} x "
              f"{ranks.world_size} process(es), {engine} (spacing {[round(s, 3) for s in spacing]} mm, window "
              f"{roi_size}, overlap {args.overlap}, tta {args.tta}; largest component kept for "
              f"{', '.join(kept) or 'no class'})", flush=True)
    ranks.barrier()  # figures/ and the DICOM outputs go into the folder rank 0 made

    results = []
    mine = ranks.share(cases)
    for case in progress(mine, "predicting") if not sys.stderr.isatty() else mine:
        try:
            results.append(predict_case(case, segmenter, args, rule, out))
        except DataError as problem:
            raise named_for_series(problem, cases, series_by_case) from None
        labels = results[-1].pop("labels")  # written already; not carried to rank 0 or kept for all cases
        if case.case_id in series_by_case:
            write_dicom_outputs(labels, series_by_case[case.case_id], args.output_format, class_names, out,
                                results[-1]["report"], roi_names)
    results = ranks.gather(results)
    if not ranks.is_main:
        ranks.close()
        return {}
    write_rows([row for r in results for row in r["rows"]], out / "metrics.csv")
    labelled = [r for r in results if r["dice"] is not None]
    checkpoint = [m.path for m in members] if len(members) > 1 else first_checkpoint
    applied = {"largest_component": kept, "source": postprocessing.get("source")}
    if labelled:
        summary = summarise(np.array([r["dice"] for r in labelled]), np.array([r["hd95"] for r in labelled]),
                            np.array([r["misses"] for r in labelled]), class_names, checkpoint, applied)
    else:
        summary = {"n_cases": 0, "checkpoint": checkpoint, "postprocessing": applied}
    if labelled:
        summary["uncertainty_evaluation"] = evaluate_uncertainty(labelled, class_names, rule)
    summary["n_predicted"] = len(results)
    summary["tta"] = args.tta
    summary["review_rule"] = ("none: a member's run has no uncertainty.json" if rule is None
                              else {"rule": rule["rule"], "score": rule["score"], "source": rule["source"],
                                    "settings": rule["settings"], "held_out": rule["held_out"]})
    summary["flagged"] = [{"case": r["case"].case_id, "organ": f["organ"], "score": f["score"],
                           "threshold": f["threshold"], "reason": f["reason"]} for r in results for f in r["flags"]]
    if series_by_case:
        summary["skipped_series"] = [s.as_dict() for s in skipped]
        summary["warnings"] = warnings
        summary["left_out_of_rtstruct"] = {r["report"]["case_id"]: r["report"]["rtstruct_absent"] for r in results
                                           if r["report"].get("rtstruct_absent")}
    longitudinal = write_longitudinal(out, results, class_names, weeks, args.volume_change, not args.no_figures)
    summary["longitudinal"] = longitudinal["summary"]
    (out / "summary.json").write_text(json.dumps(json_ready(summary), indent=2) + "\n")
    run_figures = []
    if labelled and not args.no_figures:
        from pelvicseg.figures import save_dice_boxplot
        save_dice_boxplot(np.array([r["dice"] for r in labelled]), class_names, out / "figures" / "dice_boxplot.png")
        run_figures = ["figures/dice_boxplot.png"]
    write_report(out, [r["report"] for r in results], summary if labelled else None, class_names,
                 title=f"Prediction report: {len(results)} volume(s), {len(members)} model(s)", run_figures=run_figures,
                 skipped=[s.as_dict() for s in skipped], warnings=warnings, longitudinal=longitudinal,
                 review_rule=summary["review_rule"] if isinstance(summary["review_rule"], dict) else None,
                 adaptation=segmenter.adaptation)
    if labelled:
        print_table(summary, class_names)
    flagged_cases = sorted({f["case"] for f in summary["flagged"]})
    print(f"Flagged for review: {len(flagged_cases)} of {len(results)} case(s)"
          + (f" ({', '.join(flagged_cases)})" if flagged_cases else ""))
    if summary_line(longitudinal["summary"]):
        print(summary_line(longitudinal["summary"]))
    print(f"Outputs in {out} (open {out / 'report.html'})")
    ranks.close()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
