"""Sending a teacher request through the openai SDK's raw-response path.

Selected with ``http_client = "openai"`` (``--http-client openai``). The SDK builds
each request (base URL, its headers, authentication including the schemes that are not
a plain API key), and :class:`AiohttpTransport` sends it over the shared
:class:`~pipeline.harvest_transport.AiohttpPool`. ``cast_to=httpx2.Response`` makes the
SDK return the raw response, so no pydantic model is built per top-k alternative. On an
83 kB chat body of 64 tokens x 20 alternatives, the SDK's ``ChatCompletion`` took 5.2 ms,
against 1.3 ms for orjson plus this project's parser (Python 3.11, openai 3.63).

Building the request costs about 0.5 ms of CPU per request more than the default
direct path (``benchmarks/CHANGES.md``), so this path is for teachers that need the
SDK's request handling. httpx2 is the fork of httpx that openai 3.x uses. This module
imports both only when a teacher selects it.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx2
import openai

from pipeline.config import TeacherConfig
from pipeline.errors import TeacherError
from pipeline.harvest_transport import AiohttpPool, HttpReply, TransportFailure


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """httpx2 transport that sends the SDK's requests over an :class:`AiohttpPool`.

    A :class:`TransportFailure` becomes the httpx2 exception that the SDK expects, and
    the SDK turns it into ``APIConnectionError`` or ``APITimeoutError``.
    """

    def __init__(self, pool: AiohttpPool):
        self._pool = pool

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        try:
            reply = await self._pool.request(request.method, str(request.url), request.headers.multi_items(), body or None)
        except TransportFailure as failure:
            raise _HTTPX_ERRORS[failure.kind](failure.detail, request=request) from failure
        return httpx2.Response(reply.status, headers=list(reply.headers.items()), content=reply.content, request=request)


_HTTPX_ERRORS: dict[str, type[httpx2.TransportError]] = {
    "proxy": httpx2.ProxyError,
    "connect": httpx2.ConnectError,
    "disconnected": httpx2.RemoteProtocolError,
    "timeout": httpx2.ReadTimeout,
    "read": httpx2.ReadError,
}


class OpenAISender:
    """Posts request bodies to one teacher through ``openai.AsyncOpenAI``."""

    def __init__(self, teacher: TeacherConfig, pool: AiohttpPool, *, timeout_s: float):
        if teacher.api_key is None:
            raise ValueError(f"teacher {teacher.name} has no API key; build it with build_harvest_config")
        self._http = httpx2.AsyncClient(transport=AiohttpTransport(pool), timeout=timeout_s)
        self._openai = openai.AsyncOpenAI(
            base_url=teacher.base_url,
            api_key=teacher.api_key.reveal(),
            # Retries belong to pipeline.retry.
            max_retries=0,
            timeout=timeout_s,
            http_client=self._http,
        )

    async def post(self, path: str, body: Mapping[str, object]) -> HttpReply:
        """Send one request; raises :class:`TransportFailure` or ``TeacherError`` (SDK failures)."""
        try:
            response = await self._openai.post(path, body=body, cast_to=httpx2.Response)
        except openai.APIStatusError as error:
            # The SDK raises for 4xx/5xx after reading the body; the caller types it from the status.
            response = error.response
        except openai.APITimeoutError as error:
            raise TransportFailure("timeout", "read timed out") from error
        except openai.APIConnectionError as error:
            raise _failure_from(error.__cause__) from error
        except httpx2.HTTPError as error:
            raise _failure_from(error) from error
        except openai.OpenAIError as error:
            # Any other SDK error is unexpected with raw responses; the request fails without a retry.
            raise TeacherError(f"the openai SDK failed: {type(error).__name__}") from error
        return HttpReply(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self._openai.close()


def _failure_from(cause: BaseException | None) -> TransportFailure:
    """Type an httpx2 exception the way :class:`AiohttpPool` types aiohttp's."""
    if isinstance(cause, TransportFailure):
        return cause
    if cause is not None and isinstance(cause.__cause__, TransportFailure):
        # Raised by AiohttpTransport, which keeps the pool's typed failure as the cause.
        return cause.__cause__
    if isinstance(cause, httpx2.ConnectError):
        return TransportFailure("connect", str(cause))
    if isinstance(cause, httpx2.RemoteProtocolError):
        return TransportFailure("disconnected", str(cause))
    if isinstance(cause, httpx2.TimeoutException):
        return TransportFailure("timeout", str(cause) or "read timed out")
    if cause is None:
        return TransportFailure("read", "connection error")
    return TransportFailure("read", f"{type(cause).__name__}: {cause}")
