"""Tests of the teacher response parser on realistic bodies and on each value rule."""

from __future__ import annotations

import json

import orjson
import pytest

from pipeline.errors import (
    ClientError,
    MissingLogprobsError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TruncatedBodyError,
)
from pipeline.parsing import ERROR_SUMMARY_MAX_CHARS, parse_response, summarize_error_body
from pipeline.parsing_logprobs import derive_token_bytes
from storage.schema import build_responses_table

# A chat completion as the OpenAI API returns it with logprobs=true, top_logprobs=2.
OPENAI_CHAT_BODY = b"""{
  "id": "chatcmpl-AJ2x7kq",
  "object": "chat.completion",
  "created": 1729000000,
  "model": "gpt-4o-mini-2024-07-18",
  "choices": [
    {
      "index": 0,
      "message": {"role": "assistant", "content": "Hello! Caf\\u00e9?", "refusal": null},
      "logprobs": {
        "content": [
          {"token": "Hello", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111],
           "top_logprobs": [
             {"token": "Hello", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111]},
             {"token": "Hi", "logprob": -1.3190403, "bytes": [72, 105]}]},
          {"token": "!", "logprob": -0.02380986, "bytes": [33],
           "top_logprobs": [
             {"token": "!", "logprob": -0.02380986, "bytes": [33]},
             {"token": " there", "logprob": -3.787621, "bytes": [32, 116, 104, 101, 114, 101]}]},
          {"token": " Caf", "logprob": -2.1, "bytes": [32, 67, 97, 102],
           "top_logprobs": [
             {"token": " How", "logprob": -0.2, "bytes": [32, 72, 111, 119]},
             {"token": " Caf", "logprob": -2.1, "bytes": [32, 67, 97, 102]}]},
          {"token": "\\u00e9", "logprob": -1e-06, "bytes": [195, 169],
           "top_logprobs": [
             {"token": "\\u00e9", "logprob": -1e-06, "bytes": [195, 169]},
             {"token": "e", "logprob": -14.5, "bytes": [101]}]},
          {"token": "?", "logprob": -0.5, "bytes": [63],
           "top_logprobs": [
             {"token": "?", "logprob": -0.5, "bytes": [63]},
             {"token": ".", "logprob": -0.95, "bytes": [46]}]}
        ],
        "refusal": null
      },
      "finish_reason": "stop"
    }
  ],
  "usage": {"prompt_tokens": 19, "completion_tokens": 5, "total_tokens": 24},
  "system_fingerprint": "fp_e2bde53e6e"
}"""

# A legacy completion as the OpenAI API returns it with logprobs=2 and n=2.
OPENAI_COMPLETIONS_BODY = b"""{
  "id": "cmpl-AJ2x9",
  "object": "text_completion",
  "created": 1729000001,
  "model": "gpt-3.5-turbo-instruct",
  "choices": [
    {"text": " Paris.", "index": 0, "finish_reason": "stop",
     "logprobs": {"tokens": [" Paris", "."], "token_logprobs": [-0.0012, -0.25],
                  "top_logprobs": [{" Paris": -0.0012, " paris": -7.1},
                                   {".": -0.25, ",": -1.6}],
                  "text_offset": [26, 32]}},
    {"text": " Lyon", "index": 1, "finish_reason": "length",
     "logprobs": {"tokens": [" Lyon"], "token_logprobs": [-6.9],
                  "top_logprobs": [{" Paris": -0.0012, " paris": -7.1, " Lyon": -6.9}],
                  "text_offset": [26]}}
  ],
  "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
}"""


def parse(body, endpoint="chat", top_logprobs=2, required=True):
    return parse_response(
        body, endpoint=endpoint, top_logprobs=top_logprobs, logprobs_required=required
    )


def chat_entries_body(entries: list, content: str = "x") -> bytes:
    return json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                    "logprobs": {"content": entries},
                }
            ]
        }
    ).encode()


def entry(token="x", logprob=-0.5, alternatives=None, **extra):
    data = {"token": token, "logprob": logprob, "top_logprobs": alternatives or []}
    data.update(extra)
    return data


