"""The streaming proxy over real loopback servers: uvicorn in front, the aiohttp mock behind."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import httpx2
import openai
import orjson
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.disconnects import Call, WatchList
from gateway.jsonpost import JsonPoster
from gateway.proxy import Upstream
from gateway.settings import Settings
from gateway.transport import _ResponseHandler
from middleware.protocols import DetectorFailed
from tests.servers import run_app
from tests.upstream import MockUpstream


@pytest.fixture
def mock(upstream: MockUpstream) -> MockUpstream:
    return upstream


_hop: list[str] = ["lean"]


@pytest.fixture(autouse=True, params=["lean", "public"])
def upstream_hop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every proxy test runs on both upstream hops (gateway/transport.py): aiohttp's lower steps and its public API."""
    _hop[0] = request.param
    yield request.param
    _hop[0] = "lean"


def make_settings(upstream_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "upstream_url": upstream_url,
        "moderation": "off",
        "upstream_hop": _hop[0],
        **overrides,
    }
    return Settings(**values)


def make_app(upstream: Upstream) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await upstream.start()
        try:
            yield
        finally:
            await upstream.close()

    return Starlette(routes=[Mount("/v1", app=upstream)], lifespan=lifespan)


@contextmanager
def gateway(upstream_url: str, **overrides: Any) -> Iterator[tuple[str, Upstream]]:
    upstream = Upstream(make_settings(upstream_url, **overrides))
    with run_app(make_app(upstream)) as url:
        yield url, upstream


