"""Teacher bodies that broke other harvesting tools, parsed with their right values.

Each body is written out literally as a server sent it (bytes, so the non-standard
``NaN`` and ``-Infinity`` literals survive), and each expected value has its own assert.
"""

from __future__ import annotations

import math

import pytest

from pipeline.errors import (
    ClientError,
    MissingLogprobsError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TruncatedBodyError,
)
from pipeline.parsing import parse_response, summarize_error_body
from storage.schema import build_responses_table


def parse_chat(body, top_logprobs=5, required=True):
    return parse_response(
        body, endpoint="chat", top_logprobs=top_logprobs, logprobs_required=required
    )


def parse_completions(body, top_logprobs=5, required=True):
    return parse_response(
        body, endpoint="completions", top_logprobs=top_logprobs, logprobs_required=required
    )


def stored_row(choice):
    """Write one parsed choice through the real table builder and read it back."""
    row_input = {
        "response": choice.text,
        "finish_reason": choice.finish_reason,
        "logprobs": choice.logprobs,
    }
    table = build_responses_table([row_input])
    return table.to_pylist()[0]


# Non-finite logprobs: -9999.0, -Infinity and NaN among a position's alternatives.

MASKED_BODY = b"""{"id": "chatcmpl-c01", "model": "constrained-7b", "choices": [{"index": 0,
 "message": {"role": "assistant", "content": "yes"}, "finish_reason": "stop",
 "logprobs": {"content": [{"token": "yes", "logprob": -0.0201, "bytes": [121, 101, 115],
   "top_logprobs": [{"token": "yes", "logprob": -0.0201, "bytes": [121, 101, 115]},
                    {"token": "no", "logprob": -9999.0, "bytes": [110, 111]},
                    {"token": "maybe", "logprob": -Infinity, "bytes": [109, 97, 121, 98, 101]}]}]}}]}"""

NAN_BODY = MASKED_BODY.replace(b"-Infinity", b"NaN")


def test_masked_alternatives_stored_as_none():
    choice = parse_chat(MASKED_BODY, top_logprobs=3).choices[0]
    assert choice.logprobs.top_logprobs == [-0.0201, None, None]
    assert choice.logprobs.top_tokens == ["yes", "no", "maybe"]
    assert choice.logprobs.token_logprobs == [-0.0201]
    assert choice.token_level_ok is True


def test_masked_alternatives_stay_null_in_store():
    choice = parse_chat(MASKED_BODY, top_logprobs=3).choices[0]
    row = stored_row(choice)
    logprobs = [alternative["logprob"] for alternative in row["top_logprobs"][0]]
    assert logprobs[1] is None
    assert logprobs[2] is None
    assert not any(value is not None and math.isnan(value) for value in logprobs)


def test_nan_logprob_rejected_with_position():
    with pytest.raises(ResponseFormatError) as caught:
        parse_chat(NAN_BODY, top_logprobs=3)
    assert "NaN" in str(caught.value)
    assert "choices[0].logprobs.content[0].top_logprobs[2].logprob" in str(caught.value)
    assert caught.value.retryable is False


# Fewer alternatives than requested: 4 of 5 at one position, none at another, and a
# legacy request for 100 that returned 5 per position.

FEWER_ALTERNATIVES_BODY = b"""{"choices": [{"index": 0, "finish_reason": "stop",
 "message": {"role": "assistant", "content": "Hi."},
 "logprobs": {"content": [
  {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [
    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
    {"token": "Hello", "logprob": -2.5, "bytes": [72, 101, 108, 108, 111]},
    {"token": "Hey", "logprob": -3.9, "bytes": [72, 101, 121]},
    {"token": "Good", "logprob": -6.0, "bytes": [71, 111, 111, 100]}]},
  {"token": ".", "logprob": -0.0004, "bytes": [46], "top_logprobs": []}]}}]}"""

LEGACY_CAPPED_BODY = b"""{"choices": [{"index": 0, "text": " a b", "finish_reason": "length",
 "logprobs": {"tokens": [" a", " b"], "token_logprobs": [-0.5, -0.7],
  "top_logprobs": [{" a": -0.5, " the": -1.2, " an": -2.0, " one": -3.1, " my": -3.3},
                   {" b": -0.7, " c": -1.0, " d": -2.2, " e": -2.9, " f": -4.0}],
  "text_offset": [0, 2]}}]}"""


