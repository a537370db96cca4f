"""The server protocol's limits on a request body: its minimum rate, its silence, and the time the
server itself holds it, which is never the client's; and which ways of running the gateway have
the server's limits."""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from gateway.proxy import Upstream
from gateway.server import GatewayHttpProtocol, protocol_for
from gateway.settings import settings_from
from loadtests.harness import child_env, free_port
from tests.servers import run_app
from tests.test_proxy import make_app, make_settings
from tests.test_server import QuickProtocol, _port, _read_all, slow_clients
from tests.upstream import MockUpstream


def _json_answer(sock: socket.socket) -> bytes:
    answer = b""
    while not answer.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:  # closed before the whole answer: the assertions after say what came
            break
        answer += chunk
    return answer


@contextmanager
def _proxy(**limits: float) -> Iterator[tuple[int, MockUpstream]]:
    """The gateway's proxy (no moderation) in front of a mock upstream, on the server protocol
    with these body settings: (port, mock)."""
    protocol = protocol_for(settings_from(**limits))
    with MockUpstream() as mock, run_app(make_app(Upstream(make_settings(mock.url))), http=protocol) as url:
        yield _port(url), mock


@pytest.fixture
def proxied() -> Iterator[tuple[int, MockUpstream]]:
    """A body due 0.5 s after its headers plus a second for each 100 bytes received."""
    with _proxy(body_timeout=0.5, body_min_rate=100) as proxy:
        yield proxy


