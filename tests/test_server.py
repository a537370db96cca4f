"""The server protocol's limits: header size, header deadline, body silence; and nothing lost for good clients."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import httpx2
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.server import GatewayHttpProtocol
from tests.servers import run_app


class QuickProtocol(GatewayHttpProtocol):
    max_header_bytes = 4096
    header_timeout = 0.3
    body_idle_timeout = 0.3


async def echo_length(request: Request) -> JSONResponse:
    return JSONResponse({"length": len(await request.body())})


async def slow_answer(request: Request) -> JSONResponse:
    await asyncio.sleep(0.6)  # longer than QuickProtocol's header deadline
    return JSONResponse({"slow": True})


SEEN: list[dict[str, str]] = []  # the headers of every request that reached the app


async def seen(request: Request) -> JSONResponse:
    SEEN.append(dict(request.headers))
    await request.body()
    return JSONResponse({"seen": len(SEEN)})


@pytest.fixture
def url() -> Iterator[str]:
    SEEN.clear()
    app = Starlette(
        routes=[
            Route("/echo", echo_length, methods=["POST"]),
            Route("/slow", slow_answer),
            Route("/seen", seen, methods=["GET", "POST"]),
        ]
    )
    with run_app(app, http=QuickProtocol) as base:
        yield base


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _reply(sock: socket.socket) -> tuple[bytes, dict[str, Any]]:
    head, _, body = _read_all(sock).partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def slow_clients(reason: str) -> float:
    """gateway_slow_clients_total{reason}: connections cut for a slow client."""
    return REGISTRY.get_sample_value("gateway_slow_clients_total", {"reason": reason}) or 0.0


def test_oversized_headers_get_431(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)
        status, body = _reply(sock)
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert body["error"]["code"] == "request_headers_too_large"


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2\r\n\r\n", b"\x00\x01 nonsense\r\n\r\n"],
    ids=["bad-content-length", "not-http"],
)
def test_a_request_the_parser_refuses_gets_an_openai_shaped_400(url: str, request_bytes: bytes) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(request_bytes)
        head, _, body = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-type: application/json" in head
    assert json.loads(body)["error"]["code"] == "invalid_request"


class _Lines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, fields: dict[str, Any]) -> None:
        self.lines.append(fields)


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"\x00\x01 nonsense\r\n\r\n", 400, "invalid_request"),
        (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192, 431, "request_headers_too_large"),
    ],
    ids=["400", "431"],
)
def test_the_servers_own_refusals_carry_a_request_id_and_an_access_line(
    url: str, monkeypatch: pytest.MonkeyPatch, request_bytes: bytes, status: int, code: str
) -> None:
    lines = _Lines()
    monkeypatch.setattr("gateway.server.access_log", lines)
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(request_bytes)
        head = _read_all(sock).partition(b"\r\n\r\n")[0].decode()
    request_id = re.search(r"\r\nx-request-id: ([0-9a-f]{32})\r\n", head)
    assert request_id is not None, head
    (line,) = lines.lines
    assert (line["request_id"], line["status"], line["decision"]) == (request_id.group(1), status, code)


@pytest.mark.parametrize("drip", [0, 40], ids=["stopped", "trickling"])
def test_headers_that_never_finish_get_408(url: str, drip: int) -> None:
    # The deadline counts from the request's first byte, not from the last one: a slow drip (2 s
    # of a header line every 50 ms) is cut at the same 0.3 s as headers that simply stop.
    before = slow_clients("headers")
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        with suppress(OSError):  # the gateway may close while we still write
            for _ in range(drip):
                time.sleep(0.05)
                sock.sendall(b"X: y\r\n")
        status, body = _reply(sock)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert body["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 1.5
    assert slow_clients("headers") == before + 1


def test_a_silent_connection_is_closed(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        status, _ = _reply(sock)
    assert status.startswith(b"HTTP/1.1 408")


def test_a_body_that_stops_arriving_is_cut(url: str) -> None:
    before = slow_clients("body_silence")
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed without an answer: the app saw a disconnect
    assert time.monotonic() - started < 3
    assert slow_clients("body_silence") == before + 1


@pytest.mark.parametrize(("method", "body"), [(b"GET", b""), (b"POST", b"hello")])
def test_an_upgrade_to_websocket_is_served_as_plain_http(url: str, method: bytes, body: bytes) -> None:
    # The gateway serves no WebSocket. Handed to uvicorn's WebSocket protocol, a connection left
    # every limit of this one behind: a POST asking to upgrade was never answered nor closed.
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(
            method + b" /seen HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        status, answer = _reply(sock)
    assert status == b"HTTP/1.1 200 OK"
    assert answer == {"seen": 1}


def test_large_bodies_and_keep_alive_still_work(url: str) -> None:
    with httpx2.Client() as client:
        big = client.post(f"{url}/echo", content=b"x" * 1_000_000)
        small = client.post(f"{url}/echo", content=b"y" * 10)
        time.sleep(0.5)  # longer than the header deadline: an idle kept-alive connection is not refused
        again = client.post(f"{url}/echo", content=b"z")
    assert big.json() == {"length": 1_000_000}
    assert small.json() == {"length": 10}
    assert again.json() == {"length": 1}


def test_oversized_headers_in_many_chunks_get_431(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        with suppress(OSError):
            for _ in range(10):
                sock.sendall(b"X-Part: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.01)
        status, body = _reply(sock)
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert body["error"]["code"] == "request_headers_too_large"


def _with_header_block_of(size: int) -> bytes:
    """A GET of /seen whose header block, request line to blank line, is `size` bytes."""
    head, end = b"GET /seen HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return head + b"a" * (size - len(head) - len(end)) + end


def test_a_header_block_of_the_cap_passes_and_one_byte_more_gets_431_in_one_send(url: str) -> None:
    answers = []
    for size in (QuickProtocol.max_header_bytes, QuickProtocol.max_header_bytes + 1):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
            sock.sendall(_with_header_block_of(size))
            answers.append(sock.recv(65536).split(b"\r\n", 1)[0])
    assert answers == [b"HTTP/1.1 200 OK", b"HTTP/1.1 431 Request Header Fields Too Large"]
    assert len(SEEN) == 1


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (b"", b""),
        (b"", b"GET /seen HTTP/1.1\r\nHost: x\r\n\r\n"),
        (b"POST /seen HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe", b"llo"),
    ],
    ids=["alone", "behind-a-request", "behind-a-body"],
)
def test_a_100_kb_header_block_in_one_send_gets_431_and_never_reaches_the_app(
    url: str, first: bytes, then: bytes
) -> None:
    # The parser takes a whole header block from one chunk, whatever its size; the cap must
    # hold per request there too, also when the block follows another request's end.
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        if first:
            sock.sendall(first)
            time.sleep(0.05)  # its own read, so the next send begins mid-body
        sock.sendall(then + _with_header_block_of(100_000))
        with suppress(ConnectionResetError):  # closed with part of the block unread
            answer = _read_all(sock)
    assert b"HTTP/1.1 431 Request Header Fields Too Large" in answer
    assert not [headers for headers in SEEN if "x-pad" in headers]


def test_many_small_pipelined_requests_in_one_send_are_all_answered(url: str) -> None:
    # Three times the cap in one send: the pieces it is read in end inside requests, and each
    # request counts its own header bytes only, not those of the requests before it.
    requests = [_with_header_block_of(100 + n) for n in range(120)]
    assert sum(map(len, requests)) > 3 * QuickProtocol.max_header_bytes
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"".join(requests) + b"GET /seen HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = _read_all(sock)
    assert answer.count(b"HTTP/1.1 200 OK") == 121
    assert len(SEEN) == 121


def test_a_pipelined_request_whose_headers_stop_gets_408_after_the_first_answer(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + b"POST /echo HTTP/1.1\r\nHost: x\r\n"
        )
        first, _, rest = _read_all(sock).partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b'{"length":3}' in rest
    assert b"HTTP/1.1 408 Request Timeout" in rest


def test_a_pipelined_request_whose_headers_stop_behind_a_slow_answer_gets_408_after_it(url: str) -> None:
    # Its header deadline passes while the first answer is still being made; once that is sent,
    # the unfinished request must still be refused, not held open for ever.
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"HTTP/1.1 408 Request Timeout" in answer
    assert time.monotonic() - started < 2


def test_a_body_arriving_slowly_but_steadily_is_not_cut(url: str) -> None:
    # Silence is what the body timeout measures: pauses shorter than it, however many, are fine.
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        for _ in range(8):
            time.sleep(0.1)  # 0.8 s in all, well past the 0.3 s timeout, never silent that long
            sock.sendall(b"x")
        status, body = _reply(sock)
    assert status.startswith(b"HTTP/1.1 200")
    assert body == {"length": 8}


class CountingProtocol(GatewayHttpProtocol):
    """Keeps its instances, so a test can look at a connection's timers."""

    made: list[CountingProtocol] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        CountingProtocol.made.append(self)


