"""Adapt a trained model to one patient from the patient's reference scans and their approved
contours (MR-guided adaptive radiotherapy: the planning scan, week 0), for that patient's later scans.

    # once per parent run: choose steps, learning rate and augmentation on its validation patients
    python adapt.py --choose-on-validation runs/demo                     # -> runs/demo/adaptation.json
    # one patient (HipMRI layout; several --reference-weeks: cumulative adaptation)
    python adapt.py --checkpoint runs/demo --patient 010 --reference-weeks 0 --out runs/demo_p010
    # any files
    python adapt.py --checkpoint runs/demo --image plan.nii.gz --label plan_labels.nii.gz --out runs/p_new
    # the protocol on the test patients: adapt on week 0, score weeks 1 and later, against the parent
    python adapt.py --evaluate runs/demo

--out becomes a run folder like train.py's (best.pt, config.json, splits.json, postprocessing.json,
uncertainty.json) plus adapted.json: the parent (path, SHA-256), the reference scans, the setting,
the per-organ decision (adapted or the parent's) and the guard's thresholds, and parent and adapted
Dice on the reference scans. predict.py runs it with its parent beside it: an organ decided for the
parent, or one that disagrees grossly with the parent's on a scan, is the parent's (the latter
flagged). See docs/adaptation.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pelvicseg.atomic import write_bytes, write_json
from pelvicseg.adaptation import (AUGMENT_NAMES, AUGMENT_VALUES, DEFAULT_SETTINGS, GRID_AUGMENT, GRID_LR, GRID_STEPS,
                                  MAX_ORGAN_LOSS, SETTINGS_FILE, TRAINABLE, Parent, adapted_member, choose_from,
                                  decision_for, describe, evaluate_cases, fine_tune, grid_of, guard_thresholds,
                                  load_parent, mean_foreground, patients_with_weeks, per_class_means, per_week_table,
                                  prepared, replay_cases, run_protocol, settings_for, table_of)
from pelvicseg.checkpoint import file_sha256, save_checkpoint
from pelvicseg.cli import run_cli
from dataset import Case, case_id_from_path, find_cases
from pelvicseg.errors import DataError
from pelvicseg.inference import checkpoint_path, resolve_device
from pelvicseg.lock import FolderLock
from pelvicseg.metrics import json_ready
from pelvicseg.records import read_record

EVALUATION_FILE = "adaptation_test.json"  # in the parent run: the protocol on its test patients
RUN_FILES = ("postprocessing.json", "uncertainty.json", "splits.json")  # the parent's, kept by the adapted run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune a trained model on one patient's reference scans "
                                     "and contours.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--checkpoint", help="the parent: a run folder (its best.pt) or a checkpoint file")
    task.add_argument("--choose-on-validation", metavar="RUN",
                      help=f"choose the setting on RUN's validation patients and write RUN/{SETTINGS_FILE}")
    task.add_argument("--evaluate", metavar="RUN", help="adapt each test patient of RUN on its first week, score its "
                      f"later weeks against the parent, and write RUN/{EVALUATION_FILE}")
    parser.add_argument("--data-root", help="HipMRI-layout folder (default: the parent run's)")
    parser.add_argument("--patient", help="with --checkpoint: the patient id as in splits.json, e.g. 010")
    parser.add_argument("--reference-weeks", type=int, nargs="+",
                        help="with --patient: the weeks with approved contours (default: the patient's first)")
    parser.add_argument("--image", action="append", default=[], help="instead of --patient: a reference image "
                        "(repeatable, each with its --label)")
    parser.add_argument("--label", action="append", default=[], help="the contours of the --image in the same place")
    parser.add_argument("--out", help="with --checkpoint: the adapted run folder")
    parser.add_argument("--patients", nargs="+", help="with --choose-on-validation: only these validation patients")
    parser.add_argument("--steps", type=int, help=f"training steps (default: RUN/{SETTINGS_FILE}'s, else {DEFAULT_SETTINGS['steps']})")
    parser.add_argument("--lr", type=float, help=f"Adam learning rate (default: RUN/{SETTINGS_FILE}'s, else {DEFAULT_SETTINGS['lr']:g})")
    parser.add_argument("--augment", choices=("on", "off", "wide"),
                        help="the parent's training augmentation, crops only, or the augmentation with the wider "
                        "deformation and scale ranges of week-to-week change (adaptation.WIDE_AUGMENTATION) "
                        f"(default: RUN/{SETTINGS_FILE}'s, "
                        f"else {AUGMENT_NAMES[DEFAULT_SETTINGS['augment']]})")
    parser.add_argument("--trainable", choices=TRAINABLE, help="the parameters fine-tuned: all, decoder (encoder "
                        "frozen) or norm_head (normalisation layers and output head) (default: RUN/"
                        f"{SETTINGS_FILE}'s, else {DEFAULT_SETTINGS['trainable']})")
    parser.add_argument("--l2sp", type=float, help="weight of the L2-SP penalty, the squared distance to the parent's "
                        f"weights (default: RUN/{SETTINGS_FILE}'s, else {DEFAULT_SETTINGS['l2sp']:g})")
    parser.add_argument("--replay", type=int, help="that many of the parent's training scans (one per patient) mixed "
                        f"into the reference crops (default: RUN/{SETTINGS_FILE}'s, else {DEFAULT_SETTINGS['replay']})")
    parser.add_argument("--steps-grid", type=int, nargs="+", default=list(GRID_STEPS),
                        help="with --choose-on-validation: the step counts scored (0: the parent)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=list(GRID_LR),
                        help="with --choose-on-validation: the learning rates tried")
    parser.add_argument("--augment-grid", choices=("on", "off", "wide"), nargs="+",
                        default=[AUGMENT_NAMES[a] for a in GRID_AUGMENT],
                        help="with --choose-on-validation: the augmentations tried")
    parser.add_argument("--trainable-grid", choices=TRAINABLE, nargs="+", default=["all"],
                        help="with --choose-on-validation: the parameter sets fine-tuned")
    parser.add_argument("--l2sp-grid", type=float, nargs="+", default=[0.0],
                        help="with --choose-on-validation: the L2-SP weights tried")
    parser.add_argument("--replay-grid", type=int, nargs="+", default=[0],
                        help="with --choose-on-validation: the numbers of replayed training scans tried")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="refused unless it is the parent's: an adapted model keeps its parent's preprocessing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops and augmentation")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-hd95", action="store_true", help="with --evaluate: skip HD95 (the slow metric)")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapted run in --out, or the parent "
                        f"run's {SETTINGS_FILE} / {EVALUATION_FILE}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint and not args.out:
        parser.error("--checkpoint needs --out (the adapted run folder)")
    if args.checkpoint and bool(args.patient) == bool(args.image):
        parser.error("--checkpoint needs either --patient (HipMRI layout) or --image/--label pairs")
    if len(args.image) != len(args.label):
        parser.error(f"{len(args.image)} --image but {len(args.label)} --label: give one label per image")
    return args


def overrides(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "lr": args.lr, "augment": AUGMENT_VALUES.get(args.augment),
            "trainable": args.trainable, "l2sp": args.l2sp, "replay": args.replay}


def training_replay(parent: Parent, data_root: str | None, count: int, seed: int) -> list[Case]:
    """The parent's training scans replayed among the reference crops (none for ``count`` 0)."""
    if count <= 0:
        return []
    cases, _ = parent_cases(parent, data_root)
    train_patients = list((parent.member.split or {}).get("train") or [])
    try:
        return replay_cases(cases, train_patients, count, seed)
    except ValueError as problem:
        raise DataError(f"{parent.path}: {problem}; give --data-root or --replay 0") from None