def sdk(url: str, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-client", **kwargs)


def dead_port() -> socket.socket:
    """A bound socket that does not listen: connections to its port are refused until it does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_chat_completion_through_sdk(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        completion = sdk(url).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-User-ID": "u1"}
        )
    assert completion.choices[0].message.content == mock.reply
    assert completion.model == "gpt-4o-mini"
    request = mock.requests[-1]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.json()["messages"] == [{"role": "user", "content": "hi"}]


def test_responses_and_models_through_sdk(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        client = sdk(url)
        response = client.responses.create(model="gpt-4o-mini", input="hi")
        models = client.models.list()
    assert response.output_text == mock.reply
    assert [model.id for model in models] == ["gpt-mock"]


async def test_streaming_arrives_chunk_by_chunk(mock: MockUpstream) -> None:
    mock.chunk_delay = 0.3
    with gateway(mock.url) as (url, _):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-client", max_retries=0)
        arrivals: list[float] = []
        pieces: list[str] = []
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for chunk in stream:
            arrivals.append(time.monotonic())
            pieces.append(chunk.choices[0].delta.content or "")
        await client.close()
    assert "".join(pieces) == mock.reply
    assert len(arrivals) == mock.chunks + 1
    # 0.3 s between upstream chunks: a buffering proxy would deliver them in one burst.
    assert arrivals[-1] - arrivals[0] > 0.6
    assert arrivals[1] - arrivals[0] > 0.15


def test_streaming_through_sync_sdk(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        stream = sdk(url).completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True)
        text = "".join(chunk.choices[0].text for chunk in stream)
    assert text == mock.reply


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
def test_every_method_path_and_query_reaches_upstream(mock: MockUpstream, method: str) -> None:
    with gateway(mock.url) as (url, _):
        response = httpx2.request(
            method,
            f"{url}/v1/files/file-1%3Ax/content?limit=2&after=a%20b&tag=1&tag=2",
            headers={"X-Mock": "echo"},
            content=b"payload" if method in ("POST", "PUT", "PATCH") else None,
        )
    assert response.status_code == 200
    request = mock.requests[-1]
    assert request.method == method
    assert request.path == "/v1/files/file-1:x/content"
    assert request.query_string == "limit=2&after=a%20b&tag=1&tag=2"
    if method != "HEAD":
        assert response.json()["query"] == "limit=2&after=a%20b&tag=1&tag=2"
    if method in ("POST", "PUT", "PATCH"):
        assert request.body == b"payload"
        assert request.headers["Content-Length"] == "7"


def test_percent_encoding_of_the_path_is_kept(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        response = httpx2.get(f"{url}/v1/models/ft%3Agpt-4o%3Aacme%3A%3Aabc", headers={"X-Mock": "echo"})
    assert response.status_code == 200
    assert mock.requests[-1].raw_path == "/v1/models/ft%3Agpt-4o%3Aacme%3A%3Aabc"


def test_request_headers_are_filtered(mock: MockUpstream) -> None:
    with gateway(mock.url, openai_api_key="sk-upstream") as (url, _):
        response = httpx2.post(
            f"{url}/v1/chat/completions",
            headers={
                "Authorization": "Bearer sk-client",
                "X-User-ID": "alice",
                "Connection": "keep-alive, X-Named-Hop",
                "X-Named-Hop": "gone",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic eA==",
                "Proxy-Connection": "keep-alive",
                "TE": "trailers",
                "Trailer": "X-Checksum",
                "OpenAI-Organization": "org-1",
                "OpenAI-Beta": "assistants=v2",
                "User-Agent": "my-client/1.0",
                "Accept-Encoding": "br",
                "X-Mock": "echo",
            },
            content=b'{"model": "m"}',
        )
    assert response.status_code == 200
    headers = mock.requests[-1].headers
    for dropped in ("X-User-ID", "X-Named-Hop", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "TE"):
        assert dropped not in headers, dropped
    assert "Trailer" not in headers
    assert headers.get("Connection", "keep-alive") == "keep-alive"  # aiohttp's own, if any
    assert headers["Authorization"] == "Bearer sk-upstream"
    assert headers["Host"] == f"127.0.0.1:{mock.port}"
    assert next(iter(headers)) == "Host"  # first, as RFC 9110 asks of clients
    assert headers["OpenAI-Organization"] == "org-1"
    assert headers["OpenAI-Beta"] == "assistants=v2"
    assert headers["User-Agent"] == "my-client/1.0"
    assert headers.getall("Accept-Encoding") == ["br"]
    assert headers["Content-Length"] == "14"
    assert "Content-Type" not in headers  # aiohttp adds none of its own


def test_redirects_and_cookies_are_the_clients_business(mock: MockUpstream) -> None:
    """A 3xx goes back to the client as it came, Set-Cookie included; the gateway follows none and replays no cookie."""
    with gateway(mock.url) as (url, _), httpx2.Client(follow_redirects=False) as client:
        moved = client.get(f"{url}/v1/files", headers={"X-Mock": "redirect", "X-User-ID": "eve"})
        client.cookies.clear()
        after = client.get(f"{url}/v1/files", headers={"X-Mock": "echo", "X-User-ID": "eve"})
    assert (moved.status_code, moved.headers["Location"], moved.text) == (307, "/v1/models", "moved")
    assert moved.headers["Set-Cookie"] == "upstream-session=s1; Path=/"
    assert [request.path for request in mock.requests] == ["/v1/files", "/v1/files"]  # /v1/models never asked
    assert after.status_code == 200
    assert "Cookie" not in mock.requests[-1].headers


def test_no_header_is_added_that_the_client_did_not_send(mock: MockUpstream) -> None:
    """aiohttp would add User-Agent, Accept, Accept-Encoding and a Content-Type of its own: none goes upstream."""
    with gateway(mock.url) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        connection.putheader("X-User-ID", "dora")
        connection.putheader("Content-Length", "13")
        connection.endheaders(b'{"model":"m"}')
        assert connection.getresponse().status == 200
        connection.close()
    headers = mock.requests[-1].headers
    assert sorted(name.lower() for name in headers) == ["content-length", "host"]


def test_client_authorization_is_forwarded_without_openai_key(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        httpx2.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-client", "X-User-ID": "bob"})
    headers = mock.requests[-1].headers
    assert headers["Authorization"] == "Bearer sk-client"
    assert "X-User-ID" not in headers


def test_custom_user_header_is_dropped(mock: MockUpstream) -> None:
    with gateway(mock.url, user_header="X-End-User") as (url, _):
        httpx2.get(f"{url}/v1/models", headers={"x-end-user": "carol", "X-User-ID": "kept"})
    headers = mock.requests[-1].headers
    assert "X-End-User" not in headers
    assert headers["X-User-ID"] == "kept"


def test_response_status_and_headers_are_kept(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        direct = httpx2.get(f"{mock.url}/models", headers={"X-Mock": "hop-headers"})
        response = httpx2.get(f"{url}/v1/models", headers={"X-Mock": "hop-headers"})
    assert direct.headers["X-Upstream-Hop"] == "1"
    assert response.status_code == 200
    assert response.headers["X-Mock-Upstream"] == "1"
    assert response.headers["X-End-To-End"] == "1"
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == direct.headers["Content-Length"]
    assert response.headers.get_list("Server") == direct.headers.get_list("Server")
    assert len(response.headers.get_list("Date")) == 1
    assert "X-Upstream-Hop" not in response.headers
    assert "Keep-Alive" not in response.headers
    assert response.headers.get("Connection", "keep-alive") == "keep-alive"
    assert response.content == direct.content


def test_gzip_passes_through_byte_for_byte(mock: MockUpstream) -> None:
    headers = {"X-Mock": "gzip", "Accept-Encoding": "gzip"}
    with gateway(mock.url) as (url, _):
        with httpx2.stream("GET", f"{mock.url}/models", headers=headers) as direct:
            expected = b"".join(direct.iter_raw())
        with httpx2.stream("GET", f"{url}/v1/models", headers=headers) as response:
            raw = b"".join(response.iter_raw())
            encoding = response.headers["Content-Encoding"]
            length = response.headers["Content-Length"]
    assert encoding == "gzip"
    assert raw[:2] == b"\x1f\x8b"
    assert raw == expected
    assert length == str(len(expected))
    assert orjson.loads(__import__("gzip").decompress(raw))["object"] == "list"


def test_upstream_error_passes_through_unchanged(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        with pytest.raises(openai.RateLimitError) as caught:
            sdk(url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Mock": "status=429"}
            )
        direct = httpx2.get(f"{mock.url}/models", headers={"X-Mock": "status=500"})
        proxied = httpx2.get(f"{url}/v1/models", headers={"X-Mock": "status=500"})
    assert caught.value.status_code == 429
    assert caught.value.code == "mock_429"
    assert proxied.status_code == 500
    assert proxied.content == direct.content


def test_upstream_down_is_502_after_two_retries() -> None:
    sock = dead_port()
    before = counter("gateway_upstream_retries_total")
    with (
        gateway(f"http://127.0.0.1:{sock.getsockname()[1]}/v1") as (url, _),
        pytest.raises(openai.APIStatusError) as caught,
    ):
        sdk(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    sock.close()
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert counter("gateway_upstream_retries_total") - before == 2


def test_refused_connection_is_retried_until_the_upstream_listens() -> None:
    sock = dead_port()
    before = counter("gateway_upstream_retries_total")
    result: list[httpx2.Response] = []
    with gateway(f"http://127.0.0.1:{sock.getsockname()[1]}/v1") as (url, _):
        client = threading.Thread(
            target=lambda: result.append(httpx2.post(f"{url}/v1/chat/completions", json={"model": "m"}, timeout=10))
        )
        client.start()
        deadline = time.monotonic() + 5
        while counter("gateway_upstream_retries_total") == before and time.monotonic() < deadline:
            time.sleep(0.001)
        # The first attempt was refused; the upstream comes up while the proxy backs off.
        with MockUpstream(sock=sock) as late:
            client.join(10)
    assert result[0].status_code == 200
    assert result[0].json()["object"] == "chat.completion"
    assert len(late.requests) == 1
    assert counter("gateway_upstream_retries_total") - before >= 1


async def test_connection_dropped_after_sending_is_not_retried(upstream_hop: str) -> None:
    connections = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read(1)  # the request has begun to arrive
        writer.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(make_settings(f"http://127.0.0.1:{port}/v1"))
    try:
        with run_app(make_app(upstream)) as url:
            async with httpx2.AsyncClient() as client:
                post = await client.post(f"{url}/v1/chat/completions", json={"model": "m"})
                get = await client.get(f"{url}/v1/models")
    finally:
        server.close()
        await server.wait_closed()
    assert post.status_code == 502
    assert post.json()["error"]["code"] == "upstream_unavailable"
    assert get.status_code == 502
    if upstream_hop == "lean":
        assert connections == 2  # one each: neither the POST nor the idempotent GET was sent again
    else:
        # aiohttp's session.request resends an idempotent request once when the server drops it
        # (RFC 9112 9.3.1), and offers no public switch: documented for the public hop. Never a POST.
        assert connections == 3


def test_hang_past_read_timeout_is_504(mock: MockUpstream) -> None:
    with gateway(mock.url, read_timeout=0.5) as (url, _):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Mock": "hang"}
            )
        elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert 0.4 < elapsed < 5
    assert mock.disconnected.wait(2)  # the gateway let go of the hung upstream call


def test_connect_timeout_is_504() -> None:
    # A listening socket whose backlog is full: the SYN is never answered.
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(("127.0.0.1", server.getsockname()[1]))
        fillers.append(filler)
    try:
        with gateway(f"http://127.0.0.1:{server.getsockname()[1]}/v1", connect_timeout=0.2) as (url, _):
            response = httpx2.get(f"{url}/v1/models", timeout=10)
    finally:
        for filler in fillers:
            filler.close()
        server.close()
    if response.status_code == 502:
        pytest.skip("this kernel refuses instead of dropping SYNs to a full backlog")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_stalled_sse_ends_with_an_error_event(mock: MockUpstream) -> None:
    with gateway(mock.url, read_timeout=0.5) as (url, _):
        stream = sdk(url).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"X-Mock": "stall-after=2"},
        )
        received: list[Any] = []
        with pytest.raises(openai.APIError) as caught:
            received.extend(stream)
    assert len(received) == 2
    assert caught.value.code == "upstream_timeout"


def test_read_timeout_bounds_silence_not_the_whole_answer(mock: MockUpstream) -> None:
    # Chunks 0.15 s apart for about 1 s under a 0.4 s read timeout: each chunk moves the deadline.
    mock.chunks = 6
    with gateway(mock.url, read_timeout=0.4) as (url, _):
        started = time.monotonic()
        stream = sdk(url).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"X-Mock": "delay=0.15"},
        )
        received = list(stream)
        elapsed = time.monotonic() - started
    assert len(received) == 7  # six pieces and the final chunk: nothing cut
    assert elapsed > 0.8


async def test_read_timer_is_one_lazy_timer_per_connection() -> None:
    loop = asyncio.get_running_loop()
    handler = _ResponseHandler(loop)
    handler.set_response_params(read_timeout=0.2)
    fired: list[float] = []
    handler._on_read_timeout = lambda: fired.append(loop.time())  # type: ignore[method-assign]
    started = loop.time()
    handler.start_timeout()
    timer = handler._read_deadline.timer
    await asyncio.sleep(0.1)
    handler._reschedule_timeout()  # a chunk arrived: the deadline moves, the timer stays
    assert handler._read_deadline.timer is timer
    await asyncio.sleep(0.15)  # the first deadline has passed: the timer slept again
    assert fired == []
    await asyncio.sleep(0.1)
    assert len(fired) == 1
    assert fired[0] - started >= 0.29  # 0.2 s of silence after the last chunk (5 ms early is reached)
    handler.start_timeout()
    handler._drop_timeout()  # the answer ended: nothing fires
    await asyncio.sleep(0.25)
    assert len(fired) == 1
    handler.set_response_params(read_timeout=0.05)
    handler.start_timeout()
    handler.set_response_params(read_timeout=0.01)  # a shorter timeout is not held up by a later timer
    handler.start_timeout()
    await asyncio.sleep(0.03)
    assert len(fired) == 2
    handler.start_timeout()
    handler.connection_lost(None)  # a closed connection keeps no timer
    assert handler._read_deadline.timer is None


def test_sse_dropped_mid_stream_ends_with_an_error_event(mock: MockUpstream) -> None:
    with (
        gateway(mock.url) as (url, _),
        httpx2.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": "m", "stream": True},
            headers={"X-Mock": "drop-after=2"},
        ) as response,
    ):
        body = response.read()
    events = [line for line in body.split(b"\n\n") if line.strip()]
    assert len(events) == 3
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_unavailable"


def test_small_body_dropped_mid_way_is_502(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        response = httpx2.get(f"{url}/v1/models", headers={"X-Mock": "drop-after"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


def test_large_body_dropped_mid_way_is_cut(mock: MockUpstream) -> None:
    headers = {"X-Mock": "large=400000,drop-after"}
    with gateway(mock.url) as (url, _), httpx2.stream("GET", f"{url}/v1/files/f/content", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["Content-Length"] == "400000"
        with pytest.raises(httpx2.RemoteProtocolError):
            response.read()


def test_large_body_streams_whole(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        response = httpx2.get(f"{url}/v1/files/f/content", headers={"X-Mock": "large=3000000"})
    assert response.status_code == 200
    assert len(response.content) == 3000000
    assert response.content[:16] == b"0123456789abcdef"


def test_client_disconnect_mid_stream_closes_upstream(mock: MockUpstream) -> None:
    with gateway(mock.url, read_timeout=30) as (url, _):
        with httpx2.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": "m", "stream": True},
            headers={"X-Mock": "stall-after=1"},
        ) as response:
            first = next(response.iter_raw())
            assert first.startswith(b"data: ")
        left = time.monotonic()
        assert mock.disconnected.wait(3)
    assert mock.disconnect_times[0] - left < 1.0


def test_client_disconnect_before_headers_closes_upstream(mock: MockUpstream) -> None:
    with gateway(mock.url, read_timeout=30) as (url, _):
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.get(f"{url}/v1/models", headers={"X-Mock": "hang"}, timeout=0.3)
        left = time.monotonic()
        assert mock.disconnected.wait(3)
    assert mock.disconnect_times[0] - left < 1.0


class _CountingLoop:
    """The running loop, counting the timers armed through it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers = 0

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self.loop.call_later(delay, callback, *args)


async def test_watch_list_watches_only_calls_still_running() -> None:
    loop = _CountingLoop(asyncio.get_running_loop())
    watchlist = WatchList(after=0.05)
    task = asyncio.current_task()
    assert task is not None

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    calls = [Call(None, receive, task) for _ in range(200)]
    for call in calls:
        watchlist.add(call, loop)  # type: ignore[arg-type]
    for call in calls[::2]:
        call.unwatch()  # these ended before their moment
    assert [call.watcher for call in calls] == [None] * 200
    await asyncio.sleep(0.03)
    assert all(call.watcher is None for call in calls)  # not before the delay
    await asyncio.sleep(0.1)  # past twice the delay: every call still running is watched
    assert all(call.watcher is None for call in calls[::2])
    assert all(call.watcher is not None for call in calls[1::2])
    assert loop.timers == 2  # one tick to age them, one to watch them: not a timer per call
    late = Call(None, receive, task)
    watchlist.add(late, loop)  # type: ignore[arg-type]  # the list was idle: it ticks again
    await asyncio.sleep(0.03)
    assert late.watcher is None
    await asyncio.sleep(0.1)
    assert late.watcher is not None
    assert loop.timers == 4
    for call in [*calls, late]:
        call.unwatch()
    watchlist.close()


async def test_a_call_that_ended_lets_go_of_the_request_while_the_watch_list_keeps_it() -> None:
    # The list keeps a call until its second tick (0.1 to 0.2 s); the request behind it (uvicorn's
    # cycle through `receive`, the call's task) must not live that long after the answer.
    watchlist = WatchList(after=60)
    task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
    await task

    class Receive:
        async def __call__(self) -> dict[str, Any]:
            raise AssertionError

    receive = Receive()
    held = weakref.ref(receive)
    call = Call(None, receive, task)
    watchlist.add(call, asyncio.get_running_loop())
    del receive
    assert held() is not None  # the running call holds its request
    call.unwatch()
    assert held() is None  # gone with the answer, though the list still holds the call
    assert call.task is None
    call.watch()  # a tick reaching the ended call starts nothing
    assert call.watcher is None
    watchlist.close()


def test_circuit_opens_then_a_probe_closes_it() -> None:
    sock = dead_port()
    port = sock.getsockname()[1]
    with gateway(f"http://127.0.0.1:{port}/v1", circuit_failures=2, circuit_cooldown=0.5) as (url, upstream):
        client = sdk(url)

        def call() -> httpx2.Response:
            return httpx2.post(f"{url}/v1/chat/completions", json={"model": "m"}, timeout=10)

        assert [call().status_code for _ in range(2)] == [502, 502]
        assert upstream.circuit_open
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503
        assert caught.value.code == "upstream_circuit_open"
        assert caught.value.response.headers["Retry-After"] == "1"

        time.sleep(0.55)
        # After the cool-down a TCP probe decides, not this call: it failed, so open again.
        assert call().status_code == 503
        assert call().status_code == 503

        time.sleep(0.55)
        with MockUpstream(sock=sock) as late:
            trial = call()
            after = call()
    assert trial.status_code == 200
    assert after.status_code == 200
    assert not upstream.circuit_open
    assert len(late.requests) == 2


def test_a_slow_body_after_the_cool_down_does_not_hold_the_circuit_open() -> None:
    # The first call after the cool-down once was the trial: a body trickled for half a minute
    # kept the circuit open for everyone while the upstream was healthy.
    sock = dead_port()
    port = sock.getsockname()[1]
    with gateway(f"http://127.0.0.1:{port}/v1", circuit_failures=1, circuit_cooldown=0.3) as (url, upstream):
        assert httpx2.post(f"{url}/v1/files", content=b"x", timeout=10).status_code == 502
        assert upstream.circuit_open
        time.sleep(0.35)
        with MockUpstream(sock=sock) as late:
            release = threading.Event()

            def trickle() -> Iterator[bytes]:
                yield b"first"
                release.wait(10)
                yield b"last"

            slow: list[httpx2.Response] = []
            thread = threading.Thread(
                target=lambda: slow.append(
                    httpx2.post(f"{url}/v1/files", content=trickle(), headers={"X-Mock": "echo"}, timeout=15)
                )
            )
            thread.start()
            time.sleep(0.2)  # the slow call is past the circuit and sending its body
            started = time.monotonic()
            quick = httpx2.get(f"{url}/v1/models", timeout=10)
            waited = time.monotonic() - started
            release.set()
            thread.join(15)
    assert quick.status_code == 200
    assert waited < 2  # not held until the slow body ended
    assert slow[0].status_code == 200
    assert not upstream.circuit_open
    assert [request.path for request in late.requests] == ["/v1/models", "/v1/files"]


def test_content_length_over_the_limit_is_413(mock: MockUpstream) -> None:
    with gateway(mock.url, max_body_bytes=1000) as (url, _):
        response = httpx2.post(f"{url}/v1/files", content=b"x" * 2000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert mock.requests == []


def test_chunked_body_over_the_limit_is_413(mock: MockUpstream) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 300
            time.sleep(0.01)

    with gateway(mock.url, max_body_bytes=1000) as (url, _):
        response = httpx2.post(f"{url}/v1/files", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert all(len(request.body) <= 1000 for request in mock.requests)


def test_chunked_body_streams_upstream(mock: MockUpstream) -> None:
    def chunks() -> Iterator[bytes]:
        for index in range(3):
            yield bytes([65 + index]) * 300
            time.sleep(0.01)

    with gateway(mock.url, max_body_bytes=1000) as (url, _):
        response = httpx2.post(f"{url}/v1/files", content=chunks(), headers={"X-Mock": "echo"})
    assert response.status_code == 200
    assert mock.requests[-1].body == b"A" * 300 + b"B" * 300 + b"C" * 300
    assert mock.requests[-1].headers["Transfer-Encoding"] == "chunked"


def test_upstream_seconds_reach_the_request_state(mock: MockUpstream) -> None:
    upstream = Upstream(make_settings(mock.url))
    seen: dict[str, Any] = {}

    async def with_state(scope: Any, receive: Any, send: Any) -> None:
        scope["state"] = seen
        await app(scope, receive, send)

    app = make_app(upstream)
    with run_app(with_state) as url:
        assert httpx2.get(f"{url}/v1/models", headers={"X-Mock": "slow-headers=0.2"}).status_code == 200
    assert 0.15 < seen["upstream_seconds"] < 5


async def test_post_json(mock: MockUpstream) -> None:
    upstream = Upstream(make_settings(mock.url))
    await upstream.start()
    post = JsonPoster(lambda: upstream.session)
    try:
        body = orjson.dumps({"model": "omni-moderation-latest", "input": "a forbidden thing"})
        status, data = await post(f"{mock.url}/moderations", body, {"Authorization": "Bearer k"}, 5)
        assert status == 200
        result = orjson.loads(data)["results"][0]
        assert result["flagged"] is True
        assert result["categories"]["violence"] is True
        assert mock.requests[-1].headers["Authorization"] == "Bearer k"
        assert mock.requests[-1].headers["Content-Type"] == "application/json"

        mock.behaviors["/v1/moderations"] = "hang"
        with pytest.raises(DetectorFailed):
            await post(f"{mock.url}/moderations", body, {}, 0.3)
        sock = dead_port()
        with pytest.raises(DetectorFailed):
            await post(f"http://127.0.0.1:{sock.getsockname()[1]}/v1/moderations", body, {}, 1)
        sock.close()
    finally:
        await upstream.close()


def test_keep_alive_connection_serves_many_calls(mock: MockUpstream) -> None:
    mock.chunk_delay = 0.01
    with gateway(mock.url) as (url, _), httpx2.Client(base_url=url) as client:
        for _ in range(3):
            assert client.get("/v1/models").json()["object"] == "list"
            with client.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True}) as response:
                assert response.read().endswith(b"data: [DONE]\n\n")
            assert client.post("/v1/chat/completions", json={"model": "m"}).status_code == 200
    assert len(mock.requests) == 9


async def test_concurrent_calls(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        async with httpx2.AsyncClient(base_url=url) as client:
            responses = await asyncio.gather(
                *(client.post("/v1/chat/completions", json={"model": f"m{i}"}) for i in range(40))
            )
    assert [response.json()["model"] for response in responses] == [f"m{i}" for i in range(40)]


def test_large_body_with_content_length_streams_upstream(mock: MockUpstream) -> None:
    body = bytes(range(256)) * 2000
    with gateway(mock.url) as (url, _):
        response = httpx2.post(f"{url}/v1/files", content=body, headers={"X-Mock": "echo"})
    assert response.status_code == 200
    assert mock.requests[-1].body == body
    assert mock.requests[-1].headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in mock.requests[-1].headers


def test_client_gone_during_upload_leaves_the_gateway_serving(mock: MockUpstream) -> None:
    with gateway(mock.url) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n")
            time.sleep(0.2)
        time.sleep(0.2)
        assert httpx2.get(f"{url}/v1/models").status_code == 200
    assert [request.path for request in mock.requests] == ["/v1/models"]


def test_run_app_raises_when_the_app_fails_to_start() -> None:
    @asynccontextmanager
    async def broken(app: Starlette) -> AsyncIterator[None]:
        raise OSError("no database")
        yield

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="failed to start") as caught, run_app(Starlette(lifespan=broken)):
        pass
    assert isinstance(caught.value.__cause__, OSError)
    assert time.monotonic() - started < 5


def test_a_method_override_never_reaches_the_upstream(mock: MockUpstream) -> None:
    # An upstream that honoured it would serve a GET the gateway did not judge as a POST.
    with gateway(mock.url) as (url, _):
        headers = {"X-HTTP-Method-Override": "POST", "X-HTTP-Method": "POST", "X-Method-Override": "POST"}
        response = httpx2.get(f"{url}/v1/models", headers={**headers, "X-Mock": "echo"})
    assert response.status_code == 200
    forwarded = mock.requests[-1].headers
    assert not {name for name in headers if name in forwarded}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_get_or_head_with_a_body_is_refused(mock: MockUpstream, method: str) -> None:
    # RFC 9110 9.3.1: a GET's body has no meaning; an upstream reading it as a request of its own
    # would get one the gateway never judged.
    with gateway(mock.url) as (url, _):
        answer = httpx2.request(method, f"{url}/v1/chat/completions", content=b'{"model": "m", "messages": []}')
        plain = httpx2.request(method, f"{url}/v1/models", headers={"X-Mock": "echo"})
    assert answer.status_code == 400
    if method == "GET":
        assert answer.json()["error"]["code"] == "invalid_request"
    assert plain.status_code == 200
    assert [request.method for request in mock.requests] == [method]
