"""Fast OpenAI-compatible mock teacher for benchmarks and format tests.

The mock responds to ``POST /v1/chat/completions`` and ``POST /v1/completions`` with
realistic bodies that carry token logprobs and top-k alternatives, after a fixed
latency. It is built so that its own CPU cost per request is tiny and the client
under test is always the bottleneck:

- a raw :class:`asyncio.Protocol` HTTP/1.1 server (keep-alive, ``Content-Length``
  bodies, pipelining kept in order) with no framework and no JSON parsing of requests;
- a pool of complete HTTP responses (status line, headers and body as one ``bytes``)
  built once at start-up. A request gets the pool entry picked by a CRC-32 of its body,
  so different prompts get different bodies and a retried request gets the same one;
- latency by ``loop.call_later``, which costs one timer and no task or thread.

``GET /stats`` returns request counts and the mock's own CPU seconds, and
``POST /stats/reset`` zeroes the counts; benchmarks use both to count requests sent
and to measure the mock's CPU share. Run it as::

    python -m benchmarks.mock_teacher --port 0 --latency-ms 100 --k 20 --tokens 64

It prints ``http://127.0.0.1:PORT/v1`` on one line when it is ready to serve.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import random
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

HOST = "127.0.0.1"
MAX_HEADER_BYTES = 64 * 1024
CREATED = 1_700_000_000

# Word pieces with a leading space, punctuation and multi-byte UTF-8 characters, so the
# ``bytes`` fields differ from the ASCII text in some tokens as they do with real teachers.
_WORDS = (
    "the a and to of was she he it in they day little big happy sad dog cat girl boy "
    "tree house ball park sun moon friend mom dad play run jump look find saw said "
    "wanted loved time once upon there named very good bad new old red blue green "
    "toy box car bird fish water food cake smile laugh help share home school"
).split()
_EXTRA_TOKENS = [".", ",", "!", "?", "\n", '"', " café", " naïve", " —", " ☀", " 🐶", "ing", "ed", "s"]
VOCABULARY: tuple[str, ...] = tuple([" " + w for w in _WORDS] + [w.capitalize() for w in _WORDS[:20]] + _EXTRA_TOKENS)


@dataclass(slots=True)
class MockConfig:
    """Settings of one mock teacher; the defaults are the benchmark's standard workload."""

    port: int = 0
    latency_ms: float = 100.0
    top_k: int = 20
    tokens: int = 64
    pool_size: int = 64
    fail_429: float = 0.0
    fail_500: float = 0.0
    retry_after_ms: int = 100
    model: str = "mock-teacher"
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of range; use 0 for a free port")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if not 1 <= self.top_k <= len(VOCABULARY):
            raise ValueError(f"top_k must be in 1..{len(VOCABULARY)}, got {self.top_k}")
        if self.tokens < 1 or self.pool_size < 1:
            raise ValueError("tokens and pool_size must be >= 1")
        if self.fail_429 < 0 or self.fail_500 < 0 or self.fail_429 + self.fail_500 > 1:
            raise ValueError(
                f"failure rates must be >= 0 and sum to <= 1, got 429={self.fail_429}, 500={self.fail_500}"
            )


# --- response bodies -------------------------------------------------------------


@dataclass(slots=True)
class _Position:
    token: str
    logprob: float
    alternatives: list[tuple[str, float]]


def _sample_positions(rng: random.Random, top_k: int, count: int) -> list[_Position]:
    """Draw ``count`` positions, each with ``top_k`` distinct alternatives sorted by logprob."""
    positions = []
    for _ in range(count):
        tokens = rng.sample(VOCABULARY, top_k)
        logits = sorted((rng.gauss(0.0, 2.5) for _ in range(top_k)), reverse=True)
        # Leave some probability mass outside the top-k, as a real vocabulary would.
        tail = math.log(rng.uniform(0.01, 0.3))
        peak = max(logits[0], tail)
        log_norm = peak + math.log(sum(math.exp(x - peak) for x in [*logits, tail]))
        logprobs = [x - log_norm for x in logits]
        chosen = rng.choices(range(top_k), weights=[math.exp(x) for x in logprobs])[0]
        positions.append(_Position(tokens[chosen], logprobs[chosen], list(zip(tokens, logprobs))))
    return positions


