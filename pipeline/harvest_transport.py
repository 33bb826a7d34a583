"""The teacher client's HTTP connection pool: one ``aiohttp.ClientSession`` per teacher.

Both ways of sending a request go through :class:`AiohttpPool`. The default one posts
the orjson-encoded body straight to the pool. The other (``http_client = "openai"``,
in :mod:`pipeline.client_openai`) lets the openai SDK build each request and hands it
to the pool through :class:`AiohttpTransport`, an ``httpx2`` transport. httpcore2's own
pool cost 0.7 to 1.2 ms more CPU per 98 kB chat response than aiohttp's, which is why
the SDK path uses this pool too (``benchmarks/CHANGES.md``).

A request that gets no complete response raises :class:`TransportFailure`. Its
``kind`` names the failure:

- ``proxy``: the proxy from the environment cannot be reached;
- ``connect``: the teacher refused the connection or cannot be reached;
- ``disconnected``: the connection closed before the whole response arrived;
- ``timeout``: a socket read or connect timed out;
- ``read``: another socket error.

Runs on the asyncio event loop only (aiohttp's requirement).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

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
        except aiohttp.ClientProxyConnectionError as error:
            raise TransportFailure("proxy", _text(error)) from error
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
                found = (None, None) if _no_proxy_matches(url) else get_env_proxy_for_url(yarl.URL(url))
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


def _no_proxy_matches(url: str) -> bool:
    """Return whether a ``NO_PROXY`` entry of the forms aiohttp does not match covers ``url``.

    aiohttp matches host names and domain suffixes. This adds ``host:port`` entries and
    IP networks in CIDR form (``127.0.0.0/8``, common in cluster set-ups).
    """
    entries = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (entry.strip() for entry in entries.split(",")):
        if not entry:
            continue
        if parts.port is not None and entry == f"{host}:{parts.port}":
            return True
        if address is not None and "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def describe_failure(failure: TransportFailure) -> str:
    """Return a message for a failed transfer, built from the failure kind and socket error only."""
    if failure.kind == "proxy":
        return (
            f"cannot connect to the proxy ({failure.detail}); check HTTP_PROXY and HTTPS_PROXY,"
            " or add the teacher's host to NO_PROXY"
        )
    if failure.kind == "connect":
        return f"cannot connect ({failure.detail}); check that the teacher is running at the base URL"
    if failure.kind == "disconnected":
        return f"connection closed before the response was complete ({failure.detail})"
    if failure.kind == "timeout":
        return f"socket timed out ({failure.detail})"
    return f"connection lost while reading the response ({failure.detail})"


def _text(error: BaseException) -> str:
    return str(error) or type(error).__name__
