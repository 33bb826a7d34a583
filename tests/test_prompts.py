"""Tests of the JSONL prompt reader: messy files, invalid values, limits and the real sets."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, PromptError
from pipeline.prompts import PromptReader, PromptRecord

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
PROMPT_SETS = SHARED_DIR / "data" / "prompts"


def write(tmp_path: Path, data: bytes, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_all(path: Path, **kwargs) -> tuple[PromptReader, list]:
    reader = PromptReader(path, **kwargs)
    return reader, list(reader)


def records(items: list) -> list[PromptRecord]:
    return [item for item in items if isinstance(item, PromptRecord)]


def errors(items: list) -> list[PromptError]:
    return [item for item in items if isinstance(item, PromptError)]


# Messy JSONL: blank lines, CRLF, trailing garbage, long lines, invalid UTF-8.

MESSY = b'{"prompt":"a"}\n\n{"prompt":"b"}\r\n   \n{"prompt": "c"} trailing\n'


def test_messy_file_good_lines_kept(tmp_path):
    _, items = read_all(write(tmp_path, MESSY))
    assert [(record.line, record.prompt) for record in records(items)] == [(1, "a"), (3, "b")]


def test_messy_file_trailing_garbage_reported(tmp_path):
    _, items = read_all(write(tmp_path, MESSY))
    [error] = errors(items)
    assert error.line == 5
    assert "invalid JSON" in str(error)
    assert "unexpected data after the object" in str(error)
    assert error.path == str(tmp_path / "prompts.jsonl")


def test_messy_file_counters(tmp_path):
    reader, _ = read_all(write(tmp_path, MESSY))
    assert reader.records == 2
    assert reader.blank_lines == 2
    assert reader.invalid_lines == 1


def test_invalid_utf8_line_reported(tmp_path):
    data = b'{"prompt":"ok"}\n{"prompt":"\xff"}\n{"prompt":"after"}\n'
    _, items = read_all(write(tmp_path, data))
    [error] = errors(items)
    assert error.line == 2
    assert "invalid UTF-8" in str(error)
    assert [record.prompt for record in records(items)] == ["ok", "after"]


def test_ten_megabyte_prompt_accepted(tmp_path):
    prompt = "story " * (10 * 2**20 // 6)
    data = b'{"prompt": "' + prompt.encode() + b'"}\n{"prompt": "next"}\n'
    reader, items = read_all(write(tmp_path, data))
    assert reader.invalid_lines == 0
    assert records(items)[0].prompt == prompt
    assert records(items)[1].prompt == "next"


def test_line_over_limit_reported(tmp_path):
    long_line = b'{"prompt": "' + b"x" * 5000 + b'"}'
    data = b'{"prompt": "a"}\n' + long_line + b'\n{"prompt": "b"}\n'
    reader, items = read_all(write(tmp_path, data), max_line_bytes=1024)
    [error] = errors(items)
    assert error.line == 2
    assert "longer than 1024 bytes" in str(error)
    assert [record.line for record in records(items)] == [1, 3]


def test_line_over_limit_not_loaded(tmp_path):
    long_line = b'{"prompt": "' + b"x" * (16 * 2**20) + b'"}'
    path = write(tmp_path, long_line + b'\n{"prompt": "b"}\n')
    tracemalloc.start()
    try:
        reader, items = read_all(path, max_line_bytes=2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.invalid_lines == 1
    assert records(items)[0].line == 2
    assert peak < 4 * 2**20


@pytest.mark.parametrize(
    ("line", "accepted"),
    [
        (b'{"prompt": "' + b"x" * 48 + b'"}\n', True),
        (b'{"prompt": "' + b"x" * 48 + b'"}\r\n', True),
        (b'{"prompt": "' + b"x" * 48 + b'"}', True),
        (b'{"prompt": "' + b"x" * 49 + b'"}\n', False),
        (b'{"prompt": "' + b"x" * 49 + b'"}', False),
    ],
)
def test_line_limit_boundary(tmp_path, line, accepted):
    # The content of a 48-character prompt line is exactly 62 bytes.
    reader, _ = read_all(write(tmp_path, b'{"prompt": "z"}\n' + line), max_line_bytes=62)
    assert reader.records == (2 if accepted else 1)
    assert reader.invalid_lines == (0 if accepted else 1)


def test_crlf_and_missing_final_newline(tmp_path):
    _, items = read_all(write(tmp_path, b'{"prompt": "a"}\r\n{"prompt": "b"}'))
    assert [record.prompt for record in records(items)] == ["a", "b"]


def test_byte_order_mark_accepted(tmp_path):
    _, items = read_all(write(tmp_path, b'\xef\xbb\xbf{"prompt": "a"}\n'))
    assert records(items)[0].prompt == "a"


def test_unicode_line_separator_inside_string(tmp_path):
    data = '{"prompt": "one\u2028two\u0085three"}\n'.encode()
    reader, items = read_all(write(tmp_path, data))
    assert reader.records == 1
    assert records(items)[0].prompt == "one\u2028two\u0085three"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[1, 2]", "expected a JSON object, got a list"),
        (b'"a prompt"', "expected a JSON object, got a string"),
        (b"42", "expected a JSON object, got a number"),
        (b'{"prompt": NaN}', "invalid JSON"),
        (b'{"prompt": "a"', "invalid JSON"),
        (b'{"prompt": "a"}}', "invalid JSON"),
    ],
)
def test_invalid_lines_reported(tmp_path, line, message):
    _, items = read_all(write(tmp_path, b'{"prompt": "ok"}\n' + line + b"\n"))
    [error] = errors(items)
    assert error.line == 2
    assert message in str(error)


# Prompt values that are not strings, and both prompt and messages.


NOT_STRINGS = [
    (b'{"prompt": [15496, 995]}', "prompt is a list of token ids; only text prompts are supported"),
    (b'{"prompt": ["a", "b"]}', "prompt is a list of strings; put each prompt on its own line"),
    (b'{"prompt": 42}', "prompt must be a non-empty string, got a number"),
    (b'{"prompt": null}', "prompt must be a non-empty string, got null"),
    (b'{"prompt": ""}', "prompt is an empty string"),
    (b'{"prompt": "\\ud800"}', "prompt contains a lone UTF-16 surrogate"),
]


@pytest.mark.parametrize(("line", "message"), NOT_STRINGS)
def test_non_string_prompt_rejected(tmp_path, line, message):
    _, items = read_all(write(tmp_path, b'{"prompt": "ok"}\n' + line + b"\n"))
    [error] = errors(items)
    assert error.line == 2
    assert error.field == "prompt"
    assert message in str(error)


def test_non_string_prompts_one_item_per_line(tmp_path):
    data = b"\n".join(line for line, _ in NOT_STRINGS) + b"\n"
    reader, items = read_all(write(tmp_path, data))
    assert [item.line for item in items] == list(range(1, len(NOT_STRINGS) + 1))
    assert reader.records == 0
    assert reader.invalid_lines == len(NOT_STRINGS)


def test_prompt_and_messages_rejected(tmp_path):
    line = b'{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}\n'
    _, items = read_all(write(tmp_path, line))
    [error] = errors(items)
    assert error.line == 1
    assert error.field == "messages"
    assert "has both prompt and messages" in str(error)


def test_neither_prompt_nor_messages_rejected(tmp_path):
    _, items = read_all(write(tmp_path, b'{"id": "x", "text": "a"}\n'))
    [error] = errors(items)
    assert error.field == "prompt"
    assert "has neither prompt nor messages" in str(error)


# Chat messages.


def test_messages_record_built(tmp_path):
    line = (
        b'{"id": "chat-1", "messages": [{"role": "system", "content": "Be brief."},'
        b' {"role": "user", "content": "Hi", "name": "ann"}]}\n'
    )
    _, items = read_all(write(tmp_path, line))
    [record] = records(items)
    assert record.prompt is None
    assert record.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
    )
    assert record.prompt_id == "chat-1"


@pytest.mark.parametrize(
    ("messages", "field", "message"),
    [
        (b"[]", "messages", "messages must be a non-empty list of messages, got an empty list"),
        (b'"hi"', "messages", "got a string"),
        (b'["hi"]', "messages[0]", "messages[0] must be an object"),
        (b'[{"role": "robot", "content": "x"}]', "messages[0].role", "got 'robot'"),
        (b'[{"content": "x"}]', "messages[0].role", "got null"),
        (b'[{"role": "user", "content": ["x"]}]', "messages[0].content", "must be a string, got a list"),
        (b'[{"role": "user"}]', "messages[0].content", "must be a string, got null"),
        (b'[{"role": "user", "content": "x", "weight": 2}]', "messages[0].weight", "unsupported key"),
        (b'[{"role": "tool", "content": "x", "tool_call_id": 5}]', "messages[0].tool_call_id", "must be a string"),
    ],
)
def test_invalid_messages_rejected(tmp_path, messages, field, message):
    _, items = read_all(write(tmp_path, b'{"messages": ' + messages + b"}\n"))
    [error] = errors(items)
    assert error.field == field
    assert message in str(error)


# Ids.


def test_ids_from_line_or_file(tmp_path):
    data = b'{"id": 7, "prompt": "a"}\n{"prompt": "b"}\n{"id": "x-1", "prompt": "c"}\n'
    _, items = read_all(write(tmp_path, data, "stories.jsonl"))
    assert [record.prompt_id for record in records(items)] == ["7", "stories:2", "x-1"]


def test_duplicate_id_reported_on_later_line(tmp_path):
    data = b'{"id": "a", "prompt": "1"}\n{"id": "b", "prompt": "2"}\n{"id": "a", "prompt": "3"}\n'
    _, items = read_all(write(tmp_path, data))
    [error] = errors(items)
    assert error.line == 3
    assert error.field == "id"
    assert "duplicate id 'a'" in str(error)
    assert [record.line for record in records(items)] == [1, 2]


def test_duplicate_of_generated_id_reported(tmp_path):
    data = b'{"prompt": "1"}\n{"id": "prompts:1", "prompt": "2"}\n'
    _, items = read_all(write(tmp_path, data))
    [error] = errors(items)
    assert error.line == 2
    assert error.field == "id"


@pytest.mark.parametrize("value", [b'""', b"1.5", b"true", b'["a"]', b'{"a": 1}'])
def test_invalid_id_rejected(tmp_path, value):
    _, items = read_all(write(tmp_path, b'{"id": ' + value + b', "prompt": "a"}\n'))
    [error] = errors(items)
    assert error.field == "id"


# Paths and iteration.


def test_missing_file_is_config_error(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(ConfigError) as caught:
        PromptReader(path)
    assert str(path) in str(caught.value)
    assert "not found" in str(caught.value)


def test_directory_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        PromptReader(tmp_path)
    assert str(tmp_path) in str(caught.value)
    assert "is a directory" in str(caught.value)


def test_invalid_line_limit_is_config_error(tmp_path):
    with pytest.raises(ConfigError):
        PromptReader(write(tmp_path, b""), max_line_bytes=0)


def test_empty_file_has_no_records(tmp_path):
    reader, items = read_all(write(tmp_path, b""))
    assert items == []
    assert reader.records == 0


def test_second_iteration_restarts_counters(tmp_path):
    reader = PromptReader(write(tmp_path, MESSY))
    first = list(reader)
    second = list(reader)
    assert [type(item) for item in first] == [type(item) for item in second]
    assert reader.records == 2
    assert reader.blank_lines == 2
    assert reader.invalid_lines == 1


def test_reader_streams_lazily(tmp_path):
    reader = PromptReader(write(tmp_path, b'{"prompt": "a"}\n{"prompt": "b"}\n'))
    iterator = iter(reader)
    assert next(iterator).prompt == "a"
    assert reader.records == 1


# The real prompt sets.


@pytest.mark.parametrize(
    ("name", "count"), [("tinystories_openings.jsonl", 245), ("instructions.jsonl", 1175)]
)
def test_real_prompt_sets_valid(name, count):
    path = PROMPT_SETS / name
    if not path.exists():
        pytest.fail(f"prompt set not found at {path}; put the shared folder beside the checkout")
    reader, items = read_all(path)
    assert reader.records == count
    assert reader.invalid_lines == 0
    assert reader.blank_lines == 0
    assert all(record.prompt for record in items)
    assert len({record.prompt_id for record in items}) == count
