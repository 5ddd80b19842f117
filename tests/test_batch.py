"""Batches: spreading prompts over hosts, failover, bad prompts, concurrency bounds and the frame."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

import pytest

from _timing import wait_until
from fabstir_jupyter.batch import BATCH_COLUMNS, HostWindow, run_batch
from fabstir_jupyter.errors import FabstirError, InvalidOptions
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text
from fabstir_jupyter.hosts import HostInfo

DEAD = "ws://127.0.0.1:9/v1/ws"
N = 8


def prompts(count):
    return [f"question number {i}" for i in range(count)]


class Progress:
    """A progress callback that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, done, total, errors):
        self.calls.append((done, total, errors))


@contextlib.asynccontextmanager
async def watch_streams(servers, interval=0.002):
    """Sample the hosts' active streams; yields a dict of the highest counts seen (per host and total)."""
    peaks = collections.Counter()

    async def sample():
        while True:
            counts = [s.active_streams for s in servers]
            for server, count in zip(servers, counts, strict=True):
                peaks[server.http_url] = max(peaks[server.http_url], count)
            peaks["total"] = max(peaks["total"], sum(counts))
            await asyncio.sleep(interval)

    task = asyncio.ensure_future(sample())
    try:
        yield peaks
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_batch_spreads_prompts_over_live_hosts_around_a_dead_one(start_host, make_manager):
    """12 prompts over 2 live hosts and a dead one: every row answered exactly, progress 12 times."""
    a = await start_host(backend=ScriptedBackend(token_rate=400))
    b = await start_host(backend=ScriptedBackend(token_rate=400))
    manager = make_manager([a.ws_url, DEAD, b.ws_url])
    progress = Progress()
    frame = await run_batch(manager, prompts(12), max_tokens=N, progress=progress)

    assert len(frame) == 12
    assert frame["error"].isna().all()
    assert list(frame["text"]) == [scripted_text(p, N) for p in prompts(12)]
    assert set(frame["host"]) == {a.http_url, b.http_url}
    assert (frame["tokens"] == N).all() and (frame["finish_reason"] == "length").all()
    assert (frame["model"] == "scripted-1").all()
    assert frame["ttft"].notna().all() and (frame["duration"] >= frame["ttft"]).all()
    assert [c[0] for c in progress.calls] == list(range(1, 13))
    assert progress.calls[-1] == (12, 12, 0)
    assert {r.kind for r in manager.usage.records} == {"batch"}


