"""Export a trained model (or an ensemble) as a MONAI Bundle that runs without this repository.

    python export.py --checkpoint runs/demo --out bundles/hipmri_unet
    python export.py --checkpoint runs/fold0 runs/fold1 runs/fold2 --out bundles/hipmri_ensemble
    python -m monai.bundle run --config_file bundles/hipmri_unet/configs/inference.json \
        --dataset_dir scans/ --output_dir labels/

The bundle (MONAI Bundle specification):

    configs/metadata.json    versions, classes, spacing, training data, network_data_format
    configs/inference.json   load -> LPS -> spacing -> percentiles -> Gaussian sliding window ->
                             softmax -> input's grid -> arg-max -> largest components -> NIfTI
    models/model.pt          state dict of the network in inference.json's network_def
    models/model.ts          TorchScript (traced), configs embedded as extra files
    models/model.onnx        ONNX, dynamic batch and spatial axes (multiples of 16)
    scripts/modules.py       the network, copied from modules.py (it imports no project module)
    scripts/hipmri.py        the project's preprocessing and back-to-the-grid code, generated
    docs/README.md           how to run it

scripts/hipmri.py is generated at export time from the project's own source: the bundle's
components (pelvicseg/bundle_components.py) and, recursively, every project function, class and
constant they use, with the imports those need. Keeping a hand-made second copy in the repository
would drift from dataset.py and inference.py as they change; generated, the bundle always carries
what predict.py runs today, and a dependency that cannot be carried stops the export.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import errno
import graphlib
import importlib
import inspect
import json
import os
import shutil
import subprocess
import symtable
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

import dataset
from pelvicseg import bundle_components as components
from pelvicseg.checkpoint import file_sha256, load_checkpoint
from pelvicseg.cli import run_cli
from pelvicseg.errors import CheckpointError, DataError, ExportError, WriteError
from pelvicseg.inference import (ONNX_OPSET, PREDICTION_OVERLAP, TRACE_SHAPE, Member, export_onnx, load_members,
                                 postprocessing_for, quiet_tracing)
from modules import ImprovedUNet3D

PROJECT = Path(__file__).resolve().parent
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# Project modules the bundle carries whole (scripts/<name>.py) and imports relatively.
WHOLE_MODULES = ("modules",)
SW_BATCH_SIZE = 2  # inference.predict_probabilities' default
NETWORK_MULTIPLE = 2 ** ImprovedUNet3D.depth
# TorchScript and ONNX are checked against the eager network at export, on a batch of 2 with three
# different spatial sizes, none the traced one: the dynamic axes are exercised, not assumed.
CHECK_SHAPE = (2, 1, 48, 32, 16)
EXPORT_TOLERANCE = 1e-3  # relative to the largest logit
REFERENCES = [
    "Cicek et al., 3D U-Net: learning dense volumetric segmentation from sparse annotation, MICCAI 2016",
    "Isensee et al., Brain tumor segmentation and radiomics survival prediction, BrainLes 2017",
    "Oktay et al., Attention U-Net: learning where to look for the pancreas, MIDL 2018",
    "Wu and He, Group normalization, ECCV 2018",
]
NOT_CLINICAL = ("Research and education only. Not for clinical use: not a medical device, not validated for "
                "diagnosis or treatment planning, and figures measured on the project's synthetic phantom are "
                "not results on patient data.")


# MONAI's run applies configs/logging.conf when there is one: the evaluator's log lines on stdout.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export trained checkpoints (one model or an ensemble) as a MONAI "
                                     "Bundle that runs with MONAI alone: python -m monai.bundle run --config_file "
                                     "OUT/configs/inference.json --dataset_dir IN --output_dir LABELS")
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="best.pt/last.pt files or run folders written by train.py; several are exported as an "
                        "ensemble (their probabilities are averaged, as predict.py does)")
    parser.add_argument("--out", required=True, help="the bundle folder to write")
    parser.add_argument("--version", default="0.1.0", help="the bundle's version in metadata.json")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="leave out the largest-component post-processing decided on the validation patients")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- scripts/hipmri.py

def project_module(name: str) -> ModuleType | None:
    """The module when ``name`` is one of this repository's own, else None (a dependency)."""
    root = name.split(".")[0]
    if (PROJECT / f"{root}.py").is_file() or (PROJECT / root / "__init__.py").is_file():
        return importlib.import_module(name)
    return None