def check_spacing(parent: Parent, spacing: Sequence[float] | None) -> None:
    own = parent.member.config["spacing"]
    if spacing is not None and not np.allclose(spacing, own, rtol=1e-6, atol=1e-9):
        raise DataError(f"{parent.path}: --spacing {' '.join(f'{s:g}' for s in spacing)} differs from the parent's "
                        f"{' '.join(f'{s:g}' for s in own)} mm; an adapted model keeps its parent's preprocessing")


def parent_cases(parent: Parent, data_root: str | None) -> tuple[list[Case], str]:
    root = data_root or parent.member.config.get("data_root")
    if not root:
        raise DataError(f"{parent.path}: the run records no --data-root; give --data-root")
    return find_cases(root, require_labels=False), root


def normal_patient(patient: str) -> str:
    return f"{int(patient):03d}" if patient.isdigit() else patient


def reference_cases(args: argparse.Namespace, parent: Parent) -> list[Case]:
    """The reference scans, each with its contours: --patient's weeks, or the --image/--label pairs."""
    if args.image:
        return [Case(str(image), str(label), case_id_from_path(image), "given", index)
                for index, (image, label) in enumerate(zip(args.image, args.label))]
    cases, root = parent_cases(parent, args.data_root)
    patient = normal_patient(args.patient)
    mine = sorted((c for c in cases if c.patient == patient), key=lambda c: c.week)
    if not mine:
        known = sorted({c.patient for c in cases})
        raise DataError(f"{root}: no scan of patient {patient} (patients: {', '.join(known)})")
    weeks = args.reference_weeks if args.reference_weeks is not None else [mine[0].week]
    chosen = []
    for week in weeks:
        case = next((c for c in mine if c.week == week), None)
        if case is None:
            raise DataError(f"{root}: patient {patient} has no week {week} (weeks: "
                            f"{', '.join(str(c.week) for c in mine)})")
        if case.label is None:
            raise DataError(f"{case.image}: patient {patient} week {week} has no contours (no label file); "
                            "adaptation needs the reference scan's approved contours")
        chosen.append(case)
    return chosen


