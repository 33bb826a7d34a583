"""The msgspec fast path for chat bodies: taken for the common shape, equal to the general parser.

A body passed as ``str`` skips the fast path, so parsing the same body as ``bytes`` and
as ``str`` compares the two paths.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import KDError
from pipeline.parsing import parse_response
from pipeline.parsing_fast import decode_chat
from tests.test_fuzz_inputs import FUZZ_SETTINGS, openai_bodies, valid_positions


def parse_both(body: bytes, **options):
    """Parse ``body`` on the fast path (bytes) and the general path (str); return both outcomes."""
    outcomes = []
    for given_body in (body, body.decode("utf-8", "surrogatepass")):
        try:
            outcomes.append(parse_response(given_body, endpoint="chat", **options))
        except KDError as error:
            outcomes.append((type(error), str(error)))
    return outcomes


def chat_body(entries: list[dict], text: str = "ab", **choice_fields) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": "stop", "logprobs": {"content": entries}, **choice_fields}
    return json.dumps({"model": "m", "choices": [choice],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()


def entry(token: str, logprob=-0.5, alternatives=None, **fields) -> dict:
    alternatives = alternatives if alternatives is not None else [
        {"token": token, "logprob": logprob, "bytes": list(token.encode())},
        {"token": "x", "logprob": -2.0, "bytes": [120]},
    ]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": alternatives, **fields}


OPTIONS = {"top_logprobs": 2, "logprobs_required": True}


def test_common_body_takes_fast_path() -> None:
    body = chat_body([entry("a"), entry("b")])
    assert decode_chat(body) is not None
    fast, general = parse_both(body, **OPTIONS)
    assert fast == general
    choice = fast.choices[0]
    assert choice.token_level_ok
    assert choice.logprobs.top_tokens == ["a", "x", "b", "x"]
    assert (fast.model, fast.prompt_tokens, fast.completion_tokens) == ("m", 3, 2)


def test_missing_bytes_derived_from_token() -> None:
    alternatives = [{"token": "a", "logprob": -0.1}, {"token": "bytes:\\xf0\\x9f", "logprob": -3.0}]
    body = chat_body([{"token": "a", "logprob": -0.1, "top_logprobs": alternatives}], text="a")
    assert decode_chat(body) is not None
    fast, general = parse_both(body, **OPTIONS)
    assert fast == general
    assert fast.choices[0].logprobs.top_bytes == [b"a", b"\xf0\x9f"]


@pytest.mark.parametrize(
    "body",
    [
        chat_body([entry("a", logprob=-9999.0), entry("b")]),
        chat_body([entry("a", logprob=1e-6), entry("b")]),
        chat_body([entry("a", logprob=None), entry("b")]),
        chat_body([entry("a", alternatives=[{"token": "a", "logprob": 0.5}]), entry("b")]),
        chat_body([entry("a", bytes=[300]), entry("b")]),
        chat_body([entry("a", bytes="61"), entry("b")]),
        chat_body([entry("a"), entry("b")], index=None),
        chat_body([entry("a"), entry("b")], error={"message": "overloaded", "code": 503}),
        chat_body([entry("a"), entry("b")], text=[{"type": "text", "text": "ab"}]),
        json.dumps({"choices": [{"index": 0, "text": "ab", "logprobs": {
            "content": None, "tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2]}}]}).encode(),
        json.dumps({"error": {"message": "rate limited", "code": 429}, "choices": []}).encode(),
        b'{"choices": [{"index": 0, "message": {"content": "a"}, "logprobs": {"content": '
        b'[{"token": "a", "logprob": NaN, "top_logprobs": []}]}}]}',
        b"\xef\xbb\xbf" + chat_body([entry("a"), entry("b")]),
        chat_body([entry("a"), entry("b")])[:-40],
    ],
    ids=["masked", "positive-noise", "null-logprob", "positive-alternative", "byte-over-255",
         "bytes-string", "null-index", "choice-error", "content-parts", "legacy-in-chat",
         "document-error", "nan", "bom", "truncated"],
)
def test_unusual_body_falls_back(body: bytes) -> None:
    assert decode_chat(body) is None
    fast, general = parse_both(body, **OPTIONS)
    assert fast == general


@FUZZ_SETTINGS
@given(document=openai_bodies(), top_logprobs=st.sampled_from([None, 2]), required=st.booleans())
def test_fast_path_matches_general_parser(document, top_logprobs, required) -> None:
    body = json.dumps(document, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    fast, general = parse_both(body, top_logprobs=top_logprobs, logprobs_required=required)
    assert fast == general


@FUZZ_SETTINGS
@given(positions=valid_positions)
def test_valid_bodies_take_fast_path(positions) -> None:
    entries = [
        {"token": token, "logprob": logprob if logprob is not None else -1.0,
         "bytes": list(token.encode()),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]}
        for token, logprob, alternatives in positions
    ]
    body = chat_body(entries, text="".join(token for token, _, _ in positions))
    assert decode_chat(body) is not None
    fast, general = parse_both(body, top_logprobs=5, logprobs_required=True)
    assert fast == general
