"""Checks of model sources, output directories and devices shared by the model commands.

Each check runs before any model loads and returns a message naming the flag and the
fix, so a bad path fails fast with one clear line instead of a loader traceback. A
model source is either a local directory with ``config.json`` or a Hugging Face hub
id. Anything else is rejected here. The hub client's own message for such a value
("Repo id must use alphanumeric chars") never mentions the local path the user meant.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import ConfigError


def model_source_problem(source: str, flag: str) -> str | None:
    """Return why ``source`` cannot be a model directory or hub id, or None when it can.

    A hub id that is valid in form passes; whether it exists is up to the loader.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{flag} {source} has no config.json; pass a transformers model directory"
        return None
    if path.exists():
        return f"{flag} {source} is a file; pass a transformers model directory"
    if _looks_local(source) or not _valid_hub_id(source):
        return (
            f"model not found: {source} is not a directory and not a valid hub id;"
            f" pass a transformers model directory or a hub id as {flag}"
        )
    return None


def check_model_source(source: str, flag: str) -> None:
    """Raise ConfigError when :func:`model_source_problem` finds a problem."""
    problem = model_source_problem(source, flag)
    if problem:
        raise ConfigError(problem)


def out_dir_problem(out_dir: str | Path, *, overwrite: bool, flag: str = "--out") -> str | None:
    """Return why ``out_dir`` cannot receive a new model, or None; creates nothing."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        return f"cannot create {flag} {path}: it exists and is not a directory; pass a directory"
    if path.is_dir() and not overwrite and any(path.iterdir()):
        return (
            f"{flag} {path} is not empty; pass --overwrite to replace the files in it,"
            " or pass a new directory"
        )
    return None


def create_out_dir(out_dir: str | Path, *, flag: str = "--out") -> Path:
    """Create ``out_dir`` and its parents; raise ConfigError naming ``flag`` when that fails."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"cannot create {flag} {path}: {reason}; pass a writable directory") from error
    if not os.access(path, os.W_OK):
        raise ConfigError(f"cannot create {flag} {path}: not writable; pass a writable directory")
    return path


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep + os.sep in source or source.count("/") > 1


def _valid_hub_id(source: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_CUDA_INDEX = re.compile(r"cuda:\d+")


def device_problem(device: str, flag: str = "--device") -> str | None:
    """Return why ``device`` is not auto, cpu, cuda or cuda:N, or None when it is.

    Whether CUDA is present is checked by the caller, which imports torch anyway.
    """
    if device in ("auto", "cpu", "cuda") or _CUDA_INDEX.fullmatch(device):
        return None
    return f"{flag} {device!r} is not supported; pass one of {', '.join(DEVICE_CHOICES)}"
