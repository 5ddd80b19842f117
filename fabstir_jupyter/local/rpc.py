"""The local chain served over HTTP JSON-RPC on loopback, so host processes can prove and settle.

:class:`LocalRpcServer` answers JSON-RPC 2.0 requests and batches (``POST /``) from a thread, the
way a node does for web3's ``HTTPProvider``: every answer is standard JSON-RPC (hex quantities,
camelCase fields), reverts are code 3 errors carrying the revert data. Requests go to the chain's
:class:`~fabstir_jupyter.local.chain.LocalProvider`, which serializes them (py-evm is not
thread-safe); eth-tester's own request and result shapes are translated with web3's formatters
for it.

Only what a wallet or a host needs is served (:data:`METHODS`): reads, gas and fee estimates,
receipts, logs and signed raw transactions. Unlocked-account methods (``eth_sendTransaction``,
``eth_sign``), time travel and snapshots are refused, so every transaction over the wire is signed
by its sender's own key, as on a real network. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from eth_abi import encode as abi_encode
from eth_tester.exceptions import BlockNotFound, FilterNotFound, TransactionNotFound
from web3.providers.eth_tester.middleware import request_formatters, result_formatters
from web3.types import RPCEndpoint

from ..errors import InvalidOptions

__all__ = ["LocalRpcServer", "METHODS", "MAX_BODY"]

logger = logging.getLogger(__name__)

#: The JSON-RPC methods served; anything else is answered "method not found".
METHODS = frozenset({
    "web3_clientVersion", "net_version", "net_listening",
    "eth_chainId", "eth_blockNumber", "eth_gasPrice", "eth_maxPriorityFeePerGas", "eth_feeHistory",
    "eth_getBalance", "eth_getCode", "eth_getStorageAt", "eth_getTransactionCount", "eth_call", "eth_estimateGas",
    "eth_sendRawTransaction", "eth_getTransactionByHash", "eth_getTransactionReceipt",
    "eth_getBlockByNumber", "eth_getBlockByHash", "eth_getLogs", "eth_syncing",
})
MAX_BODY = 1 << 20  # bytes of one HTTP request
_NOT_FOUND = (TransactionNotFound, BlockNotFound)  # a node answers null for these
_BLOOM_BYTES = 256
_REVERT_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
#: web3's translations of eth-tester's results into a node's shapes, by method (web3 types it as optional).
_RESULT_FORMATTERS: dict[RPCEndpoint, Callable[..., Any]] = result_formatters or {}


def _wire(value: Any, key: str = "") -> Any:
    """eth-tester's Python values → JSON-RPC: ints as hex quantities, bytes as 0x data."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        if key == "logsBloom":
            return "0x" + value.to_bytes(_BLOOM_BYTES, "big").hex()
        return hex(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict):
        return {k: _wire(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire(v) for v in value]
    return value


def _error(request_id: Any, code: int, message: str, data: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _revert_data(message: str) -> str:
    # a node sends the revert data with code 3; LocalProvider keeps only the decoded text
    reason = message.removeprefix("execution reverted: ").removeprefix("execution reverted")
    return "0x" + (_REVERT_SELECTOR + abi_encode(["string"], [reason])).hex()


class LocalRpcServer:
    """Serve a :class:`~fabstir_jupyter.local.chain.LocalProvider` over HTTP JSON-RPC on 127.0.0.1.

    Args:
        provider: the chain's provider (its ``make_request`` is thread-safe).
        port: the TCP port (0: a free one).
        sock: a socket already listening on 127.0.0.1 to serve on instead (``port`` is then
            ignored). Bound before the chain exists, it gives the chain's URL to processes started
            early: their requests wait in its backlog until :meth:`start`.

    Usage::

        with LocalRpcServer(chain.provider) as server:
            w3 = Web3(Web3.HTTPProvider(server.url))
    """

    def __init__(self, provider: Any, *, port: int = 0, sock: socket.socket | None = None) -> None:
        self._provider = provider
        if sock is None:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        else:
            address = sock.getsockname()
            if address[0] != "127.0.0.1":
                raise InvalidOptions(f"the local RPC server serves loopback only, not {address[0]}", field="sock")
            self._httpd = ThreadingHTTPServer(address, self._handler_class(), bind_and_activate=False)
            self._httpd.socket.close()  # the one the constructor made, unbound
            self._httpd.socket = sock
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.requests_served = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"  # it serves loopback only

    def __repr__(self) -> str:
        state = "serving" if self._thread is not None else "stopped"
        return f"<LocalRpcServer {self.url} {state}>"

    def start(self) -> LocalRpcServer:
        """Serve in a daemon thread; returns self. Idempotent."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="fabstir-local-rpc", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    close = stop

    def __enter__(self) -> LocalRpcServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ dispatch

    def answer(self, body: Any) -> Any:
        """Answer one parsed JSON-RPC payload (a request or a batch); ``None`` for notifications only."""
        if isinstance(body, list):
            if not body:
                return _error(None, -32600, "invalid request: empty batch")
            answers = [self._one(item) for item in body]
            kept = [a for a in answers if a is not None]
            return kept or None
        return self._one(body)

    def _one(self, request: Any) -> dict[str, Any] | None:
        if (not isinstance(request, dict) or request.get("jsonrpc") != "2.0"
                or not isinstance(request.get("method"), str)):
            return _error(request.get("id") if isinstance(request, dict) else None, -32600, "invalid request")
        request_id = request.get("id")
        method = request["method"]
        params = request.get("params", [])
        if not isinstance(params, list):
            return _error(request_id, -32602, "invalid params: expected a list")
        if method not in METHODS:
            return _error(request_id, -32601, f"method not found: {method}")
        self.requests_served += 1
        logger.debug("local rpc %s", method)
        try:
            result = self._call(method, params)
        except _NOT_FOUND:
            result = None
        except FilterNotFound as exc:
            return _error(request_id, -32000, str(exc))
        except Exception as exc:  # the chain's own refusal (bad nonce, funds, malformed input)
            return _error(request_id, -32000, str(exc) or type(exc).__name__)
        if isinstance(result, dict) and "error" in result:
            error = result["error"]
            data = _revert_data(error["message"]) if error.get("code") == 3 else None
            return _error(request_id, error.get("code", -32000), error.get("message", "error"), data)
        return None if request_id is None else {"jsonrpc": "2.0", "id": request_id, "result": result}

    def _call(self, method: str, params: list[Any]) -> Any:
        endpoint = RPCEndpoint(method)
        if endpoint in request_formatters:
            params = request_formatters[endpoint](params)
        response = self._provider.make_request(endpoint, params)
        if "error" in response:
            return response
        result = response["result"]
        if endpoint in _RESULT_FORMATTERS:
            result = _RESULT_FORMATTERS[endpoint](result)
        return _wire(result)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle on, a kept-alive connection waits for
            # the client's delayed ACK (40 ms on Linux) before the body, on every request.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:  # http.server's naming
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._reply(HTTPStatus.LENGTH_REQUIRED, _error(None, -32600, "content-length required"))
                    return
                if int(length) > MAX_BODY:
                    self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _error(None, -32600, "request too large"))
                    self.close_connection = True
                    return
                raw = self.rfile.read(int(length))
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._reply(HTTPStatus.OK, _error(None, -32700, "parse error"))
                    return
                answer = server.answer(body)
                if answer is None:
                    self.send_response(HTTPStatus.NO_CONTENT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._reply(HTTPStatus.OK, answer)

            def do_GET(self) -> None:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, _error(None, -32600, "use POST"))

            def _reply(self, status: HTTPStatus, payload: Any) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("local rpc http: " + format, *args)

        return Handler
