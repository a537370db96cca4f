"""Serve an ASGI app with a real uvicorn server on a loopback port, for tests.

The server runs in a background thread with its own event loop, so sync tests, async tests
and the sync OpenAI client can all talk to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import uvicorn

from middleware.asgi import ASGIApp, Receive, Scope, Send


@contextmanager
def run_app(
    app: ASGIApp,
    *,
    lifespan: Literal["auto", "on", "off"] = "on",
    startup_timeout: float = 15.0,
    shutdown_timeout: float = 5.0,
    **config: Any,
) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) and yield its base URL, e.g. `http://127.0.0.1:41234`.

    A failing lifespan startup raises RuntimeError here (chained to the app's exception)
    instead of hanging. `config` goes to `uvicorn.Config` (e.g. `timeout_graceful_shutdown`).
    Like the gateway's own server, it sends no `server`/`date` headers of its own by default,
    so an upstream's pass through without duplicates.
    """
    failures: list[BaseException] = []

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn only logs a lifespan failure; keep the exception to raise it in the test.
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            if scope["type"] == "lifespan":
                failures.append(exc)
            raise

    config.setdefault("log_level", "warning")
    config.setdefault("server_header", False)
    config.setdefault("date_header", False)
    config.setdefault("proxy_headers", False)
    config.setdefault("timeout_graceful_shutdown", shutdown_timeout)
    server = uvicorn.Server(uvicorn.Config(watched, lifespan=lifespan, **config))

    # Bind before starting, so the port is known and cannot be taken in between.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def serve() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # SystemExit on a startup failure included
            failures.append(exc)

    thread = threading.Thread(target=serve, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or failures:
                server.should_exit = True
                thread.join(shutdown_timeout)
                cause = failures[0] if failures else None
                raise RuntimeError(f"the app failed to start: {cause!r}") from cause
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the app did not start within {startup_timeout} s")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout + 5)
        sock.close()


def stop_process(process: subprocess.Popen[str], timeout: float = 30) -> str:
    """SIGTERM `process` if it still runs and wait for it (killed past `timeout`); its stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return stderr or ""