def test_openai_chat_body_fields():
    response = parse(OPENAI_CHAT_BODY)
    assert response.model == "gpt-4o-mini-2024-07-18"
    assert response.prompt_tokens == 19
    assert response.completion_tokens == 5
    assert len(response.choices) == 1


def test_openai_chat_body_logprobs():
    choice = parse(OPENAI_CHAT_BODY).choices[0]
    assert choice.text == "Hello! Café?"
    assert choice.finish_reason == "stop"
    assert choice.logprobs_format == "chat"
    assert choice.logprobs.tokens == ["Hello", "!", " Caf", "é", "?"]
    assert choice.logprobs.token_logprobs == [-0.31725305, -0.02380986, -2.1, -1e-06, -0.5]
    assert choice.logprobs.top_counts == [2, 2, 2, 2, 2]
    assert choice.logprobs.alternatives(2)[0] == (" How", -0.2, b" How")
    assert choice.logprobs.text_offset is None


def test_openai_chat_body_usable():
    choice = parse(OPENAI_CHAT_BODY).choices[0]
    assert choice.logprobs_lossy is False
    assert choice.token_bytes_match is True
    assert choice.token_level_ok is True
    assert choice.logprobs_note is None


def test_openai_completions_body_choices():
    response = parse(OPENAI_COMPLETIONS_BODY, endpoint="completions")
    assert response.model == "gpt-3.5-turbo-instruct"
    assert [choice.index for choice in response.choices] == [0, 1]
    assert [choice.finish_reason for choice in response.choices] == ["stop", "length"]
    assert response.choices[1].text == " Lyon"


def test_openai_completions_body_logprobs():
    choice = parse(OPENAI_COMPLETIONS_BODY, endpoint="completions").choices[0]
    assert choice.logprobs_format == "completions"
    assert choice.logprobs.tokens == [" Paris", "."]
    assert choice.logprobs.token_bytes == [b" Paris", b"."]
    assert choice.logprobs.token_logprobs == [-0.0012, -0.25]
    assert choice.logprobs.top_tokens == [" Paris", " paris", ".", ","]
    assert choice.logprobs.top_bytes == [b" Paris", b" paris", b".", b","]
    assert choice.logprobs.text_offset == [26, 32]
    assert choice.token_level_ok is True


def test_legacy_chosen_token_added_not_lossy():
    # OpenAI adds the sampled token as a (k+1)-th key when it is outside the top k.
    choice = parse(OPENAI_COMPLETIONS_BODY, endpoint="completions").choices[1]
    assert choice.logprobs.top_counts == [3]
    assert choice.logprobs_lossy is False


def test_parsed_response_builds_table():
    response = parse(OPENAI_CHAT_BODY)
    choice = response.choices[0]
    row_input = {
        "response": choice.text,
        "finish_reason": choice.finish_reason,
        "logprobs": choice.logprobs,
    }
    table = build_responses_table([row_input])
    row = table.to_pylist()[0]
    assert row["tokens"] == choice.logprobs.tokens
    assert row["token_bytes"] == choice.logprobs.token_bytes
    assert [len(position) for position in row["top_logprobs"]] == [2, 2, 2, 2, 2]


def test_bytes_str_and_mapping_agree():
    from_bytes = parse(OPENAI_CHAT_BODY)
    from_str = parse(OPENAI_CHAT_BODY.decode())
    from_mapping = parse(orjson.loads(OPENAI_CHAT_BODY))
    assert from_str == from_bytes
    assert from_mapping == from_bytes


def test_large_body_all_positions_parsed():
    alternatives = [
        {"token": f"t{j}", "logprob": -0.1 * (j + 1), "bytes": list(f"t{j}".encode())}
        for j in range(20)
    ]
    entries = [entry("ab", -0.1, alternatives, bytes=[97, 98]) for _ in range(64)]
    choice = parse(chat_entries_body(entries, "ab" * 64), top_logprobs=20).choices[0]
    assert len(choice.logprobs) == 64
    assert choice.logprobs.top_counts == [20] * 64
    assert len(choice.logprobs.top_logprobs) == 64 * 20
    choice.logprobs.validate()


