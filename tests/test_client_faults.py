"""TeacherClient against each fault of the fault server: one attempt, one typed error."""

from __future__ import annotations

import socket
import threading
import time

import anyio
import pytest

from pipeline.client import TeacherClient, TeacherReply
from pipeline.config import HTTP_CLIENTS
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


# Every test runs once per way of sending (direct aiohttp and the openai SDK), because
# both must type each fault the same way. The fixture sets this for the helpers below.
_http_client = HTTP_CLIENTS[0]


@pytest.fixture(autouse=True, params=HTTP_CLIENTS)
def http_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(f"{__name__}._http_client", request.param)
    return request.param


async def _send(base_url: str, body: dict, *, endpoint: str = "chat", timeout_s: float = 5.0,
                top_logprobs: int = 4) -> TeacherReply:
    teacher = make_teacher(base_url, endpoint=endpoint, http_client=_http_client)
    client = TeacherClient(teacher, timeout_s=timeout_s, max_connections=2, top_logprobs=top_logprobs)
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


def test_gzip_body_is_decoded() -> None:
    reply = send_with_fault("gzip")
    expected = expected_response(CHAT_BODY, "chat")
    choice = reply.parsed.choices[0]
    assert choice.text == expected["choices"][0]["message"]["content"]
    assert choice.token_level_ok


def test_api_key_sent_as_bearer_token() -> None:
    with FaultServer(FaultPlan(sequence=["ok"])) as server:
        anyio.run(lambda: _send(server.base_url, CHAT_BODY))
        assert [request.api_key for request in server.log] == [TEST_KEY]


def test_user_agent_names_sender(http_client: str) -> None:
    with FaultServer(FaultPlan(sequence=["ok"])) as server:
        anyio.run(lambda: _send(server.base_url, CHAT_BODY))
        user_agent = server.log[0].user_agent
    expected_prefix = "AsyncOpenAI/Python" if http_client == "openai" else "kd-pipeline"
    assert user_agent is not None
    assert user_agent.startswith(expected_prefix)


class RecordingProxy:
    """A loopback HTTP proxy stand-in: records each request line and replies with HTTP 502."""

    def __init__(self) -> None:
        self.request_lines: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                self.request_lines.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                body = b'{"error": {"message": "proxy refused", "code": 502}}'
                connection.sendall(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )

    def close(self) -> None:
        self._listener.close()


def test_proxy_from_environment_used(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = RecordingProxy()
    try:
        with FaultServer(FaultPlan(sequence=["ok"])) as server:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "")
            with pytest.raises(ServerError):
                anyio.run(lambda: _send(server.base_url, CHAT_BODY))
            assert server.log == []
        assert proxy.request_lines == [f"POST {server.base_url}/chat/completions HTTP/1.1"]
    finally:
        proxy.close()


def test_no_proxy_bypasses_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = RecordingProxy()
    try:
        with FaultServer(FaultPlan(sequence=["ok"])) as server:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            reply = anyio.run(lambda: _send(server.base_url, CHAT_BODY))
        assert reply.status == 200
        assert proxy.request_lines == []
    finally:
        proxy.close()


@pytest.mark.parametrize("entry", ["127.0.0.1:{port}", "127.0.0.0/8"])
def test_no_proxy_port_and_cidr_bypass(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    proxy = RecordingProxy()
    try:
        with FaultServer(FaultPlan(sequence=["ok"])) as server:
            port = server.base_url.split(":")[-1].split("/")[0]
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", entry.format(port=port))
            reply = anyio.run(lambda: _send(server.base_url, CHAT_BODY))
        assert reply.status == 200
        assert proxy.request_lines == []
    finally:
        proxy.close()


def test_dead_proxy_named_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultServer(FaultPlan(sequence=["ok"])) as server:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port}")
        monkeypatch.setenv("NO_PROXY", "")
        with pytest.raises(TransportError) as raised:
            anyio.run(lambda: _send(server.base_url, CHAT_BODY))
        assert server.log == []
    assert "cannot connect to the proxy" in str(raised.value)
    assert "NO_PROXY" in str(raised.value)
