"""HTTP client of one teacher: sends one attempt of one request and types every failure.

The send path has three layers, each named for what it handles:

- :meth:`TeacherClient._post` sends the request through ``openai.AsyncOpenAI`` with
  ``max_retries=0`` (retries belong to :mod:`pipeline.retry`) and
  ``cast_to=httpx2.Response``, so the SDK returns the raw response instead of building
  pydantic models of every top-k alternative; the body bytes go straight to
  :func:`pipeline.parsing.parse_response`. On an 83 kB chat body of 64 tokens x 20
  alternatives, building the SDK's ``ChatCompletion`` took 5.2 ms, while orjson plus
  ``parse_response`` (which also builds the stored columns) took 1.3 ms (Python 3.11,
  openai 3.63, one core of a shared 2-core VM, mean of 300 parses).
- :meth:`TeacherClient._raise_for_status` turns a non-2xx response into
  RateLimitError (429), ServerError (5xx, whatever the body: JSON, HTML or empty) or
  ClientError (other 4xx), with ``Retry-After`` parsed and a short body summary.
- :meth:`TeacherClient._parse` parses a 2xx body; a 200 carrying an ``error`` object
  becomes the matching typed error there.

The SDK's ``httpx2.AsyncClient`` (httpx2 is the fork of httpx that openai 3.x uses)
sends through :class:`~pipeline.harvest_transport.AiohttpTransport`, an aiohttp
connection pool. The HTTP stack took 47 % of the harvester's CPU samples with httpx 0.29
and 8 % with this transport (``python -m benchmarks.profile_harvest``; the figures are
in ``benchmarks/CHANGES.md``).

SDK and transport exceptions (timeouts, refused or dropped connections, bodies cut off
mid-transfer) become TransportError. Every error names the teacher and the request id
and chains its cause. Messages are built here from the status, the teacher name and a
summary of the server's body, never from the SDK's exception text or the request, so
the API key cannot end up in a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import httpx2
import openai

from pipeline.config import TeacherConfig
from pipeline.errors import (
    ClientError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TeacherError,
    TransportError,
)
from pipeline.harvest_transport import AiohttpTransport
from pipeline.parsing import ParsedResponse, parse_response, summarize_error_body
from pipeline.retry import parse_retry_after

log = logging.getLogger(__name__)

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(slots=True)
class TeacherReply:
    """A successful response: the parsed body plus what the rate limiter needs."""

    parsed: ParsedResponse
    headers: httpx2.Headers
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
        self.teacher = teacher
        self.timeout_s = timeout_s
        # The parser takes None to mean that no alternatives were requested.
        self._top_logprobs = top_logprobs or None
        self._logprobs_required = top_logprobs > 0
        self._path = ENDPOINT_PATHS[teacher.endpoint]
        self._now = now
        self._http = httpx2.AsyncClient(
            transport=AiohttpTransport(max_connections=max_connections, timeout_s=timeout_s),
            timeout=timeout_s,
        )
        self._openai = openai.AsyncOpenAI(
            base_url=teacher.base_url,
            api_key=teacher.api_key.reveal(),
            max_retries=0,
            timeout=timeout_s,
            http_client=self._http,
        )

    async def aclose(self) -> None:
        await self._openai.close()

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
                response = await self._post(body, request_id)
        except TimeoutError as error:
            raise self._timeout_error(request_id) from error
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._raise_for_status(response, request_id)
        parsed = self._parse(response, request_id)
        log.debug(
            "teacher %s request %s: HTTP %d, %d bytes in %.1f ms",
            self.teacher.name, request_id, response.status_code, len(response.content), latency_ms,
        )
        return TeacherReply(parsed, response.headers, response.status_code, latency_ms, len(response.content))

    async def _post(self, body: Mapping[str, object], request_id: str) -> httpx2.Response:
        try:
            return await self._openai.post(self._path, body=body, cast_to=httpx2.Response)
        except openai.APIStatusError as error:
            # The SDK raises for 4xx/5xx after reading the body; type it from the response.
            self._raise_for_status(error.response, request_id, cause=error)
            raise  # unreachable: the response is not 2xx
        except openai.APITimeoutError as error:
            raise self._timeout_error(request_id) from error
        except openai.APIConnectionError as error:
            raise TransportError(
                f"teacher {self.teacher.name}: request {request_id} failed: {_describe_transport(error.__cause__)}",
                request_id=request_id,
            ) from error
        except httpx2.HTTPError as error:
            raise TransportError(
                f"teacher {self.teacher.name}: request {request_id} failed: {_describe_transport(error)}",
                request_id=request_id,
            ) from error
        except openai.OpenAIError as error:
            # Any other SDK error is unexpected with raw responses; fail the request, no retry.
            raise TeacherError(
                f"teacher {self.teacher.name}: request {request_id} failed in the openai SDK:"
                f" {type(error).__name__}",
                request_id=request_id,
            ) from error

    def _timeout_error(self, request_id: str) -> TransportError:
        return TransportError(
            f"teacher {self.teacher.name}: request {request_id} timed out after {self.timeout_s:g} s"
            " (raise --timeout if the teacher is slow)",
            request_id=request_id,
        )

    def _raise_for_status(
        self, response: httpx2.Response, request_id: str, *, cause: BaseException | None = None
    ) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        summary = summarize_error_body(response.content, response.headers.get("content-type"))
        message = f"teacher {self.teacher.name}: request {request_id} got HTTP {status}: {summary}"
        retry_after = parse_retry_after(response.headers, now=self._now)
        error_class = _status_error_class(status)
        raise error_class(message, status=status, retry_after=retry_after, request_id=request_id) from cause

    def _parse(self, response: httpx2.Response, request_id: str) -> ParsedResponse:
        try:
            return parse_response(
                response.content,
                endpoint=self.teacher.endpoint,
                top_logprobs=self._top_logprobs,
                logprobs_required=self._logprobs_required,
            )
        except TeacherError as error:
            # An error object inside a 200 body: the status came from the body, the
            # Retry-After (if any) from the headers.
            retry_after = error.retry_after
            if retry_after is None:
                retry_after = parse_retry_after(response.headers, now=self._now)
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


def _describe_transport(cause: BaseException | None) -> str:
    """Describe a transport failure from the httpx2 exception (never from the request)."""
    if isinstance(cause, httpx2.RemoteProtocolError):
        return f"connection closed before the response was complete ({_short(cause)})"
    if isinstance(cause, httpx2.ConnectError):
        return f"cannot connect ({_short(cause)}); check that the teacher is running at the base URL"
    if isinstance(cause, httpx2.ReadError):
        return f"connection lost while reading the response ({_short(cause)})"
    if isinstance(cause, httpx2.WriteError):
        return f"connection lost while sending the request ({_short(cause)})"
    if cause is None:
        return "connection error"
    return f"{type(cause).__name__} ({_short(cause)})"


def _short(error: BaseException, limit: int = 200) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
