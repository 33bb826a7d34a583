"""Streaming reader of JSONL prompt files.

A prompts file is user input, so :class:`PromptReader` validates every line before
any request is built and reports each invalid line as a :class:`PromptError` carrying
its path, 1-based line number and field, while the valid lines go on. One bad line
never discards the file. Iterating the reader yields those errors instead of raising
them, so the caller decides whether to stop, count or log them.

The file is read in binary and split on ``\\n`` only. Splitting decoded text with
:meth:`str.splitlines` would also break lines at U+2028 and other Unicode line
separators, which may appear inside a JSON string. A line is read with a size limit,
and the rest of a longer line is skipped in bounded chunks. Memory therefore stays
bounded by ``max_line_bytes`` plus the set of ids seen, which duplicate detection needs
(a :class:`~pipeline.harvest_ids.DigestSet`, 16 bytes per id).

Each line is a JSON object with exactly one of ``prompt`` (a non-empty string, for
``/v1/completions``) or ``messages`` (a non-empty list of chat messages), and an
optional ``id`` (string or integer). Other keys are ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from pipeline.errors import ConfigError, PromptError
from pipeline.harvest_ids import DigestSet

logger = logging.getLogger(__name__)

DEFAULT_MAX_LINE_BYTES = 64 * 2**20
MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# Optional string fields of a message besides role and content.
MESSAGE_OPTIONAL_FIELDS = frozenset({"name", "tool_call_id"})

_SKIP_CHUNK_BYTES = 64 * 2**10
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class PromptRecord:
    """One valid line of a prompts file; exactly one of ``prompt`` and ``messages`` is set.

    ``prompt_id`` is the line's ``id`` (an integer id converted to a string) or, without
    one, ``"<file stem>:<line>"``.
    """

    line: int
    prompt_id: str
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None


class PromptReader:
    """Iterate the prompts of a JSONL file, yielding a PromptError for each invalid line.

    Raises ConfigError on construction when the path does not exist or is not a regular
    file. The counters ``records``, ``invalid_lines`` and ``blank_lines`` are updated as
    iteration goes and restart from zero on each new iteration. A line longer than
    ``max_line_bytes`` (not counting its line ending) is reported and skipped without
    being read into memory.
    """

    def __init__(self, path: str | Path, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        self.path = Path(path)
        if max_line_bytes < 1:
            raise ConfigError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        _check_prompts_path(self.path)
        self.records = 0
        self.invalid_lines = 0
        self.blank_lines = 0

    def __iter__(self) -> Iterator[PromptRecord | PromptError]:
        self.records = 0
        self.invalid_lines = 0
        self.blank_lines = 0
        seen_ids = DigestSet()

        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise ConfigError(f"cannot open prompts file {self.path}: {exc.strerror}") from exc
        with handle:
            for number, content in _read_lines(handle, self.max_line_bytes):
                item = self._read_line(number, content, seen_ids)
                if item is None:
                    self.blank_lines += 1
                    continue
                if isinstance(item, PromptError):
                    self.invalid_lines += 1
                    logger.debug("invalid prompt line: %s", item)
                else:
                    self.records += 1
                yield item

    def _read_line(
        self, number: int, content: bytes | None, seen_ids: DigestSet
    ) -> PromptRecord | PromptError | None:
        """Validate one line; return None for a blank line."""
        path = str(self.path)
        if content is None:
            return PromptError(
                f"line is longer than {self.max_line_bytes} bytes; split the prompt or raise"
                " max_line_bytes",
                path=path,
                line=number,
            )
        if number == 1 and content.startswith(_BOM):
            content = content[len(_BOM) :]
        if not content.strip():
            return None

        try:
            document = _decode_json_line(content)
            return self._build_record(number, document, seen_ids)
        except _LineError as exc:
            return PromptError(str(exc), path=path, line=number, field=exc.field)

    def _build_record(self, number: int, document: Any, seen_ids: DigestSet) -> PromptRecord:
        if not isinstance(document, dict):
            raise _LineError(f"expected a JSON object, got {_json_type(document)}")

        has_prompt = "prompt" in document
        has_messages = "messages" in document
        if has_prompt and has_messages:
            raise _LineError("has both prompt and messages; give exactly one", "messages")
        if not has_prompt and not has_messages:
            raise _LineError("has neither prompt nor messages; give exactly one", "prompt")

        prompt = _validate_prompt(document["prompt"]) if has_prompt else None
        messages = _validate_messages(document["messages"]) if has_messages else None
        prompt_id = _prompt_id(document.get("id"), f"{self.path.stem}:{number}")
        if prompt_id in seen_ids:
            raise _LineError(f"duplicate id {prompt_id!r}; ids must be unique in a file", "id")
        seen_ids.add(prompt_id)
        return PromptRecord(number, prompt_id, prompt, messages)


class _LineError(Exception):
    """An invalid line, turned into a PromptError with the path and line number."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