def test_fewer_alternatives_stored_as_returned():
    choice = parse_chat(FEWER_ALTERNATIVES_BODY, top_logprobs=5).choices[0]
    assert choice.logprobs.top_counts == [4, 0]
    assert choice.logprobs.alternatives(1) == []
    assert choice.logprobs_lossy is False
    assert choice.token_level_ok is True


def test_fewer_alternatives_round_trip_store():
    choice = parse_chat(FEWER_ALTERNATIVES_BODY, top_logprobs=5).choices[0]
    row = stored_row(choice)
    assert len(row["top_logprobs"][0]) == 4
    assert row["top_logprobs"][1] == []


def test_legacy_provider_cap_not_lossy():
    choice = parse_completions(LEGACY_CAPPED_BODY, top_logprobs=100).choices[0]
    assert choice.logprobs.top_counts == [5, 5]
    assert choice.logprobs_lossy is False
    assert choice.token_level_ok is True
    assert choice.logprobs.text_offset == [0, 2]


# Legacy dict form: tokens that decode to the same text collapse into one key.

COLLAPSED_BODY = b"""{"choices": [{"index": 0, "text": "true", "finish_reason": "length",
 "logprobs": {"tokens": ["true"], "token_logprobs": [-0.2231],
  "top_logprobs": [{"false": -8.48, "true": -1.60, "null": -8.35}], "text_offset": [0]}}]}"""

COLLAPSED_COUNT_BODY = b"""{"choices": [{"index": 0, "text": "yes no", "finish_reason": "length",
 "logprobs": {"tokens": ["yes", " no"], "token_logprobs": [-0.1, -0.3],
  "top_logprobs": [{"yes": -0.1, "Yes": -2.6, "YES": -4.0, "y": -5.5},
                   {" no": -0.3, " No": -1.5, " NO": -4.4}]}}]}"""


def test_collapsed_dict_keeps_returned_keys():
    choice = parse_completions(COLLAPSED_BODY, top_logprobs=4).choices[0]
    assert choice.logprobs.top_counts == [3]
    assert choice.logprobs.top_tokens == ["false", "true", "null"]


def test_collapsed_dict_token_logprobs_wins():
    choice = parse_completions(COLLAPSED_BODY, top_logprobs=4).choices[0]
    assert choice.logprobs.token_logprobs == [-0.2231]
    assert dict(zip(choice.logprobs.top_tokens, choice.logprobs.top_logprobs))["true"] == -0.2231


def test_collapsed_dict_marked_lossy():
    choice = parse_completions(COLLAPSED_BODY, top_logprobs=4).choices[0]
    assert choice.logprobs_lossy is True
    assert choice.token_level_ok is False
    assert "legacy top_logprobs" in choice.logprobs_note


def test_collapsed_dict_fewer_keys_lossy():
    choice = parse_completions(COLLAPSED_COUNT_BODY, top_logprobs=4).choices[0]
    assert choice.logprobs.top_counts == [4, 3]
    assert choice.logprobs_lossy is True
    assert choice.token_level_ok is False


# Partial UTF-8 tokens: an emoji (F0 9F 98 8A) generated as several tokens.

EMOJI = "\U0001f60a"


def chat_body(content_json: bytes, entries_json: bytes) -> bytes:
    return (
        b'{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",'
        b' "content": ' + content_json + b'}, "logprobs": {"content": [' + entries_json + b"]}}]}"
    )


