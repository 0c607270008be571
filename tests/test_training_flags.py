"""train.py's flags that the other tests leave alone, each in a real run on tiny data, and the
behaviour each flag promises, checked against a computation made here: the loss terms of deep
supervision and of --loss ce/dice against PyTorch's and MONAI's own losses, --tta against the
model called directly, steps per epoch of --batch-size 2 against Adam's step count, the resumed
settings and the cosine schedule against the closed form.

Runs are in-process (``run_cli(train.main, train.get_args(argv))`` returns the exit code); what a
user sees on the terminal of a normal run (no library warnings, no progress frames) is checked on
tests/test_predict.py's train.py and predict.py subprocesses. Nothing of the project is mocked;
where a failure cannot be provoked on tiny data (running out of GPU memory, a GPU's bf16
support), a library function is patched.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts, not an installed package
    sys.path.insert(0, str(REPO))

from pelvicseg import inference  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from pelvicseg import training  # noqa: E402
from pelvicseg.cli import run_cli  # noqa: E402
from conftest import synthetic_case, write_case, write_dataset  # noqa: E402
from dataset import find_cases, preprocessing  # noqa: E402
from modules import ImprovedUNet3D  # noqa: E402

TINY = ["--spatial-size", "16", "16", "16", "--channels", "4", "8", "8", "8", "--workers", "0", "--device", "cpu"]
# float32 where precision is not what a test is about: on CPUs with native bf16 (where bf16 is the
# default) a tiny network's epoch takes 0.2 s in float32 and 2-3 s in bf16.
FP32 = [*TINY, "--no-amp"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one CPU thread for tiny networks


# ----------------------------------------------------------------------------- helpers

def train_in_process(capsys, data_root, out, *flags) -> tuple[int, str, str]:
    """train.py's CLI without the interpreter start: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_cli(train.main, train.get_args(["--data-root", str(data_root), "--out", str(out), *map(str, flags)]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def trained(capsys, data_root, out, *flags) -> str:
    """A run that must succeed; returns its stdout."""
    code, stdout, stderr = train_in_process(capsys, data_root, out, *flags)
    assert code == 0, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


