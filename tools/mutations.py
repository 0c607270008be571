"""Mutation canary: plant known one-line bugs in critical paths and check that the tests named for
each one fail. A test that still passes with its bug planted tests nothing of that path.

    python -m tools.mutations                      # every mutation, each with its tests
    python -m tools.mutations --only seg_flipped   # one of them
    python -m tools.mutations --only seg_flipped --tests tests/test_dicom_study.py   # other tests

Each mutation runs in its own copy of the repository in a temporary folder (the working tree is
never touched): the files git tracks or would track (untracked files that are not ignored, so a
test not yet committed is there too), symbolic links left out. The bug is an exact text
replacement that must match exactly once; where the text is gone (the code was changed) the
canary stops and says so, rather than pass without having planted anything. The named tests run
in a subprocess with this interpreter (``sys.executable``); the mutation is caught when pytest
reports failed tests (exit status 1). That the same tests pass without the bug is the ordinary
suite's job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 300
PYTEST_FAILED = 1  # pytest's exit status when tests ran and some failed


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # the exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail with the mutation planted
    why: str


MUTATIONS = (
    Mutation("seg_flipped", "predict.py",
             "path = write_seg(labels, series,", "path = write_seg(labels[:, ::-1], series,",
             ("tests/test_dicom.py::test_predicts_rtstruct_and_seg_read_back_by_geometry_alone_as_its_labels",),
             "predict.py writes the DICOM-SEG from labels flipped along the rows"),
    Mutation("never_flagged", "predict.py",
             "flags = (flag_case(scores, rule, class_names) if rule else [])", "flags = ([])",
             ("tests/test_uncertainty.py::"
              "test_predict_flags_every_organ_scoring_above_thresholds_refitted_on_lower_scores",),
             "predict.py never flags a case for review"),
    Mutation("dice_without_two", "pelvicseg/metrics.py",
             "2 * true_positive / denominator", "true_positive / denominator",
             ("tests/test_predict.py::test_dice_partial_overlap_matches_hand_count",),
             "Dice without its factor 2"),
    Mutation("label_values_interpolated", "dataset.py",
             "item[self.label_key] = self.resample_label(item[self.label_key], image_resize)",
             "item[self.label_key] = image_resize(item[self.label_key])",
             ("tests/test_dataset.py::test_resized_labels_keep_their_classes",),
             "labels resampled as values with the image's interpolation, not per class mask"),
    Mutation("source_grid_inverted", "pelvicseg/inference.py",
             "source_to_target = np.linalg.inv(target_affine) @ source_affine",
             "source_to_target = np.linalg.inv(source_affine) @ target_affine",
             ("tests/test_predict.py::test_finer_spacing_returns_to_source_grid_almost_exactly",),
             "the way back to the source grid through the inverted mapping"),
    Mutation("rtstruct_in_ras", "pelvicseg/dicom/outputs.py",
             "lps = LPS_TO_RAS @ series.affine", "lps = series.affine",
             ("tests/test_dicom.py::test_rtstruct_keeps_holes_islands_and_one_pixel_regions_on_an_oblique_grid",),
             "RTSTRUCT contour points written in NIfTI's RAS instead of DICOM's LPS"),
    Mutation("checkpoint_in_place", "pelvicseg/checkpoint.py",
             "    with atomic_open(path, \"wb\") as handle:\n",
             "    with open(path, \"wb\") as handle:\n",
             ("tests/test_reliability.py::test_failed_save_keeps_the_previous_checkpoint",),
             "the checkpoint written in place instead of to a temporary file renamed over it"),
    Mutation("adaptation_scored_with_the_parent", "pelvicseg/adaptation.py",
             "member = adapted_member(parent, weights)", "member = parent.member",
             ("tests/test_adapt.py::test_choose_on_validation_then_adapt_uses_it_and_evaluate_compares_with_the_parent",),
             "--choose-on-validation scores every step count with the parent's weights"),
    Mutation("older_run_resumed_with_new_weights", "train.py",
             "for key, value in {**BEFORE_THE_FLAG, **stored}.items():", "for key, value in stored.items():",
             ("tests/test_recipe.py::"
              "test_class_weight_power_reaches_the_weights_and_an_older_run_resumes_with_its_own",),
             "a run written before --class-weight-power resumes with the new default's class weights"),
)


class MutationError(RuntimeError):
    """A mutation that cannot be planted: its text is gone or found more than once."""


def repository_files(root: Path) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode()
    return sorted({name for name in listed.split("\0")
                   if name and (root / name).is_file() and not (root / name).is_symlink()})


def copy_repository(root: Path, destination: Path) -> Path:
    for name in repository_files(root):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return destination


def plant(copy: Path, mutation: Mutation) -> None:
    path = copy / mutation.path
    text = path.read_text()
    found = text.count(mutation.old)
    if found != 1:
        raise MutationError(f"{mutation.name}: {mutation.path} holds its text {found} times, not once: "
                            f"{mutation.old!r}; update the mutation to the code as it is now")
    path.write_text(text.replace(mutation.old, mutation.new))


@dataclass
class Outcome:
    mutation: Mutation
    tests: tuple[str, ...]
    returncode: int
    seconds: float
    output: str

    @property
    def caught(self) -> bool:
        return self.returncode == PYTEST_FAILED

    def line(self) -> str:
        verdict = "caught" if self.caught else f"NOT CAUGHT (pytest exit {self.returncode})"
        return (f"{self.mutation.name}: {verdict} by {' '.join(self.tests)} in {self.seconds:.0f} s "
                f"({self.mutation.why})")


def run_mutation(mutation: Mutation, tests: Sequence[str] | None = None, root: Path = REPO,
                 timeout: float = TEST_TIMEOUT_S) -> Outcome:
    """``mutation`` planted in a fresh copy of ``root``; its tests (or ``tests``) run there."""
    tests = tuple(tests or mutation.tests)
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as folder:
        copy = copy_repository(root, Path(folder) / "repo")
        plant(copy, mutation)
        start = time.perf_counter()
        # one thread: the canary runs beside the suite's other worker on a small machine
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider",
                                 *tests], cwd=copy, capture_output=True, text=True, timeout=timeout, env=environment)
        return Outcome(mutation, tests, result.returncode, time.perf_counter() - start,
                       result.stdout[-4000:] + result.stderr[-2000:])


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Plant known one-line bugs, each in a temporary copy of the "
                                     "repository, and check that the tests named for each fail.")
    parser.add_argument("--only", nargs="+", choices=[m.name for m in MUTATIONS], metavar="NAME",
                        help="these mutations only (default: all): " + ", ".join(m.name for m in MUTATIONS))
    parser.add_argument("--tests", nargs="+", metavar="NODE",
                        help="run these pytest node ids against each mutation instead of its own tests")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output of each run")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    missed = 0
    for mutation in chosen:
        outcome = run_mutation(mutation, args.tests)
        print(outcome.line(), flush=True)
        if args.verbose or not outcome.caught:
            print(outcome.output, flush=True)
        missed += not outcome.caught
    print(f"{len(chosen) - missed} of {len(chosen)} mutation(s) caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(get_args()))
