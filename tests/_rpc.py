"""Chain endpoints that misbehave as public ones do, for tests: each wraps the local chain's provider
(serve it with ``LocalRpcServer``) and caps log ranges, records requests, holds transactions unmined,
or fails chosen requests."""

from __future__ import annotations

from typing import Any


class RangeCappedProvider:
    """Wraps a :class:`~fabstir_jupyter.local.chain.LocalProvider` (serve it with ``LocalRpcServer``):
    ``eth_getLogs`` over more than ``cap`` blocks, or up to ``"latest"``, is answered "block range too
    large"; the ranges it answered are kept in :attr:`ranges`, in order."""

    def __init__(self, inner: Any, cap: int) -> None:
        self.inner, self.cap = inner, cap
        self.ranges: list[tuple[int, int]] = []

    def make_request(self, method: str, params: Any) -> Any:
        if method == "eth_getLogs":
            query = params[0]
            bounds = (query.get("fromBlock", query.get("from_block")), query.get("toBlock", query.get("to_block")))
            first, last = (int(b, 16) if isinstance(b, str) and b.startswith("0x") else b for b in bounds)
            if not isinstance(first, int) or not isinstance(last, int) or last - first >= self.cap:
                return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32005, "message": "block range too large"}}
            self.ranges.append((first, last))
        return self.inner.make_request(method, params)


class RecordingProvider:
    """Wraps a chain provider (serve it with ``LocalRpcServer``) and records each request: its method
    and, for ``eth_call``, the called function's 4-byte selector."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[tuple[str, str]] = []

    def make_request(self, method: str, params: Any) -> Any:
        call = params[0] if method == "eth_call" and params and isinstance(params[0], dict) else {}
        data = call.get("data") or call.get("input") or ""
        self.requests.append((method, data[:10] if isinstance(data, str) else "0x" + bytes(data[:4]).hex()))
        return self.inner.make_request(method, params)

    def count(self, method: str, selector: str = "") -> int:
        return sum(1 for m, s in self.requests if m == method and (not selector or s == selector))


class StuckTransactions:
    """Wraps a chain provider (serve it with ``LocalRpcServer``): the first ``stuck`` raw transactions
    are answered with their hash but never reach the chain, as a transaction priced under a fee spike
    waits in a mempool. With ``mine_late``, the first one is mined after all just before the next
    transaction arrives (a replacement then finds its nonce taken). With ``refuse``, the next
    transaction is answered with that error instead, and the first one is mined then. Every raw
    transaction received is kept in :attr:`sent`."""

    def __init__(self, inner: Any, stuck: int = 1, *, mine_late: bool = False, refuse: str | None = None) -> None:
        self.inner, self.stuck, self.mine_late, self.refuse = inner, stuck, mine_late, refuse
        self.sent: list[str] = []
        self.held: list[str] = []

    def make_request(self, method: str, params: Any) -> Any:
        if method == "eth_sendRawTransaction":
            raw = params[0] if isinstance(params[0], str) else "0x" + bytes(params[0]).hex()
            self.sent.append(raw)
            if len(self.sent) <= self.stuck:
                from eth_utils import keccak

                self.held.append(raw)
                return {"jsonrpc": "2.0", "id": 1, "result": "0x" + keccak(hexstr=raw).hex()}
            if (self.mine_late or self.refuse) and self.held:
                self.inner.make_request(method, [self.held.pop(0)])
            if self.refuse:
                return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": self.refuse}}
        return self.inner.make_request(method, params)

    def release(self) -> None:
        """Hold nothing more, and send what was held on to the chain, in order."""
        self.stuck = 0
        while self.held:
            self.inner.make_request("eth_sendRawTransaction", [self.held.pop(0)])


class FailingRequests:
    """Wraps a chain provider: the calls of each named method whose 0-based index is listed in
    ``failures[method]`` are answered with JSON-RPC error ``message`` (default: a server error).
    With ``after``, calls count only once a request of that method has passed through."""

    def __init__(self, inner: Any, failures: dict[str, set[int]], message: str = "internal error", *,
                 after: str | None = None) -> None:
        self.inner, self.failures, self.message = inner, failures, message
        self.armed = after is None
        self.after = after
        self.calls: dict[str, int] = {}
        self.failed: list[str] = []

    def make_request(self, method: str, params: Any) -> Any:
        if self.armed:
            index = self.calls.get(method, 0)
            self.calls[method] = index + 1
            if index in self.failures.get(method, ()):
                self.failed.append(method)
                return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": self.message}}
        elif method == self.after:
            self.armed = True
        return self.inner.make_request(method, params)
