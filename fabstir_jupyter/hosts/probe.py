"""Probing hosts over HTTP and WebSocket: features, models, liveness and latency.

Production hosts answer ``/health`` with ``degraded`` and ``/v1/models`` with 503 whatever their
state (spec/PROTOCOL.md §4.6), so liveness is the time to the WebSocket ``connected`` greeting, and
``/v1/version`` (read once per host) tells which guarantees a host makes and, from a reference
host, how many streams it runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.request
from typing import Any

import httpx

from .. import _compat
from ..config import InferenceConfig
from ..errors import AuthFailed, ConnectionFailed, FabstirError, HostBusy
from ..transport import WebSocketClient, redact_url
from .info import HostInfo

__all__ = ["HostProber"]

logger = logging.getLogger("fabstir_jupyter.hosts")


def _tls_proxy_for_http() -> bool:
    """Whether the environment sends plain-http requests through an https:// proxy (which needs TLS)."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme, "").lower().startswith("https://") for scheme in ("http", "all"))


class HostProber:
    """Read ``/v1/version`` and ``/v1/models`` once per host, and time WebSocket greetings.

    Args:
        config: TLS and timeout settings shared with the sockets.
        timeout: bound of one probe, in seconds.
        concurrency: probes running at once.
    """

    def __init__(self, config: InferenceConfig | None = None, *, timeout: float = 5.0, concurrency: int = 16) -> None:
        self.config = config or InferenceConfig()
        self.timeout = timeout
        self._limit = asyncio.Semaphore(concurrency)
        self._http: httpx.AsyncClient | None = None  # for https:// hosts (and http:// ones behind a TLS proxy)
        self._http_building: asyncio.Future[httpx.AsyncClient] | None = None
        self._plain_http: httpx.AsyncClient | None = None  # for http:// hosts: no certificates loaded
        self._described: dict[str, asyncio.Future[None]] = {}

    def _build_client(self) -> httpx.AsyncClient:
        verify = self.config.verify_tls
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        return httpx.AsyncClient(timeout=self.timeout, verify=verify, trust_env=True)

    async def _client(self, url: str) -> httpx.AsyncClient:
        if url.startswith("http://") and not _tls_proxy_for_http():
            # Loading the certificate store is most of a fresh client's first request (~20 ms); a
            # plain-http host needs none. The context trusts no certificate, so were an https URL
            # ever to reach this client it would fail verification, never go unverified.
            if self._plain_http is None:
                self._plain_http = httpx.AsyncClient(timeout=self.timeout, trust_env=True,
                                                     verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
            return self._plain_http
        # Building the TLS client loads certificates and imports transports: ~80 ms the first
        # time, so it happens in a worker thread, once, rather than on the event loop.
        if self._http is None:
            if self._http_building is None:
                self._http_building = asyncio.ensure_future(asyncio.to_thread(self._build_client))
            client = await asyncio.shield(self._http_building)
            if self._http is None:
                self._http = client
        return self._http

    async def _get_json(self, url: str) -> Any | None:
        try:
            response = await (await self._client(url)).get(url, headers=self.config.auth_headers(url))
        except httpx.HTTPError as exc:
            logger.debug("probe %s failed: %s", redact_url(url), exc)
            return None
        if response.status_code != 200:
            return None
        try:
            return response.json()
        except ValueError:
            return None

    async def describe(self, host: HostInfo, *, refresh: bool = False) -> None:
        """Fill ``features``, ``version``, and when the host says them ``max_concurrent_streams`` and
        ``models``; once per host.

        Concurrent callers for one host share one read. Never raises: an unreadable host keeps
        empty features, so production-host quirk handling applies to it.
        """
        key = host.api_url
        pending = self._described.get(key)
        if pending is None or refresh:
            pending = asyncio.ensure_future(self._read_description(host))
            self._described[key] = pending
        await asyncio.shield(pending)

    async def _read_description(self, host: HostInfo) -> None:
        async with self._limit:
            version, models = await asyncio.gather(
                self._get_json(host.api_url + "/v1/version"), self._get_json(host.api_url + "/v1/models")
            )
        if isinstance(version, dict):
            features = version.get("features")
            if isinstance(features, list):
                host.features = frozenset(f for f in features if isinstance(f, str))
            if isinstance(version.get("version"), str):
                host.version = version["version"]
            limit = version.get("max_concurrent_streams")
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                host.max_concurrent_streams = limit
        if isinstance(models, dict) and isinstance(models.get("models"), list):
            ids, names = [], {}
            for entry in models["models"]:
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    ids.append(entry["id"])
                    if isinstance(entry.get("name"), str):
                        names[entry["name"]] = entry["id"]
                    if isinstance(entry.get("context_window"), int):
                        host.context_window = entry["context_window"]
            if ids:
                host.adopt_served_models(ids, names)

    async def ping(self, host: HostInfo) -> float | None:
        """Time a WebSocket open up to the ``connected`` greeting; update the host; return seconds.

        On failure returns ``None`` and keeps the error in ``host.last_error``. The host is marked
        ``"unreachable"``, except when it is alive but refused: ``HOST_BUSY`` marks it ``"busy"``
        (still selectable), and a refused token or an untrusted certificate leave it selectable so
        the request itself raises the error that says what to fix.
        """
        async with self._limit:
            client = WebSocketClient(host.ws_url, self.config.replace(connection_timeout=self.timeout),
                                     headers=self.config.auth_headers(host.ws_url))
            try:
                async with _compat.timeout(self.timeout):
                    await client.connect()
            except (FabstirError, asyncio.TimeoutError) as caught:
                error = caught if isinstance(caught, FabstirError) else ConnectionFailed(
                    f"connect: no websocket greeting within {self.timeout:g} s", host=redact_url(host.ws_url))
                host.record_error(error)
                if isinstance(error, HostBusy):
                    logger.info("host %s is busy: %s", redact_url(host.ws_url), error)
                elif isinstance(error, AuthFailed) or isinstance(error.__cause__, ssl.SSLCertVerificationError):
                    logger.info("host %s is up but not usable: %s", redact_url(host.ws_url), error)
                else:
                    logger.info("host %s unreachable: %s", redact_url(host.ws_url), error)
                    host.health = "unreachable"
                return None
            finally:
                await client.close()
        assert client.connected_latency is not None
        host.record_latency(client.connected_latency)
        host.health = "ok"
        host.record_error(None)
        return client.connected_latency

    async def probe(self, host: HostInfo) -> HostInfo:
        """Describe and ping one host."""
        await asyncio.gather(self.describe(host), self.ping(host))
        return host

    async def aclose(self) -> None:
        """Stop the description reads still running, close the HTTP client; idempotent."""
        running = [task for task in self._described.values() if not task.done()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        building, self._http_building = self._http_building, None
        if self._http is None and building is not None:
            with contextlib.suppress(Exception):
                self._http = await building
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._plain_http is not None:
            await self._plain_http.aclose()
            self._plain_http = None
