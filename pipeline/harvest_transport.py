"""The teacher client's HTTP connection pool: one ``aiohttp.ClientSession`` per teacher.

Both ways of sending a request go through :class:`AiohttpPool`. The default one posts
the orjson-encoded body straight to the pool. The other (``http_client = "openai"``,
in :mod:`pipeline.client_openai`) lets the openai SDK build each request and hands it
to the pool through :class:`AiohttpTransport`, an ``httpx2`` transport. httpcore2's own
pool cost 0.7 to 1.2 ms more CPU per 98 kB chat response than aiohttp's, which is why
the SDK path uses this pool too (``benchmarks/CHANGES.md``).

A request that gets no complete response raises :class:`TransportFailure`, whose
``kind`` names the failure: ``connect`` (refused or unreachable), ``disconnected``
(the connection closed before the whole response arrived), ``timeout`` (a socket
read or connect timed out) or ``read`` (another socket error). Runs on the asyncio
event loop only (aiohttp's requirement).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import yarl
# NOTE: get_env_proxy_for_url is in aiohttp.helpers (aiohttp 3.x), not in aiohttp's
# documented API; it is the lookup that trust_env=True performs.
from aiohttp.helpers import get_env_proxy_for_url


# Maximum length of the socket error text kept in a message, in characters.
_DETAIL_LIMIT = 200


@dataclass(slots=True)
class HttpReply:
    """A complete HTTP response: status, case-insensitive headers and the decoded body."""

    status: int
    headers: Mapping[str, str]
    content: bytes


class TransportFailure(Exception):
    """A request that got no complete response; ``kind`` names the failure."""

    def __init__(self, kind: str, detail: str):
        if len(detail) > _DETAIL_LIMIT:
            detail = detail[: _DETAIL_LIMIT - 3] + "..."
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class AiohttpPool:
    """Sends requests over one ``aiohttp.ClientSession``, opened on the first request.

    ``decompress`` makes aiohttp decode gzip and deflate bodies. It is off for the
    SDK path, whose httpx2 client decodes bodies itself.
    """

    def __init__(self, *, max_connections: int, timeout_s: float, decompress: bool = True):
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._decompress = decompress
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, tuple[yarl.URL | None, aiohttp.BasicAuth | None]] = {}

    async def request(
        self, method: str, url: str, headers: Mapping[str, str] | list[tuple[str, str]], body: bytes | None
    ) -> HttpReply:
        """Send one request and read the whole response; raises :class:`TransportFailure`."""
        session = self._open_session()
        proxy, proxy_auth = self._proxy_for(url)
        try:
            async with session.request(
                method, url, headers=headers, data=body, allow_redirects=False, proxy=proxy, proxy_auth=proxy_auth
            ) as response:
                content = await response.read()
                return HttpReply(response.status, response.headers, content)
        except aiohttp.ClientConnectorError as error:
            raise TransportFailure("connect", _text(error)) from error
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as error:
            raise TransportFailure("disconnected", _text(error)) from error
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as error:
            raise TransportFailure("timeout", str(error) or "read timed out") from error
        except (aiohttp.ClientError, OSError) as error:
            raise TransportFailure("read", _text(error)) from error

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _proxy_for(self, url: str) -> tuple[yarl.URL | None, aiohttp.BasicAuth | None]:
        """Return the proxy that HTTP(S)_PROXY, NO_PROXY and .netrc give ``url``, looked up once per URL.

        aiohttp's ``trust_env=True`` repeats this lookup in a worker thread on every
        request, which cost about 4 % of the harvester's CPU at 20,000 requests.
        """
        found = self._proxies.get(url)
        if found is None:
            try:
                found = get_env_proxy_for_url(yarl.URL(url))
            except LookupError:
                found = (None, None)
            self._proxies[url] = found
        return found

    def _open_session(self) -> aiohttp.ClientSession:
        # Created on first use because aiohttp binds a session to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=self._decompress,
                # The caller sets every header it needs; aiohttp adds none of its own.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                # Proxies from the environment are resolved by _proxy_for instead.
                trust_env=False,
            )
        return self._session


def describe_failure(failure: TransportFailure) -> str:
    """Return a message for a failed transfer, built from the failure kind and socket error only."""
    if failure.kind == "connect":
        return f"cannot connect ({failure.detail}); check that the teacher is running at the base URL"
    if failure.kind == "disconnected":
        return f"connection closed before the response was complete ({failure.detail})"
    if failure.kind == "timeout":
        return f"socket timed out ({failure.detail})"
    return f"connection lost while reading the response ({failure.detail})"


def _text(error: BaseException) -> str:
    return str(error) or type(error).__name__