# Value rules.


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (-1e-06, -1e-06),
        (0, 0.0),
        (1e-06, 0.0),
        (0.0009, 0.0),
        (-999.5, -999.5),
        (-1000.0, None),
        (-1e30, None),
        (None, None),
    ],
)
def test_logprob_value_rules(value, stored):
    choice = parse(chat_entries_body([entry(logprob=value)]), top_logprobs=None).choices[0]
    assert choice.logprobs.token_logprobs == [stored]


@pytest.mark.parametrize("value", [0.002, 1.0, True, "-0.5", [-0.5]])
def test_invalid_logprob_rejected(value):
    with pytest.raises(ResponseFormatError) as caught:
        parse(chat_entries_body([entry(logprob=value)]), top_logprobs=None)
    assert "choices[0].logprobs.content[0].logprob" in str(caught.value)


def test_positive_infinity_rejected():
    body = chat_entries_body([entry(logprob=-0.5)]).replace(b"-0.5", b"Infinity")
    with pytest.raises(ResponseFormatError) as caught:
        parse(body, top_logprobs=None)
    assert "positive" in str(caught.value)


def test_missing_logprob_rejected():
    with pytest.raises(ResponseFormatError) as caught:
        parse(chat_entries_body([{"token": "x", "bytes": [120]}]), top_logprobs=None)
    assert "content[0].logprob: missing" in str(caught.value)


@pytest.mark.parametrize("raw", [[300], [-1], ["a"], [1.5], "eA==", 7, {"0": 1}])
def test_invalid_token_bytes_rejected(raw):
    with pytest.raises(ResponseFormatError) as caught:
        parse(chat_entries_body([entry(bytes=raw)]), top_logprobs=None)
    assert "content[0].bytes" in str(caught.value)


def test_invalid_alternative_bytes_rejected():
    alternatives = [{"token": "x", "logprob": -0.5, "bytes": [256]}]
    with pytest.raises(ResponseFormatError) as caught:
        parse(chat_entries_body([entry(alternatives=alternatives, bytes=[120])]), top_logprobs=1)
    assert "content[0].top_logprobs[0].bytes" in str(caught.value)


def test_non_string_token_rejected():
    with pytest.raises(ResponseFormatError) as caught:
        parse(chat_entries_body([entry(token=17)]), top_logprobs=None)
    assert "content[0].token: expected a string, got a number" in str(caught.value)


def test_literal_escape_text_kept():
    # A token that reads \x41 decodes to valid UTF-8 ("A"), so it is literal text.
    assert derive_token_bytes("\\x41") == b"\\x41"
    assert derive_token_bytes("\\xe2\\x80") == b"\xe2\x80"
    assert derive_token_bytes("bytes:\\x41") == b"A"
    assert derive_token_bytes("caf\u00e9") == b"caf\xc3\xa9"


# Body decoding: truncated versus invalid.


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"  \n",
        b'{"choices": [',
        b'{"choices": [{"index": 0, "text": "ab',
        b'{"choices": [{"index": 0, "text": "ab\\u00',
        b'{"choices": [{"index": 0, "text": "ab\\ud83d\\ude',
        b'{"choices": [{"index": -1.',
        b'{"choices": [{"index": 0, "logprobs": {"tokens": ["a"], "token_logprobs": [-Inf',
        b'{"choices": [{"index": 0, "logprobs": {"tokens": ["a"], "token_logprobs": [Na',
        b'{"choices": [{"index": 0, "done": tr',
        b'{"choices": [{"index": 0, "text": "caf\xc3',
    ],
)
def test_truncated_bodies_detected(body):
    with pytest.raises(TruncatedBodyError):
        parse(body, endpoint="completions")


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Bad gateway</body></html>",
        b'{"choices": []} trailing',
        b'{"choices": [}',
        b'{"text": "caf\xff"}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_invalid_bodies_not_truncated(body):
    with pytest.raises(ResponseFormatError) as caught:
        parse(body, endpoint="completions")
    assert not isinstance(caught.value, TruncatedBodyError)