def bound_names(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds in its module."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {alias.asname or alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
        return {name for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)
                for name in bound_names(child)}
    return set()


def free_names(source: str) -> set[str]:
    """Global names a piece of module-level source uses but does not define itself (annotations
    are never evaluated under ``from __future__ import annotations``, so they are not uses)."""
    table = symtable.symtable("from __future__ import annotations\n" + source, "<piece>", "exec")
    defined = {s.get_name() for s in table.get_symbols() if s.is_local()}
    names: set[str] = set()

    def visit(scope) -> None:
        for symbol in scope.get_symbols():
            if symbol.is_referenced() and symbol.is_global() and not symbol.is_local():
                names.add(symbol.get_name())
        for child in scope.get_children():
            visit(child)

    visit(table)
    return names - defined


class ModuleSource:
    """A project module's source and which top-level statement binds each name."""

    def __init__(self, module: ModuleType):
        self.module, self.name = module, module.__name__
        self.source = inspect.getsource(module)
        self.lines = self.source.splitlines(keepends=True)
        self.bindings: dict[str, ast.stmt] = {}
        for node in ast.parse(self.source).body:
            for name in bound_names(node):
                self.bindings[name] = node

    def piece(self, node: ast.stmt) -> str:
        """The statement's source with its decorators and the comment lines right above it."""
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and self.lines[start - 1].lstrip().startswith("#"):
            start -= 1
        return "".join(self.lines[start:node.end_lineno])


class ScriptsBuilder:
    """Collects ``roots`` and everything of the project they use, transitively: project functions,
    classes and constants as source, third-party names as import statements."""

    def __init__(self):
        self.sources: dict[str, ModuleSource] = {}
        self.pieces: dict[tuple[str, int], str] = {}
        self.imports: dict[str, set[str]] = {}  # "from X" -> names, or "import" -> statements
        self.owner: dict[str, str] = {}  # bound name -> where it comes from, to catch clashes
        self.order = graphlib.TopologicalSorter()

    def source_of(self, module: ModuleType) -> ModuleSource:
        if module.__name__ not in self.sources:
            self.sources[module.__name__] = ModuleSource(module)
            self.order.add(module.__name__)
        return self.sources[module.__name__]

    def claim(self, name: str, origin: str) -> None:
        if self.owner.setdefault(name, origin) != origin:
            raise ExportError(f"scripts/hipmri.py would define {name} twice ({self.owner[name]} and {origin}); "
                              "rename one of them in the project")

    def need(self, module: ModuleType, name: str, wanted_by: str) -> None:
        source = self.source_of(module)
        node = source.bindings.get(name)
        if node is None:
            if hasattr(builtins, name):
                return
            raise ExportError(f"{module.__name__}: {name} (used by {wanted_by}) is not defined at module level")
        if isinstance(node, ast.ImportFrom):
            self.need_import_from(module, node, name, wanted_by)
        elif isinstance(node, ast.Import):
            alias = next(a for a in node.names if (a.asname or a.name.split(".")[0]) == name)
            if project_module(alias.name) is not None:
                raise ExportError(f"{module.__name__}: 'import {alias.name}' imports a project module whole; "
                                  f"import the names {wanted_by} needs from it instead")
            statement = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
            self.claim(name, statement)
            self.imports.setdefault("import", set()).add(statement)
        else:
            key = (module.__name__, node.lineno)
            if key in self.pieces:
                return
            for bound in bound_names(node):
                self.claim(bound, f"{module.__name__}.{bound}")
            self.pieces[key] = source.piece(node)
            for used in sorted(free_names(self.pieces[key])):
                self.need(module, used, f"{module.__name__}.{name}")

    def need_import_from(self, module: ModuleType, node: ast.ImportFrom, name: str, wanted_by: str) -> None:
        alias = next(a for a in node.names if (a.asname or a.name) == name)
        if node.module == "__future__":
            return
        if node.level:
            raise ExportError(f"{module.__name__}: relative imports are not carried into the bundle")
        target = project_module(node.module)
        if target is None or node.module in WHOLE_MODULES:
            origin = ("." if target is not None else "") + node.module
            self.claim(name, f"{origin}.{alias.name}")
            self.imports.setdefault(origin, set()).add(alias.name + (f" as {alias.asname}" if alias.asname else ""))
            return
        if alias.asname and alias.asname != alias.name:
            raise ExportError(f"{module.__name__}: 'from {node.module} import {alias.name} as {alias.asname}' is "
                              "not carried into the bundle (one name per object)")
        self.order.add(module.__name__, target.__name__)
        self.need(target, alias.name, wanted_by)

    def render(self, header: str, exported: Sequence[str]) -> str:
        modules = []
        self.order.prepare()
        while self.order.is_active():
            ready = sorted(self.order.get_ready())  # by name where the dependencies leave a choice
            modules += ready
            self.order.done(*ready)
        lines = [header, "from __future__ import annotations", ""]
        lines += sorted(self.imports.get("import", ()))
        lines += [f"from {origin} import {', '.join(sorted(names))}"
                  for origin, names in sorted(self.imports.items()) if origin != "import"]
        for module_name in modules:
            keys = sorted(k for k in self.pieces if k[0] == module_name)
            if keys:
                lines += ["", "", f"# {'-' * 77} from {module_name.replace('.', '/')}.py"]
                for key in keys:
                    lines += ["", "", self.pieces[key].rstrip("\n")]
        lines += ["", "", f"__all__ = {sorted(exported)!r}", ""]
        text = "\n".join(lines)
        undefined = free_names(text) - set(dir(builtins))
        if undefined:
            raise ExportError(f"scripts/hipmri.py would use undefined names: {', '.join(sorted(undefined))}")
        compile(text, "scripts/hipmri.py", "exec")
        return text


