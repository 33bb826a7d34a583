"""TeacherClient against each fault of the fault server: one attempt, one typed error."""

from __future__ import annotations

import socket
import time

import anyio
import pytest

from pipeline.client import TeacherClient, TeacherReply
from pipeline.errors import (
    ClientError,
    KDError,
    MissingLogprobsError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TransportError,
    TruncatedBodyError,
)
from tests.fault_server import FaultPlan, FaultServer, expected_response
from tests.fixtures_harvest import TEST_KEY, make_teacher

CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "Once upon a time"}],
             "max_tokens": 12, "logprobs": True, "top_logprobs": 4}
LEGACY_BODY = {"model": "m", "prompt": "Once upon a time", "max_tokens": 12, "logprobs": 4}


async def _send(base_url: str, body: dict, *, endpoint: str = "chat", timeout_s: float = 5.0,
                top_logprobs: int = 4) -> TeacherReply:
    client = TeacherClient(make_teacher(base_url, endpoint=endpoint), timeout_s=timeout_s,
                           max_connections=2, top_logprobs=top_logprobs)
    try:
        return await client.send(body, request_id="req-1")
    finally:
        await client.aclose()


def send_with_fault(fault: str, body: dict = CHAT_BODY, **kwargs) -> TeacherReply:
    with FaultServer(FaultPlan(sequence=[fault])) as server:
        return anyio.run(lambda: _send(server.base_url, body, **kwargs))


def error_for(fault: str, body: dict = CHAT_BODY, **kwargs) -> KDError:
    with pytest.raises(KDError) as raised:
        send_with_fault(fault, body, **kwargs)
    return raised.value


@pytest.mark.parametrize(
    ("fault", "error_class", "status"),
    [
        ("429", RateLimitError, 429),
        ("500", ServerError, 500),
        ("502-html", ServerError, 502),
        ("502-json", ServerError, 502),
        ("503", ServerError, 503),
        ("529", ServerError, 529),
        ("error-200:code=429", RateLimitError, 429),
        ("error-200:code=500", ServerError, 500),
        ("error-200:code=400", ClientError, 400),
        ("truncated-json", TruncatedBodyError, None),
        ("drop-length", TransportError, None),
        ("drop-chunked", TransportError, None),
        ("close", TransportError, None),
        ("no-logprobs", MissingLogprobsError, None),
        ("bad-logprobs", ResponseFormatError, None),
    ],
)
def test_fault_becomes_typed_error(fault: str, error_class: type[KDError], status: int | None) -> None:
    error = error_for(fault)
    assert type(error) is error_class
    assert getattr(error, "status", None) == status
    assert error.request_id == "req-1"
    assert "req-1" in str(error)
    assert len(str(error)) < 500
    assert TEST_KEY not in str(error)


@pytest.mark.parametrize(
    ("fault", "retryable"),
    [("429", True), ("502-html", True), ("529", True), ("drop-length", True), ("drop-chunked", True),
     ("truncated-json", True), ("error-200:code=429", True), ("error-200:code=400", False),
     ("no-logprobs", False), ("bad-logprobs", False)],
)
def test_fault_retryable_flag(fault: str, retryable: bool) -> None:
    assert error_for(fault).retryable is retryable


def test_html_502_message_is_short_text() -> None:
    error = error_for("502-html")
    message = str(error)
    assert "502 Bad Gateway" in message
    assert "<" not in message
    assert "HTTP 502" in message


def test_dropped_body_chains_cause() -> None:
    for fault in ("drop-length", "drop-chunked"):
        error = error_for(fault)
        assert error.__cause__ is not None
        assert "closed before the response was complete" in str(error)


def test_rate_limit_carries_retry_after() -> None:
    error = error_for("429:retry-after=12")
    assert isinstance(error, RateLimitError)
    assert error.retry_after == 12.0


def test_slow_response_times_out() -> None:
    error = error_for("slow:seconds=2", timeout_s=0.3)
    assert isinstance(error, TransportError)
    assert error.retryable
    assert "timed out after 0.3 s" in str(error)


def test_trickled_body_times_out_in_total() -> None:
    # Each part arrives within 0.2 s, so only a limit on the whole attempt stops it.
    started = time.monotonic()
    error = error_for("trickle:seconds=2", timeout_s=0.5)
    assert time.monotonic() - started < 1.5
    assert isinstance(error, TransportError)
    assert "timed out after 0.5 s" in str(error)


def test_connection_refused_is_transport_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    with pytest.raises(TransportError) as raised:
        anyio.run(lambda: _send(f"http://127.0.0.1:{port}/v1", CHAT_BODY))
    assert "cannot connect" in str(raised.value)


def test_not_found_is_client_error() -> None:
    with FaultServer() as server:
        url = server.base_url.replace("/v1", "/nope")
        with pytest.raises(ClientError) as raised:
            anyio.run(lambda: _send(url, CHAT_BODY))
    assert raised.value.status == 404
    assert not raised.value.retryable


def test_chat_response_parses() -> None:
    reply = send_with_fault("ok")
    expected = expected_response(CHAT_BODY, "chat")
    choice = reply.parsed.choices[0]
    assert choice.text == expected["choices"][0]["message"]["content"]
    assert choice.finish_reason == expected["choices"][0]["finish_reason"]
    assert choice.token_level_ok
    assert len(choice.logprobs) == len(expected["choices"][0]["logprobs"]["content"])
    assert reply.status == 200


def test_legacy_response_parses() -> None:
    reply = send_with_fault("ok", LEGACY_BODY, endpoint="completions")
    expected = expected_response(LEGACY_BODY, "completions")
    choice = reply.parsed.choices[0]
    assert choice.text == expected["choices"][0]["text"]
    assert choice.logprobs.tokens == expected["choices"][0]["logprobs"]["tokens"]


def test_content_filter_is_a_response() -> None:
    reply = send_with_fault("content-filter")
    choice = reply.parsed.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.text is None
    assert choice.logprobs is None