def prepare_out(out: Path, overwrite: bool) -> None:
    if (out / "best.pt").exists() and not overwrite:
        raise DataError(f"{out}: already holds a run (best.pt); pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder")


def adapt_one(args: argparse.Namespace) -> dict:
    """--checkpoint: fine-tune, check on the reference scans, write the adapted run folder."""
    parent = load_parent(args.checkpoint)
    check_spacing(parent, args.spacing)
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    reference = reference_cases(args, parent)
    settings, source = settings_for(parent.member.run_dir, overrides(args))
    organs, guard, decision_source = decision_for(parent.member.run_dir, parent.class_names)
    replay = training_replay(parent, args.data_root, settings["replay"], args.seed)
    device = resolve_device(args.device)
    print(f"Adapting {parent.path} on {len(reference)} reference scan(s) ({', '.join(c.case_id for c in reference)}): "
          f"{settings['steps']} steps, {describe(settings)} [{source}] on {device}; organs adapted: "
          f"{', '.join(n for n, v in organs.items() if v == 'adapted') or 'none'} [{decision_source}]", flush=True)
    started = time.perf_counter()
    weights, train_seconds = fine_tune(parent, reference, settings, device, args.seed, replay=replay)
    scans = prepared(parent, reference)
    before = evaluate_cases(parent.member, scans, device, hd95=False)
    after = evaluate_cases(adapted_member(parent, weights), scans, device, hd95=False)
    seconds = time.perf_counter() - started
    parent_dice, adapted_dice = mean_foreground(before), mean_foreground(after)
    used = adapted_dice >= parent_dice
    record = {"parent": str(parent.path.resolve()), "parent_sha256": file_sha256(parent.path),
              "reference": [{"case": c.case_id, "patient": c.patient, "week": c.week, "image": str(Path(c.image).resolve()),
                             "label": str(Path(c.label).resolve())} for c in reference],
              "settings": settings, "settings_source": source, "seed": args.seed, "device": str(device),
              "train_seconds": train_seconds, "seconds": seconds,
              "reference_dice_parent": before, "reference_dice_adapted": after,
              "reference_mean_fg_dice_parent": parent_dice, "reference_mean_fg_dice_adapted": adapted_dice,
              "used": used, "organs": organs, "organs_source": decision_source, "guard": guard,
              "replay": [c.case_id for c in replay]}
    state = {key: value for key, value in parent.state.items() if key not in ("optimizer", "scaler", "rng")}
    state["model"] = weights if used else parent.member.weights
    state["adaptation"] = record
    out.mkdir(parents=True, exist_ok=True)
    if not used:
        # Worse than its parent on its own contours: kept for inspection, never used silently.
        save_checkpoint({**state, "model": weights}, out / "rejected.pt")
    save_checkpoint(state, out / "best.pt")
    for name in RUN_FILES:
        if (parent.member.run_dir / name).exists():
            write_bytes(out / name, (parent.member.run_dir / name).read_bytes())
    write_json(out / "config.json", json_ready(parent.member.config))
    write_json(out / "adapted.json", json_ready(record))
    print(f"Reference scans' mean foreground Dice: parent {parent_dice:.4f}, adapted {adapted_dice:.4f} "
          f"({train_seconds:.1f} s of fine-tuning, {seconds:.1f} s in all)", flush=True)
    if used:
        print(f"Adapted model: {out / 'best.pt'}")
    else:
        print(f"warning: the adapted model scores below its parent on its own reference scans, so {out / 'best.pt'} "
              f"holds the parent's weights; the adapted ones are in {out / 'rejected.pt'} (try a lower --lr or fewer "
              "--steps)", file=sys.stderr, flush=True)
    return record


