"""API limits under abuse, each over a real connection: uvicorn on a loopback port, run the
way `cartwise api` runs it (api/server.py), with the embedded broker and redis-server behind.

Slow senders are closed (headers and bodies time out), connections are bounded, the ingest
limit counts events, and reads write per-shopper keys only within a bound.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import orjson
import pytest
import uvicorn

from api import server
from api.app import create_asgi
from api.auth import new_key
from cartwise.embedded import free_port
from cartwise.redisconn import connect as connect_redis
from cartwise.settings import Settings
from streams.store import Keys
from tests.conftest import Served


@contextmanager
def running(settings: Settings) -> Iterator[tuple[str, uvicorn.Server]]:
    """The app on a loopback port in a thread, configured as `cartwise api` runs it."""
    port = free_port()
    srv = uvicorn.Server(server.config(create_asgi(settings), settings, "127.0.0.1", port,
                                       log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", srv
    finally:
        srv.should_exit = True
        thread.join(30)


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection. A server closing with
    unread request bytes resets the connection: what arrived before is returned."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


def wait_until(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def keys() -> dict[str, tuple[str, str]]:
    return {role: new_key(role) for role in ("read", "ingest", "admin")}


def limited(make_settings: Callable[..., Settings], keys: dict, name: str,
            **overrides: object) -> Settings:
    return make_settings(name, api_keys=",".join(e for _, e in keys.values()), **overrides)


def test_half_sent_bodies_are_dropped_after_the_body_timeout(make_settings, keys):
    settings = limited(make_settings, keys, "slowbody", body_timeout_s=1.0)
    with running(settings) as (base, srv):
        socks = []
        for _ in range(20):
            s = connect(base)
            s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                      b"\r\nX-API-Key: " + keys["ingest"][0].encode() +
                      b"\r\nContent-Length: 900000\r\n\r\n" + b" " * 200_000)
            socks.append(s)
        wait_until("the server never saw the connections",
                   lambda: len(srv.server_state.connections) >= 20)
        for s in socks:
            status, body = answer(read_all(s))  # returns: the server closed the connection
            assert status == 408 and body["error"]["reason"] == "body_timeout"
            s.close()
        # Nothing of the half-sent bodies is held: no connection, no request task left.
        wait_until("connections still open",
                   lambda: not srv.server_state.connections and not srv.server_state.tasks)
        # The server still answers whole requests.
        assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_bodies_in_progress_are_bounded_all_together(make_settings, keys):
    # 1 MB of bodies in progress at most: of ten half-sent 300 KB bodies, those past the
    # bound are refused at once, before any times out.
    settings = limited(make_settings, keys, "buffer", body_buffer_bytes=1_048_576,
                       body_timeout_s=60.0)
    with running(settings) as (base, srv):
        socks = []
        for _ in range(10):
            s = connect(base)
            s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: t\r\nX-API-Key: " +
                      keys["ingest"][0].encode() + b"\r\nContent-Length: 900000\r\n\r\n" +
                      b" " * 300_000)
            socks.append(s)
        refused = 0
        for s in socks[4:]:  # four fit in 1 MB at most; of the other six, some are refused
            s.settimeout(10)
            try:
                raw = read_all(s)
            except TimeoutError:
                continue  # still held: it fitted
            # Closed by the server: with its answer, or reset while the client still sent.
            if raw:
                status, body = answer(raw)
                assert (status, body["error"]["reason"]) == (503, "server_busy")
            refused += 1
        assert refused >= 3
        for s in socks:
            s.close()
        wait_until("connections still open", lambda: not srv.server_state.connections)


def test_slow_or_missing_headers_are_dropped_after_the_header_timeout(make_settings, keys):
    settings = limited(make_settings, keys, "slowhead", header_timeout_s=1.0)
    with running(settings) as (base, srv):
        partial = connect(base)
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        silent = connect(base)
        status, body = answer(read_all(partial))
        assert status == 408 and body["error"]["reason"] == "headers_timeout"
        assert read_all(silent).startswith(b"HTTP/1.1 408")
        # A kept-alive connection gets the same deadline for its next request's headers.
        kept = connect(base)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        first = kept.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        assert b"headers_timeout" in read_all(kept)
        for s in (partial, silent, kept):
            s.close()
        wait_until("connections still open", lambda: not srv.server_state.connections)


def test_connections_beyond_the_bound_are_refused_at_once(make_settings, keys):
    settings = limited(make_settings, keys, "conns", max_connections=3, header_timeout_s=60.0)
    with running(settings) as (base, srv):
        held = [connect(base) for _ in range(3)]
        wait_until("the server never saw the connections",
                   lambda: len(srv.server_state.connections) == 3)
        extra = connect(base)
        status, body = answer(read_all(extra))
        assert status == 503 and body["error"]["reason"] == "too_many_connections"
        extra.close()
        for s in held:
            s.close()
        wait_until("held connections not released", lambda: not srv.server_state.connections)
        assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_the_ingest_limit_counts_events_not_requests(make_settings, keys):
    # 1 event/s, bursts of one batch (50): one full batch passes, the next one is refused,
    # although the key made only two requests (its request rate is 500/s).
    settings = limited(make_settings, keys, "events", rate_events=1.0, max_batch=50)
    batch = [{"type": "view", "user_id": f"u{n}", "item_id": "pho-000"} for n in range(50)]
    headers = {"X-API-Key": keys["ingest"][0]}
    with running(settings) as (base, _):
        wait_until("broker not connected", lambda: httpx.get(base + "/ready", timeout=10)
                   .json()["checks"]["broker"] == "ok")
        first = httpx.post(base + "/v1/events", json=batch, headers=headers, timeout=30)
        assert first.status_code == 202, first.text
        second = httpx.post(base + "/v1/events", json=batch, headers=headers, timeout=30)
        assert second.status_code == 429
        assert second.json()["error"]["reason"] == "rate_limited"
        assert "event rate limit" in second.json()["error"]["detail"]
        assert int(second.headers["retry-after"]) >= 1
        # Reads with the same key are not charged for the events.
        assert httpx.get(base + "/v1/trending", headers=headers, timeout=10).status_code == 200


def test_served_records_are_bounded_per_process(make_settings, keys):
    settings = limited(make_settings, keys, "served", served_rate=1.0)
    prefix = settings.prefix
    r = connect_redis(settings)
    # Something to answer with: a served record is kept only for a non-empty answer.
    r.zadd(Keys(prefix).trending(None), {f"pop-{n}": float(n) for n in range(10)})
    with running(settings) as (base, _):
        headers = {"X-API-Key": keys["read"][0]}
        for n in range(30):
            resp = httpx.get(f"{base}/v1/items/item-{n}/suggestions", headers=headers,
                             timeout=10)
            assert resp.status_code == 200
        metrics = httpx.get(base + "/metrics", timeout=10).text
        records = list(r.scan_iter(f"{prefix}served:*", count=1000))
    assert 0 < len(records) < 30  # far fewer than answers: the budget is 1 a second
    skipped = next(line for line in metrics.splitlines()
                   if line.startswith("cartwise_api_served_skipped_total"))
    assert float(skipped.split()[-1]) == 30 - len(records)


def test_reads_write_no_frequency_cap_counts(served: Served):
    """Only impressions count toward the cap (the workers write them): asking, for a known or
    an invented shopper, writes nothing, so invented ids cannot grow Redis."""
    s = served
    assert s.put("/v1/rules", {"frequency_cap": 3}).status_code == 200
    try:
        known = next(u.decode().rsplit(":", 1)[1]
                     for u in s.r.scan_iter(f"{s.settings.prefix}user:*"))
        invented = [f"nobody-{n}" for n in range(25)]
        for user in [*invented, known]:
            assert s.get(f"/v1/users/{user}/suggestions", k=5).status_code == 200
        shown = {k.decode().split(":")[-2] for k in s.r.scan_iter(
            f"{s.settings.prefix}shown:*", count=1000)}
        assert not shown & {*invented, known}
    finally:
        assert s.put("/v1/rules", {}).status_code == 200
        # Other tests count showings of the same shoppers: leave them none.
        for key in s.r.scan_iter(f"{s.settings.prefix}shown:*", count=1000):
            s.r.delete(key)
