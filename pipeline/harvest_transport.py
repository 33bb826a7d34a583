"""httpx2 transport that sends requests with aiohttp, for the teacher client's connection pool.

The openai SDK builds and reads requests through an ``httpx2.AsyncClient``. Its own pool
(httpcore2 over anyio sockets) cost 0.7 to 1.2 ms more CPU per 98 kB chat response than
aiohttp's pool, in ``benchmarks/bench_harvest.py`` on a shared 2-core VM (2,000 to
20,000 requests, concurrency 64 and 256). :class:`AiohttpTransport` replaces only the
pool. The SDK still builds the request, and httpx2 still decodes the body: with
``auto_decompress=False`` here, a compressed body is decoded once, by httpx2.

aiohttp errors become the httpx2 exceptions that the SDK and
:func:`pipeline.client._describe_transport` expect: a refused connection is
``ConnectError``, a connection closed before the whole response arrived is
``RemoteProtocolError``, other socket errors are ``ReadError``, and a socket timeout is
``ReadTimeout``. Runs on the asyncio event loop only (aiohttp's requirement).
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx2


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """Sends httpx2 requests over one ``aiohttp.ClientSession``, opened on the first request."""

    def __init__(self, *, max_connections: int, timeout_s: float):
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = self._open_session()
        body = await request.aread()
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=body or None,
                allow_redirects=False,
            ) as response:
                content = await response.read()
                headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.raw_headers]
                status = response.status
        except aiohttp.ClientConnectorError as error:
            raise httpx2.ConnectError(str(error), request=request) from error
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as error:
            raise httpx2.RemoteProtocolError(str(error), request=request) from error
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as error:
            raise httpx2.ReadTimeout(str(error) or "read timed out", request=request) from error
        except (aiohttp.ClientError, OSError) as error:
            raise httpx2.ReadError(str(error) or type(error).__name__, request=request) from error
        return httpx2.Response(status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _open_session(self) -> aiohttp.ClientSession:
        # Created on first use because aiohttp binds a session to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                # The SDK sets every header it needs; aiohttp adds none of its own.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                # Honour HTTP(S)_PROXY and NO_PROXY as httpx does.
                trust_env=True,
            )
        return self._session