@pytest.fixture
def keep_alive_url() -> Iterator[str]:
    CountingProtocol.made.clear()
    app = Starlette(routes=[Route("/echo", echo_length, methods=["POST"])])
    with run_app(app, http=CountingProtocol, timeout_keep_alive=1) as base:
        yield base


def _request(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    while not data.endswith(b"}"):
        data += sock.recv(65536)
    return data


def test_an_idle_kept_alive_connection_is_closed_silently_after_the_keep_alive(keep_alive_url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(keep_alive_url)), timeout=5) as sock:
        assert _request(sock, b"abc").endswith(b'{"length":3}')
        time.sleep(0.5)  # within the keep-alive (1 s): the connection still serves
        assert _request(sock, b"abcd").endswith(b'{"length":4}')
        started = time.monotonic()
        assert sock.recv(65536) == b""  # then closed without a word (no 408: no request had begun)
    assert 0.9 <= time.monotonic() - started < 2.5


def test_requests_on_one_connection_make_no_timer_each(keep_alive_url: str) -> None:
    # uvicorn makes a keep-alive timer when each response ends and cancels it when the next
    # request comes; here the connection's one deadline moves, and its timer is re-armed only
    # when the deadline comes nearer (the keep-alive after the header deadline) or when it fires.
    with socket.create_connection(("127.0.0.1", _port(keep_alive_url)), timeout=5) as sock:
        timers = set()
        for size in range(1, 21):
            assert _request(sock, b"x" * size).endswith(b'{"length":%d}' % size)
            (protocol,) = CountingProtocol.made
            timers.add(id(protocol._deadline.timer))
            assert protocol.timeout_keep_alive_task is None
    assert len(timers) <= 3  # 20 requests: the first header deadline, the keep-alive, one firing at most