def test_html_body_message_short():
    body = b"<html><head><title>Oops</title></head><body>" + b"<p>x</p>" * 1000 + b"</body></html>"
    with pytest.raises(ResponseFormatError) as caught:
        parse(body)
    assert "<" not in str(caught.value).split(":", 1)[1]
    assert len(str(caught.value)) < ERROR_SUMMARY_MAX_CHARS + 100


@pytest.mark.parametrize("body", [b"[]", b'"ok"', b"42", b"null"])
def test_non_object_body_rejected(body):
    with pytest.raises(ResponseFormatError) as caught:
        parse(body)
    assert "expected a JSON object" in str(caught.value)


def test_byte_order_mark_accepted():
    assert parse(b"\xef\xbb\xbf" + OPENAI_CHAT_BODY) == parse(OPENAI_CHAT_BODY)


def test_lone_surrogate_rejected():
    body = chat_entries_body([entry(token="x", bytes=[120])], content="x").replace(
        b'"token": "x"', b'"token": "\\ud800"'
    )
    with pytest.raises(ResponseFormatError) as caught:
        parse(body, top_logprobs=None)
    assert "surrogate" in str(caught.value)


def test_lone_surrogate_in_text_rejected():
    document = {"choices": [{"index": 0, "text": "a\ud800", "logprobs": None}]}
    with pytest.raises(ResponseFormatError):
        parse(document, endpoint="completions", required=False)


def test_unknown_endpoint_is_value_error():
    with pytest.raises(ValueError, match="endpoint must be one of"):
        parse(OPENAI_CHAT_BODY, endpoint="responses")


# Choice shapes.


def test_content_parts_joined():
    document = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {
                    "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
                },
            }
        ]
    }
    choice = parse(document, required=False).choices[0]
    assert choice.text == "Hello"


def test_missing_message_means_no_text():
    document = {"choices": [{"index": 0, "finish_reason": "content_filter"}]}
    choice = parse(document, required=True).choices[0]
    assert choice.text is None
    assert choice.logprobs is None


def test_empty_token_list_required_rejected():
    with pytest.raises(MissingLogprobsError) as caught:
        parse(chat_entries_body([], content="Hello"), top_logprobs=2)
    assert "an empty token list" in str(caught.value)


def test_empty_token_list_not_required():
    body = chat_entries_body([], content="Hello")
    choice = parse(body, top_logprobs=2, required=False).choices[0]
    assert choice.logprobs is not None
    assert choice.token_level_ok is False
    assert choice.logprobs_note == "logprobs contain no tokens"


def test_empty_text_without_logprobs_accepted():
    document = {"choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]}
    choice = parse(document, endpoint="completions", required=True).choices[0]
    assert choice.text == ""
    assert choice.logprobs is None


def test_missing_index_uses_position():
    document = {"choices": [{"text": "a", "logprobs": None}, {"text": "b", "logprobs": None}]}
    response = parse(document, endpoint="completions", required=False)
    assert [choice.index for choice in response.choices] == [0, 1]


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ({"index": "0", "text": "a"}, "choices[0].index"),
        ({"index": 0, "text": 5}, "choices[0].text"),
        ({"index": 0, "text": "a", "finish_reason": 1}, "choices[0].finish_reason"),
        ({"index": 0, "text": "a", "logprobs": []}, "choices[0].logprobs"),
    ],
)
def test_invalid_choice_fields_rejected(choice, message):
    with pytest.raises(ResponseFormatError) as caught:
        parse({"choices": [choice]}, endpoint="completions", required=False)
    assert message in str(caught.value)


def test_choice_level_error_typed():
    error = {"code": 502, "message": "upstream"}
    document = {"choices": [{"index": 0, "finish_reason": "error", "error": error}]}
    with pytest.raises(ServerError) as caught:
        parse(document)
    assert caught.value.status == 502


@pytest.mark.parametrize("value", [None, False, 0, "", {}, []])
def test_empty_error_field_ignored(value):
    document = orjson.loads(OPENAI_CHAT_BODY)
    document["error"] = value
    assert parse(document).choices[0].token_level_ok is True


