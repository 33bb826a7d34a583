"""Parsing of teacher response bodies into checked, storable records.

Every teacher body enters the project here, so this module treats it as untrusted:
any input ends either in a :class:`ParsedResponse` or in one of the errors of
:mod:`pipeline.errors` (:class:`TruncatedBodyError`, :class:`ResponseFormatError`,
:class:`MissingLogprobsError`, or a :class:`TeacherError` subclass for an error object
inside a 200 body), never in another exception.

A chat body of the common shape is decoded by the typed fast path in
:mod:`pipeline.parsing_fast`; every other body, and any body that path declines, is
decoded with orjson, which is several times faster than :mod:`json` on the large
logprob bodies of top-k harvesting. orjson rejects the ``NaN`` and ``-Infinity``
literals that some servers emit for masked tokens, so a body it rejects is decoded again
with :mod:`json`, which accepts them. Only that fallback can produce strings with lone
UTF-16 surrogates, so only its results are checked for them. The token logprob
formats themselves are handled in :mod:`pipeline.parsing_logprobs`.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.errors import (
    ClientError,
    MissingLogprobsError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TruncatedBodyError,
)
from pipeline.parsing_fast import FastChoice, decode_chat
from pipeline.parsing_logprobs import (
    ExtractedLogprobs,
    describe_json_type,
    extract_llamacpp,
    extract_openai_logprobs,
    shape_error,
)
from storage.schema import LogprobColumns

ENDPOINTS = ("chat", "completions", "llamacpp")

ERROR_SUMMARY_MAX_CHARS = 300
"""Maximum length of an error message built from a teacher body."""

NOTE_NO_LOGPROBS = "no logprobs returned"
NOTE_NO_CONTENT = "no content"
NOTE_NO_TOKENS = "logprobs contain no tokens"
NOTE_BYTES_MISMATCH = "token bytes do not match the response text"
NOTE_NO_ALTERNATIVES = "no top-k alternatives returned"

_BOM = b"\xef\xbb\xbf"
_INT32_MAX = 2**31 - 1

# Text that may follow a JSON decode error's position when the body was cut off there:
# the rest of a number, of a literal (true, NaN, -Infinity, ...), or of a \u escape.
_INCOMPLETE_TAIL = re.compile(
    r"-?\d*\.?\d*(?:[eE][+-]?\d*)?"
    r"|-?I(?:n(?:f(?:i(?:n(?:i(?:ty?)?)?)?)?)?)?"
    r"|N(?:aN?)?|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?"
)
_INCOMPLETE_ESCAPE = re.compile(r"\\?u?[0-9a-fA-F]{0,4}")
_HTML_MARKER = re.compile(r"<\s*(?:!doctype|html|head|body|title|center|h1|p)\b", re.IGNORECASE)
_HTML_DROPPED = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")
_HTML_CLOSING_TAG = re.compile(r"</[a-zA-Z][a-zA-Z0-9]*\s*>")
_WHITESPACE = re.compile(r"[\s\x00-\x1f\x7f]+")


@dataclass(slots=True)
class ParsedChoice:
    """One choice of a teacher response, with its token logprobs when present.

    ``text`` is ``None`` when the teacher returned ``content: null`` (for example with
    ``finish_reason`` ``content_filter``). ``token_bytes_match`` is ``None`` when there
    are no logprobs. ``token_level_ok`` is True only when logprobs are present, not
    lossy, contain tokens and top-k alternatives (when some were requested), and their
    bytes concatenate to the UTF-8 of ``text``. ``logprobs_note`` then gives the reason
    it is False.
    """

    index: int
    text: str | None
    finish_reason: str | None
    logprobs: LogprobColumns | None
    logprobs_format: str | None
    logprobs_lossy: bool
    token_bytes_match: bool | None
    token_level_ok: bool
    logprobs_note: str | None


@dataclass(slots=True)
class ParsedResponse:
    """A teacher response: reported model, token usage and the parsed choices."""

    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    choices: list[ParsedChoice]


def parse_response(
    body: bytes | str | Mapping[str, Any],
    *,
    endpoint: str,
    top_logprobs: int | None,
    logprobs_required: bool,
) -> ParsedResponse:
    """Parse one teacher response body (HTTP 200) into a :class:`ParsedResponse`.

    ``endpoint`` is ``"chat"`` (``/v1/chat/completions``), ``"completions"``
    (``/v1/completions``) or ``"llamacpp"`` (llama.cpp's native ``/completion``).
    ``top_logprobs`` is the number of alternatives requested per token, used to detect
    collapsed legacy alternatives. With ``logprobs_required``, a choice that has text
    but no logprobs raises :class:`MissingLogprobsError`.

    Raises TruncatedBodyError when the body is incomplete JSON (retryable),
    ResponseFormatError when its shape or values are invalid, and RateLimitError,
    ServerError or ClientError for an ``error`` object inside the body.
    """
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if endpoint == "chat" and type(body) is bytes:
        decoded = decode_chat(body)
        if decoded is not None:
            return _parse_fast_chat(*decoded, top_logprobs, logprobs_required)

    document, from_orjson = _load_document(body)
    if not isinstance(document, Mapping):
        found = describe_json_type(document)
        raise ResponseFormatError(f"response body is {found}, expected a JSON object")
    _raise_embedded_error(document, "response")

    try:
        if endpoint == "llamacpp":
            parsed = _parse_llamacpp(document, top_logprobs, logprobs_required)
        else:
            parsed = _parse_openai(document, endpoint, top_logprobs, logprobs_required)
        if not from_orjson:
            _check_unicode(parsed)
    except UnicodeEncodeError as exc:
        # Only strings from the json fallback or a caller's mapping can hold these.
        raise ResponseFormatError(
            "response contains a lone UTF-16 surrogate (an invalid \\uD800-\\uDFFF escape)"
        ) from exc
    return parsed


def _load_document(body: bytes | str | Mapping[str, Any]) -> tuple[Any, bool]:
    """Decode a body into Python values; also return whether orjson decoded it."""
    if isinstance(body, Mapping):
        return body, False
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if isinstance(body, bytes) and body.startswith(_BOM):
        body = body[len(_BOM) :]
    elif isinstance(body, str) and body.startswith("\ufeff"):
        body = body[1:]
    if not isinstance(body, (bytes, str)):
        raise TypeError(f"body must be bytes, str or a mapping, got {type(body).__name__}")
    if not body.strip():
        raise TruncatedBodyError("response body is empty")

    try:
        return orjson.loads(body), True
    except orjson.JSONDecodeError:
        pass
    return _load_with_json(body), False


def _load_with_json(body: bytes | str) -> Any:
    """Decode with :mod:`json`, which accepts NaN and Infinity, and classify failures."""
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":
                raise TruncatedBodyError(
                    f"response body ends inside a UTF-8 character at byte {exc.start}"
                ) from exc
            message = f"response body is not valid UTF-8 (byte {exc.start})"
            raise ResponseFormatError(message) from exc
    else:
        text = body

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if _is_truncated(text, exc):
            raise TruncatedBodyError(
                f"response body is incomplete JSON ({len(text)} characters, {exc.msg})"
            ) from exc
        raise ResponseFormatError(
            f"response body is not JSON ({exc.msg} at character {exc.pos}):"
            f" {summarize_error_body(text.encode('utf-8', 'replace'), None)}"
        ) from exc
    except RecursionError as exc:
        raise ResponseFormatError("response body is nested too deeply") from exc
    except ValueError as exc:
        # For example an integer of more digits than Python converts by default.
        raise ResponseFormatError(f"response body has an invalid value: {exc}") from exc


def _is_truncated(text: str, exc: json.JSONDecodeError) -> bool:
    """Return whether a decode error means the text stopped early, not that it is wrong."""
    if exc.msg.startswith("Unterminated string"):
        return True
    if exc.msg == "Extra data":
        return False
    tail = text[exc.pos :].rstrip()
    if exc.msg.startswith("Invalid \\uXXXX escape"):
        return _INCOMPLETE_ESCAPE.fullmatch(tail) is not None
    return _INCOMPLETE_TAIL.fullmatch(tail) is not None


def _raise_embedded_error(container: Mapping[str, Any], where: str) -> None:
    """Raise the typed TeacherError for an ``error`` sent inside a 200 body or choice.

    The status comes from the error object's ``code`` or ``status``, else from the
    container's own. A null, false, zero or empty ``error`` means no error.
    """
    error = container.get("error")
    if not error:
        return
    if isinstance(error, Mapping):
        status = _embedded_status(error)
        message = error.get("message")
        detail = message if isinstance(message, str) else _compact_json(error)
    else:
        status = None
        detail = error if isinstance(error, str) else _compact_json(error)
    if status is None:
        status = _embedded_status(container)

    status_text = f" (status {status})" if status is not None else ""
    message = _clean_text(f"teacher returned an error in a 200 {where}{status_text}: {detail}")
    if status == 429:
        raise RateLimitError(message, status=status)
    if status is not None and 500 <= status <= 599:
        raise ServerError(message, status=status)
    raise ClientError(message, status=status)


def _embedded_status(fields: Mapping[str, Any]) -> int | None:
    """Return the HTTP error status (400-599) in ``code``, ``status`` or similar, if any."""
    for key in ("code", "status", "status_code", "http_status"):
        value = fields.get(key)
        if isinstance(value, str) and len(value.strip()) == 3 and value.strip().isdecimal():
            value = int(value.strip())
        if type(value) is int and 400 <= value <= 599:
            return value
    return None


def _parse_openai(
    document: Mapping[str, Any], endpoint: str, top_logprobs: int | None, required: bool
) -> ParsedResponse:
    raw_choices = document.get("choices")
    if type(raw_choices) is not list or not raw_choices:
        found = "an empty list" if raw_choices == [] else describe_json_type(raw_choices)
        raise ResponseFormatError(f"response has no choices (choices is {found})")

    choices = []
    for position, raw in enumerate(raw_choices):
        where = f"choices[{position}]"
        if not isinstance(raw, Mapping):
            raise shape_error(where, "an object", raw)
        _raise_embedded_error(raw, where)

        index = raw.get("index", position)
        if type(index) is not int:
            raise shape_error(f"{where}.index", "an integer", index)
        if endpoint == "chat":
            text = _chat_text(raw, where)
        else:
            text = _optional_str(raw.get("text"), f"{where}.text")
        finish_reason = _optional_str(raw.get("finish_reason"), f"{where}.finish_reason")
        extracted = extract_openai_logprobs(raw.get("logprobs"), f"{where}.logprobs", top_logprobs)
        choices.append(
            _build_choice(index, text, finish_reason, extracted, where, top_logprobs, required)
        )

    return _openai_response(document, choices)


def _parse_fast_chat(
    fields: dict[str, Any], fast_choices: list[FastChoice], top_logprobs: int | None, required: bool
) -> ParsedResponse:
    """Finish a chat body that :func:`pipeline.parsing_fast.decode_chat` decoded."""
    choices = [
        _build_choice(
            choice.index, choice.text, choice.finish_reason, choice.extracted,
            f"choices[{position}]", top_logprobs, required,
        )
        for position, choice in enumerate(fast_choices)
    ]
    return _openai_response(fields, choices)


def _openai_response(document: Mapping[str, Any], choices: list[ParsedChoice]) -> ParsedResponse:
    """Build the response from the choices and the document's ``model`` and ``usage``."""
    usage = document.get("usage")
    usage = usage if isinstance(usage, Mapping) else {}
    return ParsedResponse(
        model=_model_name(document),
        prompt_tokens=_token_count(usage.get("prompt_tokens")),
        completion_tokens=_token_count(usage.get("completion_tokens")),
        choices=choices,
    )


def _chat_text(choice: Mapping[str, Any], where: str) -> str | None:
    """Return a chat choice's ``message.content``; ``None`` when null or absent."""
    message = choice.get("message")
    if message is None:
        return None
    if not isinstance(message, Mapping):
        raise shape_error(f"{where}.message", "an object", message)
    content = message.get("content")
    if content is None or type(content) is str:
        return content
    if type(content) is list:
        # Some servers send content as a list of parts; only text parts are kept.
        where_content = f"{where}.message.content"
        parts = [_text_part(part, f"{where_content}[{i}]") for i, part in enumerate(content)]
        return "".join(parts)
    raise shape_error(f"{where}.message.content", "a string, a list or null", content)


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, Mapping):
        raise shape_error(where, "an object", part)
    if part.get("type", "text") != "text":
        return ""
    text = part.get("text")
    if type(text) is not str:
        raise shape_error(f"{where}.text", "a string", text)
    return text


