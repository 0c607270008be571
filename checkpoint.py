"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``, rebuilt from their
own ``model_args`` so prediction needs no flags about the network."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from modules import ImprovedUNet3D

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message is one line naming the file."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash mid-write never leaves a
    truncated checkpoint where a good one was."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format_version": FORMAT_VERSION, **state}, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with ``weights_only=True``: a crafted pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused, not a plain-data checkpoint ({first_line[:160]})") from None
    except Exception as error:
        # Not only RuntimeError/EOFError/BadZipFile/OSError/ValueError: damaged bytes also surface as
        # KeyError, IndexError, struct.error or AssertionError from torch's (legacy) unpickling, found
        # by fuzzing (tests/test_reliability.py). Any failure to read the file is a corrupt checkpoint.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: corrupt or not a checkpoint ({first_line[:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model or model_args)")
    return state


def model_from_checkpoint(state: dict, path: str | Path = "checkpoint") -> ImprovedUNet3D:
    """Rebuild the network from the checkpoint's own arguments and load its weights."""
    try:
        model = ImprovedUNet3D(**state["model_args"])
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit ImprovedUNet3D ({first_line[:160]})") from None
    return model
