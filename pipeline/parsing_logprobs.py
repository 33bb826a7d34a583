"""Extraction of token logprobs from the three shapes teachers send.

There are three shapes:

- chat: ``logprobs.content[]`` entries with ``token``, ``logprob``, ``bytes`` and
  ``top_logprobs``;
- legacy completions: parallel arrays ``tokens``, ``token_logprobs``, ``top_logprobs``
  (dicts keyed by decoded text) and ``text_offset``;
- llama.cpp's native ``completion_probabilities``: probabilities in older builds,
  logprobs in newer ones.

All three fill one
:class:`~storage.schema.LogprobColumns` directly, appending to its flat lists instead of
building an object per alternative: at 20 alternatives per token this loop is the
hot path of harvesting, so the common case (a finite float in ``(-1000, 0]``) is tested
inline and only unusual values go through :func:`checked_logprob`.

Value rules, the same in every shape: a logprob at or below
:data:`~storage.schema.MASKED_LOGPROB_THRESHOLD` or ``-inf`` is masked and stored as
``None``. A positive value up to :data:`POSITIVE_LOGPROB_TOLERANCE` is rounding noise and
is clamped to 0. A larger positive value or NaN raises :class:`ResponseFormatError` naming
the position. Token bytes come from the teacher's ``bytes`` field when present, and are
otherwise derived from the token text (see :func:`derive_token_bytes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ResponseFormatError
from storage.schema import MASKED_LOGPROB_THRESHOLD, LogprobColumns

# Logprobs are often sent rounded or computed in float32 after a softmax, so a
# most-likely token can come out as +1e-7. Anything above this is not rounding.
POSITIVE_LOGPROB_TOLERANCE = 1e-3

# Probabilities (llama.cpp's older native format) above 1 by at most this much are
# rounding noise and become logprob 0.
PROBABILITY_TOLERANCE = 1e-3

_MASK = MASKED_LOGPROB_THRESHOLD
_MISSING = object()
_HEX_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_ONLY_HEX_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")

NOTE_COLLAPSED = "legacy top_logprobs dict lost alternatives or disagrees with token_logprobs"
NOTE_CHOSEN_UNKNOWN = "chosen token is not among the alternatives, so its logprob is unknown"


@dataclass(slots=True)
class ExtractedLogprobs:
    """Token logprobs of one choice, with the format they came in and any loss."""

    columns: LogprobColumns
    format: str
    lossy: bool = False
    note: str | None = None


def extract_openai_logprobs(
    logprobs: Any, where: str, top_logprobs: int | None
) -> ExtractedLogprobs | None:
    """Extract the ``logprobs`` object of an OpenAI-style choice.

    The shape decides the parser, not the endpoint, because some servers return
    ``content: null`` and the legacy parallel arrays in a chat response. Returns ``None`` when
    the object carries no token logprobs (``null``, or ``content: null`` and no arrays).
    """
    if logprobs is None:
        return None
    if type(logprobs) is not dict:
        raise shape_error(where, "an object or null", logprobs)

    content = logprobs.get("content")
    legacy_tokens = logprobs.get("tokens")
    if type(content) is list and (content or legacy_tokens is None):
        columns = LogprobColumns()
        fill_chat_entries(content, f"{where}.content", columns)
        return ExtractedLogprobs(columns, "chat")
    if content is not None and type(content) is not list:
        raise shape_error(f"{where}.content", "a list or null", content)
    if legacy_tokens is not None:
        return extract_legacy(logprobs, where, top_logprobs)
    return None


def fill_chat_entries(entries: list[Any], where: str, columns: LogprobColumns) -> None:
    """Append chat-format entries (``token``, ``logprob``, ``bytes``, ``top_logprobs``)."""
    tokens = columns.tokens
    token_bytes = columns.token_bytes
    token_logprobs = columns.token_logprobs
    top_counts = columns.top_counts

    for position, entry in enumerate(entries):
        if type(entry) is not dict:
            raise shape_error(f"{where}[{position}]", "an object", entry)
        token = entry.get("token")
        if type(token) is not str:
            raise shape_error(f"{where}[{position}].token", "a string", token)

        logprob = entry.get("logprob", _MISSING)
        if type(logprob) is not float or not (_MASK < logprob <= 0.0):
            logprob = checked_logprob(logprob, f"{where}[{position}].logprob")

        tokens.append(token)
        token_logprobs.append(logprob)
        token_bytes.append(token_bytes_of(entry.get("bytes"), token, f"{where}[{position}].bytes"))

        alternatives = entry.get("top_logprobs")
        if alternatives is None:
            top_counts.append(0)
        elif type(alternatives) is list:
            fill_chat_alternatives(alternatives, f"{where}[{position}].top_logprobs", columns)
            top_counts.append(len(alternatives))
        else:
            raise shape_error(f"{where}[{position}].top_logprobs", "a list", alternatives)


def fill_chat_alternatives(alternatives: list[Any], where: str, columns: LogprobColumns) -> None:
    """Append one position's alternatives, each ``{token, logprob, bytes}``."""
    top_tokens = columns.top_tokens
    top_logprobs = columns.top_logprobs
    top_bytes = columns.top_bytes

    for index, alternative in enumerate(alternatives):
        if type(alternative) is not dict:
            raise shape_error(f"{where}[{index}]", "an object", alternative)
        token = alternative.get("token")
        if type(token) is not str:
            raise shape_error(f"{where}[{index}].token", "a string", token)

        logprob = alternative.get("logprob", _MISSING)
        if type(logprob) is not float or not (_MASK < logprob <= 0.0):
            logprob = checked_logprob(logprob, f"{where}[{index}].logprob")

        raw = alternative.get("bytes")
        if type(raw) is list:
            try:
                raw = bytes(raw)
            except (TypeError, ValueError) as exc:
                raise ResponseFormatError(
                    f"{where}[{index}].bytes: expected a list of integers 0-255"
                ) from exc
        else:
            raw = token_bytes_of(raw, token, f"{where}[{index}].bytes")
        top_tokens.append(token)
        top_logprobs.append(logprob)
        top_bytes.append(raw)


