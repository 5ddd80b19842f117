"""search_logs against a fake endpoint: one query when it answers, windows from the head when it refuses."""

from __future__ import annotations

import pytest

from fabstir_jupyter.chainlogs import search_logs
from fabstir_jupyter.errors import ChainError, ConnectionFailed

HEAD = 100


class Endpoint:
    """Logs at the given blocks; refuses queries over more than ``cap`` blocks (None: any range)."""

    def __init__(self, blocks: list[int], cap: int | None = None) -> None:
        self.blocks, self.cap, self.queries = blocks, cap, []

    def fetch(self, first: int, last: int | None) -> list[int]:
        self.queries.append((first, last))
        end = HEAD if last is None else last
        if self.cap is not None and end - first + 1 > self.cap:
            raise ChainError("eth_getLogs: block range too large")
        return [b for b in self.blocks if first <= b <= end]


def test_an_endpoint_that_answers_is_asked_once_for_everything():
    endpoint = Endpoint([3, 50, 97])
    assert search_logs(endpoint.fetch, lambda: HEAD, from_block=10) == [50, 97]
    assert endpoint.queries == [(10, None)]


def test_a_refused_range_is_searched_back_from_the_head_and_stops_at_the_newest_match():
    endpoint = Endpoint([3, 50, 55], cap=20)
    assert search_logs(endpoint.fetch, lambda: HEAD, window=20) == [50, 55]
    assert endpoint.queries == [(0, None), (81, 100), (61, 80), (41, 60)]


def test_a_window_the_endpoint_refuses_is_halved_until_it_answers():
    endpoint = Endpoint([90], cap=6)
    assert search_logs(endpoint.fetch, lambda: HEAD, window=25) == [90]
    answered = [(a, b) for a, b in endpoint.queries[1:] if b - a + 1 <= 6]
    assert endpoint.queries[1:4] == [(76, 100), (89, 100), (95, 100)]  # 25 → 12 → 6 blocks
    assert answered[0] == (95, 100) and all(b - a + 1 == 6 for a, b in answered)


def test_the_walk_ends_at_from_block_or_at_the_deadline_with_nothing():
    endpoint = Endpoint([3], cap=10)
    assert search_logs(endpoint.fetch, lambda: HEAD, from_block=60, window=10) == []
    assert min(a for a, _ in endpoint.queries) == 60
    endpoint.queries.clear()
    assert search_logs(endpoint.fetch, lambda: HEAD, window=10, deadline=0.0) == []
    assert endpoint.queries == [(0, None)]


def test_other_errors_and_a_refused_single_block_propagate():
    def down(first: int, last: int | None) -> list[int]:
        raise ConnectionFailed("chain rpc: ConnectionError")

    with pytest.raises(ConnectionFailed):
        search_logs(down, lambda: HEAD, refused=(ChainError,))
    with pytest.raises(ChainError):
        search_logs(Endpoint([], cap=0).fetch, lambda: HEAD)
    with pytest.raises(ValueError):
        search_logs(Endpoint([]).fetch, lambda: HEAD, window=0)
