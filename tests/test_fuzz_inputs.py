"""Property tests: untrusted bodies and prompt files end in a record or a documented error.

The parser must turn any input into a ParsedResponse or raise one of the errors of
pipeline.errors. The prompt reader must yield a record or a PromptError for every
non-blank line and never raise.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import (
    ClientError,
    PromptError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TruncatedBodyError,
)
from pipeline.parsing import ParsedResponse, parse_response
from pipeline.prompts import PromptReader, PromptRecord
from storage.schema import MASKED_LOGPROB_THRESHOLD, build_responses_table, checked_row

DOCUMENTED_ERRORS = (ResponseFormatError, RateLimitError, ServerError, ClientError)
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

KEYS = [
    "choices", "index", "message", "content", "text", "finish_reason", "logprobs", "token",
    "logprob", "bytes", "top_logprobs", "tokens", "token_logprobs", "text_offset", "error",
    "code", "usage", "model", "completion_probabilities", "probs", "prob", "tok_str",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)
SPECIAL_LOGPROBS = [-9999.0, -math.inf, math.nan, math.inf, 0.0, 1e-6, 0.6997, -1000.0, None]
SPECIAL_TOKENS = ["\\xf0\\x9f", "bytes:\\xf0\\x9f", "\ufffd", ""]

logprob_values = (
    st.floats(min_value=-30.0, max_value=0.0) | st.sampled_from(SPECIAL_LOGPROBS) | json_values
)
token_texts = st.text(max_size=4) | st.sampled_from(SPECIAL_TOKENS)
byte_lists = st.none() | st.lists(st.integers(min_value=0, max_value=255), max_size=4) | json_values


@st.composite
def maybe(draw, strategy):
    """Draw a plausible value, or one time in ten an arbitrary JSON value."""
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return draw(json_values)
    return draw(strategy)


@st.composite
def chat_logprobs(draw):
    alternative = st.fixed_dictionaries(
        {"token": maybe(token_texts), "logprob": logprob_values}, optional={"bytes": byte_lists}
    )
    entry = st.fixed_dictionaries(
        {"token": maybe(token_texts), "logprob": logprob_values},
        optional={"bytes": byte_lists, "top_logprobs": maybe(st.lists(alternative, max_size=4))},
    )
    return {"content": draw(maybe(st.lists(entry, max_size=5)))}


@st.composite
def legacy_logprobs(draw):
    size = draw(st.integers(min_value=0, max_value=4))

    def sized(values):
        # Mostly parallel arrays of one length, sometimes of another.
        return st.lists(values, min_size=size, max_size=size) | st.lists(values, max_size=5)

    top = st.none() | st.dictionaries(token_texts, logprob_values, max_size=4)
    return draw(
        st.fixed_dictionaries(
            {"tokens": maybe(sized(token_texts)), "token_logprobs": maybe(sized(logprob_values))},
            optional={
                "top_logprobs": maybe(sized(top)),
                "text_offset": maybe(sized(st.integers(min_value=-2, max_value=2**32))),
                "content": st.none(),
            },
        )
    )


@st.composite
def openai_bodies(draw):
    message = st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": maybe(st.none() | st.text(max_size=8))}
    )
    choice = st.fixed_dictionaries(
        {},
        optional={
            "index": maybe(st.integers(min_value=0, max_value=3)),
            "message": maybe(message),
            "text": maybe(st.text(max_size=8)),
            "finish_reason": maybe(st.sampled_from(["stop", "length", "content_filter"])),
            "logprobs": st.none() | chat_logprobs() | legacy_logprobs() | json_values,
            "error": json_values,
        },
    )
    return draw(
        st.fixed_dictionaries(
            {"choices": maybe(st.lists(choice, max_size=3))},
            optional={
                "model": maybe(st.text(max_size=5)),
                "usage": json_values,
                "error": json_values,
            },
        )
    )


@st.composite
def llamacpp_bodies(draw):
    old_alternative = st.fixed_dictionaries(
        {"tok_str": maybe(token_texts), "prob": maybe(st.floats())}
    )
    old_entry = st.fixed_dictionaries(
        {"content": maybe(token_texts), "probs": st.lists(old_alternative, max_size=3)}
    )
    new_alternative = st.fixed_dictionaries(
        {"token": maybe(token_texts), "logprob": logprob_values}, optional={"bytes": byte_lists}
    )
    new_entry = st.fixed_dictionaries(
        {"token": maybe(token_texts)},
        optional={
            "logprob": logprob_values,
            "prob": maybe(st.floats()),
            "top_logprobs": st.lists(new_alternative, max_size=3),
            "bytes": byte_lists,
        },
    )
    entry = old_entry | new_entry
    return draw(
        st.fixed_dictionaries(
            {"content": maybe(st.text(max_size=8))},
            optional={
                "completion_probabilities": maybe(st.lists(entry, max_size=4)),
                "stop_type": maybe(st.sampled_from(["eos", "limit", "word"])),
                "tokens_predicted": json_values,
            },
        )
    )


endpoints = st.sampled_from(["chat", "completions", "llamacpp"])
options = st.fixed_dictionaries(
    {
        "top_logprobs": st.none() | st.integers(min_value=0, max_value=20),
        "logprobs_required": st.booleans(),
    }
)


def check_parse(body, endpoint, top_logprobs, logprobs_required):
    """Parse and check the invariants of the result; return the result or the error."""
    try:
        response = parse_response(
            body, endpoint=endpoint, top_logprobs=top_logprobs, logprobs_required=logprobs_required
        )
    except DOCUMENTED_ERRORS as exc:
        assert str(exc)
        return exc
    assert isinstance(response, ParsedResponse)
    for choice in response.choices:
        check_choice(choice)
    return response


def check_choice(choice):
    if choice.logprobs is None:
        assert choice.token_level_ok is False
        assert choice.token_bytes_match is None
        return
    columns = choice.logprobs
    columns.validate()
    for value in columns.token_logprobs + columns.top_logprobs:
        assert value is None or MASKED_LOGPROB_THRESHOLD < value <= 0.0
    assert all(isinstance(raw, bytes) for raw in columns.token_bytes)
    assert choice.token_level_ok is (choice.logprobs_note is None)
    # The parser marks its columns as type-checked; the store's full check must agree.
    assert columns.element_types_checked
    columns.element_types_checked = False
    checked_row("responses", {"request_id": "fuzz", "logprobs": columns})
    build_responses_table(
        [{"response": choice.text, "finish_reason": choice.finish_reason, "logprobs": columns}]
    )


valid_logprobs = st.floats(min_value=-50.0, max_value=0.0)
alternatives_lists = st.lists(
    st.tuples(st.text(max_size=4), valid_logprobs), min_size=1, max_size=5
)
valid_positions = st.lists(
    st.tuples(st.text(max_size=4), valid_logprobs | st.none(), alternatives_lists),
    min_size=1,
    max_size=6,
)


def chat_alternatives(alternatives):
    return [
        {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        for token, logprob in alternatives
    ]


@FUZZ_SETTINGS
@given(positions=valid_positions)
def test_valid_chat_bodies_round_trip(positions):
    entries = [
        {
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": chat_alternatives(alternatives),
        }
        for token, logprob, alternatives in positions
    ]
    text = "".join(token for token, _, _ in positions)
    choice_document = {"index": 0, "message": {"content": text}, "logprobs": {"content": entries}}
    body = json.dumps({"choices": [choice_document]}, ensure_ascii=False).encode()

    response = parse_response(body, endpoint="chat", top_logprobs=5, logprobs_required=True)
    choice = response.choices[0]
    check_choice(choice)
    assert choice.token_level_ok is True
    assert choice.logprobs.tokens == [token for token, _, _ in positions]
    assert choice.logprobs.token_logprobs == [logprob for _, logprob, _ in positions]
    assert choice.logprobs.top_counts == [len(alternatives) for _, _, alternatives in positions]
    expected_top = [lp for _, _, alternatives in positions for _, lp in alternatives]
    assert choice.logprobs.top_logprobs == expected_top


@FUZZ_SETTINGS
@given(positions=valid_positions)
def test_valid_legacy_bodies_round_trip(positions):
    tokens = [token for token, _, _ in positions]
    # Distinct dict keys only: a legacy dict cannot hold two alternatives of the same text.
    tops = [dict(alternatives) for _, _, alternatives in positions]
    logprobs = {
        "tokens": tokens,
        "token_logprobs": [logprob for _, logprob, _ in positions],
        "top_logprobs": tops,
        "text_offset": [0] * len(tokens),
    }
    document = {"choices": [{"index": 0, "text": "".join(tokens), "logprobs": logprobs}]}
    body = json.dumps(document, ensure_ascii=True).encode()

    response = parse_response(
        body, endpoint="completions", top_logprobs=None, logprobs_required=True
    )
    choice = response.choices[0]
    check_choice(choice)
    assert choice.logprobs.tokens == tokens
    assert choice.logprobs.top_counts == [len(top) for top in tops]
    assert choice.logprobs.token_logprobs == logprobs["token_logprobs"]


@FUZZ_SETTINGS
@given(body=st.binary(max_size=300), endpoint=endpoints, opts=options)
def test_random_bytes_parse_or_documented_error(body, endpoint, opts):
    check_parse(body, endpoint, **opts)


@FUZZ_SETTINGS
@given(document=json_values, endpoint=endpoints, opts=options)
def test_random_json_parse_or_documented_error(document, endpoint, opts):
    body = json.dumps(document, allow_nan=True).encode()
    check_parse(body, endpoint, **opts)


@settings(FUZZ_SETTINGS, max_examples=120)
@given(document=openai_bodies() | llamacpp_bodies(), endpoint=endpoints, opts=options)
def test_response_like_bodies(document, endpoint, opts):
    body = json.dumps(document, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    from_bytes = check_parse(body, endpoint, **opts)
    from_mapping = check_parse(document, endpoint, **opts)
    if isinstance(from_bytes, ParsedResponse) or isinstance(from_mapping, ParsedResponse):
        assert from_bytes == from_mapping


@settings(FUZZ_SETTINGS, max_examples=120)
@given(document=openai_bodies() | llamacpp_bodies(), ascii_only=st.booleans(), data=st.data())
def test_cut_bodies_are_truncated(document, ascii_only, data):
    text = json.dumps(document, allow_nan=True, ensure_ascii=ascii_only)
    body = text.encode("utf-8", "surrogatepass")
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    with pytest.raises(TruncatedBodyError):
        parse_response(body[:cut], endpoint="chat", top_logprobs=None, logprobs_required=False)


prompt_lines = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b'{"prompt": "a"}', b'{"id": 1, "prompt": "b"}', b"", b"   ", b'{"prompt": [1, 2]}',
         b'{"messages": [{"role": "user", "content": "hi"}]}', b'{"prompt": "\xff"}', b"x" * 100]
    ),
    json_values.map(lambda value: json.dumps(value).encode()),
)


@FUZZ_SETTINGS
@given(lines=st.lists(prompt_lines, max_size=8), crlf=st.booleans(), final_newline=st.booleans())
def test_prompt_reader_random_files(lines, crlf, final_newline):
    separator = b"\r\n" if crlf else b"\n"
    data = separator.join(lines) + (separator if final_newline and lines else b"")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.jsonl"
        path.write_bytes(data)
        reader = PromptReader(path, max_line_bytes=64)
        items = list(reader)

    physical_lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    assert reader.records + reader.invalid_lines + reader.blank_lines == physical_lines
    assert all(isinstance(item, (PromptRecord, PromptError)) for item in items)
    numbers = [item.line for item in items]
    assert numbers == sorted(set(numbers))
    assert all(1 <= number <= physical_lines for number in numbers)
    for item in items:
        if isinstance(item, PromptRecord):
            assert (item.prompt is None) != (item.messages is None)
