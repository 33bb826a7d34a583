"""HTTP client of one teacher: sends one attempt of one request and types every failure.

The send path has three steps, each named for what it handles:

- :meth:`TeacherClient._post` sends the request. By default (``http_client =
  "aiohttp"``) it posts the orjson-encoded body straight to the teacher's
  :class:`~pipeline.harvest_transport.AiohttpPool` with headers built once per client.
  With ``http_client = "openai"`` the openai SDK builds each request
  (:mod:`pipeline.client_openai`), which costs about 0.5 ms more CPU per request: at
  2,000 chat requests of 64 tokens x 20 alternatives, 3.2 against 3.7 CPU ms per
  request (``benchmarks/CHANGES.md``). Retries belong to :mod:`pipeline.retry` on both.
- :meth:`TeacherClient._raise_for_status` turns a non-2xx response into
  RateLimitError (429), ServerError (5xx, whatever the body: JSON, HTML or empty) or
  ClientError (other 4xx), with ``Retry-After`` parsed and a short body summary.
- :meth:`TeacherClient._parse` parses a 2xx body with
  :func:`pipeline.parsing.parse_response`; a 200 carrying an ``error`` object becomes
  the matching typed error there.

Transport failures (timeouts, refused or dropped connections, bodies cut off
mid-transfer) become TransportError. Every error names the teacher and the request id
and chains its cause. Messages are built here from the status, the teacher name and a
summary of the server's body, never from the request or its headers, so the API key
cannot end up in a message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import anyio
import orjson

from pipeline.config import HTTP_CLIENTS, TeacherConfig
from pipeline.errors import (
    ClientError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TeacherError,
    TransportError,
)
from pipeline.harvest_transport import AiohttpPool, HttpReply, TransportFailure, describe_failure
from pipeline.parsing import ParsedResponse, parse_response, summarize_error_body
from pipeline.retry import parse_retry_after

log = logging.getLogger(__name__)

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


try:
    _USER_AGENT = f"kd-pipeline/{version('kd-pipeline')}"
except PackageNotFoundError:  # running from a source tree that was never installed
    _USER_AGENT = "kd-pipeline"

# Optional OpenAI account headers, read from the same variables as the openai SDK.
_ACCOUNT_HEADERS = {"OPENAI_ORG_ID": "OpenAI-Organization", "OPENAI_PROJECT_ID": "OpenAI-Project"}


@dataclass(slots=True)
class TeacherReply:
    """A successful response: the parsed body plus what the rate limiter needs."""

    parsed: ParsedResponse
    headers: Mapping[str, str]
    status: int
    latency_ms: float
    body_bytes: int


class TeacherClient:
    """Sends requests to one teacher over a pooled HTTP/1.1 connection set."""

    def __init__(
        self,
        teacher: TeacherConfig,
        *,
        timeout_s: float,
        max_connections: int,
        top_logprobs: int,
        now: Callable[[], float] = time.time,
    ):
        if teacher.api_key is None:
            raise ValueError(f"teacher {teacher.name} has no API key; build it with build_harvest_config")
        if teacher.http_client not in HTTP_CLIENTS:
            raise ValueError(f"teacher {teacher.name}: http_client {teacher.http_client!r} is not one of {HTTP_CLIENTS}")
        self.teacher = teacher
        self.timeout_s = timeout_s
        # The parser takes None to mean that no alternatives were requested.
        self._top_logprobs = top_logprobs or None
        self._logprobs_required = top_logprobs > 0
        self._path = ENDPOINT_PATHS[teacher.endpoint]
        self._url = teacher.base_url.rstrip("/") + self._path
        self._now = now
        via_sdk = teacher.http_client == "openai"
        self._pool = AiohttpPool(max_connections=max_connections, timeout_s=timeout_s, decompress=not via_sdk)
        self._sdk = None
        if via_sdk:
            from pipeline.client_openai import OpenAISender  # imports openai only when selected

            self._sdk = OpenAISender(teacher, self._pool, timeout_s=timeout_s)
        self._headers = _request_headers(teacher.api_key.reveal())

    async def aclose(self) -> None:
        if self._sdk is not None:
            await self._sdk.aclose()
        await self._pool.aclose()

    async def send(self, body: Mapping[str, object], *, request_id: str) -> TeacherReply:
        """Send one attempt of a request and return its parsed response.

        Raises a TeacherError subclass or a ResponseFormatError subclass; each carries
        ``request_id``.
        """
        started = time.perf_counter()
        try:
            # Socket timeouts apply per read, so a server that trickles bytes could hold a
            # request far longer; this bounds the whole attempt.
            with anyio.fail_after(self.timeout_s):
                reply = await self._post(body, request_id)
        except TimeoutError as error:
            raise self._timeout_error(request_id) from error
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._raise_for_status(reply, request_id)
        parsed = self._parse(reply, request_id)
        log.debug(
            "teacher %s request %s: HTTP %d, %d bytes in %.1f ms",
            self.teacher.name, request_id, reply.status, len(reply.content), latency_ms,
        )
        return TeacherReply(parsed, reply.headers, reply.status, latency_ms, len(reply.content))

    async def _post(self, body: Mapping[str, object], request_id: str) -> HttpReply:
        try:
            if self._sdk is not None:
                return await self._sdk.post(self._path, body)
            return await self._pool.request("POST", self._url, self._headers, orjson.dumps(body))
        except TransportFailure as failure:
            if failure.kind == "timeout":
                raise self._timeout_error(request_id) from failure
            raise TransportError(
                f"teacher {self.teacher.name}: request {request_id} failed: {describe_failure(failure)}",
                request_id=request_id,
            ) from failure
        except TeacherError as error:
            raise TeacherError(f"teacher {self.teacher.name}: request {request_id}: {error}", request_id=request_id) from error

    def _timeout_error(self, request_id: str) -> TransportError:
        return TransportError(
            f"teacher {self.teacher.name}: request {request_id} timed out after {self.timeout_s:g} s"
            " (raise --timeout if the teacher is slow)",
            request_id=request_id,
        )

    def _raise_for_status(self, reply: HttpReply, request_id: str) -> None:
        status = reply.status
        if 200 <= status < 300:
            return
        summary = summarize_error_body(reply.content, reply.headers.get("content-type"))
        message = f"teacher {self.teacher.name}: request {request_id} got HTTP {status}: {summary}"
        retry_after = parse_retry_after(reply.headers, now=self._now)
        error_class = _status_error_class(status)
        raise error_class(message, status=status, retry_after=retry_after, request_id=request_id)

    def _parse(self, reply: HttpReply, request_id: str) -> ParsedResponse:
        try:
            return parse_response(
                reply.content,
                endpoint=self.teacher.endpoint,
                top_logprobs=self._top_logprobs,
                logprobs_required=self._logprobs_required,
            )
        except TeacherError as error:
            # An error object inside a 200 body: the status came from the body, the
            # Retry-After (if any) from the headers.
            retry_after = error.retry_after
            if retry_after is None:
                retry_after = parse_retry_after(reply.headers, now=self._now)
            raise type(error)(
                self._prefix(request_id, error), status=error.status, retry_after=retry_after,
                request_id=request_id,
            ) from error
        except ResponseFormatError as error:
            raised = type(error)(self._prefix(request_id, error))
            raised.request_id = request_id  # type: ignore[attr-defined]
            raise raised from error

    def _prefix(self, request_id: str, error: BaseException) -> str:
        return f"teacher {self.teacher.name}: request {request_id}: {error}"


def _status_error_class(status: int) -> type[TeacherError]:
    if status == 429:
        return RateLimitError
    if status >= 500:
        return ServerError
    if status == 408:
        # The server timed out waiting for the request: a transport problem, retried.
        return TransportError
    return ClientError


def _request_headers(api_key: str) -> dict[str, str]:
    """Build the headers of every direct request: the OpenAI API's, plus the account ones if set."""
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": _USER_AGENT,
    }
    for variable, header in _ACCOUNT_HEADERS.items():
        value = os.environ.get(variable)
        if value:
            headers[header] = value
    return headers