def hipmri_script() -> str:
    """scripts/hipmri.py: the names in components.__all__ and all the project code behind them."""
    builder = ScriptsBuilder()
    for name in components.__all__:
        builder.need(components, name, "configs/inference.json")
    header = ('"""Generated by export.py from this project\'s own source (pelvicseg/bundle_components.py and\n'
              'every function, class and constant of the project it uses), so that the bundle runs\n'
              'without the repository. Edits here are lost when the bundle is exported again."""\n')
    return builder.render(header, components.__all__)


def whole_module_script(name: str) -> str:
    """A project module copied verbatim, after checking that it imports no other project module."""
    module = importlib.import_module(name)
    source = inspect.getsource(module)
    for node in ast.walk(ast.parse(source)):
        imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for imported_name in imported:
            if node.__class__ is ast.ImportFrom and node.level or project_module(imported_name) is not None:
                raise ExportError(f"{name}.py imports the project module {imported_name}: it cannot be copied "
                                  "into the bundle alone")
    return source


# ----------------------------------------------------------------------------- configs

def config_value(value):
    """A transform argument as the bundle config writes it (dtypes as expressions)."""
    if isinstance(value, torch.dtype):
        return f"$torch.{str(value).replace('torch.', '')}"
    if isinstance(value, type) and issubclass(value, np.generic):
        return f"$np.{np.dtype(value).name}"
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [config_value(v) for v in value]
    return value