REPLACEMENT_PIECES_BODY = chat_body(
    b'"\\ud83d\\ude0a"',
    b'{"token": "\\ufffd", "logprob": -0.9, "bytes": [239, 191, 189], "top_logprobs": []},'
    b' {"token": "\\ufffd", "logprob": -0.01, "bytes": [239, 191, 189], "top_logprobs": []}',
)
EMPTY_PIECES_BODY = chat_body(
    b'"\\ud83d\\ude0a"',
    b'{"token": "", "logprob": -0.9, "bytes": [], "top_logprobs": []},'
    b' {"token": "", "logprob": -0.01, "bytes": [], "top_logprobs": []}',
)
ESCAPED_PIECES_BODY = chat_body(
    '"\U0001f60a"'.encode(),
    b'{"token": "\\\\xf0\\\\x9f\\\\x98", "logprob": -0.9, "bytes": [240, 159, 152], "top_logprobs": []},'
    b' {"token": "\\\\x8a", "logprob": -0.01, "bytes": [138], "top_logprobs": []}',
)
ESCAPED_PIECES_NO_BYTES_BODY = chat_body(
    b'"\\ud83d\\ude0a"',
    b'{"token": "\\\\xf0\\\\x9f\\\\x98", "logprob": -0.9, "top_logprobs": []},'
    b' {"token": "\\\\x8a", "logprob": -0.01, "bytes": null, "top_logprobs": []}',
)
LEGACY_BYTES_PIECES_BODY = (
    b'{"choices": [{"index": 0, "text": "\\ud83d\\ude0a", "finish_reason": "length",'
    b' "logprobs": {"tokens": ["bytes:\\\\xf0\\\\x9f", "bytes:\\\\x98\\\\x8a"],'
    b' "token_logprobs": [-0.9, -0.01],'
    b' "top_logprobs": [{"bytes:\\\\xf0\\\\x9f": -0.9}, {"bytes:\\\\x98\\\\x8a": -0.01}],'
    b' "text_offset": [0, 1]}}]}'
)


def test_replacement_char_pieces_unusable():
    choice = parse_chat(REPLACEMENT_PIECES_BODY, top_logprobs=None).choices[0]
    assert choice.text == EMOJI
    assert choice.logprobs.token_bytes == [b"\xef\xbf\xbd", b"\xef\xbf\xbd"]
    assert choice.token_bytes_match is False
    assert choice.token_level_ok is False
    assert choice.logprobs_note == "token bytes do not match the response text"


def test_replacement_char_pieces_kept():
    choice = parse_chat(REPLACEMENT_PIECES_BODY, top_logprobs=None).choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs == [-0.9, -0.01]


def test_empty_pieces_unusable():
    choice = parse_chat(EMPTY_PIECES_BODY, top_logprobs=None).choices[0]
    assert choice.logprobs.token_bytes == [b"", b""]
    assert choice.token_bytes_match is False
    assert choice.token_level_ok is False


def test_escaped_pieces_bytes_are_truth():
    choice = parse_chat(ESCAPED_PIECES_BODY, top_logprobs=None).choices[0]
    assert choice.logprobs.tokens == ["\\xf0\\x9f\\x98", "\\x8a"]
    assert choice.logprobs.token_bytes == [b"\xf0\x9f\x98", b"\x8a"]
    assert choice.token_bytes_match is True
    assert choice.token_level_ok is True


def test_escaped_pieces_without_bytes_decoded():
    choice = parse_chat(ESCAPED_PIECES_NO_BYTES_BODY, top_logprobs=None).choices[0]
    assert choice.logprobs.token_bytes == [b"\xf0\x9f\x98", b"\x8a"]
    assert choice.token_bytes_match is True


def test_legacy_bytes_prefix_decoded():
    choice = parse_completions(LEGACY_BYTES_PIECES_BODY, top_logprobs=1).choices[0]
    assert choice.logprobs.token_bytes == [b"\xf0\x9f", b"\x98\x8a"]
    assert choice.logprobs.top_bytes == [b"\xf0\x9f", b"\x98\x8a"]
    assert choice.token_bytes_match is True
    assert choice.token_level_ok is True


# Other shapes of the same data: legacy arrays inside a chat response, and a provider
# that sends only tokens and token_logprobs.

CHAT_WITH_LEGACY_ARRAYS_BODY = b"""{"choices": [{"index": 0, "finish_reason": "stop",
 "message": {"role": "assistant", "content": "The sky"},
 "logprobs": {"content": null, "tokens": ["The", " sky"], "token_logprobs": [-0.05, -1.25],
  "top_logprobs": [{"The": -0.05, "A": -3.1}, {" sky": -1.25, " sea": -1.9}],
  "text_offset": [0, 3]}}]}"""

