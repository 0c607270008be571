"""Figures: training curves, best slice per class, three-plane overviews, Dice box plots.

Volumes are shown in radiological convention: arrays are reoriented to LPS, axial slices show
anterior at the top and the patient's left on the image's right.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

CLASS_COLOURS = ["#00000000", "#f4a582", "#e6c229", "#4393c3", "#1b9e77", "#d6604d"]


def class_colours(num_classes: int) -> list[str]:
    extra = [matplotlib.colors.to_hex(plt.cm.tab10(i)) for i in range(max(0, num_classes - len(CLASS_COLOURS)))]
    return (CLASS_COLOURS + extra)[:num_classes]


def overlay_cmap(num_classes: int) -> ListedColormap:
    colours = class_colours(num_classes)
    return ListedColormap(["#00000000"] + colours[1:])


def legend_handles(class_names: Sequence[str]) -> list[Patch]:
    colours = class_colours(len(class_names))
    return [Patch(facecolor=colours[c], edgecolor="k", label=name) for c, name in enumerate(class_names) if c > 0]


def to_lps(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt("LPS"))
    return nib.orientations.apply_orientation(volume, transform)


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    return volume[:, :, z].T  # rows: anterior -> posterior; columns: right -> left


def show_overlay(ax, image_slice, label_slice, num_classes, title, aspect=1.0):
    ax.imshow(image_slice, cmap="gray", aspect=aspect, interpolation="nearest")
    if label_slice is not None:
        masked = np.ma.masked_where(label_slice == 0, label_slice)
        ax.imshow(masked, cmap=overlay_cmap(num_classes), vmin=0, vmax=num_classes - 1, alpha=0.55,
                  interpolation="nearest", aspect=aspect)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def save_case_figures(image: np.ndarray, target: np.ndarray | None, prediction: np.ndarray, affine: np.ndarray,
                      class_names: Sequence[str], folder: Path, case_id: str) -> None:
    """``<case>_best_slices.png`` (per foreground class: image, ground truth, prediction on the
    axial slice where the class is largest) and ``<case>_overview.png`` (three planes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_classes = len(class_names)
    image = to_lps(np.asarray(image, dtype=np.float32), affine)
    prediction = to_lps(prediction, affine)
    target = to_lps(target, affine) if target is not None else None
    low, high = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    reference = target if target is not None else prediction

    columns = 3 if target is not None else 2
    fig, axes = plt.subplots(num_classes - 1, columns, figsize=(3.0 * columns, 2.9 * (num_classes - 1)),
                             squeeze=False)
    for row, c in enumerate(range(1, num_classes)):
        area = (reference == c).sum(axis=(0, 1))
        z = int(area.argmax()) if area.max() > 0 else reference.shape[2] // 2
        panels = [("image", None)] + ([("ground truth", target)] if target is not None else []) + [
            ("prediction", prediction)]
        for col, (title, labels) in enumerate(panels):
            show_overlay(axes[row, col], axial(image, z), None if labels is None else axial(labels, z),
                         num_classes, f"{class_names[c]}: {title} (z={z})")
    fig.legend(handles=legend_handles(class_names), loc="lower center", ncol=num_classes - 1, fontsize=8)
    fig.suptitle(case_id)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(folder / f"{case_id}_best_slices.png", dpi=90)
    plt.close(fig)

    centre = centre_of(reference, class_id=num_classes - 1)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    slices = [(image[:, :, centre[2]].T, prediction[:, :, centre[2]].T, "axial"),
              (np.flipud(image[:, centre[1], :].T), np.flipud(prediction[:, centre[1], :].T), "coronal"),
              (np.flipud(image[centre[0], :, :].T), np.flipud(prediction[centre[0], :, :].T), "sagittal")]
    for ax, (image_slice, label_slice, name) in zip(axes, slices):
        show_overlay(ax, image_slice, label_slice, num_classes, f"{name} (prediction)")
    fig.legend(handles=legend_handles(class_names), loc="lower center", ncol=num_classes - 1, fontsize=8)
    fig.suptitle(case_id)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(folder / f"{case_id}_overview.png", dpi=90)
    plt.close(fig)


def centre_of(labels: np.ndarray, class_id: int) -> tuple[int, int, int]:
    coordinates = np.argwhere(labels == class_id)
    if coordinates.size == 0:
        return tuple(s // 2 for s in labels.shape)
    return tuple(int(v) for v in coordinates.mean(axis=0).round())


def save_dice_boxplot(dice: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [dice[:, c][np.isfinite(dice[:, c])] for c in range(1, len(class_names))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot(data, tick_labels=list(class_names[1:]))
    ax.set_ylabel("3D Dice per volume")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Per-class Dice over {dice.shape[0]} volume(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_training_curves(metrics_csv: Path, class_names: Sequence[str], path: Path) -> None:
    """Loss (train, validation) and per-class Dice (train dashed, validation solid) per epoch."""
    with open(metrics_csv) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]

    def column(name):
        return [float(r[name]) if r.get(name) not in (None, "", "nan") else np.nan for r in rows]

    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_ax.plot(epochs, column("train_loss"), label="train")
    loss_ax.plot(epochs, column("val_loss"), label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    colours = class_colours(len(class_names))
    colours[0] = "#444444"  # background: visible on white
    for c, name in enumerate(class_names):
        dice_ax.plot(epochs, column(f"dice_{name}"), color=colours[c], label=f"{name} (val)")
        dice_ax.plot(epochs, column(f"train_dice_{name}"), color=colours[c], linestyle="--", alpha=0.7)
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylabel("3D Dice")
    dice_ax.set_ylim(0, 1.02)
    dice_ax.set_title("Per-class Dice (solid: validation, dashed: train)")
    dice_ax.legend(fontsize=7, ncol=2, loc="lower right")
    dice_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_uncertainty_figure(image: np.ndarray, entropy: np.ndarray, affine: np.ndarray, path: Path,
                            prediction: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                            title: str | None = None) -> int:
    """The axial slice with the most uncertainty (largest summed entropy): the image with the
    normalised entropy ``(X, Y, Z)`` in [0, 1] over it and a colour bar, and, when ``prediction``
    and ``class_names`` are given, the predicted labels beside it on the same slice so the
    reviewer sees which contour the uncertainty belongs to. Returns the slice's index in the
    LPS-reoriented volume (the ``z=`` in the panel titles)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = to_lps(np.asarray(image, dtype=np.float32), affine)
    entropy = to_lps(np.asarray(entropy, dtype=np.float32), affine)
    low, high = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    z = int(entropy.sum(axis=(0, 1)).argmax())
    show_labels = prediction is not None and class_names is not None

    fig, axes = plt.subplots(1, 2 if show_labels else 1, figsize=(8.4 if show_labels else 4.6, 4.0), squeeze=False)
    if show_labels:
        show_overlay(axes[0, 0], axial(image, z), axial(to_lps(prediction, affine), z), len(class_names),
                     f"prediction (z={z})")
        fig.legend(handles=legend_handles(class_names), loc="lower center", ncol=len(class_names) - 1, fontsize=8)
    ax = axes[0, -1]
    ax.imshow(axial(image, z), cmap="gray", interpolation="nearest")
    # near-zero entropy left transparent: the confident anatomy stays visible under the map
    heat = ax.imshow(np.ma.masked_less(axial(entropy, z), 0.02), cmap="inferno", vmin=0, vmax=1, alpha=0.8,
                     interpolation="nearest")
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04, label="normalised entropy")
    ax.set_title(f"uncertainty (z={z})", fontsize=9)
    ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if show_labels else 0, 1, 0.95 if title else 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return z