def preprocessing_config(spacing: Sequence[float], num_classes: int) -> list[dict]:
    """dataset.preprocessing's transforms, read from the Compose the project builds, as bundle
    config for the image alone: a transform changed there changes the bundle, and one this
    function does not know stops the export instead of being left out."""
    written = []
    from monai import transforms as mt
    for transform in dataset.preprocessing(spacing, num_classes).transforms:
        if isinstance(transform, dataset.LoadValidated):
            entry = {"_target_": "$@scripts.LoadValidated", "keys": ["image"], "num_classes": transform.num_classes}
        elif isinstance(transform, dataset.ResampleToSpacingd):
            entry = {"_target_": "$@scripts.ResampleToSpacingd", "spacing": "@spacing"}
            if hasattr(transform, "num_classes"):
                entry["num_classes"] = transform.num_classes
            if not np.allclose(transform.spacing, spacing):
                raise ExportError(f"dataset.preprocessing resamples to {transform.spacing}, not {list(spacing)}")
        elif isinstance(transform, mt.EnsureChannelFirstd):
            entry = {"_target_": "EnsureChannelFirstd", "keys": ["image"],
                     "channel_dim": transform.adjuster.input_channel_dim}
        elif isinstance(transform, mt.Orientationd):
            entry = {"_target_": "Orientationd", "keys": ["image"], "axcodes": transform.ornt_transform.axcodes,
                     "labels": config_value(transform.ornt_transform.labels)}
        elif isinstance(transform, mt.ScaleIntensityRangePercentilesd):
            scaler = transform.scaler
            entry = {"_target_": "ScaleIntensityRangePercentilesd", "keys": ["image"], "lower": scaler.lower,
                     "upper": scaler.upper, "b_min": scaler.b_min, "b_max": scaler.b_max, "clip": scaler.clip,
                     "relative": scaler.relative, "channel_wise": scaler.channel_wise,
                     "dtype": config_value(scaler.dtype)}
        elif isinstance(transform, mt.EnsureTyped):
            entry = {"_target_": "EnsureTyped", "keys": ["image"], "dtype": config_value(transform.dtype[0]),
                     "track_meta": transform.converter.track_meta}
        else:
            raise ExportError(f"dataset.preprocessing has a {type(transform).__name__}, which export.py does not "
                              "know how to write into the bundle")
        if "image" not in transform.keys:
            raise ExportError(f"dataset.preprocessing's {type(transform).__name__} does not act on the image")
        written.append(entry)
    return written


def bundle_root_expression() -> str:
    """The bundle's own folder, from the --config_file given to ``python -m monai.bundle``
    (CONFIG/../), so the bundle runs from any working directory; without one on the command line
    (the API called from Python) the working directory, the Model Zoo's "." default. An explicit
    --bundle_root always wins."""
    given = ("next((a.split('=', 1)[1] if '=' in a else sys.argv[i + 1] for i, a in enumerate(sys.argv) "
             "if a.split('=', 1)[0] in ('--config_file', '--config-file')), 'configs/inference.json')")
    return f"$os.path.dirname(os.path.dirname(os.path.abspath({given})))"