async def test_bad_prompts_get_invalid_prompt_rows(start_host, make_manager):
    """Empty, blank, NUL-holding and non-string prompts error in their rows; the rest are answered."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    batch = ["first", "", "nul\x00here", "second", "   ", None]
    progress = Progress()
    frame = await run_batch(manager, batch, max_tokens=4, progress=progress)

    assert list(frame["error"]) == [None, "INVALID_PROMPT", "INVALID_PROMPT", None, "INVALID_PROMPT", "INVALID_PROMPT"]
    assert "U+0000" in frame["error_message"][2]
    assert frame["text"][0] == scripted_text("first", 4) and frame["text"][3] == scripted_text("second", 4)
    assert list(frame["text"][[1, 2, 4, 5]]) == [""] * 4
    assert list(frame["tokens"][[1, 2]]) == [0, 0] and frame["host"][1] is None
    assert progress.calls[-1] == (6, 6, 4)


async def test_a_host_failing_every_request_loses_its_prompts_to_another(start_host, make_manager):
    """Prompts that fail on a broken host are run again elsewhere; the broken host is soon benched."""
    good = await start_host()
    broken = await start_host(backend=ScriptedBackend(error_code="HOST_ERROR"))
    manager = make_manager([broken.ws_url, good.ws_url])
    frame = await run_batch(manager, prompts(10), max_tokens=N, per_host_concurrency=1)

    assert frame["error"].isna().all()
    assert set(frame["host"]) == {good.http_url}
    assert list(frame["text"]) == [scripted_text(p, N) for p in prompts(10)]
    failed = {r.request_id for r in manager.usage.records if r.error_code == "HOST_ERROR"}
    assert 1 <= len(failed) <= 3


async def test_a_host_dropping_streams_still_gives_exact_rows(start_host, make_manager):
    """A host that drops the connection mid-answer: rows still hold the exact, gapless text."""
    flaky = await start_host(backend=ScriptedBackend(close_after=3))
    steady = await start_host()
    manager = make_manager([flaky.ws_url, steady.ws_url])
    frame = await run_batch(manager, prompts(6), max_tokens=N)

    assert frame["error"].isna().all()
    assert list(frame["text"]) == [scripted_text(p, N) for p in prompts(6)]
    assert (frame["tokens"] == N).all()


async def test_no_live_host_gives_error_rows_not_an_exception(make_manager):
    """With only a dead host, every row says NO_HOSTS_AVAILABLE and the frame is still returned."""
    manager = make_manager([DEAD])
    progress = Progress()
    frame = await run_batch(manager, prompts(3), progress=progress)

    assert list(frame["error"]) == ["NO_HOSTS_AVAILABLE"] * 3
    assert (frame["finish_reason"] == "error").all()
    assert progress.calls[-1] == (3, 3, 3)


async def test_concurrency_bounds_are_respected(start_host, make_manager):
    """max_concurrency bounds the batch and per_host_concurrency each host; both are reached."""
    servers = [await start_host(backend=ScriptedBackend(token_rate=200)) for _ in range(2)]
    manager = make_manager([s.ws_url for s in servers])
    async with watch_streams(servers) as peaks:
        frame = await run_batch(manager, prompts(12), max_tokens=10, max_concurrency=3, per_host_concurrency=2)
    assert frame["error"].isna().all()
    assert peaks["total"] == 3
    assert max(peaks[s.http_url] for s in servers) == 2


async def test_default_concurrency_is_hosts_times_the_per_host_limit(start_host, make_manager):
    """Without max_concurrency, every fitting host runs up to its limit (dead hosts do not count)."""
    servers = [await start_host(backend=ScriptedBackend(token_rate=200)) for _ in range(2)]
    manager = make_manager([servers[0].ws_url, DEAD, servers[1].ws_url])
    async with watch_streams(servers) as peaks:
        await run_batch(manager, prompts(10), max_tokens=10, per_host_concurrency=2)
    assert peaks["total"] == 4
    assert all(peaks[s.http_url] == 2 for s in servers)


async def test_frame_columns_and_input_order(start_host, make_manager):
    """Columns are BATCH_COLUMNS in order; rows follow the input even when answers finish out of order."""
    slow = await start_host(backend=ScriptedBackend(token_rate=50))
    fast = await start_host()
    manager = make_manager([slow.ws_url, fast.ws_url])
    batch = prompts(6)
    frame = await run_batch(manager, batch, max_tokens=4, per_host_concurrency=1)

    assert list(frame.columns) == list(BATCH_COLUMNS) == [
        "prompt", "text", "host", "model", "tokens", "ttft", "duration", "cost", "cost_unit", "finish_reason",
        "error", "error_message",
    ]
    assert list(frame["prompt"]) == batch
    assert list(frame["text"]) == [scripted_text(p, 4) for p in batch]


async def test_cheapest_mode_keeps_the_batch_on_the_cheap_host(start_host, make_manager):
    """mode='cheapest' sends every prompt to the cheap host while it has room, and reports its cost."""
    dear = await start_host()
    cheap = await start_host()
    manager = make_manager([])
    for server, price in ((dear, 90_000), (cheap, 150)):
        manager.host_manager.add_host(
            HostInfo.from_url(server.ws_url, prices={"scripted-1": {"native": 0, "stable": price}}, stake=5000))
    frame = await run_batch(manager, prompts(6), max_tokens=N, mode="cheapest", max_concurrency=2,
                            per_host_concurrency=2)

    assert set(frame["host"]) == {cheap.http_url}
    assert frame["cost"].tolist() == pytest.approx([N * 150 / 1000 / 1e6] * 6)
    assert set(frame["cost_unit"]) == {"USDC"}


async def test_host_address_pins_every_prompt(start_host, make_manager):
    """host_address sends every prompt to that host, without selection."""
    a = await start_host()
    b = await start_host()
    manager = make_manager([a.ws_url, b.ws_url])
    frame = await run_batch(manager, prompts(4), max_tokens=4, host_address=b.ws_url)
    assert set(frame["host"]) == {b.http_url}
    assert frame["error"].isna().all()


async def test_progress_errors_are_swallowed_and_logged(start_host, make_manager, caplog):
    """A progress callback that raises is logged; the batch finishes."""
    host = await start_host()
    manager = make_manager([host.ws_url])

    def broken(done, total, errors):
        raise RuntimeError("progress bar exploded")

    with caplog.at_level(logging.WARNING, logger="fabstir_jupyter.batch"):
        frame = await run_batch(manager, prompts(3), max_tokens=4, progress=broken)
    assert frame["error"].isna().all()
    assert sum("progress callback failed" in r.message for r in caplog.records) == 3


async def test_empty_batch_gives_an_empty_frame(make_manager):
    """No prompts: an empty frame with the columns, and no progress calls."""
    progress = Progress()
    frame = await run_batch(make_manager([DEAD]), [], progress=progress)
    assert frame.empty and list(frame.columns) == list(BATCH_COLUMNS)
    assert progress.calls == []


@pytest.mark.parametrize("call, field", [
    (lambda m: run_batch(m, "one prompt"), "prompts"),
    (lambda m: run_batch(m, ["x"], max_concurrency=0), "max_concurrency"),
    (lambda m: run_batch(m, ["x"], per_host_concurrency=1.5), "per_host_concurrency"),
    (lambda m: run_batch(m, ["x"], temperature=9), "temperature"),
    (lambda m: run_batch(m, ["x"], mode="specific"), "mode"),
    (lambda m: run_batch(m, ["x"], progress="yes"), "progress"),
])
async def test_misuse_raises_before_any_io(make_manager, call, field):
    """Bad options and limits raise INVALID_OPTIONS naming the field; no host is contacted."""
    manager = make_manager([DEAD])
    with pytest.raises(InvalidOptions) as exc:
        await call(manager)
    assert exc.value.field == field
    assert manager.usage.records == []


async def test_cancelling_a_batch_cancels_its_streams(start_host, make_manager):
    """Cancelling run_batch stops every running stream on the hosts."""
    host = await start_host(backend=ScriptedBackend(token_rate=20))
    manager = make_manager([host.ws_url])
    task = asyncio.ensure_future(run_batch(manager, prompts(4), max_tokens=200))
    for _ in range(200):
        if host.active_streams:
            break
        await asyncio.sleep(0.01)
    assert host.active_streams > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if not host.active_streams:
            break
        await asyncio.sleep(0.01)
    assert host.active_streams == 0


async def test_a_host_killed_mid_batch_loses_its_prompts_to_the_others(start_host, make_manager):
    """A host closed while it streams: its prompts run again on the live hosts, with exact text."""
    servers = [await start_host(backend=ScriptedBackend(token_rate=200)) for _ in range(3)]
    manager = make_manager([s.ws_url for s in servers], backoff_initial=0.05, backoff_max=0.2)
    victim = servers[1]

    async def kill_when_busy():
        await wait_until(lambda: victim.active_streams, what="the victim streaming")
        await victim.close()

    killer = asyncio.ensure_future(kill_when_busy())
    frame = await run_batch(manager, prompts(12), max_tokens=N)
    await killer

    assert frame["error"].isna().all()
    assert list(frame["text"]) == [scripted_text(p, N) for p in prompts(12)]
    assert victim.http_url not in set(frame["host"])
    assert any(r.host == victim.http_url and r.error_code for r in manager.usage.records)


async def test_manager_batch_delegates_to_the_batch_runner(start_host, make_manager):
    """InferenceManager.batch returns the same frame as run_batch, in input order."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    frame = await manager.batch(["one", "two", "three"], max_tokens=3)
    assert list(frame["text"]) == [scripted_text(p, 3) for p in ("one", "two", "three")]
    assert frame["error"].isna().all() or (frame["error"].map(lambda e: e is None)).all()


