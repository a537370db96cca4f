"""The server protocol's limits: header size, header deadline, body silence; and nothing lost for good clients."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
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


@pytest.fixture
def url() -> Iterator[str]:
    app = Starlette(routes=[Route("/echo", echo_length, methods=["POST"])])
    with run_app(app, http=QuickProtocol) as base:
        yield base


def _reply(sock: socket.socket) -> tuple[bytes, dict[str, Any]]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_oversized_headers_get_431(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)
        status, body = _reply(sock)
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert body["error"]["code"] == "request_headers_too_large"


def test_headers_that_never_finish_get_408(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        status, body = _reply(sock)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert body["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 3


def test_a_silent_connection_is_closed(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        status, _ = _reply(sock)
    assert status.startswith(b"HTTP/1.1 408")


def test_a_body_that_stops_arriving_is_cut(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed without an answer: the app saw a disconnect
    assert time.monotonic() - started < 3


def test_large_bodies_and_keep_alive_still_work(url: str) -> None:
    with httpx2.Client() as client:
        big = client.post(f"{url}/echo", content=b"x" * 1_000_000)
        small = client.post(f"{url}/echo", content=b"y" * 10)
        time.sleep(0.5)  # longer than the header deadline: an idle kept-alive connection is not refused
        again = client.post(f"{url}/echo", content=b"z")
    assert big.json() == {"length": 1_000_000}
    assert small.json() == {"length": 10}
    assert again.json() == {"length": 1}