CHAT_FORM_BODY = b"""{"choices": [{"index": 0, "finish_reason": "stop",
 "message": {"role": "assistant", "content": "The sky"},
 "logprobs": {"content": [
  {"token": "The", "logprob": -0.05, "bytes": [84, 104, 101], "top_logprobs": [
    {"token": "The", "logprob": -0.05, "bytes": [84, 104, 101]},
    {"token": "A", "logprob": -3.1, "bytes": [65]}]},
  {"token": " sky", "logprob": -1.25, "bytes": [32, 115, 107, 121], "top_logprobs": [
    {"token": " sky", "logprob": -1.25, "bytes": [32, 115, 107, 121]},
    {"token": " sea", "logprob": -1.9, "bytes": [32, 115, 101, 97]}]}]}}]}"""

POSITIVE_FIRST_BODY = b"""{"choices": [{"index": 0, "finish_reason": "stop",
 "message": {"role": "assistant", "content": "Sure thing"},
 "logprobs": {"tokens": ["Sure", " thing"], "token_logprobs": [0.6997, -0.41]}}]}"""

TOKENS_ONLY_BODY = POSITIVE_FIRST_BODY.replace(b"0.6997", b"-0.6997")

LENGTH_MISMATCH_BODY = b"""{"choices": [{"index": 0, "text": "a b c", "finish_reason": "stop",
 "logprobs": {"tokens": ["a", " b", " c"], "token_logprobs": [-0.1, -0.2]}}]}"""


def test_legacy_arrays_in_chat_same_columns():
    legacy = parse_chat(CHAT_WITH_LEGACY_ARRAYS_BODY, top_logprobs=2).choices[0].logprobs
    chat = parse_chat(CHAT_FORM_BODY, top_logprobs=2).choices[0].logprobs
    assert legacy.tokens == chat.tokens
    assert legacy.token_bytes == chat.token_bytes
    assert legacy.token_logprobs == chat.token_logprobs
    assert legacy.top_counts == chat.top_counts
    assert legacy.top_tokens == chat.top_tokens
    assert legacy.top_logprobs == chat.top_logprobs
    assert legacy.top_bytes == chat.top_bytes


def test_legacy_arrays_in_chat_format_recorded():
    choice = parse_chat(CHAT_WITH_LEGACY_ARRAYS_BODY, top_logprobs=2).choices[0]
    assert choice.logprobs_format == "completions"
    assert choice.logprobs.text_offset == [0, 3]
    assert choice.token_level_ok is True


def test_positive_logprob_rejected():
    with pytest.raises(ResponseFormatError) as caught:
        parse_chat(POSITIVE_FIRST_BODY, top_logprobs=None)
    assert "0.6997" in str(caught.value)
    assert "positive" in str(caught.value)
    assert "choices[0].logprobs.token_logprobs[0]" in str(caught.value)


def test_tokens_only_zero_alternatives():
    choice = parse_chat(TOKENS_ONLY_BODY, top_logprobs=None).choices[0]
    assert choice.logprobs.token_logprobs == [-0.6997, -0.41]
    assert choice.logprobs.top_counts == [0, 0]
    assert choice.token_bytes_match is True


def test_tokens_only_not_top_k_usable():
    choice = parse_chat(TOKENS_ONLY_BODY, top_logprobs=5).choices[0]
    assert choice.token_level_ok is False
    assert choice.logprobs_note == "no top-k alternatives returned"


def test_array_length_mismatch_rejected():
    with pytest.raises(ResponseFormatError) as caught:
        parse_completions(LENGTH_MISMATCH_BODY, top_logprobs=None)
    assert "token_logprobs" in str(caught.value)
    assert "has 2 entries, but tokens has 3" in str(caught.value)


# llama.cpp's native formats, and logprobs: null although they were requested.

LLAMACPP_PROBS_BODY = b"""{"content": " to the", "model": "tinyllama.gguf",
 "completion_probabilities": [
  {"content": " to", "probs": [{"prob": 0.983, "tok_str": " to"}, {"prob": 0.017, "tok_str": " the"},
                               {"prob": 0.0, "tok_str": " a"}]},
  {"content": " the", "probs": [{"prob": 0.6, "tok_str": " the"}, {"prob": 0.4, "tok_str": " a"}]}],
 "stop": true, "stopped_limit": true, "tokens_predicted": 2, "tokens_evaluated": 4}"""

