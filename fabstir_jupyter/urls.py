"""Host and RPC URLs: normalise them, and redact them before they are shown.

Pure functions over strings, at the bottom of the package (beside :mod:`.errors`), so that option
validation (:mod:`.config`), the wire protocol and the transport share one reading of a URL.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from urllib.parse import urlsplit, urlunsplit

from .errors import InvalidOptions

__all__ = ["WS_PATH", "ws_url", "http_url", "redact_url", "hide_rpc_url_in_logs", "hide_rpc_urls"]

#: The path of a host's WebSocket endpoint.
WS_PATH = "/v1/ws"

# A DNS name (letters, digits, '-', '_' in dot-separated labels, IDN letters too) or an IPv4 literal.
_HOST_NAME = re.compile(r"[\w-]+(\.[\w-]+)*\.?")


def _valid_host_name(name: str) -> bool:
    if ":" in name:  # an IPv6 literal (urlsplit has removed the brackets)
        try:
            ipaddress.IPv6Address(name.split("%", 1)[0])
        except ValueError:
            return False
        return True
    return _HOST_NAME.fullmatch(name) is not None


def ws_url(url: str) -> str:
    """Return the WebSocket endpoint for a host URL.

    ``http://h:1`` → ``ws://h:1/v1/ws``; ``https://…`` → ``wss://…/v1/ws``; a ``ws(s)://`` URL with a
    path is kept as given; a bare ``h:1`` is taken as ``ws://h:1/v1/ws``.

    Raises:
        InvalidOptions: the URL has another scheme, no host, an invalid host name or port.
    """
    text = url.strip() if isinstance(url, str) else ""
    if "://" not in text:
        text = "ws://" + text
    try:
        parts = urlsplit(text)
    except ValueError:  # a malformed IPv6 literal: "http://[::zz]:1", "http://[::1"
        raise InvalidOptions(f"host url {url!r} is not a valid url", field="host_url") from None
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise InvalidOptions(f"host url {url!r} is not a ws://, wss://, http:// or https:// url", field="host_url")
    try:
        parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise InvalidOptions(f"host url {url!r} has an invalid port", field="host_url") from None
    if not _valid_host_name(parts.hostname):
        raise InvalidOptions(f"host url {url!r} has an invalid host name {parts.hostname!r}", field="host_url")
    path = parts.path.rstrip("/")
    if parts.scheme.lower() in ("http", "https") or not path:
        path = path + WS_PATH if not path.endswith(WS_PATH) else path
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def http_url(url: str) -> str:
    """Return the HTTP base URL (no path) of a host, from any URL form :func:`ws_url` takes."""
    parts = urlsplit(ws_url(url))
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """Return ``url`` without what may hold a secret, for logs, reprs and errors.

    Credentials, the query and the fragment always go. ``keep_path=False`` drops the path too: RPC
    providers put API keys there (``https://rpc.example/v3/KEY``); a host's ``/v1/ws`` is kept by
    default. IPv6 hosts keep their brackets (``ws://[::1]:8196/v1/ws``). A text that is not a URL
    gives ``""``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if port:
        netloc = f"{netloc}:{port}"
    if not netloc:
        return ""
    return urlunsplit((parts.scheme, netloc, parts.path if keep_path else "", "", ""))


class _RpcUrlFilter(logging.Filter):
    """Hide registered RPC URLs in web3's and urllib3's DEBUG records: web3's HTTP provider logs the
    full URI, urllib3 the request's path and query, and either often holds an API key. A URL shows
    as its scheme, host and port; a path or query alone as ``/…``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def hide(self, text: str) -> str:
        for url in self.urls:
            text = text.replace(url, redact_url(url, keep_path=False) or "rpc")
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            if target != "/":
                text = text.replace(target, "/…")
            # what is left of a secret quoted piecemeal: credentials, the path or the query alone
            for part in (parts.netloc.rpartition("@")[0], parts.path.rstrip("/"), parts.query):
                if len(part) > 1:
                    text = text.replace(part, "…")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.urls:
            return True
        message = record.getMessage()
        hidden = self.hide(message)
        if hidden != message:
            record.msg, record.args = hidden, ()
        return True


_RPC_URL_FILTER = _RpcUrlFilter()
#: The loggers that print the URLs (or paths) of the HTTP requests web3 makes.
_RPC_LOGGERS = ("web3.providers.HTTPProvider", "web3._utils.http_session_manager.HTTPSessionManager",
                "urllib3.connectionpool")


def hide_rpc_url_in_logs(url: str) -> None:
    """From now on, show ``url`` in web3's and urllib3's log records only as its scheme, host and
    port (its path and query, where providers put API keys, as ``/…``). Idempotent."""
    if not _RPC_URL_FILTER.urls:
        for name in _RPC_LOGGERS:
            logging.getLogger(name).addFilter(_RPC_URL_FILTER)
    _RPC_URL_FILTER.urls.add(url)


def hide_rpc_urls(text: str) -> str:
    """``text`` with every URL given to :func:`hide_rpc_url_in_logs` shown as its scheme, host and
    port (its path and query as ``/…``): for error messages that quote a request's URL."""
    return _RPC_URL_FILTER.hide(text)