def _usage(config: MockConfig) -> dict[str, int]:
    prompt_tokens = 16
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": config.tokens,
        "total_tokens": prompt_tokens + config.tokens,
    }


def chat_body(config: MockConfig, index: int, positions: list[_Position]) -> dict[str, Any]:
    """Build a ``chat.completion`` body with ``choices[0].logprobs.content``."""
    content = [
        {
            "token": p.token,
            "logprob": p.logprob,
            "bytes": list(p.token.encode()),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in p.alternatives
            ],
        }
        for p in positions
    ]
    return {
        "id": f"chatcmpl-mock-{index}",
        "object": "chat.completion",
        "created": CREATED,
        "model": config.model,
        "system_fingerprint": "fp_mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(p.token for p in positions)},
                "logprobs": {"content": content},
                "finish_reason": "length",
            }
        ],
        "usage": _usage(config),
    }


def completions_body(config: MockConfig, index: int, positions: list[_Position]) -> dict[str, Any]:
    """Build a legacy ``text_completion`` body with parallel logprob lists.

    ``text_offset`` counts characters from the start of the completion, not of the
    prompt: the bodies are built before any request arrives.
    """
    offsets = []
    offset = 0
    for p in positions:
        offsets.append(offset)
        offset += len(p.token)
    return {
        "id": f"cmpl-mock-{index}",
        "object": "text_completion",
        "created": CREATED,
        "model": config.model,
        "choices": [
            {
                "index": 0,
                "text": "".join(p.token for p in positions),
                "logprobs": {
                    "tokens": [p.token for p in positions],
                    "token_logprobs": [p.logprob for p in positions],
                    "top_logprobs": [dict(p.alternatives) for p in positions],
                    "text_offset": offsets,
                },
                "finish_reason": "length",
            }
        ],
        "usage": _usage(config),
    }