def test_error_status_beside_error_string():
    with pytest.raises(RateLimitError) as caught:
        parse({"error": "Too many requests", "status": 429})
    assert caught.value.status == 429


def test_embedded_error_surrogate_replaced():
    body = b'{"error": {"message": "bad \\ud800 value", "code": 500}, "x": NaN}'
    with pytest.raises(ServerError) as caught:
        parse(body)
    assert "bad ? value" in str(caught.value)


def test_usage_out_of_range_dropped():
    document = orjson.loads(OPENAI_CHAT_BODY)
    document["usage"] = {"prompt_tokens": 2**40, "completion_tokens": "5"}
    response = parse(document)
    assert response.prompt_tokens is None
    assert response.completion_tokens is None


# Legacy arrays.


def legacy_document(**logprobs):
    return {"choices": [{"index": 0, "text": "ab", "finish_reason": "stop", "logprobs": logprobs}]}


def test_legacy_text_offset_checked():
    document = legacy_document(tokens=["a", "b"], token_logprobs=[-0.1, -0.2], text_offset=[0, -1])
    with pytest.raises(ResponseFormatError) as caught:
        parse(document, endpoint="completions")
    assert "text_offset[1]" in str(caught.value)


def test_legacy_top_logprobs_length_checked():
    document = legacy_document(tokens=["a", "b"], token_logprobs=[-0.1, -0.2], top_logprobs=[None])
    with pytest.raises(ResponseFormatError) as caught:
        parse(document, endpoint="completions")
    assert "top_logprobs: has 1 entries, but tokens has 2" in str(caught.value)


def test_legacy_missing_token_logprobs_rejected():
    with pytest.raises(ResponseFormatError) as caught:
        parse(legacy_document(tokens=["a", "b"]), endpoint="completions")
    assert "token_logprobs: missing" in str(caught.value)


def test_legacy_object_alternatives_accepted():
    top = [[{"token": "a", "logprob": -0.1}], [{"token": "b", "logprob": -0.2, "bytes": [98]}]]
    document = legacy_document(tokens=["a", "b"], token_logprobs=[-0.1, -0.2], top_logprobs=top)
    choice = parse(document, endpoint="completions", top_logprobs=1).choices[0]
    assert choice.logprobs.top_counts == [1, 1]
    assert choice.logprobs.top_bytes == [b"a", b"b"]
    assert choice.token_level_ok is True


def test_legacy_masked_chosen_disagreement():
    top = [{"a": -0.1}, {"b": -9999.0, "c": -0.4}]
    document = legacy_document(tokens=["a", "b"], token_logprobs=[-0.1, -2.0], top_logprobs=top)
    choice = parse(document, endpoint="completions", top_logprobs=2).choices[0]
    assert choice.logprobs.top_logprobs == [-0.1, -2.0, -0.4]
    assert choice.logprobs_lossy is True


# llama.cpp native.


def test_llamacpp_chosen_missing_from_probs_lossy():
    document = {
        "content": "b",
        "completion_probabilities": [{"content": "b", "probs": [{"tok_str": "a", "prob": 0.9}]}],
        "stop_type": "limit",
    }
    choice = parse(document, endpoint="llamacpp", top_logprobs=1).choices[0]
    assert choice.logprobs.token_logprobs == [None]
    assert choice.logprobs_lossy is True
    assert choice.token_level_ok is False
    assert "chosen token" in choice.logprobs_note


@pytest.mark.parametrize("prob", [1.5, -0.1, "0.5"])
def test_llamacpp_invalid_probability_rejected(prob):
    document = {
        "content": "a",
        "completion_probabilities": [{"content": "a", "probs": [{"tok_str": "a", "prob": prob}]}],
    }
    with pytest.raises(ResponseFormatError) as caught:
        parse(document, endpoint="llamacpp")
    assert "completion_probabilities[0].probs[0].prob" in str(caught.value)


def test_llamacpp_post_sampling_probs():
    document = {
        "content": "a",
        "completion_probabilities": [
            {"id": 1, "token": "a", "prob": 1.0000001, "bytes": [97],
             "top_probs": [{"id": 1, "token": "a", "prob": 1.0000001, "bytes": [97]}]}
        ],
    }
    choice = parse(document, endpoint="llamacpp", top_logprobs=1).choices[0]
    assert choice.logprobs.token_logprobs == [0.0]
    assert choice.logprobs.top_logprobs == [0.0]


