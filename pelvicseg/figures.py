"""Figures: training curves, best slice per class, three-plane overviews, uncertainty maps, Dice box plots.

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
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from pelvicseg.atomic import atomic_path  # noqa: E402
from pelvicseg.palette import class_colours  # noqa: E402


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
    save_figure(fig, folder / f"{case_id}_best_slices.png", dpi=90)
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
    save_figure(fig, folder / f"{case_id}_overview.png", dpi=90)
    plt.close(fig)


def save_figure(fig, path: Path, dpi: int) -> None:
    """``fig.savefig`` through atomic.atomic_path: a PNG appears whole or not at all."""
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=dpi)


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
    save_figure(fig, path, dpi=100)
    plt.close(fig)


# Litres and hundreds of ml: on one axis with them the bladder, rectum and prostate (tens of ml)
# would be flat lines, so these get a panel of their own scale.
LARGE_CLASSES = ("body", "bone")
FLAG_COLOUR = "#b2182b"  # the report's review colour


def save_volume_timeline(weeks: Sequence[int], volumes: dict[str, Sequence[float]], class_names: Sequence[str],
                         path: Path, title: str = "", flagged: dict[str, Sequence[bool]] | None = None) -> None:
    """One patient's predicted organ volumes (ml) over the weeks, one line per organ in its class
    colour: the organs on the left, body and bone (``LARGE_CLASSES``) on a right panel of their own
    scale. ``volumes`` and ``flagged``: {organ: one value per week}; flagged weeks get a ring in
    the report's review colour."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colours = dict(zip(class_names, class_colours(len(class_names))))
    groups = [[o for o in volumes if o not in LARGE_CLASSES], [o for o in volumes if o in LARGE_CLASSES]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 + 2.6 * (len(groups) - 1), 2.9), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1][:len(groups)]})
    for ax, organs in zip(axes[0], groups):
        for organ in organs:
            ax.plot(weeks, volumes[organ], marker="o", markersize=4, color=colours[organ], label=organ)
            rings = [(w, v) for w, v, f in zip(weeks, volumes[organ], (flagged or {}).get(organ, ())) if f]
            if rings:
                ax.scatter(*zip(*rings), s=90, facecolors="none", edgecolors=FLAG_COLOUR, linewidths=1.5, zorder=3)
        ax.set_xticks(list(weeks))
        ax.set_xlabel("week", fontsize=8)
        ax.set_ylabel("predicted volume (ml)", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if flagged and any(any(f) for f in flagged.values()):
        axes[0, 0].scatter([], [], s=60, facecolors="none", edgecolors=FLAG_COLOUR, label="flagged")
        axes[0, 0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def save_training_curves(metrics_csv: Path, class_names: Sequence[str], path: Path) -> None:
    """Loss (train, validation) and per-class Dice (train dashed, validation solid) per epoch, and
    validation Dice against wall time (metrics.csv's elapsed_seconds): the time to accuracy.
    Validation lines join the validated epochs only (the others' validation columns are empty)."""
    with open(metrics_csv) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = np.array([int(r["epoch"]) for r in rows])

    def column(name):
        return np.array([float(r[name]) if r.get(name) not in (None, "", "nan") else np.nan for r in rows])

    validated = np.array([r.get("val_loss") not in (None, "") for r in rows])
    has_time = all(r.get("elapsed_seconds") not in (None, "") for r in rows)
    fig, axes = plt.subplots(1, 3 if has_time else 2, figsize=(18 if has_time else 12, 4.5))
    loss_ax, dice_ax = axes[0], axes[1]
    loss_ax.plot(epochs, column("train_loss"), label="train")
    loss_ax.plot(epochs[validated], column("val_loss")[validated], marker=".", label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    colours = class_colours(len(class_names))
    colours[0] = "#444444"  # background: visible on white
    for c, name in enumerate(class_names):
        dice_ax.plot(epochs[validated], column(f"dice_{name}")[validated], color=colours[c], marker=".",
                     label=f"{name} (val)")
        dice_ax.plot(epochs, column(f"train_dice_{name}"), color=colours[c], linestyle="--", alpha=0.7)
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylabel("3D Dice")
    dice_ax.set_ylim(0, 1.02)
    dice_ax.set_title("Per-class Dice (solid: validation, dashed: train)")
    dice_ax.legend(fontsize=7, ncol=2, loc="lower right")
    dice_ax.grid(alpha=0.3)
    if has_time:
        time_ax = axes[2]
        minutes = column("elapsed_seconds") / 60
        for c, name in enumerate(class_names[1:], start=1):
            time_ax.plot(minutes[validated], column(f"dice_{name}")[validated], color=colours[c], marker=".",
                         label=name)
        time_ax.set_xlabel("wall time since the run started (min)")
        time_ax.set_ylabel("validation 3D Dice")
        time_ax.set_ylim(0, 1.02)
        time_ax.set_title("Validation Dice against wall time")
        time_ax.legend(fontsize=7, loc="lower right")
        time_ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


ENTROPY_SHOWN_FROM = 0.02  # normalised entropy below this is drawn as the grey image: certain


def uncertainty_slice(entropy: np.ndarray, prediction: np.ndarray | None = None,
                      num_classes: int | None = None,
                      scores: Sequence[float] | None = None) -> tuple[int, int | None, float | None]:
    """The axial slice the uncertainty figure shows, for arrays whose third axis is axial:
    ``(z, organ, score)``.

    With ``prediction``: the foreground organ with the highest score (the one a reviewer should
    look at first): ``scores`` where given (per class, the case's review scores, so the figure
    shows the organ the flags are about), else ``uncertainty.organ_uncertainty``'s boundary-band
    entropy; and among the slices through its predicted
    mask the one holding the most entropy on the organ's boundary band, where that score comes
    from (summed, so a full cut through the organ beats a two-voxel tip). The first and last
    slices are skipped when the organ reaches others: there the body runs out of the field of
    view and the network sees padding, so their entropy says little about any contour. Where the
    band holds no entropy at all, the organ's centre slice. Without ``prediction`` (or with no
    foreground predicted): the slice with the largest summed entropy, again not the first or last
    one, organ and score None.
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    if prediction is not None:
        from pelvicseg.uncertainty import organ_uncertainty  # torch only when a prediction is shown

        prediction = np.asarray(prediction)
        num_classes = int(prediction.max()) + 1 if num_classes is None else num_classes
        scores = (organ_uncertainty(entropy, prediction, num_classes) if scores is None
                  else np.asarray(scores, dtype=np.float64))
        # an organ not predicted has no slice to show, whatever its score
        present = np.bincount(prediction.reshape(-1).astype(np.int64), minlength=len(scores))[:len(scores)] > 0
        scores = np.where(present, scores, np.nan)
        if np.isfinite(scores[1:]).any():
            organ = int(np.nanargmax(np.where(np.isfinite(scores), scores, -np.inf)[1:])) + 1
            mask = prediction == organ
            band = _boundary_band(mask)
            present = np.flatnonzero(mask.any(axis=(0, 1)))
            interior = present[(present > 0) & (present < mask.shape[2] - 1)]
            candidates = interior if interior.size else present
            per_slice = np.where(band, entropy, 0.0).sum(axis=(0, 1))[candidates]
            if per_slice.max() > 0:
                z = int(candidates[per_slice.argmax()])
            else:
                centre = np.argwhere(mask)[:, 2].mean()
                z = int(candidates[np.abs(candidates - centre).argmin()])
            return z, organ, float(scores[organ])
    per_slice = entropy.sum(axis=(0, 1))
    first = 1 if per_slice.size > 2 else 0
    return first + int(per_slice[first:per_slice.size - first].argmax()), None, None


def _boundary_band(mask: np.ndarray) -> np.ndarray:
    """The voxels within one voxel (6-connected) of the mask's contour, inside and outside; the
    array's edge is not a contour (as in ``uncertainty.organ_uncertainty``)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_dilation(mask, structure) & ~ndimage.binary_erosion(mask, structure, border_value=1)


def entropy_cmap() -> ListedColormap:
    """Inferno without its near-black start, which would read as dark anatomy on the grey image;
    values below the shown range (``set_under``) are the grey of the image under them."""
    return ListedColormap(plt.cm.inferno(np.linspace(0.15, 1.0, 256)), name="entropy").with_extremes(
        under="#8c8c8c", bad=(0, 0, 0, 0))


def _in_plane_box(prediction: np.ndarray | None, shape, margin: int = 4) -> tuple[slice, slice]:
    """Rows and columns of the axial slice around the predicted body (its largest connected part,
    so stray voxels at the field of view's edge do not undo the crop), a few voxels wider."""
    if prediction is None or not (prediction > 0).any():
        return slice(None), slice(None)
    from scipy import ndimage

    parts, count = ndimage.label(prediction > 0)
    body = parts == (np.bincount(parts.ravel())[1:].argmax() + 1) if count > 1 else parts > 0
    xs, ys = np.flatnonzero(body.any(axis=(1, 2))), np.flatnonzero(body.any(axis=(0, 2)))
    return (slice(max(int(ys[0]) - margin, 0), min(int(ys[-1]) + margin + 1, shape[1])),
            slice(max(int(xs[0]) - margin, 0), min(int(xs[-1]) + margin + 1, shape[0])))


def save_uncertainty_figure(image: np.ndarray, entropy: np.ndarray, affine: np.ndarray, path: Path,
                            prediction: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                            title: str | None = None, scores: Sequence[float] | None = None) -> int:
    """The axial slice through the most uncertain organ (``uncertainty_slice``), cropped to the
    predicted body: the predicted labels on the image, and beside them the normalised entropy
    ``(X, Y, Z)`` in [0, 1] over the image in grey with that organ's predicted contour, so the
    reviewer sees which contour the uncertainty belongs to. Entropy below ``ENTROPY_SHOWN_FROM``
    is not drawn (the colour bar's grey end says so). Without ``prediction`` and ``class_names``:
    the entropy panel alone, on the slice with the largest summed entropy. Returns the slice's
    index in the LPS-reoriented volume (the ``z=`` in the panel titles)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = to_lps(np.asarray(image, dtype=np.float32), affine)
    entropy = to_lps(np.asarray(entropy, dtype=np.float32), affine)
    low, high = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    show_labels = prediction is not None and class_names is not None
    labels = to_lps(np.asarray(prediction), affine) if show_labels else None
    z, organ, score = uncertainty_slice(entropy, labels, len(class_names) if show_labels else None, scores)
    rows, columns = _in_plane_box(labels, image.shape)

    def crop(volume):
        return axial(volume, z)[rows, columns]

    # the colour bar in a column of its own, so both image panels get the same size
    panels = 2 if show_labels else 1
    fig, axes = plt.subplots(1, panels + 1, figsize=(4.3 * panels + 1.1, 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * panels + [0.05]})
    bar_axis, axes = axes[0, -1], axes[:, :-1]
    handles = []
    if show_labels:
        show_overlay(axes[0, 0], crop(image), crop(labels), len(class_names), f"prediction (z={z})")
        handles = legend_handles(class_names)
    ax = axes[0, -1]
    # the image dimmed to mid grey, so no anatomy is as bright as the top of the colour scale
    ax.imshow(crop(image), cmap="gray", vmin=0, vmax=1 / 0.6, interpolation="nearest")
    shown = np.ma.masked_less(crop(entropy), ENTROPY_SHOWN_FROM)
    heat = ax.imshow(shown, cmap=entropy_cmap(), vmin=ENTROPY_SHOWN_FROM, vmax=1, interpolation="nearest")
    bar = fig.colorbar(heat, cax=bar_axis, extend="min", extendfrac=0.06)
    bar.set_label(f"normalised entropy\n(grey: below {ENTROPY_SHOWN_FROM:g}, not drawn)", fontsize=8)
    if organ is not None:
        contour_mask = crop(labels) == organ
        if contour_mask.any() and not contour_mask.all():
            ax.contour(contour_mask, levels=[0.5], colors="#00e5ff", linewidths=0.9)
        handles.append(Line2D([], [], color="#00e5ff", linewidth=1.5,
                              label=f"predicted {class_names[organ]} (most uncertain, {score:.3f})"))
        ax.set_title(f"uncertainty (z={z}) through {class_names[organ]}", fontsize=9)
    else:
        ax.set_title(f"uncertainty (z={z})", fontsize=9)
    ax.axis("off")
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    bottom = (0.12 if len(handles) > 4 else 0.07) if handles else 0
    fig.tight_layout(rect=(0, bottom, 1, 0.95 if title else 1))
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return z