def http_response(status: int, reason: str, body: bytes, extra_headers: str = "") -> bytes:
    """Return a complete HTTP/1.1 response with a JSON body."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra_headers}\r\n"
    )
    return head.encode() + body


@dataclass(slots=True)
class ResponsePool:
    """Pre-built HTTP responses; ``chat[i]`` and ``completions[i]`` share token data."""

    chat: list[bytes] = field(default_factory=list)
    completions: list[bytes] = field(default_factory=list)
    rate_limited: bytes = b""
    server_error: bytes = b""


def build_pool(config: MockConfig) -> ResponsePool:
    """Build every response the mock will send, so serving one costs no encoding."""
    rng = random.Random(config.seed)
    pool = ResponsePool()
    for index in range(config.pool_size):
        positions = _sample_positions(rng, config.top_k, config.tokens)
        pool.chat.append(http_response(200, "OK", orjson.dumps(chat_body(config, index, positions))))
        pool.completions.append(
            http_response(200, "OK", orjson.dumps(completions_body(config, index, positions)))
        )
    rate_body = orjson.dumps(
        {"error": {"message": "Rate limit reached (mock teacher)", "type": "rate_limit_error",
                   "code": "rate_limit_exceeded"}}
    )
    retry_s = max(1, math.ceil(config.retry_after_ms / 1000))
    pool.rate_limited = http_response(
        429, "Too Many Requests", rate_body,
        f"Retry-After: {retry_s}\r\nRetry-After-Ms: {config.retry_after_ms}\r\n",
    )
    error_body = orjson.dumps({"error": {"message": "Internal error (mock teacher)", "type": "server_error"}})
    pool.server_error = http_response(500, "Internal Server Error", error_body)
    return pool


# --- server ------------------------------------------------------------------------


@dataclass(slots=True)
class MockStats:
    """Counters served by ``GET /stats``."""

    requests: int = 0
    chat: int = 0
    completions: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    connections: int = 0
    bytes_sent: int = 0

    def as_dict(self) -> dict[str, Any]:
        cpu = time.process_time()
        return {
            "requests": self.requests,
            "chat": self.chat,
            "completions": self.completions,
            "rate_limited": self.rate_limited,
            "server_errors": self.server_errors,
            "connections": self.connections,
            "bytes_sent": self.bytes_sent,
            "cpu_s": cpu,
        }


class MockServer:
    """Routing, failure injection and counters shared by all connections."""

    def __init__(self, config: MockConfig, pool: ResponsePool):
        self.config = config
        self.pool = pool
        self.stats = MockStats()
        self.delay_s = config.latency_ms / 1000.0
        self._rng = random.Random(config.seed + 1)

    def respond(self, method: bytes, path: bytes, body: bytes) -> tuple[bytes, float]:
        """Return the response bytes for one request and the delay before sending them."""
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            self.stats.chat += 1
            return self._generation(body, self.pool.chat)
        if method == b"POST" and path in (b"/v1/completions", b"/completions"):
            self.stats.completions += 1
            return self._generation(body, self.pool.completions)
        if method == b"GET" and path in (b"/v1/models", b"/models"):
            models = {"object": "list", "data": [{"id": self.config.model, "object": "model", "owned_by": "mock"}]}
            return http_response(200, "OK", orjson.dumps(models)), 0.0
        if method == b"GET" and path == b"/stats":
            return http_response(200, "OK", orjson.dumps(self.stats.as_dict())), 0.0
        if method == b"POST" and path == b"/stats/reset":
            self.stats = MockStats()
            return http_response(200, "OK", b"{}"), 0.0
        message = f"no route for {method.decode()} {path.decode(errors='replace')}"
        return http_response(404, "Not Found", orjson.dumps({"error": {"message": message}})), 0.0

    def _generation(self, body: bytes, responses: list[bytes]) -> tuple[bytes, float]:
        self.stats.requests += 1
        draw = self._rng.random() if self.config.fail_429 or self.config.fail_500 else 1.0
        if draw < self.config.fail_429:
            self.stats.rate_limited += 1
            return self.pool.rate_limited, self.delay_s
        if draw < self.config.fail_429 + self.config.fail_500:
            self.stats.server_errors += 1
            return self.pool.server_error, self.delay_s
        return responses[zlib.crc32(body) % len(responses)], self.delay_s


class _Slot:
    """One response waiting for its delay; keeps pipelined responses in request order."""

    __slots__ = ("data", "close_after", "timer")

    def __init__(self, close_after: bool):
        self.data: bytes | None = None
        self.close_after = close_after
        self.timer: asyncio.TimerHandle | None = None


class HTTPProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server connection: ``Content-Length`` bodies and keep-alive."""

    def __init__(self, server: MockServer):
        self.server = server
        self.buffer = bytearray()
        self.pending: collections.deque[_Slot] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        for slot in self.pending:
            if slot.timer is not None:
                slot.timer.cancel()
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.closing and self._handle_one():
            pass

    def _handle_one(self) -> bool:
        """Handle the first complete request in the buffer; return False when none is complete."""
        header_end = self.buffer.find(b"\r\n\r\n")
        if header_end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                self._reject(431, "Request Header Fields Too Large")
            return False
        lines = bytes(self.buffer[:header_end]).split(b"\r\n")
        try:
            method, path, version = lines[0].split(b" ", 2)
        except ValueError:
            self._reject(400, "Bad Request")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            # NOTE: chunked request bodies are not supported; httpx, aiohttp and the
            # openai SDK all send JSON bodies with Content-Length.
            self._reject(411, "Length Required")
            return False
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            self._reject(400, "Bad Request")
            return False
        end = header_end + 4 + length
        if len(self.buffer) < end:
            return False
        body = bytes(self.buffer[header_end + 4 : end])
        del self.buffer[:end]

        connection = headers.get(b"connection", b"").lower()
        close_after = connection == b"close" or (version == b"HTTP/1.0" and connection != b"keep-alive")
        data, delay_s = self.server.respond(method, path, body)
        slot = _Slot(close_after)
        self.pending.append(slot)
        if delay_s > 0:
            slot.timer = asyncio.get_running_loop().call_later(delay_s, self._complete, slot, data)
        else:
            self._complete(slot, data)
        if close_after:
            self.closing = True
        return True

    def _complete(self, slot: _Slot, data: bytes) -> None:
        slot.data = data
        transport = self.transport
        while self.pending and self.pending[0].data is not None:
            ready = self.pending.popleft()
            if transport is None or transport.is_closing():
                return
            transport.write(ready.data)  # type: ignore[arg-type]
            self.server.stats.bytes_sent += len(ready.data)  # type: ignore[arg-type]
            if ready.close_after:
                transport.close()
                return

    def _reject(self, status: int, reason: str) -> None:
        if self.transport is not None:
            self.transport.write(http_response(status, reason, b"{}", "Connection: close\r\n"))
            self.transport.close()
        self.closing = True