def validation_patients(parent: Parent, cases: Sequence[Case], chosen: Sequence[str] | None) -> dict[str, list[Case]]:
    split = parent.member.split or {}
    validation = list(split.get("val") or [])
    if not validation:
        raise DataError(f"{parent.path}: the run has no validation patients to choose the adaptation on")
    if chosen:
        chosen = [normal_patient(p) for p in chosen]
        for patient in chosen:
            if patient in (split.get("test") or []):
                raise DataError(f"{parent.path}: patient {patient} is a test patient; the adaptation is chosen on "
                                f"validation patients only ({', '.join(validation)})")
            if patient not in validation:
                raise DataError(f"{parent.path}: patient {patient} is not a validation patient of this run "
                                f"({', '.join(validation)})")
        validation = chosen
    patients = patients_with_weeks(cases, validation)
    if not patients:
        raise DataError(f"{parent.path}: no validation patient has two or more labelled weeks")
    return patients


def refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise DataError(f"{path}: already exists; pass --overwrite to replace it")


def open_run(run: str, args: argparse.Namespace, file_name: str) -> tuple[Parent, Path, list[Case]]:
    """The run of --choose-on-validation or --evaluate: its parent model, the file in its folder that
    will be written (refused before any work when it exists without --overwrite), and its cases."""
    parent = load_parent(run)
    check_spacing(parent, args.spacing)
    target = parent.member.run_dir / file_name
    refuse_existing(target, args.overwrite)
    cases, _ = parent_cases(parent, args.data_root)
    return parent, target, cases


def progress_folder(target: Path) -> Path:
    """Where --choose-on-validation and --evaluate keep each patient's finished part until the
    whole file is written: RUN/adaptation_progress/ for RUN/adaptation.json, and so on."""
    return target.with_name(f"{target.stem}_progress")


def protocol_kept(parent: Parent, patients: dict[str, list[Case]], grid: Sequence[dict], milestones: Sequence[int],
                  device, seed: int, hd95: bool, target: Path, replay: Sequence[Case] = (),
                  organs: dict | None = None, thresholds: dict | None = None) -> dict:
    """``run_protocol`` one patient at a time, each patient's records kept (atomically) in
    progress_folder(target)/<patient>.json with what made them: a command stopped half-way
    (killed, out of disk) and run again takes the patients already done, and adapts again, saying
    why in one line, a patient whose part was made otherwise. Patients are independent (each
    adaptation starts from the parent, seeded by ``seed``), so the records are those of one run."""
    folder = progress_folder(target)
    records, seconds = [], []
    for patient, weeks in patients.items():
        made_by = json_ready({"parent_sha256": file_sha256(parent.path), "weeks": [c.case_id for c in weeks],
                              "grid": list(grid), "milestones": list(milestones), "seed": seed,
                              "device": str(device.type), "hd95": hd95, "replay": [c.case_id for c in replay],
                              "organs": organs, "thresholds": thresholds})
        path = folder / f"{patient}.json"
        kept = read_record(path)
        if kept is not None and kept.get("made_by") == made_by:
            print(f"  patient {patient}: taken from {path} (done by an earlier run of this command)", flush=True)
            outcome = kept["outcome"]
        else:
            if kept is not None:
                changed = next(k for k in made_by if (kept.get("made_by") or {}).get(k) != made_by[k])
                print(f"  patient {patient}: {path} was made with another {changed}; adapting again", flush=True)
            outcome = run_protocol(parent, {patient: weeks}, grid, milestones, device, seed, hd95=hd95, replay=replay,
                                   organs=organs, thresholds=thresholds)
            write_json(path, json_ready({"made_by": made_by, "outcome": outcome}))
        records += outcome["records"]
        seconds += outcome["seconds"]
    return {"records": records, "seconds": seconds}


