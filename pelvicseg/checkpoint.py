"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``, rebuilt from their
own ``model_args`` so prediction needs no flags about the network."""

from __future__ import annotations

import hashlib
import json
import pickle
import pickletools
import re
from pathlib import Path

import torch

from modules import ImprovedUNet3D
from pelvicseg.atomic import atomic_open
from pelvicseg.errors import CheckpointError

FORMAT_VERSION = 1
EXPECTED = "expected a best.pt or last.pt written by train.py, or its run folder"
REASON_CHARACTERS = 160  # the part of torch's message kept in ours, so the error stays one readable line


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Written as every output is (atomic.atomic_open: a temporary file in the same folder, synced,
    then renamed): a crash mid-write never leaves a truncated checkpoint where a good one was."""
    with atomic_open(path, "wb") as handle:
        torch.save({"format_version": FORMAT_VERSION, **state}, handle)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with ``weights_only=True``: a crafted pickle that would run code is refused.

    Every failure is a ``CheckpointError`` of one line that names the file, says what it is where
    that can be told (a folder, a JSON or text file, an image) and what was expected."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file; {EXPECTED}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist; {EXPECTED}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # Not only UnpicklingError/RuntimeError/EOFError/BadZipFile/OSError/ValueError: damaged bytes also
        # surface as KeyError, IndexError, struct.error or AssertionError from torch's (legacy) unpickling,
        # found by fuzzing (tests/test_reliability.py). Any failure to read the file is a corrupt checkpoint.
        kind = describe_file(path)
        if kind:
            raise CheckpointError(f"{path}: {kind}, not a checkpoint; {EXPECTED}{_beside(path)}") from None
        if isinstance(error, pickle.UnpicklingError) and _holds_pickle(path):
            raise CheckpointError(f"{path}: refused, not a plain-data checkpoint ({torch_reason(error)})") from None
        raise CheckpointError(f"{path}: corrupt or not a checkpoint ({torch_reason(error)}); {EXPECTED}") from None
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model or model_args); {EXPECTED}")
    return state


MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF document"),
         (b"\x89HDF", "an HDF5 file"))


def describe_file(path: Path, limit: int = 1 << 20) -> str | None:
    """What a file that torch could not load is, from its bytes, for the error message: None where
    it may well be a damaged checkpoint (a zip archive, a pickle, unrecognised bytes)."""
    with open(path, "rb") as handle:
        head = handle.read(limit)
    name = path.name.lower()
    if not head:
        return "an empty file"
    if head[:4] == b"PK\x03\x04" or _is_pickle(head):
        return None
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI image"
    if head[:2] == b"\x1f\x8b":
        return "a gzip-compressed NIfTI image" if name.endswith((".nii.gz", ".img.gz")) else "a gzip-compressed file"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.strip() or any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return None
    try:
        json.loads(text)
        return "a JSON file"
    except ValueError:
        pass
    if text.lstrip().startswith(("{", "[")) and len(head) == limit:
        return "a JSON file"  # too long to parse here; it starts like one
    return "a text file"


def _beside(path: Path) -> str:
    """Where a checkpoint lies in the same folder (a run's config.json given by mistake)."""
    found = [name for name in ("best.pt", "last.pt") if (path.parent / name).is_file() and path.name != name]
    return f" ({path.parent / found[0]} is beside it)" if found else ""


def _holds_pickle(path: Path) -> bool:
    """A zip archive (torch's format, whose data.pkl torch refused) or a bare pickle."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
    return head[:4] == b"PK\x03\x04" or _is_pickle(head)


def _is_pickle(data: bytes) -> bool:
    """Whether ``data`` parses as a pickle opcode stream (nothing is unpickled): a protocol-0
    pickle is ASCII text too, and should be refused as a pickle, not described as text."""
    try:
        return any(opcode.name == "STOP" for opcode, _, _ in pickletools.genops(data))
    except Exception:
        return False


def torch_reason(error: Exception) -> str:
    """The informative part of torch's message, whole words only: torch's weights-only errors open
    with a paragraph about its defaults and close with a link, and the reason sits between."""
    text = str(error).strip()
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    noise = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [p for p in paragraphs if not p.startswith(noise)]
    reason = (useful or paragraphs or [type(error).__name__])[0]
    if reason.isdigit() or len(reason) < 3:  # KeyError('101'): the bare key says nothing
        reason = f"{type(error).__name__} {reason}"
    if len(reason) > REASON_CHARACTERS:
        reason = reason[:REASON_CHARACTERS].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return reason


def model_from_checkpoint(state: dict, path: str | Path = "checkpoint") -> ImprovedUNet3D:
    """Rebuild the network from the checkpoint's own arguments and load its weights."""
    try:
        model = ImprovedUNet3D(**state["model_args"])
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: weights do not fit ImprovedUNet3D ({torch_reason(error)})") from None
    return model


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks: what a bundle or an adapted run records of
    the checkpoint it came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