def inference_config(members: Sequence[Member], class_names: Sequence[str], spacing, roi_size, overlap: float,
                     largest_component: Sequence[str]) -> dict:
    ensemble = len(members) > 1
    if ensemble:
        network_def = {"_target_": "$@scripts.SoftmaxEnsemble", "members": [dict(m.model_args) for m in members]}
        inferer = {"_target_": "$@scripts.EnsembleSlidingWindowInferer", "roi_size": "@roi_size",
                   "overlap": "@overlap", "sw_batch_size": SW_BATCH_SIZE, "mode": "gaussian"}
        probabilities = []  # the ensemble inferer returns the averaged softmax already
    else:
        network_def = {"_target_": "$@scripts.ImprovedUNet3D", **dict(members[0].model_args)}
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": SW_BATCH_SIZE,
                   "overlap": "@overlap", "mode": "gaussian"}
        probabilities = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    return {
        "imports": ["$import os", "$import sys", "$from importlib import import_module as load_module"],
        "bundle_root": bundle_root_expression(),
        # The bundle's scripts/ package on the path before any component needs it (MONAI adds the
        # bundle root only once run() starts, and verify_net_in_out never does). Expressions with
        # references must not contain the word "import": MONAI would parse them as import statements.
        "scripts_path": "$sys.path.insert(0, @bundle_root)",
        "scripts": "$@scripts_path or load_module('scripts.hipmri')",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$@scripts.images_in(@dataset_dir)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "class_names": list(class_names),
        "spacing": [float(s) for s in spacing],
        "roi_size": [int(r) for r in roi_size],
        "overlap": overlap,
        "largest_component": list(largest_component),
        "largest_component_classes": "$[@class_names.index(name) for name in @largest_component]",
        "num_workers": 0,
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose",
                          "transforms": preprocessing_config(spacing, len(class_names))},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': path} for path in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": probabilities + [
            {"_target_": "$@scripts.ToSourceGridd", "keys": "pred", "reference_key": "image"},
            {"_target_": "$@scripts.LabelsFromProbabilitiesd", "keys": "pred"},
            {"_target_": "$@scripts.KeepLargestComponentd", "keys": "pred", "classes": "@largest_component_classes"},
            {"_target_": "$@scripts.SaveLabelsd", "keys": "pred", "output_dir": "@output_dir",
             "reference_key": "image"},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("nibabel", "scipy", "pytorch-ignite", "fire"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed at export"
    return found


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else None


def metadata(members: Sequence[Member], states: Sequence[dict], class_names: Sequence[str], spacing, roi_size,
             overlap: float, postprocessing: dict, version: str) -> dict:
    import monai
    config = members[0].config
    ensemble = len(members) > 1
    channels = {str(c): name for c, name in enumerate(class_names)}
    spatial = [f"{NETWORK_MULTIPLE}*n"] * 3
    output_kind = "mean softmax of the members (probabilities)" if ensemble else "logits (softmax gives probabilities)"
    classes_text = ", ".join(f"{c} {name}" for c, name in enumerate(class_names))
    data_roots = sorted({str(m.config.get("data_root", "unrecorded")) for m in members})
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by export.py from {', '.join(m.path for m in members)}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": package_versions(),
        "name": "HipMRI 3D Improved UNet" + (f" ensemble of {len(members)}" if ensemble else ""),
        "task": f"Segmentation of pelvic T2-weighted MRI into {len(class_names)} classes: {', '.join(class_names)}",
        "description": ("3D UNet with residual double convolutions, attention-gated skip connections, GroupNorm and "
                        "LeakyReLU (ImprovedUNet3D)" + (f"; an ensemble of {len(members)} models whose softmax is "
                                                        "averaged" if ensemble else "")
                        + f". Input reoriented to LPS, resampled to {[round(float(s), 4) for s in spacing]} mm, "
                        "intensities scaled to [0, 1] between the 0.5th and 99.5th percentiles; Gaussian sliding "
                        f"window {list(roi_size)}, overlap {overlap}; probabilities brought back to the "
                        "input's own voxel grid before the arg-max; labels written with the input's affine."),
        "authors": "HipMRI 3D Improved UNet project",
        "copyright": "Copyright (c) the HipMRI 3D Improved UNet project authors",
        "data_source": "; ".join(data_roots),
        "data_type": "nibabel",
        "image_classes": "single-channel T2-weighted pelvic MRI (NIfTI), any orientation and voxel size",
        "label_classes": f"single-channel labels: {classes_text}",
        "pred_classes": f"{len(class_names)} channels, {output_kind}: {classes_text}",
        "eval_metrics": {"validation_mean_foreground_dice": [s.get("best_metric") for s in states]},
        "intended_use": NOT_CLINICAL,
        "references": REFERENCES,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1,
                                 "spatial_shape": spatial, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "probabilities" if ensemble else "logits",
                                 "num_channels": len(class_names), "spatial_shape": spatial, "dtype": "float32",
                                 "value_range": [0, 1] if ensemble else [], "is_patch_data": True,
                                 "channel_def": channels}},
            "post_processed_outputs": {"pred": {"type": "image", "format": "labels", "num_channels": 1,
                                                "spatial_shape": ["*", "*", "*"], "dtype": "uint8",
                                                "value_range": [0, len(class_names) - 1], "is_patch_data": False,
                                                "channel_def": {"0": classes_text}}},
        },
        "class_names": list(class_names),
        "preprocessing": {
            "orientation": dataset.ORIENTATION,
            "spacing_mm": [float(s) for s in spacing],
            "spacing_axes": f"array axes after reorientation to {dataset.ORIENTATION} (x, y, z)",
            "spacing_source": config.get("spacing_source"),
            "resampling": "area averaging when every axis shrinks, else trilinear with Gaussian anti-aliasing; the "
                          "field of view is kept (shape = round(shape x spacing / target))",
            "intensity": "percentiles 0.5 and 99.5 to [0, 1], clipped",
            "roi_size": [int(r) for r in roi_size],
            "overlap": overlap,
            "network_multiple": NETWORK_MULTIPLE,
        },
        "postprocessing": {"largest_component": list(postprocessing.get("largest_component", [])),
                           "rule": postprocessing.get("rule"), "source": postprocessing.get("source")},
        "training": {
            "data_root": data_roots[0] if len(data_roots) == 1 else data_roots,
            "checkpoints": [{"path": m.path, "sha256": file_sha256(m.path), "epoch": s.get("epoch"),
                             "best_validation_mean_foreground_dice": s.get("best_metric"),
                             "split": m.split, "model_args": m.model_args} for m, s in zip(members, states)],
            "exported_from_commit": git_commit(),
        },
    }