def choose(args: argparse.Namespace) -> dict:
    """--choose-on-validation: the grid on the validation patients; the constrained best setting,
    the per-organ decision and the guard's thresholds to adaptation.json."""
    parent, target, cases = open_run(args.choose_on_validation, args, SETTINGS_FILE)
    patients = validation_patients(parent, cases, args.patients)
    grid = grid_of(args.lr_grid, [AUGMENT_VALUES[a] for a in args.augment_grid], args.trainable_grid, args.l2sp_grid,
                   args.replay_grid)
    replay = training_replay(parent, args.data_root, max(args.replay_grid), args.seed)
    milestones = sorted(set(args.steps_grid) | {0})
    device = resolve_device(args.device)
    print(f"Choosing the adaptation on {len(patients)} validation patient(s) ({', '.join(patients)}): "
          f"{len(grid)} setting(s) x steps {milestones}", flush=True)
    outcome = protocol_kept(parent, patients, grid, milestones, device, args.seed, False, target, replay=replay)
    class_names = parent.class_names
    num_classes = len(class_names)
    table = table_of(outcome["records"], num_classes)
    decided = choose_from(table, class_names)
    organs, gain, mean_gain = decided.pop("organs"), decided.pop("gain"), decided.pop("mean_gain")
    chosen = decided
    guard = guard_thresholds(outcome["records"], chosen, class_names)
    result = {"chosen": chosen, "organs": organs, "gain": gain, "mean_gain": mean_gain, "guard": guard,
              "criterion": f"the best mean gain over the parent in per-organ Dice of the later weeks (adapted on the "
                           f"first week) among the settings where no organ loses more than {MAX_ORGAN_LOSS}; an "
                           "organ that loses more in every setting, or does not gain in the chosen one, keeps the "
                           "parent's prediction",
              "max_organ_loss": MAX_ORGAN_LOSS,
              "parent": str(parent.path), "patients": list(patients), "seed": args.seed, "device": str(device),
              "class_names": class_names, "table": table, "train_seconds": outcome["seconds"],
              "replay": [c.case_id for c in replay], "records": outcome["records"]}
    parent_row = next(row for row in table if row["steps"] == 0)
    for row in table:
        changes = " ".join(f"{name[:4]} {row['dice'][c] - parent_row['dice'][c]:+.3f}"
                           for c, name in enumerate(class_names) if c > 0)
        label = "parent" if row["steps"] == 0 else f"steps {row['steps']:4d}  {describe(row)}"
        print(f"  {label:<58s} mean foreground Dice {row['mean_fg_dice']:.4f}  ({row['weeks']} weeks)  {changes}")
    print(f"Chosen: {chosen['steps']} steps, {describe(chosen)}; mean gain {mean_gain:+.4f}; organs adapted: "
          f"{', '.join(n for n, v in organs.items() if v == 'adapted') or 'none'}, from the parent: "
          f"{', '.join(n for n, v in organs.items() if v == 'parent') or 'none'} -> {target}")
    write_json(target, json_ready(result))
    shutil.rmtree(progress_folder(target), ignore_errors=True)
    return result