def _parse_llamacpp(
    document: Mapping[str, Any], top_logprobs: int | None, required: bool
) -> ParsedResponse:
    """Parse llama.cpp's native ``/completion`` body into a single choice."""
    text = _optional_str(document.get("content"), "content")
    where = "completion_probabilities"
    extracted = extract_llamacpp(document.get(where), where)
    finish_reason = _llamacpp_finish_reason(document)
    choice = _build_choice(0, text, finish_reason, extracted, where, top_logprobs, required)

    timings = document.get("timings")
    timings = timings if isinstance(timings, Mapping) else {}
    prompt_tokens = document.get("tokens_evaluated", timings.get("prompt_n"))
    completion_tokens = document.get("tokens_predicted", timings.get("predicted_n"))
    settings = document.get("generation_settings")
    model = _model_name(document)
    if model is None and isinstance(settings, Mapping):
        model = _model_name(settings)
    return ParsedResponse(
        model=model,
        prompt_tokens=_token_count(prompt_tokens),
        completion_tokens=_token_count(completion_tokens),
        choices=[choice],
    )


def _llamacpp_finish_reason(document: Mapping[str, Any]) -> str | None:
    """Map llama.cpp's stop fields to OpenAI's ``finish_reason`` values."""
    stop_type = document.get("stop_type")
    if stop_type in ("eos", "word"):
        return "stop"
    if stop_type == "limit":
        return "length"
    # Builds before ``stop_type`` report booleans instead.
    if document.get("stopped_limit") is True:
        return "length"
    if document.get("stopped_eos") is True or document.get("stopped_word") is True:
        return "stop"
    return None