LLAMACPP_LOGPROB_BODY = b"""{"content": " to", "model": "tinyllama.gguf", "stop_type": "eos",
 "completion_probabilities": [
  {"id": 311, "token": " to", "logprob": -0.0171, "bytes": [32, 116, 111], "top_logprobs": [
    {"id": 311, "token": " to", "logprob": -0.0171, "bytes": [32, 116, 111]},
    {"id": 279, "token": " the", "logprob": -4.07, "bytes": [32, 116, 104, 101]}]}],
 "tokens_predicted": 1, "tokens_evaluated": 4}"""

LLAMACPP_CHAT_NULL_LOGPROBS_BODY = b"""{"id": "chatcmpl-llama", "model": "tinyllama.gguf",
 "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
  "message": {"role": "assistant", "content": "Hello there"}}]}"""


def parse_llamacpp(body, top_logprobs=3, required=True):
    return parse_response(
        body, endpoint="llamacpp", top_logprobs=top_logprobs, logprobs_required=required
    )


def test_llamacpp_probabilities_become_logs():
    choice = parse_llamacpp(LLAMACPP_PROBS_BODY).choices[0]
    assert choice.logprobs_format == "llamacpp"
    assert choice.logprobs.tokens == [" to", " the"]
    assert choice.logprobs.token_logprobs == [math.log(0.983), math.log(0.6)]
    assert choice.logprobs.top_logprobs[:2] == [math.log(0.983), math.log(0.017)]


def test_llamacpp_zero_probability_masked():
    choice = parse_llamacpp(LLAMACPP_PROBS_BODY).choices[0]
    assert choice.logprobs.top_logprobs[2] is None
    assert choice.logprobs.top_tokens[2] == " a"


def test_llamacpp_old_format_fields():
    response = parse_llamacpp(LLAMACPP_PROBS_BODY)
    assert response.model == "tinyllama.gguf"
    assert response.prompt_tokens == 4
    assert response.completion_tokens == 2
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].token_level_ok is True


def test_llamacpp_logprob_format_parsed():
    choice = parse_llamacpp(LLAMACPP_LOGPROB_BODY, top_logprobs=2).choices[0]
    assert choice.logprobs.token_logprobs == [-0.0171]
    assert choice.logprobs.top_logprobs == [-0.0171, -4.07]
    assert choice.logprobs.top_bytes == [b" to", b" the"]
    assert choice.finish_reason == "stop"
    assert choice.token_level_ok is True


def test_llamacpp_null_logprobs_is_config_error():
    with pytest.raises(MissingLogprobsError) as caught:
        parse_chat(LLAMACPP_CHAT_NULL_LOGPROBS_BODY, top_logprobs=3)
    assert caught.value.retryable is False
    assert "logprobs were requested" in str(caught.value)


def test_llamacpp_null_logprobs_not_required():
    response = parse_chat(LLAMACPP_CHAT_NULL_LOGPROBS_BODY, top_logprobs=None, required=False)
    choice = response.choices[0]
    assert choice.logprobs is None
    assert choice.token_level_ok is False
    assert choice.logprobs_note == "no logprobs returned"


# A null logprob at the first position of an echoed prompt must keep later positions
# aligned with their tokens.

ECHO_BODY = b"""{"choices": [{"index": 0, "text": "The cat sat", "finish_reason": "length",
 "logprobs": {"tokens": ["The", " cat", " sat"], "token_logprobs": [null, -4.10, -2.3],
  "top_logprobs": [null, {" cat": -4.10, " dog": -3.2}, {" sat": -2.3, " ran": -1.9}],
  "text_offset": [0, 3, 7]}}]}"""


def test_echo_first_logprob_masked():
    choice = parse_completions(ECHO_BODY, top_logprobs=2).choices[0]
    assert choice.logprobs.token_logprobs == [None, -4.10, -2.3]
    assert choice.logprobs.top_counts == [0, 2, 2]
    assert choice.token_level_ok is True


def test_echo_targets_not_shifted():
    columns = parse_completions(ECHO_BODY, top_logprobs=2).choices[0].logprobs
    for position in (1, 2):
        by_token = {token: logprob for token, logprob, _ in columns.alternatives(position)}
        assert by_token[columns.tokens[position]] == columns.token_logprobs[position]