@pytest.mark.parametrize("hosts", [2, 4])
async def test_hosts_that_always_fail_get_at_most_max_retries_plus_one_attempts(start_host, make_manager, hosts):
    """With N hosts answering HOST_ERROR to everything, each batch prompt and each stream makes at
    most max_retries + 1 attempts: one retry loop, not the batch's loop around the stream's (which
    made (max_retries + 1)**2 attempts per prompt with 4 hosts)."""
    servers = [await start_host(backend=ScriptedBackend(error_code="HOST_ERROR")) for _ in range(hosts)]
    manager = make_manager([s.ws_url for s in servers], max_retries=2)
    frame = await run_batch(manager, prompts(3), max_tokens=N)
    assert list(frame["error"]) == ["HOST_ERROR"] * 3
    per_prompt = collections.Counter(r.request_id for r in manager.usage.records)
    assert sorted(per_prompt.values()) == [3, 3, 3]
    assert {r.attempt for r in manager.usage.records} == {1, 2, 3}
    # the attempts of one prompt go to different hosts while untried ones exist
    for request_id in per_prompt:
        tried = [r.host for r in manager.usage.records if r.request_id == request_id]
        assert len(set(tried)) == min(3, hosts)

    manager.usage.records.clear()
    with pytest.raises(FabstirError) as info:
        async with manager.stream("one stream", max_tokens=N) as stream:
            await stream.read()
    assert info.value.code == "HOST_ERROR"
    assert len(manager.usage.records) == stream.attempts == 3