def readme(meta: dict, inference: dict, ensemble: bool) -> str:
    spacing = [round(s, 4) for s in meta["preprocessing"]["spacing_mm"]]
    classes = "\n".join(f"| {c} | {name} |" for c, name in enumerate(meta["class_names"]))
    kept = ", ".join(inference["largest_component"]) or "none"
    packages = " ".join(f"{name}=={v}" for name, v in meta["required_packages_version"].items())
    network = "a SoftmaxEnsemble of ImprovedUNet3D, one per member" if ensemble else "ImprovedUNet3D"
    output = ("the mean of the members' softmax (probabilities), per window" if ensemble
              else "logits (apply a softmax over channel 1 for probabilities)")
    return f"""# {meta['name']}

{meta['task']}.

**{NOT_CLINICAL}**

Trained on `{meta['data_source']}`; exported from {', '.join(f'`{c["path"]}`' for c in meta['training']['checkpoints'])}
(commit {meta['training']['exported_from_commit'] or 'unknown'}).

| label | class |
| --- | --- |
{classes}

## Run

Needs MONAI {meta['monai_version']} with PyTorch {meta['pytorch_version']} and
`pip install {packages}`; not the repository it came from.

```bash
python -m monai.bundle run --config_file BUNDLE/configs/inference.json --dataset_dir IN --output_dir OUT
```

Every `.nii`/`.nii.gz` image directly in `IN` gives `OUT/<name>_pred.nii.gz`: uint8 labels on the
input's own voxel grid, with its affine and header. Steps (configs/inference.json): NIfTI load and
checks, reorientation to {meta['preprocessing']['orientation']}, resampling to {spacing} mm (array axes
after reorientation), intensities scaled to [0, 1] between the 0.5th and 99.5th percentiles,
Gaussian sliding window {meta['preprocessing']['roi_size']} (overlap {meta['preprocessing']['overlap']}),
softmax{' averaged over the members' if ensemble else ''}, trilinear resampling of the probabilities
back to the input's grid, arg-max, and the largest connected component kept for: {kept} (decided on
the validation patients). It runs on the first GPU when there is one, else on the CPU, in float32.

The bundle finds its own folder from `--config_file`; run from elsewhere through the Python API, pass
`--bundle_root BUNDLE` (or `bundle_root=`) as for any Model Zoo bundle.

## Check

```bash
cd BUNDLE
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath meta_schema.json
```

`verify_metadata` downloads the schema named in metadata.json to `--filepath` unless that file is
already there (offline: place a copy of `{meta['schema'].rsplit('/', 1)[-1]}` there first).

## Files

- `models/model.pt`: state dict of `network_def` ({network}).
- `models/model.ts`: TorchScript (traced); `monai.data.load_net_with_metadata` also returns metadata.json and
  inference.json stored inside it.
- `models/model.onnx`: ONNX opset {ONNX_OPSET}, input `image` (B, 1, X, Y, Z) float32, output `pred`
  (B, {len(meta['class_names'])}, X, Y, Z): {output}. Batch and spatial sizes are dynamic; every spatial size must be
  a multiple of {NETWORK_MULTIPLE} (pad, or use sliding windows of such a size), as for the TorchScript model.
- `scripts/modules.py`: the network; `scripts/hipmri.py`: the project's loading, resampling and
  back-to-the-grid code, generated from its source at export.
"""