def test_llamacpp_missing_probabilities_required():
    with pytest.raises(MissingLogprobsError):
        parse({"content": "Hello", "stop_type": "eos"}, endpoint="llamacpp")


def test_llamacpp_error_body_typed():
    document = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    with pytest.raises(ServerError) as caught:
        parse(document, endpoint="llamacpp")
    assert caught.value.status == 503


# Error bodies.


def test_embedded_error_message_cleaned():
    document = {"error": {"message": "<b>Too</b>\n many " + "x" * 1000, "code": "429"}}
    with pytest.raises(RateLimitError) as caught:
        parse(document)
    assert "\n" not in str(caught.value)
    assert "<b>" not in str(caught.value)
    assert "Too many" in str(caught.value)
    assert len(str(caught.value)) <= ERROR_SUMMARY_MAX_CHARS


def test_embedded_error_without_message():
    with pytest.raises(ClientError) as caught:
        parse({"error": {"type": "invalid_request_error", "code": 404}})
    assert caught.value.status == 404
    assert "invalid_request_error" in str(caught.value)


def test_summary_of_empty_body():
    assert summarize_error_body(b"", None) == "(empty body)"


def test_summary_of_plain_text_capped():
    summary = summarize_error_body(b"upstream\ttimed out\r\n" * 100, "text/plain")
    assert summary.startswith("upstream timed out upstream")
    assert len(summary) == ERROR_SUMMARY_MAX_CHARS
    assert summary.endswith("...")


def test_summary_of_fastapi_detail():
    assert summarize_error_body(b'{"detail": "Not Found"}', "application/json") == "Not Found"


def test_summary_of_string_error():
    assert summarize_error_body(b'{"error": "model not loaded"}', None) == "model not loaded"


def test_summary_of_invalid_json_with_json_type():
    summary = summarize_error_body(b'{"error": {"message": "cut', "application/json")
    assert summary == '{"error": {"message": "cut'


def test_summary_of_html_without_content_type():
    body = (
        b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
        b"<body><h1>Service Unavailable</h1><p>Try again &amp; again.</p></body></html>"
    )
    assert summarize_error_body(body, None) == "Service Unavailable Try again & again."


def test_summary_of_invalid_utf8():
    summary = summarize_error_body(b"bad \xff gateway", None)
    assert summary == "bad \ufffd gateway"


def test_summary_keeps_json_code_once():
    body = b'{"error": {"message": "Rate limit reached (429)", "code": 429}}'
    assert summarize_error_body(body, "application/json") == "Rate limit reached (429)"


def test_summary_of_non_object_error():
    assert summarize_error_body(b'{"error": NaN}', "application/json") == '{"error": NaN}'
    assert summarize_error_body(b"[1, 2]", "application/json") == "[1, 2]"


def test_huge_integer_logprob_masked():
    body = chat_entries_body([entry(logprob=-0.5)]).replace(b"-0.5", b"-1" + b"0" * 400)
    choice = parse(body, top_logprobs=None).choices[0]
    assert choice.logprobs.token_logprobs == [None]


def test_huge_integer_logprob_positive_rejected():
    body = chat_entries_body([entry(logprob=-0.5)]).replace(b"-0.5", b"1" + b"0" * 400)
    with pytest.raises(ResponseFormatError) as caught:
        parse(body, top_logprobs=None)
    assert "positive" in str(caught.value)


def test_unprintable_error_value_handled():
    with pytest.raises(ClientError) as caught:
        parse({"error": {"detail": 10**5000}})
    assert "cannot be shown" in str(caught.value)


def test_non_string_dict_key_rejected():
    document = legacy_document(tokens=["a"], token_logprobs=[-0.1], top_logprobs=[{1: -0.1}])
    with pytest.raises(ResponseFormatError) as caught:
        parse(document, endpoint="completions")
    assert "top_logprobs[0] key" in str(caught.value)