async def test_batch_rows_are_the_streams_usage_totals(start_host, make_manager):
    """A prompt that failed over mid-answer gets a row with its stream's totals: every token it
    received, on both hosts, and the time of both attempts."""
    flaky = await start_host(backend=ScriptedBackend(close_after=3))
    steady = await start_host()
    manager = make_manager([flaky.ws_url, steady.ws_url])
    for info in await manager.host_manager.discover_all_active_hosts():
        info.latency_ms = 1.0 if info.ws_url == flaky.ws_url else 500.0
    frame = await run_batch(manager, ["only prompt"], max_tokens=N, mode="fastest")
    (row,) = frame.to_dict(orient="records")
    records = manager.usage.records
    assert [r.received_tokens for r in records] == [3, N - 3]
    assert row["tokens"] == N and row["host"] == steady.http_url
    assert row["duration"] == pytest.approx(sum(r.duration for r in records))


# ---------------------------------------------------------------------------- capacity and HOST_BUSY


def busy_count(manager):
    return sum(r.error_code == "HOST_BUSY" for r in manager.usage.records)


async def test_batch_runs_each_host_at_its_own_limit_without_refusals(start_host, make_manager):
    """24 prompts over 3 hosts that run 2 streams each, registered as running 8: the host's own figure
    (/v1/version) wins, so every prompt takes one attempt, none is refused, and each host is used
    up to its limit (the metadata's 8 made 46 of 72 attempts HOST_BUSY on a local network)."""
    servers = [await start_host(max_concurrent_streams=2, backend=ScriptedBackend(token_rate=400)) for _ in range(3)]
    manager = make_manager([])
    for server in servers:
        manager.host_manager.add_host(HostInfo.from_url(server.ws_url, metadata={"maxConcurrent": 8}))
    async with watch_streams(servers) as peaks:
        frame = await run_batch(manager, prompts(24), max_tokens=N)

    assert list(frame["text"]) == [scripted_text(p, N) for p in prompts(24)]
    assert busy_count(manager) == 0
    assert len(manager.usage.records) == 24
    assert all(peaks[s.http_url] == 2 for s in servers)
    assert {h.max_concurrent_streams for h in manager.host_manager.hosts} == {2}