# ----------------------------------------------------------------------------- models

def build_network(members: Sequence[Member]) -> torch.nn.Module:
    """The network of inference.json's network_def with the members' weights, in eval mode."""
    if len(members) == 1:
        network = ImprovedUNet3D(**members[0].model_args)
        parts = [network]
    else:
        network = components.SoftmaxEnsemble([m.model_args for m in members])
        parts = list(network.members)
    for member, part in zip(members, parts):
        try:
            part.load_state_dict(member.weights)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{member.path}: weights do not fit ImprovedUNet3D ({first_line[:160]})") from None
    return network.eval()


def export_torchscript(network: torch.nn.Module, path: Path, meta: dict, inference: dict) -> None:
    """Traced, not scripted: torch.jit.script rejects modules.py as it is written for eager
    PyTorch (its first complaint is the module-level NEGATIVE_SLOPE). The trace records the
    eval-mode path with the spatial sizes symbolic, so any multiple of 16 runs."""
    from monai.data import save_net_with_metadata
    with quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(network, torch.zeros(TRACE_SHAPE), check_trace=False)
    save_net_with_metadata(traced, str(path), include_config_vals=True, meta_values=meta,
                           more_extra_files={"inference.json": json.dumps(inference, indent=2).encode()})


def onnx_properties(meta: dict) -> dict[str, str]:
    """What a user of model.onnx alone needs to know, as the model's metadata_props."""
    return {"class_names": json.dumps(meta["class_names"]),
            "spacing_mm": json.dumps(meta["preprocessing"]["spacing_mm"]),
            "orientation": meta["preprocessing"]["orientation"],
            "output": meta["network_data_format"]["outputs"]["pred"]["format"],
            "spatial_multiple": str(NETWORK_MULTIPLE), "intended_use": NOT_CLINICAL}