def one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def metrics_rows(run_dir: Path) -> tuple[list[str], list[dict]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def assert_finished_with_finite_losses(run_dir: Path, epochs: int = 1) -> list[dict]:
    _, rows = metrics_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for row in rows:
        assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"])), row
    assert (run_dir / "best.pt").is_file() and (run_dir / "postprocessing.json").is_file()
    return rows


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def model_of(run_dir: Path) -> tuple[ImprovedUNet3D, dict]:
    state = load(run_dir / "best.pt")
    model = ImprovedUNet3D(**state["model_args"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def cases_of(run_dir: Path, data_root: Path, part: str):
    split = json.loads((run_dir / "splits.json").read_text())
    return [c for c in find_cases(data_root) if c.patient in split[part]]


def hand_class_weights(run_dir: Path, data_root: Path, spacing, num_classes: int) -> torch.Tensor:
    """Inverse fourth-root voxel frequency of the preprocessed training labels (the default
    --class-weight-power, 0.25), mean 1."""
    transform = preprocessing(spacing, num_classes)
    counts = np.zeros(num_classes)
    for case in cases_of(run_dir, data_root, "train"):
        labels = transform(case.as_dict())["label"].as_tensor().long().reshape(-1).numpy()
        counts += np.bincount(labels, minlength=num_classes)
    weights = 1 / np.sqrt(np.sqrt(counts / counts.sum()))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def single_weeks(tmp_path_factory) -> Path:
    """5 patients x 1 week: 3 training volumes (an odd number), 1 validation, 1 test."""
    return write_dataset(tmp_path_factory.mktemp("single_weeks"), patients=range(4, 9), weeks=(0,))


@pytest.fixture(scope="module")
def four_class_root(tmp_path_factory) -> Path:
    """3 patients x 2 weeks whose labels are 0..3 (bladder, rectum and prostate merged into 3)."""
    root = tmp_path_factory.mktemp("four_classes")
    for patient in (4, 5, 6):
        for week in (0, 1):
            image, label = synthetic_case(seed=patient * 100 + week)
            write_case(root, patient, week, image=image, label=np.minimum(label, 3))
    return root


@pytest.fixture(scope="module")
def fp32_run(training_root, tmp_path_factory) -> Path:
    """The same tiny run in float32 and in-process: the reference of the runs that must give its
    numbers (bf16 rounding would blur a comparison at 1e-5)."""
    run_dir = tmp_path_factory.mktemp("fp32") / "run"
    argv = ["--data-root", str(training_root), "--out", str(run_dir), "--epochs", "1", *FP32]
    assert run_cli(train.main, train.get_args(argv)) == 0
    return run_dir


# ----------------------------------------------------------------------------- deep supervision

@pytest.mark.parametrize("kind", ["combined", "ce"])
def test_deep_supervision_loss_is_the_weighted_sum_of_three_levels(kind):
    """(L(main) + 1/2 L(aux at 1/2, labels taken every 2nd voxel) + 1/4 L(aux at 1/4, every 4th))
    / 1.75 on an odd size: labels zero-padded to the network's multiple of 16 first."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(6, generator=generator) + 0.5
    labels = torch.randint(0, 6, (2, 1, 17, 16, 9), generator=generator).float()
    logits = torch.randn(2, 6, 17, 16, 9, generator=generator)
    aux = [torch.randn(2, 6, 16, 8, 8, generator=generator), torch.randn(2, 6, 8, 4, 4, generator=generator)]
    padded = torch.zeros(2, 1, 32, 16, 16)
    padded[:, :, :17, :16, :9] = labels
    targets = [labels, padded[:, :, ::2, ::2, ::2], padded[:, :, ::4, ::4, ::4]]
    if kind == "ce":
        def reference(output, target):
            return F.cross_entropy(output, target[:, 0].long(), weight=weights)
    else:
        monai_loss = DiceCELoss(to_onehot_y=True, softmax=True, weight=weights)

        def reference(output, target):
            return monai_loss(output, target)
    terms = [reference(output, target) for output, target in zip([logits, *aux], targets)]
    expected = (terms[0] + 0.5 * terms[1] + 0.25 * terms[2]) / 1.75

    loss, main = training.deep_supervision_loss(training.make_loss(kind, weights), kind, (logits, aux), labels)
    assert main is logits
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    # The auxiliary terms really count: the main term alone is another number.
    assert abs(float(expected) - float(terms[0])) > 1e-3
    plain, _ = training.deep_supervision_loss(training.make_loss(kind, weights), kind, logits, labels)
    torch.testing.assert_close(plain, terms[0], rtol=1e-6, atol=1e-7)


def test_deep_supervision_run(training_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    trained(capsys, training_root, run_dir, "--epochs", 1, "--deep-supervision", *FP32)
    assert_finished_with_finite_losses(run_dir)
    model, state = model_of(run_dir)
    assert state["model_args"]["deep_supervision"] is True and state["config"]["deep_supervision"] is True
    assert {"aux_head2.weight", "aux_head3.weight"} <= set(state["model"])
    # The auxiliary heads entered the loss: only parameters that got gradients have Adam moments.
    optimizer_state = load(run_dir / "last.pt")["optimizer"]["state"]
    names = [name for name, _ in model.named_parameters()]
    for name in ("aux_head2.weight", "aux_head3.weight", "head.weight"):
        moments = optimizer_state.get(names.index(name))
        assert moments is not None and float(moments["exp_avg"].abs().sum()) > 0, name


# ----------------------------------------------------------------------------- --loss ce and --loss dice

@pytest.mark.parametrize("kind", ["ce", "dice"])
def test_loss_flag_is_the_class_weighted_loss_on_validation(kind, training_root, tmp_path, capsys):
    """The run's validation loss, recomputed here: the best.pt model on each validation volume
    (one 16^3 window, so the sliding window is the plain forward pass), the class weights from
    the training labels, and PyTorch's cross-entropy or MONAI's Dice loss."""
    run_dir = tmp_path / "run"
    trained(capsys, training_root, run_dir, "--epochs", 1, "--loss", kind, *FP32)
    rows = assert_finished_with_finite_losses(run_dir)
    model, state = model_of(run_dir)
    assert state["config"]["loss"] == kind
    spacing = state["config"]["spacing"]
    weights = hand_class_weights(run_dir, training_root, spacing, 6)
    torch.testing.assert_close(torch.tensor(state["class_weights"]), weights, rtol=1e-5, atol=1e-6)

    losses, other = [], []
    for case in cases_of(run_dir, training_root, "val"):
        item = preprocessing(spacing, 6)(case.as_dict())
        image, label = item["image"].as_tensor()[None], item["label"].as_tensor()[None]
        assert image.shape[2:] == (16, 16, 16)
        with torch.no_grad():
            log_probabilities = torch.log(torch.softmax(model(image), 1).clamp_min(1e-8))
        cross_entropy = F.cross_entropy(log_probabilities, label[:, 0].long(), weight=weights)
        dice = DiceLoss(to_onehot_y=True, softmax=True, weight=weights)(log_probabilities, label)
        losses.append(float(cross_entropy if kind == "ce" else dice))
        other.append(float(dice if kind == "ce" else cross_entropy))
    assert float(rows[0]["val_loss"]) == pytest.approx(np.mean(losses), rel=1e-4)
    assert float(rows[0]["val_loss"]) != pytest.approx(np.mean(other), rel=1e-2)  # the two are told apart


# ----------------------------------------------------------------------------- memory and speed flags

def test_checkpointing_run_records_it_and_trains_to_the_same_numbers(fp32_run, training_root, tmp_path, capsys):
    """Recomputing activations in the backward pass changes memory, not results: the same losses
    as the run without it."""
    run_dir = tmp_path / "run"
    trained(capsys, training_root, run_dir, "--epochs", 1, "--checkpointing", *FP32)
    rows = assert_finished_with_finite_losses(run_dir)
    state = load(run_dir / "last.pt")
    assert state["model_args"]["gradient_checkpointing"] is True and state["config"]["checkpointing"] is True
    assert json.loads((run_dir / "config.json").read_text())["checkpointing"] is True
    assert load(fp32_run / "last.pt")["model_args"]["gradient_checkpointing"] is False
    _, reference = metrics_rows(fp32_run)
    for key in ("train_loss", "val_loss", "mean_fg_dice"):
        assert float(rows[0][key]) == pytest.approx(float(reference[0][key]), rel=1e-5), key


def test_one_loader_worker_gives_the_numbers_of_none(fp32_run, training_root, tmp_path, capsys):
    """--workers 1 loads in a worker process; whole-volume training with on-device augmentation
    draws nothing in the loader, so the losses are those of the --workers 0 run."""
    run_dir = tmp_path / "run"
    flags = list(FP32)
    flags[flags.index("--workers") + 1] = "1"
    trained(capsys, training_root, run_dir, "--epochs", 1, *flags)
    rows = assert_finished_with_finite_losses(run_dir)
    assert json.loads((run_dir / "config.json").read_text())["workers"] == 1
    _, reference = metrics_rows(fp32_run)
    for key in ("train_loss", "val_loss", "mean_fg_dice"):
        assert float(rows[0][key]) == pytest.approx(float(reference[0][key]), rel=1e-5), key


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        os.environ.get("HIPMRI_SLOW_TESTS") != "1",
        reason="inductor compiles C++ kernels for every block, forward and backward: over 6 minutes on 2 "
        "busy CPU cores; set HIPMRI_SLOW_TESTS=1")),
])
def test_compile_on_trains_through_the_compiled_blocks(backend, fp32_run, training_root, tmp_path, monkeypatch,
                                                        capsys):
    """--compile on: every block goes through torch.compile and the backward pass through the
    compiled graphs (AOT autograd). By default with the aot_eager backend, which traces and
    partitions the forward and backward graphs as inductor does but runs them eagerly (20-40 s
    on 2 cores instead of over 6 minutes); train.py's own default backend, inductor, with
    HIPMRI_SLOW_TESTS=1."""
    from torch._dynamo import lookup_backend

    graphs = []

    def recording(graph_module, example_inputs):
        graphs.append(graph_module)
        return lookup_backend(backend)(graph_module, example_inputs)

    compile_module = torch.nn.Module.compile

    def compile_with_recording(self, *args, **kwargs):
        kwargs.setdefault("backend", recording)
        return compile_module(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_recording)
    run_dir = tmp_path / "run"
    try:
        trained(capsys, training_root, run_dir, "--epochs", 1, "--compile", "on", *FP32)
    finally:
        torch._dynamo.reset()
    rows = assert_finished_with_finite_losses(run_dir)
    assert json.loads((run_dir / "config.json").read_text())["compile"] == "on"
    # Nine blocks of five kinds (widths differ), in training and in evaluation: many graphs.
    assert len(graphs) >= 9, len(graphs)
    _, reference = metrics_rows(fp32_run)
    for key in ("train_loss", "val_loss"):
        # Compiled kernels may reorder sums: close to the eager run, not necessarily bit-equal.
        assert float(rows[0][key]) == pytest.approx(float(reference[0][key]), rel=1e-3), key


# ----------------------------------------------------------------------------- batches and classes

def test_batch_size_needs_patch_size_in_one_line(single_weeks, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, stderr = train_in_process(capsys, single_weeks, run_dir, "--epochs", 1, "--batch-size", 2, *FP32)
    line = one_line_error(code, stderr)
    assert "--patch-size" in line and "--batch-size 2" in line
    assert not run_dir.exists()


def test_batch_size_two_takes_ceil_half_the_training_volumes_in_steps(single_weeks, tmp_path, capsys):
    run_dir = tmp_path / "run"
    trained(capsys, single_weeks, run_dir, "--epochs", 1, "--batch-size", 2, "--patch-size", 16, 16, 8, *FP32)
    assert_finished_with_finite_losses(run_dir)
    n_train = len(cases_of(run_dir, single_weeks, "train"))
    assert n_train == 3  # odd, so a dropped last batch would show
    state = load(run_dir / "last.pt")
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {float(math.ceil(n_train / 2))}
    assert state["config"]["batch_size"] == 2 and state["config"]["roi_size"] == [16, 16, 8]


def test_four_class_names_make_a_four_class_model_and_metrics(four_class_root, tmp_path, capsys):
    names = ["background", "body", "bone", "soft_tissue"]
    run_dir = tmp_path / "run"
    trained(capsys, four_class_root, run_dir, "--epochs", 1, "--class-names", *names, *FP32)
    assert_finished_with_finite_losses(run_dir)
    model, state = model_of(run_dir)
    assert state["model_args"]["out_channels"] == 4 and state["class_names"] == names
    assert model.head.weight.shape[0] == 4
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 4, 16, 16, 16)
    header, _ = metrics_rows(run_dir)
    assert [h for h in header if h.startswith("dice_")] == [f"dice_{n}" for n in names]
    assert [h for h in header if h.startswith("train_dice_")] == [f"train_dice_{n}" for n in names]
    assert len(state["class_weights"]) == 4
    spacing = state["config"]["spacing"]
    torch.testing.assert_close(torch.tensor(state["class_weights"]),
                               hand_class_weights(run_dir, four_class_root, spacing, 4), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- --tta

def test_tta_is_the_mean_of_the_plain_and_the_mirrored_prediction(fp32_run, training_root):
    model, state = model_of(fp32_run)
    case = cases_of(fp32_run, training_root, "test")[0]
    image = preprocessing(state["config"]["spacing"], 6)(case.as_dict())["image"].as_tensor()[None]
    roi = state["config"]["roi_size"]
    assert list(image.shape[2:]) == roi  # one window: the sliding window is the forward pass
    with torch.no_grad():
        plain = torch.softmax(model(image), 1)
        mirrored = torch.softmax(model(image.flip(2)), 1).flip(2)
    expected = (plain + mirrored) / 2
    got = inference.predict_probabilities(model, image, roi, 0.25, tta=True, amp_dtype=None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    without = inference.predict_probabilities(model, image, roi, 0.25, tta=False, amp_dtype=None)
    torch.testing.assert_close(without, plain, rtol=1e-4, atol=1e-5)
    assert float((got - without).abs().max()) > 1e-3  # the network is not mirror-symmetric: TTA shows


def test_predict_tta_writes_the_labels_of_the_averaged_prediction(fp32_run, training_root, capsys):
    """predict.py --tta: the written labels are the arg-max of (plain + mirrored) / 2 on the
    source grid, computed here with the model called directly."""
    out = fp32_run.parent / "pred_tta"
    capsys.readouterr()
    code = run_cli(predict.main, predict.get_args([
        "--checkpoint", str(fp32_run / "best.pt"), "--data-root", str(training_root), "--split", "test",
        "--out", str(out), "--device", "cpu", "--tta", "--no-postprocessing", "--no-figures", "--no-hd95"]))
    captured = capsys.readouterr()
    assert code == 0, captured.out[-3000:] + captured.err[-3000:]
    assert json.loads((out / "summary.json").read_text())["tta"] is True
    model, state = model_of(fp32_run)
    assert state["config"]["no_amp"] is True  # float32 here as in predict.py: arg-max ties are rare
    cases = cases_of(fp32_run, training_root, "test")
    assert cases
    for case in cases:
        item = preprocessing(state["config"]["spacing"], 6)(case.as_dict())
        image = item["image"].as_tensor()[None]
        with torch.no_grad():
            plain = torch.softmax(model(image), 1)
            mirrored = torch.softmax(model(image.flip(2)), 1).flip(2)
        expected = inference.labels_from_probabilities(inference.to_source_grid(((plain + mirrored) / 2)[0],
                                                                                 item["image"]))
        without = inference.labels_from_probabilities(inference.to_source_grid(plain[0], item["image"]))
        written = np.asanyarray(nib.load(out / f"{case.case_id}_pred.nii.gz").dataobj)
        mismatch = float((written != expected).mean())
        assert mismatch <= 0.001, f"{case.case_id}: {mismatch:.4f} of voxels differ from the averaged prediction"
        assert float((written != without).mean()) > mismatch + 0.005, "TTA changed nothing measurable"


# ----------------------------------------------------------------------------- precision and memory

def test_autocast_dtype_on_cuda_asks_for_native_bf16_only(monkeypatch):
    calls = []

    def native(**kwargs):
        calls.append(kwargs)
        return True

    def emulated_only(including_emulation=True):
        calls.append({"including_emulation": including_emulation})
        return including_emulation is not False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native)
    assert inference.autocast_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert inference.autocast_dtype(torch.device("cuda")) == torch.float16
    assert calls == [{"including_emulation": False}, {"including_emulation": False}]
    assert inference.autocast_dtype(torch.device("cuda"), enabled=False) is None
    assert len(calls) == 2  # disabled: not even asked


def test_out_of_memory_in_validation_is_the_one_line_message_of_training(single_weeks, tmp_path, monkeypatch,
                                                                         capsys):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    messages = {}
    with monkeypatch.context() as patch:
        patch.setattr(inference, "sliding_window_inference", no_memory)
        with pytest.raises(SystemExit) as stopped:
            run_cli(train.main, train.get_args(["--data-root", str(single_weeks), "--out", str(tmp_path / "val"),
                                                "--epochs", "1", *FP32]))
        messages["validation"] = stopped.value
    with monkeypatch.context() as patch:
        # the first training step's first layer (the network's Conv3d modules only: preprocessing's
        # anti-aliasing smooths with functional convolutions)
        patch.setattr(torch.nn.Conv3d, "forward", no_memory)
        with pytest.raises(SystemExit) as stopped:
            run_cli(train.main, train.get_args(["--data-root", str(single_weeks), "--out", str(tmp_path / "train"),
                                                "--epochs", "1", *FP32]))
        messages["training"] = stopped.value
    capsys.readouterr()
    texts = {}
    for stage, exit_ in messages.items():
        text = exit_.code
        assert isinstance(text, str) and "\n" not in text, text
        assert text.startswith(f"error: out of GPU memory in {stage}"), text
        assert "--patch-size" in text and "--checkpointing" in text, text
        # `from None`: Python prints the message alone, no traceback of the error behind it
        assert exit_.__cause__ is None and exit_.__suppress_context__, stage
        texts[stage] = text
    assert texts["validation"].split("); ", 1)[1] == texts["training"].split("); ", 1)[1]
    assert "(window [16, 16, 16])" in texts["validation"] and "(window whole volume)" in texts["training"]


# ----------------------------------------------------------------------------- resume

RESUMED_SETTINGS = {"dropout": 0.2, "lr": 2e-3, "weight_decay": 1e-4, "seed": 3, "no_amp": True, "augment": "loader"}


@pytest.fixture(scope="module")
def first_epoch_run(training_root, tmp_path_factory):
    """One epoch with non-default settings, among them --augment loader (MONAI transforms per sample)."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    argv = ["--data-root", str(training_root), "--out", str(run_dir), "--epochs", "1", "--dropout", "0.2", "--lr",
            "2e-3", "--weight-decay", "1e-4", "--seed", "3", "--augment", "loader", *FP32]
    assert run_cli(train.main, train.get_args(argv)) == 0
    return run_dir


def test_augment_loader_run(first_epoch_run):
    assert_finished_with_finite_losses(first_epoch_run)
    assert json.loads((first_epoch_run / "config.json").read_text())["augment"] == "loader"


def test_resume_restores_every_setting_and_refuses_a_changed_one(first_epoch_run, training_root, capsys):
    run_dir = first_epoch_run
    before = folder_bytes(run_dir)
    code, _, stderr = train_in_process(capsys, training_root, run_dir, "--resume", "--epochs", 2, "--lr", "5e-3",
                                       "--workers", 0, "--device", "cpu")
    line = one_line_error(code, stderr)
    assert "--lr 0.005" in line and "0.002" in line  # the new value and the run's own
    assert folder_bytes(run_dir) == before, "a refused resume changed the run folder"

    trained(capsys, training_root, run_dir, "--resume", "--epochs", 2, "--workers", 0, "--device", "cpu")
    rows = assert_finished_with_finite_losses(run_dir, epochs=2)
    last, best = load(run_dir / "last.pt"), load(run_dir / "best.pt")
    for config in (json.loads((run_dir / "config.json").read_text()), last["config"]):
        assert {k: config[k] for k in RESUMED_SETTINGS} == RESUMED_SETTINGS
        assert config["channels"] == [4, 8, 8, 8] and config["spatial_size"] == [16, 16, 16]
        assert config["epochs"] == 2
    assert last["model_args"]["dropout"] == 0.2 and best["model_args"]["dropout"] == 0.2
    assert last["epoch"] == 2
    assert all(group["weight_decay"] == 1e-4 for group in last["optimizer"]["param_groups"])
    # The restored base rate drives the schedule: epoch 2's last step is the run's last, at a hundredth
    # of 2e-3, not of the default 1e-3 (the logged rate is that of the epoch's last step).
    assert float(rows[1]["lr"]) == pytest.approx(2e-3 * 0.01, rel=1e-5)

    trained(capsys, training_root, run_dir, "--resume", "--epochs", 3, "--patience", 4, "--workers", 0, "--device",
            "cpu")
    assert_finished_with_finite_losses(run_dir, epochs=3)
    config = load(run_dir / "last.pt")["config"]
    assert (config["epochs"], config["patience"]) == (3, 4)
    assert {k: config[k] for k in RESUMED_SETTINGS} == RESUMED_SETTINGS


# ----------------------------------------------------------------------------- schedule and stopping

def test_cosine_schedule_is_closed_form_across_a_resume(single_weeks, tmp_path, capsys):
    """One pass over 3 training volumes: 3 steps an epoch; the rate logged for an epoch is that of
    its last step, global step 3 * epoch - 1 of a run of 3 * epochs steps (no warm-up on a CPU)."""
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    trained(capsys, single_weeks, fresh, "--epochs", 8, *FP32)
    trained(capsys, single_weeks, resumed, "--epochs", 4, *FP32)
    trained(capsys, single_weeks, resumed, "--resume", "--epochs", 8, "--workers", 0, "--device", "cpu")
    fresh_rows = assert_finished_with_finite_losses(fresh, 8)
    resumed_rows = assert_finished_with_finite_losses(resumed, 8)
    base = 1e-3
    for epoch in range(1, 9):
        expected = base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (3 * epoch - 1) / (24 - 1))))
        assert float(fresh_rows[epoch - 1]["lr"]) == pytest.approx(expected, rel=1e-5), epoch
    for epoch in range(5, 9):  # the same text in both files: equal to the 6 digits written
        assert resumed_rows[epoch - 1]["lr"] == fresh_rows[epoch - 1]["lr"], epoch
    # Epochs 1-4 of the resumed run followed the 4-epoch schedule, whose last step is at a hundredth:
    # the stretch starts after the resume.
    assert float(resumed_rows[3]["lr"]) == pytest.approx(base * 0.01, rel=1e-5)