def _check_prompts_path(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"prompts file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"prompts path {path} is a directory; pass a .jsonl file")
    if not path.is_file():
        raise ConfigError(f"prompts path {path} is not a regular file")


def _read_lines(handle: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (1-based line number, content without line ending, or None when too long)."""
    number = 0
    # Two bytes more than the limit leave room for a "\r\n" ending.
    read_size = max_line_bytes + 2
    while True:
        chunk = handle.readline(read_size)
        if not chunk:
            return
        number += 1
        ends_line = chunk.endswith(b"\n")
        if not ends_line and len(chunk) == read_size:
            del chunk
            _skip_rest_of_line(handle)
            yield number, None
            continue

        content = chunk[:-1] if ends_line else chunk
        if content.endswith(b"\r"):
            content = content[:-1]
        yield number, (content if len(content) <= max_line_bytes else None)


def _skip_rest_of_line(handle: BinaryIO) -> None:
    while True:
        chunk = handle.readline(_SKIP_CHUNK_BYTES)
        if not chunk or chunk.endswith(b"\n"):
            return


def _decode_json_line(content: bytes) -> Any:
    """Decode one line, rejecting invalid UTF-8, trailing data, NaN and Infinity."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineError(f"invalid UTF-8 at byte {exc.start} of the line") from exc
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        pass
    # orjson rejects some valid JSON (integers above 64 bits, lone surrogate escapes),
    # and json gives clearer messages, so it decides and explains.
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            message = f"invalid JSON: unexpected data after the object at column {exc.colno}"
            raise _LineError(message) from exc
        raise _LineError(f"invalid JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError as exc:
        raise _LineError("invalid JSON: nested too deeply") from exc
    except ValueError as exc:
        raise _LineError(f"invalid JSON: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _validate_prompt(value: Any) -> str:
    if type(value) is str:
        if not value:
            raise _LineError("prompt is an empty string", "prompt")
        _require_utf8(value, "prompt")
        return value
    if type(value) is list and value and all(type(item) is int for item in value):
        raise _LineError(
            "prompt is a list of token ids; only text prompts are supported", "prompt"
        )
    if type(value) is list and value and all(type(item) is str for item in value):
        raise _LineError(
            "prompt is a list of strings; put each prompt on its own line", "prompt"
        )
    raise _LineError(f"prompt must be a non-empty string, got {_json_type(value)}", "prompt")


def _validate_messages(value: Any) -> tuple[dict[str, str], ...]:
    if type(value) is not list or not value:
        found = "an empty list" if value == [] else _json_type(value)
        raise _LineError(f"messages must be a non-empty list of messages, got {found}", "messages")
    return tuple(_validate_message(message, index) for index, message in enumerate(value))


def _validate_message(message: Any, index: int) -> dict[str, str]:
    field = f"messages[{index}]"
    if type(message) is not dict:
        raise _LineError(f"{field} must be an object, got {_json_type(message)}", field)

    role = message.get("role")
    if role not in MESSAGE_ROLES:
        roles = ", ".join(sorted(MESSAGE_ROLES))
        found = repr(role) if type(role) is str else _json_type(role)
        raise _LineError(f"{field}.role must be one of {roles}, got {found:.60}", f"{field}.role")
    content = message.get("content")
    if type(content) is not str:
        raise _LineError(
            f"{field}.content must be a string, got {_json_type(content)}", f"{field}.content"
        )
    _require_utf8(content, f"{field}.content")

    for key, item in message.items():
        if key in ("role", "content"):
            continue
        key_field = f"{field}.{key}"
        if key not in MESSAGE_OPTIONAL_FIELDS:
            allowed = ", ".join(["role", "content", *sorted(MESSAGE_OPTIONAL_FIELDS)])
            message_text = f"{field} has unsupported key {key!r:.60}; allowed keys: {allowed}"
            raise _LineError(message_text, key_field)
        if type(item) is not str:
            raise _LineError(f"{key_field} must be a string, got {_json_type(item)}", key_field)
        _require_utf8(item, key_field)
    return dict(message)


def _prompt_id(value: Any, default: str) -> str:
    if value is None:
        return default
    if type(value) is int:
        return str(value)
    if type(value) is str and value:
        _require_utf8(value, "id")
        return value
    found = "an empty string" if value == "" else _json_type(value)
    raise _LineError(f"id must be a non-empty string or an integer, got {found}", "id")


def _require_utf8(value: str, field: str) -> None:
    # json accepts escapes of lone UTF-16 surrogates (\ud800), which cannot be encoded
    # into a request body.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _LineError(f"{field} contains a lone UTF-16 surrogate escape", field) from exc


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "a boolean"
    if type(value) in (int, float):
        return "a number"
    if type(value) is str:
        return "a string"
    if type(value) is list:
        return "a list"
    if type(value) is dict:
        return "an object"
    return type(value).__name__