def extract_legacy(
    logprobs: dict[str, Any], where: str, top_logprobs: int | None
) -> ExtractedLogprobs:
    """Extract the legacy completions form: parallel arrays checked for equal length.

    ``top_logprobs[i]`` is a dict keyed by decoded token text, so distinct tokens that
    decode to the same text collapse into one key and a position can hold fewer keys
    than requested. The chosen token's logprob always comes from
    ``token_logprobs[i]``; where the dict disagrees with it, the dict's entry is
    overwritten and the choice is marked lossy.
    """
    tokens = _string_list(logprobs.get("tokens"), f"{where}.tokens")
    count = len(tokens)
    raw_logprobs = _parallel_list(logprobs, "token_logprobs", count, where, required=True)
    tops = _parallel_list(logprobs, "top_logprobs", count, where, required=False)
    offsets = _parallel_list(logprobs, "text_offset", count, where, required=False)

    columns = LogprobColumns(tokens=tokens)
    for position, (token, logprob) in enumerate(zip(tokens, raw_logprobs)):
        if type(logprob) is not float or not (_MASK < logprob <= 0.0):
            logprob = checked_logprob(logprob, f"{where}.token_logprobs[{position}]")
        columns.token_logprobs.append(logprob)
        columns.token_bytes.append(derive_token_bytes(token))

    lossy = False
    if tops is None:
        columns.top_counts = [0] * count
    else:
        lossy = _fill_legacy_alternatives(tops, f"{where}.top_logprobs", top_logprobs, columns)
    if offsets is not None:
        columns.text_offset = _offset_list(offsets, f"{where}.text_offset")
    return ExtractedLogprobs(columns, "completions", lossy, NOTE_COLLAPSED if lossy else None)


def _fill_legacy_alternatives(
    tops: list[Any], where: str, requested: int | None, columns: LogprobColumns
) -> bool:
    """Append legacy alternatives and return whether any position lost information."""
    # A provider may cap k below the request (100 asked, 5 sent at every position):
    # the largest count seen is taken as that cap, and only a position with fewer keys
    # than min(requested, cap) is evidence of collapsed keys. Without a requested k
    # there is no such evidence, because OpenAI adds the chosen token as a (k+1)-th key
    # at some positions only.
    observed_max = max((len(top) for top in tops if type(top) in (dict, list)), default=0)
    expected = 0 if not requested else min(requested, observed_max)
    lossy = False

    for position, top in enumerate(tops):
        if top is None:
            columns.top_counts.append(0)
        elif type(top) is dict:
            if 0 < len(top) < expected:
                lossy = True
            if _fill_legacy_dict(top, position, where, columns):
                lossy = True
            columns.top_counts.append(len(top))
        elif type(top) is list:
            # Some servers send the chat-style list of objects inside the legacy arrays.
            fill_chat_alternatives(top, f"{where}[{position}]", columns)
            columns.top_counts.append(len(top))
        else:
            raise shape_error(f"{where}[{position}]", "an object, a list or null", top)
    return lossy