async def serve(config: MockConfig, ready: asyncio.Future[str] | None = None) -> None:
    """Serve until cancelled; set ``ready`` to the base URL once listening."""
    config.validate()
    server = MockServer(config, build_pool(config))
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: HTTPProtocol(server), HOST, config.port, backlog=4096)
    port = listener.sockets[0].getsockname()[1]
    url = f"http://{HOST}:{port}/v1"
    if ready is not None:
        ready.set_result(url)
    async with listener:
        await listener.serve_forever()


# --- running it as a process --------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> MockConfig:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mock_teacher",
        description="Serve a fast OpenAI-compatible mock teacher on 127.0.0.1.",
        epilog="Example: python -m benchmarks.mock_teacher --port 0 --latency-ms 100 --k 20 --tokens 64",
    )
    defaults = MockConfig()
    parser.add_argument("--port", type=int, default=defaults.port, help="TCP port; 0 picks a free one")
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms, help="delay before each generation response, in ms")
    parser.add_argument("--k", type=int, default=defaults.top_k, help="top-k alternatives per token")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="generated tokens per response")
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, help="distinct bodies per endpoint")
    parser.add_argument("--fail-429", type=float, default=defaults.fail_429, help="share of generation requests that get HTTP 429")
    parser.add_argument("--fail-500", type=float, default=defaults.fail_500, help="share of generation requests that get HTTP 500")
    parser.add_argument("--retry-after-ms", type=int, default=defaults.retry_after_ms, help="wait a 429 asks for, in ms")
    parser.add_argument("--model", default=defaults.model, help="model name in bodies and /v1/models")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of bodies and failure draws")
    args = parser.parse_args(argv)
    return MockConfig(
        port=args.port, latency_ms=args.latency_ms, top_k=args.k, tokens=args.tokens,
        pool_size=args.pool_size, fail_429=args.fail_429, fail_500=args.fail_500,
        retry_after_ms=args.retry_after_ms, model=args.model, seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        config.validate()
    except ValueError as exc:
        sys.exit(f"error: {exc}")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[str] = loop.create_future()
        task = asyncio.create_task(serve(config, ready))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        url = await asyncio.wait_for(asyncio.shield(ready), timeout=60)
        print(url, flush=True)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(run())


class MockProcess:
    """A mock teacher in a child process; use as a context manager.

    ``url`` is the OpenAI base URL (ending in ``/v1``); :meth:`stats` reads the
    counters and the child's CPU seconds.
    """

    def __init__(self, config: MockConfig | None = None, *, python: str = sys.executable):
        self.config = config or MockConfig()
        self.config.validate()
        self._python = python
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> MockProcess:
        c = self.config
        argv = [
            self._python, "-m", "benchmarks.mock_teacher", "--port", str(c.port),
            "--latency-ms", str(c.latency_ms), "--k", str(c.top_k), "--tokens", str(c.tokens),
            "--pool-size", str(c.pool_size), "--fail-429", str(c.fail_429), "--fail-500", str(c.fail_500),
            "--retry-after-ms", str(c.retry_after_ms), "--model", c.model, "--seed", str(c.seed),
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        # The child prints its URL after building the pool (about a second) or exits.
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"mock teacher did not start: first output line {line!r}")
        self.url = line.strip()
        return self

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/stats", timeout=10) as response:
            return orjson.loads(response.read())

    def reset_stats(self) -> None:
        request = urllib.request.Request(f"{self.root}/stats/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> MockProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