def _trickle(port: int, pieces: int, piece: bytes, every: float) -> tuple[float | None, int]:
    """POST a body of `pieces` times `piece`, one piece each `every` seconds: (when the gateway
    closed the connection, counted from the headers, or None if it answered; pieces sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = (
            b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nX-User-ID: u1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        )
        sock.sendall(head % (pieces * len(piece)))
        started = time.monotonic()
        for sent in range(pieces):
            if select.select([sock], [], [], every)[0]:  # closed before the body ended
                with suppress(ConnectionResetError):  # a close with our bytes unread is a reset
                    assert sock.recv(65536) == b""
                return time.monotonic() - started, sent
            sock.sendall(piece)
        assert _read_all(sock).startswith(b"HTTP/1.1 ")
    return None, pieces


def test_a_body_below_the_minimum_rate_is_cut_at_its_deadline_and_never_reaches_the_upstream(
    proxied: tuple[int, MockUpstream],
) -> None:
    port, mock = proxied
    before = slow_clients("body_rate")
    with capture_logs() as logs:
        # 10 bytes a second against a minimum of 100: due at 0.5 s + bytes / 100, about 0.56 s,
        # long before its silence timeout (30 s) or its last byte (4 s).
        closed_at, sent = _trickle(port, 40, b"x", 0.1)
    assert closed_at is not None
    assert 0.45 <= closed_at < 1.5
    assert sent < 40
    time.sleep(0.2)  # the proxy's abort reaches the upstream
    assert mock.requests == []
    assert slow_clients("body_rate") == before + 1
    (cut,) = [line for line in logs if line["event"] == "slow client cut"]
    assert (cut["log_level"], cut["reason"], cut["client"]) == ("warning", "body_rate", "127.0.0.1")


def test_a_body_sent_steadily_above_the_minimum_rate_passes_however_long_it_takes(
    proxied: tuple[int, MockUpstream],
) -> None:
    port, mock = proxied
    # 250 bytes a second for 1.2 s: more than twice the 0.5 s every body gets, and each byte
    # sent buys a hundredth of a second more.
    closed_at, _ = _trickle(port, 12, b"y" * 25, 0.1)
    assert closed_at is None
    (request,) = mock.requests
    assert request.body == b"y" * 300


class HeldProtocol(GatewayHttpProtocol):
    """Quick deadlines; keeps its instances, so a test can see that reading was paused."""

    body_idle_timeout = 0.3
    body_timeout = 0.3
    body_min_rate = 1_000_000.0
    made: list[HeldProtocol] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pauses = 0
        HeldProtocol.made.append(self)

    def _reading_resumed(self, paused: float) -> None:
        self.pauses += 1
        super()._reading_resumed(paused)


async def slow_reader(request: Request) -> JSONResponse:
    # A consumer slower than the client, as when the upstream reads a streamed body slowly:
    # uvicorn stops reading the socket while the app has not taken what came.
    length = 0
    async for chunk in request.stream():
        length += len(chunk)
        await asyncio.sleep(0.4)  # longer than the silence timeout and the body's 0.3 s
    return JSONResponse({"length": length})


def test_a_body_the_server_holds_is_not_cut_for_it() -> None:
    HeldProtocol.made.clear()
    app = Starlette(routes=[Route("/slow-reader", slow_reader, methods=["POST"])])
    body = b"z" * 400_000  # at a million bytes a second, due in 0.7 s; read in well over that
    with (
        run_app(app, http=HeldProtocol) as url,
        socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as sock,
    ):
        started = time.monotonic()
        sock.sendall(b"POST /slow-reader HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = _json_answer(sock)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert answer.endswith(b'{"length":%d}' % len(body))
    (protocol,) = HeldProtocol.made
    assert protocol.pauses >= 2
    assert took > 1.0  # longer than the body's deadline and its silence timeout, had the pauses counted


async def read_later(request: Request) -> JSONResponse:
    await asyncio.sleep(0.6)  # the app asks for the body only now: uvicorn sends 100 Continue then
    return JSONResponse({"length": len(await request.body())})


async def read_soon(request: Request) -> JSONResponse:
    await asyncio.sleep(0.45)  # between the protocol's looks at 0.3 s and 0.6 s
    return JSONResponse({"length": len(await request.body())})


async def answer_at_once(request: Request) -> JSONResponse:
    return JSONResponse({"read": False})  # without reading the body, as a refusal does


@pytest.fixture
def quick_url() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/read-later", read_later, methods=["POST"]),
            Route("/read-soon", read_soon, methods=["POST"]),
            Route("/at-once", answer_at_once, methods=["POST"]),
        ]
    )
    with run_app(app, http=QuickProtocol, timeout_keep_alive=1) as base:
        yield base


def test_a_client_waiting_for_100_continue_is_not_cut_while_the_app_has_not_asked(quick_url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(quick_url)), timeout=5) as sock:
        sock.sendall(b"POST /read-later HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        answer = _json_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert answer.endswith(b'{"length":5}')


def test_a_client_gets_the_whole_silence_timeout_after_100_continue(quick_url: str) -> None:
    # 100 Continue goes out at 0.45 s; the protocol looks again at 0.6 s, before the body (sent
    # 0.25 s after the 100) has come: the client's time counts from the 100, not from the headers.
    with socket.create_connection(("127.0.0.1", _port(quick_url)), timeout=5) as sock:
        sock.sendall(b"POST /read-soon HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        time.sleep(0.25)
        sock.sendall(b"hello")
        answer = _json_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert answer.endswith(b'{"length":5}')


@pytest.mark.parametrize("rest", [b"d", b"d" * 97], ids=["body-stops", "body-ends"])
def test_a_body_still_coming_after_an_early_answer_does_not_hold_the_connection(quick_url: str, rest: bytes) -> None:
    # uvicorn reads the rest of such a body and drops it, to keep the connection, but never tells
    # when it has ended: the connection is closed once quiet for the keep-alive (1 s), as an idle one.
    before = slow_clients("body_silence")
    with socket.create_connection(("127.0.0.1", _port(quick_url)), timeout=5) as sock:
        sock.sendall(b"POST /at-once HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        assert _json_answer(sock).startswith(b"HTTP/1.1 200 OK")
        sock.sendall(rest)
        started = time.monotonic()
        with suppress(ConnectionResetError):
            assert sock.recv(65536) == b""
    assert 0.9 <= time.monotonic() - started < 2.5
    assert slow_clients("body_silence") == before  # not a slow client: the answer was sent


def test_a_minimum_rate_of_0_makes_the_body_timeout_a_whole_body_deadline() -> None:
    with _proxy(body_timeout=0.5, body_min_rate=0) as (port, mock):
        # The steady body that passes at a minimum of 100 bytes a second (above) takes 1.2 s.
        closed_at, _ = _trickle(port, 12, b"y" * 25, 0.1)
        time.sleep(0.2)  # the proxy's abort reaches the upstream
        assert mock.requests == []
    assert closed_at is not None
    assert 0.45 <= closed_at < 1.1


@contextmanager
def _serving(command: list[str], **variables: str) -> Iterator[int]:
    """The gateway run by `command` (with GATEWAY_PORT / --port set to a free port), ready: its port."""
    port = free_port()
    command = [arg.replace("{port}", str(port)) for arg in command]
    env = child_env(GATEWAY_PORT=str(port), GATEWAY_MODERATION="off", **variables)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with suppress(httpx2.TransportError):
                if httpx2.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(15)


def test_python_m_gateway_applies_the_body_settings_also_with_workers(database_url: str) -> None:
    # With several workers uvicorn pickles the protocol into each worker process (a class made
    # at run time could not be: no worker would start).
    with MockUpstream() as mock:
        command = [sys.executable, "-m", "gateway"]
        variables = {"GATEWAY_WORKERS": "2", "GATEWAY_BODY_TIMEOUT": "0.5", "GATEWAY_BODY_MIN_RATE": "100"}
        with _serving(command, DATABASE_URL=database_url, GATEWAY_UPSTREAM_URL=mock.url, **variables) as port:
            closed_at, _ = _trickle(port, 40, b"x", 0.1)
            time.sleep(0.2)  # the proxy's abort reaches the upstream
        assert mock.requests == []
    assert closed_at is not None
    assert 0.45 <= closed_at < 1.5


def _header_block_of_100_kb() -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("options", "status"),
    [(["--http", "gateway.server:GatewayHttpProtocol"], b"431"), ([], b"200")],
    ids=["with-the-protocol", "uvicorns-own"],
)
def test_uvicorn_runs_the_factory_with_the_server_limits_only_given_the_gateways_protocol(
    database_url: str, options: list[str], status: bytes
) -> None:
    command = [sys.executable, "-m", "uvicorn", "--factory", "gateway.app:create_app", "--port", "{port}", *options]
    with _serving(command, DATABASE_URL=database_url) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_header_block_of_100_kb())
        with suppress(ConnectionResetError):
            answer = _read_all(sock)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