def _fill_legacy_dict(
    top: dict[str, Any], position: int, where: str, columns: LogprobColumns
) -> bool:
    """Append one legacy dict's alternatives; return True if it disagrees with the chosen token."""
    chosen_token = columns.tokens[position]
    chosen_logprob = columns.token_logprobs[position]
    disagrees = False

    for token, logprob in top.items():
        if type(token) is not str:
            # Only a caller's mapping can hold non-string keys; JSON keys are strings.
            raise shape_error(f"{where}[{position}] key", "a string", token)
        if type(logprob) is not float or not (_MASK < logprob <= 0.0):
            logprob = checked_logprob(logprob, f"{where}[{position}][{token!r}]")
        if token == chosen_token and not _same_logprob(logprob, chosen_logprob):
            disagrees = True
            logprob = chosen_logprob
        columns.top_tokens.append(token)
        columns.top_logprobs.append(logprob)
        columns.top_bytes.append(derive_token_bytes(token))
    return disagrees


def extract_llamacpp(entries: Any, where: str) -> ExtractedLogprobs | None:
    """Extract llama.cpp's native ``completion_probabilities``.

    Each entry is either the older form ``{content, probs: [{tok_str, prob}]}``, whose
    chosen logprob must be looked up among the alternatives, or the newer
    ``{id, token, logprob | prob, bytes, top_logprobs | top_probs}``. Probabilities
    become logs, and probability 0 becomes masked.
    """
    if entries is None:
        return None
    if type(entries) is not list:
        raise shape_error(where, "a list or null", entries)

    columns = LogprobColumns()
    lossy = False
    for position, entry in enumerate(entries):
        if not _fill_llamacpp_entry(entry, f"{where}[{position}]", columns):
            lossy = True
    return ExtractedLogprobs(columns, "llamacpp", lossy, NOTE_CHOSEN_UNKNOWN if lossy else None)


def _fill_llamacpp_entry(entry: Any, where: str, columns: LogprobColumns) -> bool:
    """Append one native entry; return False when the chosen token's logprob is unknown."""
    if type(entry) is not dict:
        raise shape_error(where, "an object", entry)
    token = entry.get("token", _MISSING)
    if token is _MISSING:
        token = entry.get("content")
    if type(token) is not str:
        raise shape_error(f"{where}.token", "a string", token)

    start = len(columns.top_logprobs)
    count = _fill_llamacpp_alternatives(entry, where, columns)

    known = True
    if "logprob" in entry:
        logprob = checked_logprob(entry["logprob"], f"{where}.logprob")
    elif "prob" in entry:
        logprob = logprob_from_probability(entry["prob"], f"{where}.prob")
    else:
        # Older builds give the chosen token only as one of the alternatives.
        logprob = None
        known = False
        for offset in range(count):
            if columns.top_tokens[start + offset] == token:
                logprob = columns.top_logprobs[start + offset]
                known = True
                break

    columns.tokens.append(token)
    columns.token_logprobs.append(logprob)
    columns.token_bytes.append(token_bytes_of(entry.get("bytes"), token, f"{where}.bytes"))
    columns.top_counts.append(count)
    return known


def _fill_llamacpp_alternatives(entry: dict[str, Any], where: str, columns: LogprobColumns) -> int:
    """Append a native entry's alternatives from whichever key contains them; return the count."""
    for key, is_probability in (("top_logprobs", False), ("top_probs", True), ("probs", True)):
        alternatives = entry.get(key)
        if alternatives is None:
            continue
        if type(alternatives) is not list:
            raise shape_error(f"{where}.{key}", "a list", alternatives)
        for index, alternative in enumerate(alternatives):
            where_alternative = f"{where}.{key}[{index}]"
            _append_llamacpp_alternative(alternative, where_alternative, is_probability, columns)
        return len(alternatives)
    return 0


def _append_llamacpp_alternative(
    alternative: Any, where: str, is_probability: bool, columns: LogprobColumns
) -> None:
    if type(alternative) is not dict:
        raise shape_error(where, "an object", alternative)
    token = alternative.get("token", _MISSING)
    if token is _MISSING:
        token = alternative.get("tok_str")
    if type(token) is not str:
        raise shape_error(f"{where}.token", "a string", token)

    if is_probability:
        logprob = logprob_from_probability(alternative.get("prob", _MISSING), f"{where}.prob")
    else:
        logprob = checked_logprob(alternative.get("logprob", _MISSING), f"{where}.logprob")

    columns.top_tokens.append(token)
    columns.top_logprobs.append(logprob)
    columns.top_bytes.append(token_bytes_of(alternative.get("bytes"), token, f"{where}.bytes"))


