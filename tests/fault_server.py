"""Fault-injecting OpenAI-compatible teacher on 127.0.0.1, for tests and benchmarks.

The server responds to ``POST /v1/chat/completions`` and ``POST /v1/completions`` with
bodies that carry token logprobs and top-k alternatives, generated deterministically from
the request body: the same request always gets the same tokens and logprobs, so a run
through faults and a fault-free run must store identical responses.

What each request gets is scripted by a :class:`FaultPlan`, checked in this order:

- ``per_prompt``: prompt text -> faults for its successive attempts;
- ``sequence``: faults for the server's 1st, 2nd, ... request, whatever the prompt;
- ``rates``: fault -> probability, drawn from a generator seeded by the plan's seed, the
  request body and the attempt number, so the draw does not depend on request order.

A fault is written ``KIND`` or ``KIND:key=value,key=value`` (see :data:`FAULT_KINDS`),
for example ``429:retry-after=5``, ``429:retry-after-ms=4321``, ``429:retry-after=date+30``
(an HTTP date 30 s after the server clock), ``error-200:code=500``, ``slow:seconds=3``.

It is a raw asyncio HTTP/1.1 server rather than a framework app because several faults
break HTTP on purpose: a ``Content-Length`` larger than the bytes sent, a chunked body
that stops without its last chunk, a connection closed before any response.

Every request is logged in :attr:`FaultServer.log`; ``completed`` marks the ones whose
full successful body was written and flushed. Run it in a thread with
``with FaultServer(plan) as server: server.base_url`` or as a process with
``python -m tests.fault_server --port 0 --plan '{"rates": {"429": 0.2}}'``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import gzip
import hashlib
import json
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

HOST = "127.0.0.1"
CREATED = 1_700_000_000

FAULT_KINDS = {
    "ok": "a normal 200 response",
    "429": "HTTP 429; options retry-after=SECONDS|date+S|date-S|TEXT, retry-after-ms=MS",
    "500": "HTTP 500 with a JSON error",
    "502-html": "HTTP 502 with a proxy's HTML page",
    "502-json": "HTTP 502 with a proxy's JSON error",
    "503": "HTTP 503; options as for 429",
    "529": "HTTP 529 (overloaded) with a JSON error",
    "error-200": "HTTP 200 with a top-level error object and no choices; option code=STATUS",
    "truncated-json": "HTTP 200, complete transfer of a JSON body cut inside the content",
    "drop-length": "HTTP 200 with Content-Length 2048, 700 bytes sent, then the connection closed",
    "drop-chunked": "HTTP 200 chunked, 700 bytes sent, then closed without the last chunk",
    "close": "the connection closed before any response",
    "slow": "a normal response after a delay; option seconds=S",
    "trickle": "a normal response whose body arrives in 10 parts spread over seconds=S",
    "no-logprobs": "a normal response with logprobs null although they were requested",
    "bad-logprobs": "a normal response whose logprobs are malformed",
    "content-filter": "HTTP 200 with finish_reason content_filter and null content",
    "length": "HTTP 200 with finish_reason length",
    "gzip": "a normal response sent with Content-Encoding gzip",
}

_WORDS = (
    "the a and to of was she he it in they day little big happy dog cat girl boy tree "
    "house ball park sun friend mom play run jump look find saw said wanted loved time "
    "once upon there named very good red blue toy box bird fish water cake smile home"
).split()
VOCABULARY: tuple[str, ...] = tuple(
    [" " + word for word in _WORDS] + [".", ",", "!", " café", " naïve", " ☀", "ing", "ed"]
)

_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            529: "Site Overloaded"}


@dataclass(frozen=True)
class Fault:
    """One scripted behaviour: a kind from :data:`FAULT_KINDS` and its options."""

    kind: str = "ok"
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str | Fault) -> Fault:
        if isinstance(spec, Fault):
            return spec
        kind, _, rest = spec.partition(":")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known faults: {sorted(FAULT_KINDS)}")
        options = []
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"fault option {item!r} in {spec!r} is not KEY=VALUE")
            options.append((key.strip(), value.strip()))
        return cls(kind, tuple(options))

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        if not self.options:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.options)


@dataclass
class FaultPlan:
    """Which fault each request gets (see the module docstring for the order)."""

    sequence: Sequence[str | Fault] = ()
    per_prompt: Mapping[str, Sequence[str | Fault]] = field(default_factory=dict)
    rates: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self._sequence = [Fault.parse(f) for f in self.sequence]
        self._per_prompt = {p: [Fault.parse(f) for f in fs] for p, fs in self.per_prompt.items()}
        self._rates = [(Fault.parse(f), rate) for f, rate in self.rates.items()]
        if sum(rate for _, rate in self._rates) > 1:
            raise ValueError(f"fault rates add up to more than 1: {dict(self.rates)}")

    def choose(self, number: int, prompt: str, body_key: str, attempt: int) -> Fault:
        """Return the fault of request ``number`` (0-based), the ``attempt``-th for its body."""
        scripted = self._per_prompt.get(prompt)
        if scripted is not None and attempt < len(scripted):
            return scripted[attempt]
        if number < len(self._sequence):
            return self._sequence[number]
        if self._rates:
            draw = random.Random(f"{self.seed}:{body_key}:{attempt}").random()
            total = 0.0
            for fault, rate in self._rates:
                total += rate
                if draw < total:
                    return fault
        return Fault()

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        data = json.loads(text) if text else {}
        return cls(
            sequence=data.get("sequence", ()),
            per_prompt=data.get("per_prompt", {}),
            rates=data.get("rates", {}),
            seed=data.get("seed", 0),
        )


@dataclass
class LoggedRequest:
    """One request as the server received it, and the response it sent."""

    number: int
    path: str
    prompt: str
    body_key: str
    attempt: int
    fault: str
    status: int | None = None
    completed: bool = False
    # The bearer token of the Authorization header, so tests can check which key was sent.
    api_key: str | None = None
    user_agent: str | None = None


# --- deterministic bodies --------------------------------------------------------------


def prompt_text(body: Mapping[str, Any]) -> str:
    """Return the prompt string, or the last message's content for chat requests."""
    if "messages" in body:
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content")
        return content if isinstance(content, str) else json.dumps(content)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def body_key(body: Mapping[str, Any]) -> str:
    """Return a digest of everything in the body that determines the output."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]


@dataclass
class Generation:
    tokens: list[str]
    logprobs: list[float]
    alternatives: list[list[tuple[str, float]]]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def generate(body: Mapping[str, Any], top_k: int) -> Generation:
    """Generate the deterministic completion of ``body`` with ``top_k`` alternatives."""
    rng = random.Random(body_key(body))
    max_tokens = int(body.get("max_tokens") or 16)
    count = min(max_tokens, rng.randint(4, 24))
    tokens, logprobs, alternatives = [], [], []
    for _ in range(count):
        candidates = rng.sample(VOCABULARY, max(1, top_k))
        values = sorted((-rng.random() * 3 - 0.01 for _ in candidates), reverse=True)
        tokens.append(candidates[0])
        logprobs.append(round(values[0], 6))
        alternatives.append([(tok, round(lp, 6)) for tok, lp in zip(candidates, values)][:top_k])
    finish_reason = "length" if count == max_tokens else "stop"
    return Generation(tokens, logprobs, alternatives, finish_reason)


def _usage(body: Mapping[str, Any], generation: Generation) -> dict[str, int]:
    prompt_tokens = max(1, len(prompt_text(body).split()))
    completion = len(generation.tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def chat_body(body: Mapping[str, Any], fault: Fault) -> dict[str, Any]:
    top_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    generation = generate(body, top_k)
    logprobs: Any = None
    if body.get("logprobs"):
        logprobs = {"content": [
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": alt, "logprob": alt_lp, "bytes": list(alt.encode())}
                    for alt, alt_lp in alts
                ],
            }
            for token, logprob, alts in zip(generation.tokens, generation.logprobs, generation.alternatives)
        ], "refusal": None}
    content: str | None = generation.text
    finish_reason = generation.finish_reason
    if fault.kind == "no-logprobs":
        logprobs = None
    elif fault.kind == "bad-logprobs" and logprobs:
        logprobs["content"][0]["logprob"] = 0.75
        del logprobs["content"][-1]["logprob"]
    elif fault.kind == "content-filter":
        content, logprobs, finish_reason = None, None, "content_filter"
    elif fault.kind == "length":
        finish_reason = "length"
    return {
        "id": "chatcmpl-" + body_key(body)[:16],
        "object": "chat.completion",
        "created": CREATED,
        "model": body.get("model"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }],
        "usage": _usage(body, generation),
    }


def legacy_body(body: Mapping[str, Any], fault: Fault) -> dict[str, Any]:
    top_k = int(body.get("logprobs") or 0)
    generation = generate(body, top_k)
    logprobs: Any = None
    if top_k:
        offsets, position = [], len(prompt_text(body))
        for token in generation.tokens:
            offsets.append(position)
            position += len(token)
        logprobs = {
            "tokens": generation.tokens,
            "token_logprobs": generation.logprobs,
            "top_logprobs": [dict(alts) for alts in generation.alternatives],
            "text_offset": offsets,
        }
    text: str | None = generation.text
    finish_reason = generation.finish_reason
    if fault.kind == "no-logprobs":
        logprobs = None
    elif fault.kind == "bad-logprobs" and logprobs:
        logprobs["token_logprobs"] = logprobs["token_logprobs"][:-1]
        logprobs["token_logprobs"][0] = 0.75
    elif fault.kind == "content-filter":
        text, logprobs, finish_reason = "", None, "content_filter"
    elif fault.kind == "length":
        finish_reason = "length"
    return {
        "id": "cmpl-" + body_key(body)[:16],
        "object": "text_completion",
        "created": CREATED,
        "model": body.get("model"),
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": _usage(body, generation),
    }


def expected_response(body: Mapping[str, Any], endpoint: str) -> dict[str, Any]:
    """Return the fault-free body the server sends for ``body`` (for test assertions)."""
    builder = chat_body if endpoint == "chat" else legacy_body
    return builder(body, Fault())


# --- HTTP ------------------------------------------------------------------------------


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_error(message: str, error_type: str, code: Any = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "code": code}})


class FaultServer:
    """The fault-injecting server; use as a context manager to run it in a thread."""

    def __init__(
        self,
        plan: FaultPlan | None = None,
        *,
        latency_s: float = 0.0,
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ):
        self.plan = plan or FaultPlan()
        self.latency_s = latency_s
        self.port = port
        self.clock = clock
        self.log: list[LoggedRequest] = []
        self._attempts: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def completed(self) -> list[LoggedRequest]:
        """Requests whose full successful body was written and flushed."""
        return [entry for entry in self.log if entry.completed]

    def requests_for(self, prompt: str) -> list[LoggedRequest]:
        return [entry for entry in self.log if entry.prompt == prompt]

    # Thread lifecycle ------------------------------------------------------------------

    def __enter__(self) -> FaultServer:
        self._thread = threading.Thread(target=self._run_thread, name="fault-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault server did not start within 10 s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run_thread(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.serve())
        finally:
            self._loop.close()

    async def serve(self) -> None:
        """Serve until :meth:`__exit__` sets ``_stop``, then close every connection."""
        self._stop = asyncio.Event()
        await self.start()
        self._ready.set()
        await self._stop.wait()
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle_connection, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    # Requests --------------------------------------------------------------------------

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                method, path, headers = self._parse_head(head)
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                keep_open = await self._respond(method, path, headers, body, writer)
                if not keep_open or headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._connections.discard(task)
            writer.close()

    @staticmethod
    def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return method, path, headers

    async def _respond(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        route = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and route == "/v1/models":
            data = {"object": "list", "data": [{"id": "fault-teacher", "object": "model"}]}
            return await self._send(writer, 200, orjson.dumps(data))
        if method == "GET" and route == "/stats":
            data = {"requests": len(self.log), "completed": len(self.completed)}
            return await self._send(writer, 200, orjson.dumps(data))
        if method != "POST" or route not in ("/v1/chat/completions", "/v1/completions"):
            return await self._send(writer, 404, _json_error(f"no route {method} {path}", "not_found"))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return await self._send(writer, 400, _json_error("request body is not JSON", "invalid_request"))

        endpoint = "chat" if route.endswith("chat/completions") else "completions"
        entry = self._log_request(route, body)
        entry.api_key = headers.get("authorization", "").removeprefix("Bearer ") or None
        entry.user_agent = headers.get("user-agent")
        fault = Fault.parse(entry.fault)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return await self._answer(entry, fault, body, endpoint, writer)

    def _log_request(self, route: str, body: Mapping[str, Any]) -> LoggedRequest:
        key = body_key(body)
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        prompt = prompt_text(body)
        number = len(self.log)
        fault = self.plan.choose(number, prompt, key, attempt)
        entry = LoggedRequest(number, route, prompt, key, attempt, str(fault))
        self.log.append(entry)
        return entry

    async def _answer(
        self, entry: LoggedRequest, fault: Fault, body: Mapping[str, Any], endpoint: str,
        writer: asyncio.StreamWriter,
    ) -> bool:
        kind = fault.kind
        if kind in ("429", "503"):
            status = int(kind)
            entry.status = status
            payload = _json_error("Rate limit reached for requests" if status == 429 else "Service unavailable",
                                  "requests" if status == 429 else "server_error",
                                  "rate_limit_exceeded" if status == 429 else None)
            return await self._send(writer, status, payload, self._retry_headers(fault))
        if kind in ("500", "529"):
            entry.status = int(kind)
            return await self._send(writer, int(kind), _json_error("The server had an error", "server_error"))
        if kind == "502-html":
            entry.status = 502
            return await self._send(writer, 502, _HTML_502, content_type="text/html")
        if kind == "502-json":
            entry.status = 502
            return await self._send(writer, 502, _json_error("upstream connect error or disconnect", "proxy_error", 502))
        if kind == "error-200":
            entry.status = 200
            code = int(fault.option("code", "429"))
            return await self._send(writer, 200, orjson.dumps({"error": {"message": "Provider returned error", "code": code}}))
        if kind == "close":
            return False
        if kind == "slow":
            await asyncio.sleep(float(fault.option("seconds", "5")))

        builder = chat_body if endpoint == "chat" else legacy_body
        payload = orjson.dumps(builder(body, fault))
        entry.status = 200
        if kind == "truncated-json":
            marker = b'"content":"' if endpoint == "chat" else b'"text":"'
            cut = payload.index(marker) + len(marker) + 3
            return await self._send(writer, 200, payload[:cut])
        if kind == "drop-length":
            return await self._send_cut(writer, payload, chunked=False)
        if kind == "drop-chunked":
            return await self._send_cut(writer, payload, chunked=True)
        if kind == "trickle":
            return await self._send_trickle(writer, payload, float(fault.option("seconds", "3")))
        extra_headers = None
        if kind == "gzip":
            payload = gzip.compress(payload)
            extra_headers = {"content-encoding": "gzip"}
        keep_open = await self._send(writer, 200, payload, extra_headers)
        entry.completed = kind in ("ok", "gzip")
        return keep_open

    def _retry_headers(self, fault: Fault) -> dict[str, str]:
        headers = {}
        retry_after = fault.option("retry-after")
        if retry_after is not None:
            if retry_after.startswith(("date+", "date-")):
                offset = float(retry_after[4:])
                retry_after = email.utils.formatdate(self.clock() + offset, usegmt=True)
            headers["retry-after"] = retry_after
        retry_after_ms = fault.option("retry-after-ms")
        if retry_after_ms is not None:
            headers["retry-after-ms"] = retry_after_ms
        return headers

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, payload: bytes,
        extra_headers: Mapping[str, str] | None = None, *, content_type: str = "application/json",
    ) -> bool:
        headers = {"content-type": content_type, "content-length": str(len(payload))}
        headers.update(extra_headers or {})
        writer.write(_head(status, headers) + payload)
        try:
            await writer.drain()
        except ConnectionError:
            return False
        return True

    async def _send_trickle(self, writer: asyncio.StreamWriter, payload: bytes, seconds: float) -> bool:
        """Send a complete 200 response slowly, so that no single read waits long."""
        writer.write(_head(200, {"content-type": "application/json", "content-length": str(len(payload))}))
        step = -(-len(payload) // 10)
        try:
            for start in range(0, len(payload), step):
                writer.write(payload[start : start + step])
                await writer.drain()
                await asyncio.sleep(seconds / 10)
        except ConnectionError:
            return False
        return True

    async def _send_cut(self, writer: asyncio.StreamWriter, payload: bytes, *, chunked: bool) -> bool:
        """Start a 200 body and close the connection after 700 bytes."""
        payload = payload.ljust(2048)  # JSON allows trailing whitespace; 700 bytes is mid-body
        part = payload[:700]
        if chunked:
            head = _head(200, {"content-type": "application/json", "transfer-encoding": "chunked"})
            writer.write(head + b"%x\r\n" % len(part) + part + b"\r\n")
        else:
            head = _head(200, {"content-type": "application/json", "content-length": "2048"})
            writer.write(head + part)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--plan", default="", help="fault plan as JSON: sequence, per_prompt, rates, seed")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every response")
    args = parser.parse_args(argv)

    server = FaultServer(FaultPlan.from_json(args.plan), latency_s=args.latency, port=args.port)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server._ready.is_set():
            await asyncio.sleep(0.01)
        print(server.base_url, flush=True)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, server._stop.set)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
