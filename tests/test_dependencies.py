"""The dependencies' private names the code relies on: a new release that lacks one fails here, loudly.

pyproject.toml bounds each of these dependencies to the minor it was tested on; these tests say
what to look at when that bound is raised.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from importlib.metadata import version

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.transport import LeanTransport, SessionTransport, lean_problem, open_transport


def test_uvicorn_has_what_the_server_protocol_overrides_and_calls() -> None:
    # gateway/server.py: the httptools protocol's hooks it overrides or calls.
    for name in (
        "_start_asgi_task",
        "_unset_keepalive_if_required",
        "on_response_complete",
        "send_400_response",
        "data_received",
        "connection_made",
        "connection_lost",
    ):
        assert callable(getattr(HttpToolsProtocol, name, None)), (
            f"uvicorn {version('uvicorn')}: HttpToolsProtocol.{name} is gone; gateway/server.py relies on it"
        )
    # ... and the state it reads after each chunk (set in __init__ and per request).
    for name in (
        "cycle",
        "scope",
        "flow",
        "pipeline",
        "server_state",
        "timeout_keep_alive",
        "transport",
        "loop",
        "parser",
        "client",
    ):
        assert name in _assigned(HttpToolsProtocol.__init__, HttpToolsProtocol.connection_made), (
            f"uvicorn {version('uvicorn')}: HttpToolsProtocol no longer sets self.{name}; gateway/server.py reads it"
        )
    for name in ("scope", "more_body", "response_complete", "body", "waiting_for_100_continue"):
        assert name in _assigned(RequestResponseCycle.__init__), (
            f"uvicorn {version('uvicorn')}: RequestResponseCycle no longer sets self.{name}; gateway/server.py reads it"
        )
    # The flow control it replaces with one that times the pauses of reading.
    assert callable(getattr(FlowControl, "pause_reading", None)), f"uvicorn {version('uvicorn')}: FlowControl changed"
    assert callable(getattr(FlowControl, "resume_reading", None)), f"uvicorn {version('uvicorn')}: FlowControl changed"
    assert "read_paused" in _assigned(FlowControl.__init__), f"uvicorn {version('uvicorn')}: FlowControl changed"


def _assigned(*functions: Callable[..., object]) -> set[str]:
    """The attributes these methods assign on `self`."""
    source = "".join(inspect.getsource(function) for function in functions)
    return set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=(?!=)", source))


def test_starlette_mounts_match_on_the_compiled_pattern_the_app_replaces() -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount

    mount = Mount("/admin", app=PlainTextResponse("admin"))
    assert isinstance(getattr(mount, "path_regex", None), re.Pattern), (
        f"starlette {version('starlette')}: Mount.path_regex is gone; gateway/app.py _mount replaces it"
    )
    mount.path_regex = re.compile(mount.path_regex.pattern, re.DOTALL)
    match, _ = mount.matches({"type": "http", "path": "/admin/users/a\nb", "root_path": "", "method": "GET"})
    assert match.name == "FULL", "Mount.matches no longer reads path_regex: gateway/app.py _mount must change"


def test_prometheus_client_has_the_created_series_switch() -> None:
    from prometheus_client import metrics

    assert isinstance(getattr(metrics, "_use_created", None), bool), (
        f"prometheus-client {version('prometheus-client')}: metrics._use_created is gone; "
        "middleware/hotmetrics.py reads it"
    )


async def test_the_lean_upstream_hop_trusts_the_installed_aiohttp() -> None:
    assert lean_problem() is None, f"aiohttp {version('aiohttp')}: {lean_problem()}"
    import aiohttp

    transport = open_transport(limit=1, timeouts=aiohttp.ClientTimeout())
    try:
        assert isinstance(transport, LeanTransport)
    finally:
        await transport.session.close()


async def test_an_aiohttp_the_lean_hop_does_not_know_gets_the_public_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiohttp
    from structlog.testing import capture_logs

    import gateway.transport

    monkeypatch.setattr(gateway.transport, "version", lambda name: "3.99.0")
    assert lean_problem() == "aiohttp 3.99.0 is not the 3.14.x the lean hop was tested on"
    with capture_logs() as logs:
        transport = open_transport(limit=1, timeouts=aiohttp.ClientTimeout())
    try:
        assert isinstance(transport, SessionTransport)
    finally:
        await transport.session.close()
    assert [(log["event"], log["log_level"], log["reason"]) for log in logs] == [
        ("lean_upstream_hop_unavailable", "warning", "aiohttp 3.99.0 is not the 3.14.x the lean hop was tested on")
    ]
    monkeypatch.undo()
    monkeypatch.delattr(aiohttp.ClientRequest, "update_auto_headers")
    assert lean_problem() == "aiohttp's ClientRequest.update_auto_headers is missing"