def test_patience_one_stops_after_the_first_epoch_without_improvement(single_weeks, tmp_path, capsys):
    """--lr 0: the weights never change, so the second epoch's validation Dice equals the first
    and cannot beat it; with --patience 1 the run stops there, not at --epochs 5."""
    run_dir = tmp_path / "run"
    stdout = trained(capsys, single_weeks, run_dir, "--epochs", 5, "--patience", 1, "--lr", 0, *FP32)
    rows = assert_finished_with_finite_losses(run_dir, epochs=2)
    assert rows[0]["mean_fg_dice"] == rows[1]["mean_fg_dice"]
    assert "Early stopping" in stdout and "(early stop)" in stdout
    last = load(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["epochs_without_improvement"] == 1 and last["best_epoch"] == 1


@pytest.mark.parametrize("argv, noted", [([], True), (["--patch-size", "64", "64", "32"], False),
                                         (["--channels", "16", "32", "64", "128"], False)])
def test_the_banner_points_a_cpu_run_at_the_default_sizes_to_the_demo_settings(argv, noted, capsys):
    split = {"train": ["006"], "val": ["004"], "test": ["005"]}
    args = train.get_args(["--out", "unused", *argv])
    args.spacing_source, args.roi_size = "given", None
    train.print_banner(args, train.Context(torch.device("cpu")), split, 3, 3)
    out = capsys.readouterr().out
    assert ("note: the default sizes (whole volumes, widths 32-64-128-256) are for a GPU" in out) is noted, out
    if noted:
        assert ("--spatial-size 96 96 48 --patch-size 64 64 32 --channels 16 32 64 128 --lr 3e-3 --epochs 12 "
                "--steps-per-epoch 25 --val-every 6 --warmup-steps 25 --deep-supervision") in out
    # on a GPU the defaults are what to use: no note
    train.print_banner(args, train.Context(torch.device("cuda", 0)), split, 3, 3)
    assert "note: the default sizes" not in capsys.readouterr().out