def check_exports(network: torch.nn.Module, models: Path) -> dict:
    """TorchScript and ONNX Runtime (CPU) against the eager network on CHECK_SHAPE; an export that
    disagrees stops here rather than ship."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(CHECK_SHAPE, generator=generator)
    with torch.no_grad():
        reference = network(image).float()
        traced = torch.jit.load(str(models / "model.ts"), map_location="cpu")(image).float()
    scale = float(reference.abs().max()) or 1.0
    errors = {"torchscript": float((traced - reference).abs().max()) / scale}
    try:
        import onnxruntime
    except ImportError:
        errors["onnx"] = None
        print("  onnxruntime is not installed: models/model.onnx was not run", flush=True)
    else:
        session = onnxruntime.InferenceSession(str(models / "model.onnx"), providers=["CPUExecutionProvider"])
        output = session.run(None, {"image": image.numpy()})[0]
        errors["onnx"] = float(np.abs(output - reference.numpy()).max()) / scale
    for kind, error in errors.items():
        if error is not None and not error <= EXPORT_TOLERANCE:
            raise ExportError(f"models/model.{'ts' if kind == 'torchscript' else 'onnx'} differs from the network "
                              f"by {error:.2e} of the largest output on {list(CHECK_SHAPE)} "
                              f"(tolerance {EXPORT_TOLERANCE})")
    return errors


# ----------------------------------------------------------------------------- main

def check_out(out: Path, members: Sequence[Member], overwrite: bool) -> None:
    resolved = out.resolve()
    for member in members:
        checkpoint = Path(member.path).resolve()
        if resolved == checkpoint.parent or resolved in checkpoint.parents:
            raise DataError(f"{out}: refusing to write a bundle over the run folder of {member.path}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: already exists and is not empty; pass --overwrite or choose another --out")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def refuse_adapted(members: Sequence[Member], states: Sequence[dict]) -> None:
    """An adapted model is only ever delivered with its parent beside it (the per-organ decision and
    the guard of pelvicseg/guard.py, run by predict.py); a bundle would carry the adapted weights
    alone, so an organ the adaptation lost would reach the user unchecked."""
    for member, state in zip(members, states):
        if state.get("adaptation"):
            raise CheckpointError(f"{member.path}: an adapted model, delivered only with its parent guarding each "
                                  f"organ (predict.py); a bundle cannot carry that guard: export the parent "
                                  f"({state['adaptation'].get('parent')}) instead")


def main(args: argparse.Namespace) -> Path:
    members = load_members(args.checkpoint)
    states = [load_checkpoint(m.path) for m in members]
    refuse_adapted(members, states)
    config = members[0].config
    class_names, spacing, roi_size = list(config["class_names"]), config["spacing"], config.get("roi_size")
    if not roi_size:
        raise CheckpointError(f"{members[0].path}: holds no sliding-window size (roi_size); retrain")
    out = Path(args.out)
    check_out(out, members, args.overwrite)
    # predict.py's own decision and overlap (its --overlap default), so the bundle segments as
    # predict.py does by default.
    postprocessing = postprocessing_for(members, class_names, args.no_postprocessing)
    kept = list(postprocessing.get("largest_component", []))
    overlap = PREDICTION_OVERLAP

    inference = inference_config(members, class_names, spacing, roi_size, overlap, kept)
    meta = metadata(members, states, class_names, spacing, roi_size, overlap, postprocessing, args.version)
    network = build_network(members)
    print(f"Exporting {len(members)} model(s) ({', '.join(m.path for m in members)}): {len(class_names)} classes, "
          f"spacing {[round(float(s), 4) for s in spacing]} mm, window {list(roi_size)}; largest component kept for "
          f"{', '.join(kept) or 'no class'}", flush=True)

    # Written beside the target and renamed at the end: a failed export leaves no half bundle.
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        for folder in ("configs", "models", "scripts", "docs"):
            (staging / folder).mkdir(parents=True)
        (staging / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
        (staging / "configs" / "logging.conf").write_text(LOGGING_CONF)
        (staging / "scripts" / "__init__.py").write_text('"""The bundle\'s own code (see hipmri.py)."""\n')
        for name in WHOLE_MODULES:
            (staging / "scripts" / f"{name}.py").write_text(whole_module_script(name))
        (staging / "scripts" / "hipmri.py").write_text(hipmri_script())
        (staging / "docs" / "README.md").write_text(readme(meta, inference, len(members) > 1))
        torch.save(network.state_dict(), staging / "models" / "model.pt")
        export_torchscript(network, staging / "models" / "model.ts", meta, inference)
        export_onnx(network, staging / "models" / "model.onnx", onnx_properties(meta))
        errors = check_exports(network, staging / "models")
        out.parent.mkdir(parents=True, exist_ok=True)
        # The old bundle is moved aside, not deleted first: a kill between the two renames leaves
        # it whole under the hidden name, never a half-deleted bundle under the final one.
        previous = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, previous)
        os.replace(staging, out)
        if previous.exists():
            shutil.rmtree(previous)
    except OSError as error:
        raise WriteError(error.errno or errno.EIO, f"{out}: could not be written ({error.strerror or error}); "
                         "no partial bundle was left under that name") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    shown = ", ".join(f"{k} {v:.1e}" for k, v in errors.items() if v is not None)
    print(f"TorchScript and ONNX checked against the network on {list(CHECK_SHAPE)} (largest difference / largest "
          f"output: {shown})")
    print(f"Wrote the bundle {out} ({folder_bytes(out) / 2**20:.1f} MiB). Run it with:\n  python -m monai.bundle run "
          f"--config_file {out / 'configs' / 'inference.json'} --dataset_dir IN --output_dir OUT")
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