def checked_logprob(value: Any, where: str) -> float | None:
    """Return ``value`` as a stored logprob: ``None`` when masked, a float <= 0 otherwise.

    Raises ResponseFormatError for a missing value, a non-number, NaN, or a positive
    value beyond :data:`POSITIVE_LOGPROB_TOLERANCE`. ``null`` is kept as ``None``
    because servers send it where no conditional probability exists (the first token
    of an echoed prompt).
    """
    if value is None:
        return None
    if value is _MISSING:
        raise ResponseFormatError(f"{where}: missing")
    value = _as_float(value, where)
    if math.isnan(value):
        raise ResponseFormatError(f"{where}: logprob is NaN")
    if value <= _MASK:
        return None
    if value > 0.0:
        if value <= POSITIVE_LOGPROB_TOLERANCE:
            return 0.0
        raise ResponseFormatError(
            f"{where}: logprob {value!r} is positive; a log-probability must be <= 0"
        )
    return value


def logprob_from_probability(value: Any, where: str) -> float | None:
    """Convert a probability in [0, 1] to a stored logprob; 0 becomes masked (``None``)."""
    if value is _MISSING:
        raise ResponseFormatError(f"{where}: missing")
    value = _as_float(value, where)
    if math.isnan(value) or value < 0.0 or value > 1.0 + PROBABILITY_TOLERANCE:
        raise ResponseFormatError(f"{where}: probability {value!r} is outside [0, 1]")
    if value == 0.0:
        return None
    return checked_logprob(math.log(min(value, 1.0)), where)


def _as_float(value: Any, where: str) -> float:
    if type(value) is bool or not isinstance(value, (int, float)):
        raise shape_error(where, "a number", value)
    try:
        return float(value)
    except OverflowError:
        # An integer beyond the float range, as the json fallback can produce.
        return math.inf if value > 0 else -math.inf


def token_bytes_of(raw: Any, token: str, where: str) -> bytes:
    """Return a token's bytes: the teacher's ``bytes`` list when given, else derived from text."""
    if raw is None:
        return derive_token_bytes(token)
    if type(raw) is list:
        try:
            return bytes(raw)
        except (TypeError, ValueError) as exc:
            raise ResponseFormatError(f"{where}: expected a list of integers 0-255") from exc
    raise shape_error(where, "a list of integers or null", raw)


def derive_token_bytes(token: str) -> bytes:
    """Derive a token's bytes from its text when the teacher sent no ``bytes``.

    Servers write a token that is not valid UTF-8 on its own (one piece of a multi-byte
    character) as hex escapes: legacy OpenAI as ``bytes:\\xf0\\x9f``, others as the bare
    text ``\\xf0\\x9f\\x98``. Both are decoded to the raw bytes. A bare escape sequence
    that decodes to valid UTF-8 is taken as literal text, because a server would have
    sent that text unescaped.
    """
    if "\\" not in token:
        return token.encode("utf-8")
    if token.startswith("bytes:\\x"):
        return _decode_hex_escapes(token[6:])
    if _ONLY_HEX_ESCAPES.fullmatch(token):
        raw = _decode_hex_escapes(token)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    return token.encode("utf-8")


def _decode_hex_escapes(text: str) -> bytes:
    out = bytearray()
    last = 0
    for match in _HEX_ESCAPE.finditer(text):
        out += text[last : match.start()].encode("utf-8")
        out.append(int(match.group(1), 16))
        last = match.end()
    out += text[last:].encode("utf-8")
    return bytes(out)


def _same_logprob(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def _string_list(value: Any, where: str) -> list[str]:
    if type(value) is not list:
        raise shape_error(where, "a list", value)
    for position, item in enumerate(value):
        if type(item) is not str:
            raise shape_error(f"{where}[{position}]", "a string", item)
    return list(value)


def _parallel_list(
    logprobs: dict[str, Any], key: str, count: int, where: str, *, required: bool
) -> list[Any] | None:
    value = logprobs.get(key)
    if value is None:
        if required:
            raise ResponseFormatError(f"{where}.{key}: missing, but tokens has {count} entries")
        return None
    if type(value) is not list:
        raise shape_error(f"{where}.{key}", "a list", value)
    if len(value) != count:
        raise ResponseFormatError(
            f"{where}.{key}: has {len(value)} entries, but tokens has {count}"
        )
    return value


def _offset_list(values: list[Any], where: str) -> list[int]:
    for position, value in enumerate(values):
        if type(value) is not int:
            raise shape_error(f"{where}[{position}]", "an integer", value)
        if not 0 <= value < 2**31:
            raise ResponseFormatError(f"{where}[{position}]: integer outside [0, 2**31)")
    return list(values)


def shape_error(where: str, expected: str, value: Any) -> ResponseFormatError:
    """Build the error for a value of the wrong JSON type, without echoing the value."""
    return ResponseFormatError(f"{where}: expected {expected}, got {describe_json_type(value)}")


def describe_json_type(value: Any) -> str:
    """Name a JSON value's type for error messages, without echoing the value."""
    if value is _MISSING:
        return "nothing"
    if value is None:
        return "null"
    if type(value) is bool:
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