def test_echo_alignment_survives_store():
    row = stored_row(parse_completions(ECHO_BODY, top_logprobs=2).choices[0])
    assert row["tokens"] == ["The", " cat", " sat"]
    assert row["token_logprobs"][0] is None
    assert row["token_logprobs"][1] == pytest.approx(-4.10)
    assert row["token_logprobs"][2] == pytest.approx(-2.3)


# Finished for the wrong reason: content_filter with null content, and length.

CONTENT_FILTER_BODY = b"""{"id": "chatcmpl-c08", "model": "gpt-4o-mini", "choices": [{"index": 0,
 "message": {"role": "assistant", "content": null}, "logprobs": null,
 "finish_reason": "content_filter"}], "usage": {"prompt_tokens": 12, "completion_tokens": 0}}"""

LENGTH_BODY = b"""{"choices": [{"index": 0, "finish_reason": "length",
 "message": {"role": "assistant", "content": "Once upon"},
 "logprobs": {"content": [
  {"token": "Once", "logprob": -0.3, "bytes": [79, 110, 99, 101], "top_logprobs": []},
  {"token": " upon", "logprob": -0.01, "bytes": [32, 117, 112, 111, 110], "top_logprobs": []}]}}]}"""


def test_content_filter_null_content_parses():
    response = parse_chat(CONTENT_FILTER_BODY, top_logprobs=5)
    choice = response.choices[0]
    assert choice.text is None
    assert choice.finish_reason == "content_filter"
    assert choice.logprobs is None
    assert choice.token_level_ok is False
    assert choice.logprobs_note == "no content"
    assert response.completion_tokens == 0


def test_length_finish_reason_kept():
    choice = parse_chat(LENGTH_BODY, top_logprobs=None).choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == "Once upon"
    assert choice.token_bytes_match is True


# Truncated and HTML bodies.

TRUNCATED_BODY = (
    b'{"id": "chatcmpl-c11", "object": "chat.completion", "choices": [{"index": 0,'
    b' "message": {"role": "assistant", "content": "Once upon a time, there was a li'
)

PROXY_HTML_502 = b"""<html>
<head><title>502 Bad Gateway</title><style>body { font-family: sans-serif; }</style></head>
<body>
<center><h1>502 Bad Gateway</h1></center>
<hr><center>nginx/1.25.3</center>
<script>console.log("x")</script>
</body>
</html>
"""

PROXY_JSON_502 = b'{"error": {"message": "upstream connect error or disconnect/reset before headers", "code": 502}}'


def test_truncated_body_retryable():
    with pytest.raises(TruncatedBodyError) as caught:
        parse_chat(TRUNCATED_BODY)
    assert caught.value.retryable is True


def test_html_error_body_summarized():
    summary = summarize_error_body(PROXY_HTML_502, "text/html")
    assert summary == "502 Bad Gateway nginx/1.25.3"
    assert "<" not in summary
    assert "console" not in summary


def test_json_error_body_summarized():
    summary = summarize_error_body(PROXY_JSON_502, "application/json")
    assert summary == "upstream connect error or disconnect/reset before headers (code 502)"


# Errors inside a 200 body.

EMBEDDED_429_BODY = b'{"error": {"message": "Provider returned error", "code": 429}}'


def test_embedded_429_is_rate_limit():
    with pytest.raises(RateLimitError) as caught:
        parse_chat(EMBEDDED_429_BODY)
    assert caught.value.status == 429
    assert caught.value.retryable is True
    assert "Provider returned error" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "error_type", "status"),
    [
        (b'{"error": {"message": "Bad gateway", "code": 502}}', ServerError, 502),
        (b'{"error": {"message": "Overloaded", "code": "503"}}', ServerError, 503),
        (b'{"error": {"message": "Invalid model", "code": 400}}', ClientError, 400),
        (b'{"error": {"message": "Something failed"}}', ClientError, None),
        (b'{"error": "quota exhausted", "choices": []}', ClientError, None),
    ],
)
def test_embedded_error_typed_by_status(body, error_type, status):
    with pytest.raises(error_type) as caught:
        parse_chat(body)
    assert caught.value.status == status


def test_empty_choices_rejected():
    with pytest.raises(ResponseFormatError) as caught:
        parse_chat(b'{"id": "chatcmpl-empty", "choices": []}')
    assert "no choices" in str(caught.value)