def _build_choice(
    index: int,
    text: str | None,
    finish_reason: str | None,
    extracted: ExtractedLogprobs | None,
    where: str,
    top_logprobs: int | None,
    required: bool,
) -> ParsedChoice:
    """Decide whether a choice's logprobs are usable, and raise when required ones are missing."""
    has_tokens = extracted is not None and len(extracted.columns) > 0
    if required and text and not has_tokens:
        shape = "none" if extracted is None else "an empty token list"
        raise MissingLogprobsError(
            f"{where}: logprobs were requested but the teacher returned {shape};"
            " enable logprobs on the server or stop requesting them for this teacher"
        )
    if extracted is None:
        note = NOTE_NO_CONTENT if text is None else NOTE_NO_LOGPROBS
        return ParsedChoice(index, text, finish_reason, None, None, False, None, False, note)

    columns = extracted.columns
    # Every extractor stores str tokens, float or None logprobs and bytes.
    columns.element_types_checked = True
    expected = text.encode("utf-8") if text is not None else b""
    bytes_match = b"".join(columns.token_bytes) == expected
    note = _usability_note(extracted, bytes_match, top_logprobs)
    return ParsedChoice(
        index=index,
        text=text,
        finish_reason=finish_reason,
        logprobs=columns,
        logprobs_format=extracted.format,
        logprobs_lossy=extracted.lossy,
        token_bytes_match=bytes_match,
        token_level_ok=note is None,
        logprobs_note=note,
    )


