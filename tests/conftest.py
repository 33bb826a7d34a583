"""Shared test fixtures: paths to the real tiny model and the real prompt sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_DIR = Path(__file__).resolve().parents[1]
# The real model and prompts live beside the checkout (../shared), not inside it.
SHARED_DIR = Path(os.environ.get("KD_SHARED_DIR", REPO_DIR.parent / "shared"))
MODEL_DIR = SHARED_DIR / "models" / "stories260k"
STORIES_PROMPTS = SHARED_DIR / "data" / "prompts" / "tinystories_openings.jsonl"
INSTRUCTION_PROMPTS = SHARED_DIR / "data" / "prompts" / "instructions.jsonl"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"tiny model not found at {MODEL_DIR}; set KD_SHARED_DIR to the shared folder")
    return MODEL_DIR


@pytest.fixture(scope="session")
def stories_prompts() -> Path:
    if not STORIES_PROMPTS.exists():
        pytest.fail(f"prompt set not found at {STORIES_PROMPTS}; set KD_SHARED_DIR")
    return STORIES_PROMPTS
