"""Harvest config validation, request ids, the LRU cache and the command's usage errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cache import LRUCache
from pipeline.cli import cli
from pipeline.config import (
    LOOPBACK_PLACEHOLDER_KEY,
    HarvestFlags,
    SamplingConfig,
    TeacherConfig,
    build_harvest_config,
)
from pipeline.errors import ConfigError
from pipeline.harvest_requests import build_work_item
from pipeline.prompts import PromptRecord
from pipeline.request_key import CanonicalRequest
from tests.fixtures_harvest import write_prompts

REMOTE = "https://teacher.example.invalid/v1"
LOCAL = "http://127.0.0.1:8400/v1"


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl", 3)


def flags(prompts: Path, **values) -> HarvestFlags:
    values.setdefault("store_path", prompts.parent / "store")
    return HarvestFlags(prompts_path=prompts, **values)


def config_problems(prompts: Path, environ: dict[str, str] | None = None, **values) -> str:
    with pytest.raises(ConfigError) as raised:
        build_harvest_config(flags(prompts, **values), environ=environ or {})
    return str(raised.value)


def test_flags_build_teacher_with_defaults(prompts: Path) -> None:
    config = build_harvest_config(flags(prompts, base_url=LOCAL, model="m"), environ={})
    (teacher,) = config.teachers
    assert (teacher.name, teacher.endpoint, teacher.api_key_env) == ("m", "chat", "OPENAI_API_KEY")
    assert teacher.api_key.reveal() == LOOPBACK_PLACEHOLDER_KEY
    assert config.sampling == SamplingConfig()
    assert config.deadline_s == 900.0


def test_unset_named_key_variable_warns(prompts: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = build_harvest_config(flags(prompts, base_url=LOCAL, model="m", api_key_env="MY_KEY"), environ={})
    assert config.teachers[0].api_key.reveal() == LOOPBACK_PLACEHOLDER_KEY
    assert "MY_KEY is not set" in caplog.text


def test_default_key_variable_unset_is_quiet(prompts: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_harvest_config(flags(prompts, base_url=LOCAL, model="m"), environ={})
    assert "is not set" not in caplog.text


def test_remote_teacher_needs_key_variable(prompts: Path) -> None:
    message = config_problems(prompts, base_url=REMOTE, model="m", api_key_env="MY_KEY")
    assert "MY_KEY is not set" in message
    assert "--api-key-env" in message


def test_key_read_from_variable_and_file(prompts: Path, tmp_path: Path) -> None:
    config = build_harvest_config(flags(prompts, base_url=REMOTE, model="m", api_key_env="MY_KEY"),
                                  environ={"MY_KEY": "sk-from-env"})
    assert config.teachers[0].api_key.reveal() == "sk-from-env"

    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-from-file\n")
    config = build_harvest_config(flags(prompts, base_url=REMOTE, model="m", api_key_file=key_file), environ={})
    assert config.teachers[0].api_key.reveal() == "sk-from-file"


def test_key_never_in_repr_or_public_dict(prompts: Path) -> None:
    config = build_harvest_config(flags(prompts, base_url=REMOTE, model="m"),
                                  environ={"OPENAI_API_KEY": "sk-canary-12345"})
    assert "sk-canary-12345" not in repr(config)
    assert "sk-canary-12345" not in str(config.teachers[0].api_key)
    assert "sk-canary-12345" not in json.dumps(config.public_dict())


def test_all_problems_reported_together(prompts: Path) -> None:
    message = config_problems(
        prompts, base_url="ftp://x", model="m", max_tokens=0, temperature=-1.0, top_p=2.0,
        samples=0, concurrency=0, timeout_s=0.0, top_logprobs=-1, cache_size=-5, limit=0,
    )
    for expected in ("base URL 'ftp://x'", "--max-tokens 0", "--temperature -1.0", "--top-p 2.0",
                     "--samples 0", "--concurrency 0", "--timeout 0.0", "--top-logprobs -1",
                     "--cache-size -5", "--limit 0"):
        assert expected in message
    assert "11 problems" in message


def test_missing_teacher_and_store(prompts: Path) -> None:
    message = config_problems(prompts, store_path=None)
    assert "missing --store" in message
    assert "--base-url and --model" in message


def test_base_url_with_credentials_rejected(prompts: Path) -> None:
    message = config_problems(prompts, base_url="http://user:pw@127.0.0.1:1/v1?key=abc", model="m")
    assert "credentials" in message
    assert "query string" in message
    assert "pw" not in message
    assert "abc" not in message


def test_teachers_file(prompts: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "teachers.toml"
    config_file.write_text(
        f'[[teachers]]\nname = "a"\nbase_url = "{LOCAL}"\nmodel = "m1"\nrpm = 100\n\n'
        f'[[teachers]]\nbase_url = "{LOCAL}"\nmodel = "m2"\nendpoint = "completions"\nconcurrency = 3\n'
        "[teachers.params]\nrepetition_penalty = 1.1\n"
    )
    config = build_harvest_config(flags(prompts, config_path=config_file, tpm=5000.0), environ={})
    first, second = config.teachers
    assert (first.name, first.rpm, first.tpm, first.endpoint) == ("a", 100, 5000.0, "chat")
    assert (second.name, second.endpoint, second.concurrency) == ("m2", "completions", 3)
    assert second.params == {"repetition_penalty": 1.1}
    assert config.teacher_concurrency(second) == 3
    assert config.teacher_concurrency(first) == config.concurrency


def test_teachers_file_problems(prompts: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "teachers.toml"
    config_file.write_text(
        f'[[teachers]]\nname = "a"\nbase_url = "{LOCAL}"\nmodel = "m"\n\n'
        f'[[teachers]]\nname = "a"\nbase_url = "{LOCAL}"\nmodel = "m"\nendpoint = "embeddings"\n'
        "[teachers.params]\nmax_tokens = 5\n\n"
        '[[teachers]]\nname = "b"\nmodel = "m"\ncolour = "red"\n'
    )
    message = config_problems(prompts, config_path=config_file, base_url=LOCAL)
    for expected in ("unknown key 'colour'", "'a' is defined twice", "endpoint 'embeddings'",
                     "params ['max_tokens']", "teacher #3: missing base_url",
                     "--base-url cannot be combined with --config"):
        assert expected in message


def test_http_client_from_flag_and_file(prompts: Path, tmp_path: Path) -> None:
    config = build_harvest_config(flags(prompts, base_url=LOCAL, model="m"), environ={})
    assert config.teachers[0].http_client == "aiohttp"
    config = build_harvest_config(flags(prompts, base_url=LOCAL, model="m", http_client="openai"), environ={})
    assert config.teachers[0].http_client == "openai"

    config_file = tmp_path / "teachers.toml"
    config_file.write_text(
        f'[[teachers]]\nname = "a"\nbase_url = "{LOCAL}"\nmodel = "m"\nhttp_client = "openai"\n\n'
        f'[[teachers]]\nname = "b"\nbase_url = "{LOCAL}"\nmodel = "m"\n'
    )
    config = build_harvest_config(flags(prompts, config_path=config_file, http_client="aiohttp"), environ={})
    assert [teacher.http_client for teacher in config.teachers] == ["openai", "aiohttp"]


def test_unknown_http_client_rejected(prompts: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "teachers.toml"
    config_file.write_text(f'[[teachers]]\nname = "a"\nbase_url = "{LOCAL}"\nmodel = "m"\nhttp_client = "curl"\n')
    message = config_problems(prompts, config_path=config_file)
    assert "http_client 'curl' is not one of aiohttp, openai" in message


def test_teachers_file_not_toml(prompts: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "teachers.toml"
    config_file.write_text("[[teachers]\nname=")
    assert "cannot be read" in config_problems(prompts, config_path=config_file)
    assert "not found" in config_problems(prompts, config_path=tmp_path / "missing.toml")


def test_deadline_zero_disables(prompts: Path) -> None:
    config = build_harvest_config(flags(prompts, base_url=LOCAL, model="m", deadline_s=0.0), environ={})
    assert config.deadline_s is None


# --- request ids -------------------------------------------------------------------


def _request(**changes) -> CanonicalRequest:
    base = CanonicalRequest(teacher="t", model="m", endpoint="chat", prompt="hi", messages=None,
                            params={"max_tokens": 8, "temperature": 1.0, "seed": None}, sample_index=0)
    return replace(base, **changes)


def test_request_id_ignores_key_order_and_unset() -> None:
    same = _request(params={"temperature": 1.0, "max_tokens": 8})
    assert _request().request_id == same.request_id
    assert len(_request().request_id) == 32


@pytest.mark.parametrize(
    "change",
    [{"teacher": "u"}, {"model": "n"}, {"endpoint": "completions"}, {"prompt": "hi!"},
     {"sample_index": 1}, {"params": {"max_tokens": 9, "temperature": 1.0}},
     {"params": {"max_tokens": 8, "temperature": 1.0, "seed": 3}},
     {"prompt": None, "messages": ({"role": "user", "content": "hi"},)}],
)
def test_request_id_changes_with_request(change: dict) -> None:
    assert _request(**change).request_id != _request().request_id


def test_work_item_ignores_prompt_id_and_line() -> None:
    teacher = TeacherConfig(name="t", base_url=LOCAL, model="m")
    sampling = SamplingConfig(seed=5)
    first = build_work_item(teacher, PromptRecord(1, "a", "hello", None), 0, sampling, "x.jsonl")
    moved = build_work_item(teacher, PromptRecord(9, "b", "hello", None), 0, sampling, "y.jsonl")
    second_sample = build_work_item(teacher, PromptRecord(1, "a", "hello", None), 1, sampling, "x.jsonl")
    assert first.request_id == moved.request_id
    assert second_sample.request_id != first.request_id
    assert second_sample.body["seed"] == 6
    assert first.body["messages"] == [{"role": "user", "content": "hello"}]
    assert first.body["logprobs"] is True
    assert first.body["top_logprobs"] == 20


# --- cache -------------------------------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert "b" not in cache
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert (cache.hits, cache.misses, cache.evictions) == (3, 0, 1)
    assert len(cache) == 2


def test_lru_size_zero_stores_nothing() -> None:
    cache: LRUCache[str, int] = LRUCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None


# --- command -----------------------------------------------------------------------


def test_command_config_error_exits_2(prompts: Path) -> None:
    result = CliRunner().invoke(cli, ["harvest", str(prompts), "--store", str(prompts.parent / "s"),
                                      "--base-url", REMOTE, "--model", "m", "--api-key-env", "NOPE_KEY"],
                                env={"NOPE_KEY": ""})
    assert result.exit_code == 2
    assert "NOPE_KEY is not set" in result.output
    assert not (prompts.parent / "s").exists()


def test_dry_run_sends_nothing(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4, extra_lines=('{"prompt": null}',))
    result = CliRunner().invoke(cli, ["harvest", str(prompts), "--store", str(tmp_path / "s"),
                                      "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                      "--samples", "2", "--dry-run"])
    assert result.exit_code == 1, result.output
    assert "4 valid, 1 invalid lines" in result.output
    assert "8 would be sent" in result.output
    assert not (tmp_path / "s").exists()