async def test_registry_metadata_sets_the_limit_of_a_host_that_does_not_state_one(start_host, make_manager):
    """A production-like host (legacy: /v1/version states no limit) runs 2 streams; its metadata says
    so: 12 prompts, 12 attempts, no HOST_BUSY, 2 streams at a time."""
    server = await start_host(legacy=True, max_concurrent_streams=2, backend=ScriptedBackend(token_rate=400))
    manager = make_manager([])
    manager.host_manager.add_host(HostInfo.from_url(server.ws_url, metadata={"maxConcurrent": 2}))
    async with watch_streams([server]) as peaks:
        frame = await run_batch(manager, prompts(12), max_tokens=N)

    assert frame["error"].isna().all()
    assert busy_count(manager) == 0 and len(manager.usage.records) == 12
    assert peaks[server.http_url] == 2
    assert manager.host_manager.hosts[0].max_concurrent_streams is None


async def test_a_host_busy_with_another_client_gets_fewer_streams_not_a_flood(start_host, make_manager):
    """A host running 4 streams, 2 of them held by another client all along: the batch's window drops
    to 2 at the first refusals and climbs back ever more slowly, so 24 prompts (all answered) meet
    HOST_BUSY a few times, not once per freed slot."""
    server = await start_host(max_concurrent_streams=4, backend=ScriptedBackend(token_rate=400))
    other = make_manager([server.ws_url])
    held = [other.stream(f"long answer {i}", max_tokens=4000) for i in range(2)]
    for stream in held:
        await stream.__aenter__()
    await wait_until(lambda: server.active_streams == 2, what="the other client's two streams running")
    manager = make_manager([server.ws_url], backoff_initial=0.01, backoff_max=0.05, max_retries=6)
    try:
        async with watch_streams([server]) as peaks:
            frame = await run_batch(manager, prompts(24), max_tokens=N)
    finally:
        for stream in held:
            await stream.aclose()

    assert list(frame["text"]) == [scripted_text(p, N) for p in prompts(24)]
    assert peaks[server.http_url] == 4
    # 2 refusals when the batch first sends 4, then one per climb that fails, each climb twice as long
    # as the one before (after 2, 4, 8 answers): 5 in all, 7 allowed for a refusal raced by an answer
    assert 2 <= busy_count(manager) <= 7
    assert len(manager.usage.records) == 24 + busy_count(manager)


def test_host_window_drops_to_the_streams_running_and_climbs_ever_more_slowly():
    """The window after HOST_BUSY: the batch's other streams on the host (at least 1); one slot back
    per window's worth of good answers; a refusal right after a climb doubles the answers per slot."""
    window = HostWindow(3)
    assert window.allowed == 3
    window.refused(running=2)  # further refusals of the same burst only lower it
    assert (window.allowed, window.pace) == (2, 1)
    window.refused(running=0)
    assert (window.allowed, window.pace) == (1, 1)
    window.answered()
    assert window.allowed == 2  # after 1 * 1 answer
    window.refused(running=1)  # the slot just given back was not there
    assert (window.allowed, window.pace) == (1, 2)
    for expected in (1, 2, 2, 2, 2, 3):  # 1 * 2 answers, then 2 * 2
        window.answered()
        assert window.allowed == expected
    window.refused(running=2)
    assert (window.allowed, window.pace) == (2, 4)
    window.answered()
    window.refused(running=1)  # not right after a climb: the pace stays
    assert (window.allowed, window.pace) == (1, 4)
    assert HostWindow(0).allowed == 1