def _usability_note(
    extracted: ExtractedLogprobs, bytes_match: bool, top_logprobs: int | None
) -> str | None:
    """Return why the logprobs are unusable for token-level training, or None when usable."""
    columns = extracted.columns
    if len(columns) == 0:
        return NOTE_NO_TOKENS
    if extracted.lossy:
        return extracted.note
    if not bytes_match:
        return NOTE_BYTES_MISMATCH
    if top_logprobs and not columns.top_tokens:
        return NOTE_NO_ALTERNATIVES
    return None


def _check_unicode(parsed: ParsedResponse) -> None:
    """Raise UnicodeEncodeError if a string to be stored contains a lone surrogate."""
    # One join and encode per list is far cheaper than a check per string.
    parts = [parsed.model or ""]
    for choice in parsed.choices:
        parts += (choice.text or "", choice.finish_reason or "")
        if choice.logprobs is not None:
            parts.append("".join(choice.logprobs.tokens))
            parts.append("".join(token or "" for token in choice.logprobs.top_tokens))
    "".join(parts).encode("utf-8")


def _optional_str(value: Any, where: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise shape_error(where, "a string or null", value)


def _model_name(document: Mapping[str, Any]) -> str | None:
    model = document.get("model")
    return model if type(model) is str else None


def _token_count(value: Any) -> int | None:
    """Return a usage count that fits the store's int32 column, else None."""
    if type(value) is int and 0 <= value <= _INT32_MAX:
        return value
    return None


def summarize_error_body(body: bytes | str, content_type: str | None) -> str:
    """Return a short, single-line summary of an HTTP error body for error messages.

    A JSON body is reduced to its error message and code. An HTML page (a proxy's error
    page) loses its tags, scripts and styles. The result is capped at
    :data:`ERROR_SUMMARY_MAX_CHARS` characters.
    """
    if isinstance(body, str):
        text = body.strip()
    else:
        text = bytes(body).decode("utf-8", errors="replace").strip()
    if not text:
        return "(empty body)"

    content_type = (content_type or "").lower()
    if "json" in content_type or text[:1] in "{[":
        try:
            message = _json_error_message(json.loads(text))
        except (ValueError, RecursionError):
            message = None
        if message:
            return _clean_text(message)
    if "html" in content_type:
        return _clean_text(_html_to_text(text))
    return _clean_text(text)


def _json_error_message(document: Any) -> str | None:
    """Return the message of a JSON error body, with its code when it has one."""
    if not isinstance(document, Mapping):
        return _compact_json(document)
    error = document.get("error", document)
    if isinstance(error, str):
        return error
    if not isinstance(error, Mapping):
        return _compact_json(document)

    message = error.get("message", error.get("detail"))
    if not isinstance(message, str):
        return _compact_json(document)
    code = error.get("code", error.get("type"))
    if isinstance(code, (str, int)) and type(code) is not bool and str(code) not in message:
        return f"{message} (code {code})"
    return message


def _html_to_text(text: str) -> str:
    title_match = _HTML_TITLE.search(text)
    title = _WHITESPACE.sub(" ", html.unescape(title_match.group(1))).strip() if title_match else ""
    if title_match:
        text = text[: title_match.start()] + text[title_match.end() :]
    text = _HTML_DROPPED.sub(" ", text)
    text = html.unescape(_HTML_TAG.sub(" ", text))
    text = _WHITESPACE.sub(" ", text).strip()
    if title and not text.startswith(title):
        return f"{title}: {text}" if text else title
    return text


def _clean_text(text: str) -> str:
    """Make one short line of plain text: no HTML, control characters or lone surrogates."""
    if _HTML_MARKER.search(text) or _HTML_CLOSING_TAG.search(text):
        text = _html_to_text(text)
    # A lone surrogate from the json fallback would make the message unstorable in Arrow.
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > ERROR_SUMMARY_MAX_CHARS:
        text = text[: ERROR_SUMMARY_MAX_CHARS - 3].rstrip() + "..."
    return text


def _compact_json(value: Any) -> str:
    limit = ERROR_SUMMARY_MAX_CHARS * 2
    try:
        return json.dumps(value, ensure_ascii=False, default=repr)[:limit]
    except (ValueError, RecursionError):
        # For example an integer of more digits than Python converts to text.
        return f"(a {type(value).__name__} that cannot be shown)"


__all__ = [
    "ENDPOINTS",
    "ERROR_SUMMARY_MAX_CHARS",
    "ParsedChoice",
    "ParsedResponse",
    "parse_response",
    "summarize_error_body",
]
