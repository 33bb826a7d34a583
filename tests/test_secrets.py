"""A canary API key never reaches the store, the output or the DEBUG logs."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.fault_server import FaultPlan, FaultServer
from tests.fixtures_harvest import prompt_text, run_pipeline, subprocess_env, write_prompts
from tests.fixtures_server import teacher_server_url  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.slow


def canary() -> str:
    return "sk-canary-" + secrets.token_hex(12)


def files_containing(root: Path, needle: str) -> list[Path]:
    """Return every file under ``root`` whose bytes contain ``needle`` (any encoding of it)."""
    encodings = {needle.encode(), needle.encode("utf-16-le"), needle[::-1].encode()}
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(encoded in data for encoded in encodings):
                found.append(path)
    return found


def test_canary_key_absent_after_real_teacher_harvest(
    tmp_path: Path, teacher_server_url: str, stories_prompts: Path  # noqa: F811
) -> None:
    key = canary()
    store = tmp_path / "store"
    result = run_pipeline(
        "-vv", "harvest", str(stories_prompts), "--store", str(store), "--base-url", teacher_server_url,
        "--model", "stories260k", "--api-key-env", "KD_CANARY_KEY", "--max-tokens", "16",
        "--top-logprobs", "3", "--limit", "8", "--no-progress",
        env=subprocess_env(KD_CANARY_KEY=key), timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DEBUG" in result.stderr  # the logs really were at DEBUG
    assert key not in result.stdout
    assert key not in result.stderr
    assert files_containing(store, key) == []
    assert any(path.suffix == ".parquet" for path in store.rglob("*"))


def test_canary_key_absent_from_errors_and_failures(tmp_path: Path) -> None:
    key = canary()
    key_file = tmp_path / "secret" / "key.txt"
    key_file.parent.mkdir()
    key_file.write_text(key + "\n")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12, extra_lines=('{"prompt": 5}',))
    faults = ["429:retry-after=0", "500", "502-html", "drop-length", "drop-chunked", "truncated-json",
              "close", "error-200:code=429", "no-logprobs", "bad-logprobs", "error-200:code=401", "503"]
    plan = FaultPlan(per_prompt={prompt_text(i): [fault] * 2 for i, fault in enumerate(faults)})
    store = tmp_path / "store"
    with FaultServer(plan) as server:
        result = run_pipeline(
            "-vv", "harvest", str(prompts), "--store", str(store), "--base-url", server.base_url,
            "--model", "m", "--api-key-file", str(key_file), "--max-attempts", "2",
            "--backoff-initial", "0.001", "--timeout", "5", "--no-progress",
        )
        keys_sent = {entry.api_key for entry in server.log}

    assert keys_sent == {key}  # the key was used, so its absence below means something
    assert result.returncode == 1, result.stderr[-2000:]
    assert "failed" in result.stdout
    assert key not in result.stdout
    assert key not in result.stderr
    assert files_containing(store, key) == []