def evaluate(args: argparse.Namespace) -> dict:
    """--evaluate: the protocol on the test patients with the run's setting and per-organ decision,
    parent against what an adapted model delivers (guarded by its parent), per organ and per week."""
    parent, target, cases = open_run(args.evaluate, args, EVALUATION_FILE)
    test = list((parent.member.split or {}).get("test") or [])
    patients = patients_with_weeks(cases, test)
    if not patients:
        raise DataError(f"{parent.path}: no test patient has two or more labelled weeks")
    settings, source = settings_for(parent.member.run_dir, overrides(args))
    class_names = parent.class_names
    organs, guard, decision_source = decision_for(parent.member.run_dir, class_names)
    replay = training_replay(parent, args.data_root, settings["replay"], args.seed)
    device = resolve_device(args.device)
    print(f"Adapting each of {len(patients)} test patient(s) on its first week: {settings['steps']} steps, "
          f"{describe(settings)} [{source}] on {device}; organs adapted: "
          f"{', '.join(n for n, v in organs.items() if v == 'adapted') or 'none'} [{decision_source}]", flush=True)
    grid = [{k: settings[k] for k in settings if k != "steps"}]
    steps = max(settings["steps"], 1)
    outcome = protocol_kept(parent, patients, grid, sorted({0, steps}), device, args.seed, not args.no_hd95, target,
                            replay=replay, organs=organs, thresholds=guard)
    records = outcome["records"]
    before = [r for r in records if r["steps"] == 0]
    after = [r for r in records if r["steps"] == steps]
    result = {"settings": settings, "settings_source": source, "organs": organs, "organs_source": decision_source,
              "guard": guard, "parent": str(parent.path), "patients": list(patients),
              "seed": args.seed, "device": str(device), "class_names": class_names, "weeks_scored": len(before),
              "seconds_per_adaptation": outcome["seconds"], "records": records,
              "fallbacks": [{"case": r["case"], **f} for r in after for f in r["fallbacks"]]}
    for name, chosen in (("parent", before), ("adapted", after)):
        result[name] = {"dice": dict(zip(class_names, per_class_means(chosen, "dice", len(class_names)))),
                        "mean_fg_dice": mean_foreground(chosen)}
        if not args.no_hd95:
            result[name]["hd95"] = dict(zip(class_names, per_class_means(chosen, "hd95", len(class_names))))
    result["per_week"] = per_week_table(records, class_names, steps)
    weeks = sorted({r["week"] for r in before})
    print(f"Test patients' later weeks ({len(before)} scans of {len(patients)} patients), per organ: parent -> "
          "adapted (change) per week, the mean, the worst week:")
    header = "".join(f" {'week ' + str(w):>26}" for w in weeks)
    print(f"  {'organ':<10} {'from':<8}{header} {'mean':>26} {'worst':>13}" +
          ("" if args.no_hd95 else f" {'HD95 parent':>12} {'adapted':>8}"))
    for name in class_names[1:]:
        row = result["per_week"][name]
        cells = "".join(f" {v['parent']:6.3f} -> {v['adapted']:6.3f} ({v['change']:+.3f})".rjust(27)
                        for v in (row["weeks"][str(w)] for w in weeks))
        mean_change = result["adapted"]["dice"][name] - result["parent"]["dice"][name]
        worst = (f"week {row['worst_week']} {row['worst_change']:+.3f}" if row["worst_week"] is not None else "-")
        line = (f"  {name:<10} {organs.get(name, 'adapted'):<8}{cells}  {result['parent']['dice'][name]:6.3f} -> "
                f"{result['adapted']['dice'][name]:6.3f} ({mean_change:+.3f}) {worst:>13}")
        if not args.no_hd95:
            line += f" {result['parent']['hd95'][name]:12.2f} {result['adapted']['hd95'][name]:8.2f}"
        print(line)
    for fallback in result["fallbacks"]:
        print(f"  guard: {fallback['case']} {fallback['organ']}: {fallback['reason']}")
    seconds = outcome["seconds"]
    print(f"  mean foreground Dice {result['parent']['mean_fg_dice']:.4f} -> {result['adapted']['mean_fg_dice']:.4f}; "
          f"fine-tuning {np.mean(seconds):.1f} s per patient (max {np.max(seconds):.1f} s) on {device}")
    write_json(target, json_ready(result))
    shutil.rmtree(progress_folder(target), ignore_errors=True)
    print(f"Written: {target}")
    return result


def main(args: argparse.Namespace) -> dict:
    """One command at a time in the folder written: the parent run's, or --out."""
    run = args.choose_on_validation or args.evaluate
    folder = checkpoint_path(run).parent if run else Path(args.out) if args.out else None
    with FolderLock(folder) if folder is not None and not folder.is_file() else contextlib.nullcontext():
        if args.choose_on_validation:
            return choose(args)
        if args.evaluate:
            return evaluate(args)
        return adapt_one(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
