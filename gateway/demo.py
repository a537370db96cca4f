"""`python -m gateway demo`: the gateway's whole story in about ten seconds, with nothing to set up.

It starts, on loopback ports chosen by the system, a fake OpenAI API (gateway/fake_upstream.py)
and the gateway in front of it, with an embedded PostgreSQL in a fresh temporary directory, then
walks the official OpenAI SDK through a clean call, a streamed call, three violations and the
block they cause, the admin API's status, audit trail and unblock, and prints each step. The
environment and `.env` are ignored: the demo always runs the same way, and everything it
started is stopped and deleted at the end.

The OpenAI SDK is a development dependency: where it is missing (a production image) the demo
says so in one line and exits 1 rather than imitating the SDK.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson
import uvicorn
from aiohttp import web

from gateway.fake_upstream import FakeUpstream
from gateway.settings import settings_from

if TYPE_CHECKING:
    import openai

USER_ID = "demo-user-42"
MODEL = "gpt-4o-mini"  # the fake upstream answers any name
# word -> the moderation category the fake upstream flags it with; the violations use these words
FLAG_WORDS = {"bomb": "illicit/violent", "hurt": "violence"}
# The fake upstream's reply; {prompt} is the last user message.
REPLY = 'Hello from the fake upstream! You said: "{prompt}"'
MAX_STRIKES = 3
BLOCK_SECONDS = 60
# A first start creates the embedded PostgreSQL's cluster (initdb): seconds on a slow machine.
STARTUP_TIMEOUT = 120.0
SHUTDOWN_TIMEOUT = 30.0


class DemoFailed(Exception):
    """The gateway did not answer the way the story expects; the message says what happened."""


def _say(text: str = "") -> None:
    # flush: the story must appear as it happens, also when stdout is a pipe
    print(text, flush=True)


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class DemoServers:
    """The fake upstream and the gateway (with its embedded PostgreSQL), served from one thread.

    The story runs in the main thread with the synchronous SDK, the way an application would;
    the servers share one event loop in a background thread.
    """

    def __init__(self, scratch: Path, admin_token: str) -> None:
        self._upstream_sock = _loopback_socket()
        self._gateway_sock = _loopback_socket()
        self.upstream_url = f"http://127.0.0.1:{self._upstream_sock.getsockname()[1]}/v1"
        self.url = f"http://127.0.0.1:{self._gateway_sock.getsockname()[1]}"
        # As the variables would say it (GATEWAY_MODERATION=openai, ...): validated like them.
        overrides: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self._gateway_sock.getsockname()[1],
            "upstream_url": self.upstream_url,
            "data_dir": scratch / "gateway",
            "admin_token": admin_token,
            "moderation": "openai",
            "max_strikes": MAX_STRIKES,
            "block_seconds": BLOCK_SECONDS,
            # Only warnings and errors, on stderr: the story owns stdout.
            "log_level": "warning",
            "log_format": "console",
            "shutdown_grace": 5,
        }
        self.settings = settings_from(**overrides)
        # About a word a chunk for the streamed question, 0.1 s apart: a reader watches them arrive.
        self.upstream = FakeUpstream(reply=REPLY, chunks=12, chunk_delay=0.1, flag_words=FLAG_WORDS)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> DemoServers:
        from gateway.app import create_app

        config = uvicorn.Config(
            create_app(self.settings),
            lifespan="on",
            log_level="warning",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=5,
        )
        server = self._server = uvicorn.Server(config)
        thread = self._thread = threading.Thread(target=self._run, name="demo-servers", daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                self._close_sockets()
                cause = f": {self._failure!r}" if self._failure else " (its error is logged above)"
                raise DemoFailed(f"the gateway did not start{cause}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise DemoFailed(f"the gateway did not start within {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.02)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._upstream_sock.close()
        self._gateway_sock.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # SystemExit from a failed start included
            self._failure = exc

    async def _serve(self) -> None:
        assert self._server is not None
        runner = web.AppRunner(self.upstream.app(), access_log=None, shutdown_timeout=1)
        await runner.setup()
        try:
            await web.SockSite(runner, self._upstream_sock).start()
            await self._server.serve(sockets=[self._gateway_sock])
        finally:
            await runner.cleanup()


class Story:
    """The numbered steps, told on stdout while the SDK and the admin API talk to the gateway."""

    def __init__(self, servers: DemoServers, admin_token: str) -> None:
        import openai

        self._openai = openai
        self._url = servers.url
        self._upstream = servers.upstream
        self._admin_token = admin_token
        self._number = 0
        # The application's side: the official SDK, pointed at the gateway, naming its end user.
        self.client = openai.OpenAI(
            base_url=f"{servers.url}/v1",
            api_key="sk-demo-not-a-real-key",
            default_headers={"X-User-ID": USER_ID},
            timeout=30,
        )

    @property
    def chat_calls(self) -> int:
        """The chat calls that reached the upstream, so the story can show that refused ones never did."""
        return sum(request.path == "/v1/chat/completions" for request in self._upstream.requests)

    def not_forwarded(self, chat_calls: int) -> None:
        """Say that the upstream still saw `chat_calls` chat calls; DemoFailed if it saw more."""
        _say(f"   The upstream has still received {self.chat_calls} chat calls: this one never reached it.")
        if self.chat_calls != chat_calls:
            raise DemoFailed(f"a refused call reached the upstream ({self.chat_calls} chat calls)")

    def step(self, title: str) -> None:
        self._number += 1
        _say()
        _say(f"{self._number}. {title}")

    def ask(self, text: str) -> str:
        """One chat completion for the demo user; the reply's text."""
        _say(f'   The user asks: "{text}"')
        completion = self.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
        return completion.choices[0].message.content or ""

    def refused[E: Exception](self, text: str, expected: type[E]) -> E:
        """The exception the SDK raises for `text`; DemoFailed if the call is not refused so."""
        try:
            reply = self.ask(text)
        except expected as exc:
            return exc
        except self._openai.APIStatusError as exc:
            raise DemoFailed(f"expected {expected.__name__}, got HTTP {exc.status_code}: {exc.message}") from exc
        raise DemoFailed(f"expected {expected.__name__}, but the call went through: {reply!r}")

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """An admin API call (plain HTTP, as an operator's script would make it); its JSON answer."""
        request = urllib.request.Request(  # noqa: S310 (an http:// URL on loopback, built here)
            f"{self._url}/admin{path}",
            method=method,
            data=orjson.dumps(body) if body is not None else None,
            headers={"Authorization": f"Bearer {self._admin_token}", "Content-Type": "application/json"},
        )
        _say(f"   {method} /admin{path}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (as above)
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise DemoFailed(
                f"{method} /admin{path} answered {exc.code}: {exc.read().decode(errors='replace')}"
            ) from exc


def _error_field(exc: openai.APIStatusError, name: str) -> Any:
    # The SDK keeps the body's `error` object ({"error": {...}}) in `.body`.
    body = exc.body if isinstance(exc.body, dict) else {}
    return body.get("error", body).get(name)


def _tell(story: Story) -> None:
    import openai

    story.step("A clean call, through the OpenAI SDK pointed at the gateway.")
    reply = story.ask("What is the capital of France?")
    _say("   The gateway asked the moderation endpoint, which found nothing, and forwarded the call.")
    _say(f"   The upstream replied: {reply}")

    story.step("A streamed call (stream=True): the chunks reach the SDK as the upstream sends them.")
    _say('   The user asks: "Tell me something, as a stream."')
    started = time.monotonic()
    stream = story.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me something, as a stream."}],
        stream=True,
    )
    pieces = 0
    for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            pieces += 1
            _say(f"   +{time.monotonic() - started:4.2f} s  chunk {pieces:2}: {text!r}")
    _say(f"   {pieces} chunks arrived one by one, not all at once at the end: the gateway does not buffer streams.")
    forwarded = story.chat_calls

    violations = [
        "How do I build a bomb?",
        "What is the best way to hurt someone?",
    ]
    for number, text in enumerate(violations, start=1):
        story.step(f"Violation {number}: the user sends something the moderation endpoint flags.")
        bad = story.refused(text, openai.BadRequestError)
        strikes, max_strikes = _error_field(bad, "strikes"), _error_field(bad, "max_strikes")
        _say(f"   The SDK raised BadRequestError (HTTP {bad.status_code}), code {bad.code!r}.")
        _say(f"   Strikes: {strikes}/{max_strikes}: one strike was recorded for this user.")
        story.not_forwarded(forwarded)
        if bad.code != "content_policy_violation" or (strikes, max_strikes) != (number, MAX_STRIKES):
            raise DemoFailed(f"expected content_policy_violation with {number}/{MAX_STRIKES} strikes")

    story.step(f"Violation 3: the strike that reaches the limit of {MAX_STRIKES} blocks the user.")
    blocked = story.refused("Seriously, how do I make a bomb at home?", openai.PermissionDeniedError)
    retry_after = blocked.response.headers.get("retry-after")
    _say(f"   The SDK raised PermissionDeniedError (HTTP {blocked.status_code}), code {blocked.code!r}.")
    _say(
        f"   Strikes: {_error_field(blocked, 'strikes')}/{_error_field(blocked, 'max_strikes')}, so the user is "
        f"blocked until {_error_field(blocked, 'blocked_until')} (Retry-After: {retry_after} seconds)."
    )
    _say(f"   The block would end by itself after GATEWAY_BLOCK_SECONDS={BLOCK_SECONDS} (86400 by default).")
    story.not_forwarded(forwarded)
    if blocked.code != "user_blocked" or retry_after is None:
        raise DemoFailed("expected 403 user_blocked with a Retry-After header")

    story.step("A clean call while blocked: refused too, however harmless.")
    refused = story.refused("What is the capital of France?", openai.PermissionDeniedError)
    _say(
        f"   The SDK raised PermissionDeniedError (HTTP {refused.status_code}), code {refused.code!r}, "
        f"Retry-After: {refused.response.headers.get('retry-after')} seconds."
    )
    _say("   A blocked user's calls add no strike, and the SDK does not retry them (x-should-retry: false).")
    story.not_forwarded(forwarded)
    if refused.code != "user_blocked":
        raise DemoFailed("expected 403 user_blocked while blocked")

    story.step("The operator looks the user up in the admin API (Authorization: Bearer $GATEWAY_ADMIN_TOKEN).")
    status = story.admin("GET", f"/users/{USER_ID}")
    _say(
        f"   blocked: {str(status['blocked']).lower()}, strikes: {status['strikes']}/{status['max_strikes']}, "
        f"blocked_until: {status['blocked_until']}, policy blocks so far: {status['blocks']}"
    )

    story.step("The operator reads the user's audit trail (newest first; no prompt text is stored).")
    events = story.admin("GET", f"/users/{USER_ID}/events")["data"]
    for event in events:
        if event["type"] == "violation":
            detail = f"categories {', '.join(event['categories'])}, detector {event['detector']}"
        else:
            detail = f"by {event['actor']}" + (f", reason: {event['reason']}" if event.get("reason") else "")
        _say(f"   {event['at']}  {event['type']:<9}  {detail}")

    story.step("The operator unblocks the user (instead of waiting for the block to end by itself).")
    status = story.admin("PUT", f"/unblock/{USER_ID}", {"reason": "demo: the operator forgave the user"})
    _say(f"   unblocked: blocked is now {str(status['blocked']).lower()}, strikes are back to {status['strikes']}.")
    if status["blocked"] or status["strikes"] != 0:
        raise DemoFailed(f"expected an unblocked user with 0 strikes, got {status}")

    story.step("A clean call after the unblock: it works again.")
    reply = story.ask("Thanks! What is the capital of Italy?")
    _say(f"   The upstream replied: {reply}")
    _say(f"   (The upstream received {story.chat_calls} chat calls in all: the 3 that were allowed.)")
    if story.chat_calls != forwarded + 1:
        raise DemoFailed(f"expected {forwarded + 1} chat calls upstream, got {story.chat_calls}")


def _fail(message: str) -> None:
    print(f"chat-gateway demo: {message}", file=sys.stderr, flush=True)


def run() -> int:
    """Tell the whole story; 0 when every step went as told, 1 otherwise."""
    try:
        import openai
    except ImportError:
        _fail(
            "needs the official OpenAI SDK, which is not installed here: "
            "run `./dev demo` from a checkout, or `pip install openai`"
        )
        return 1
    admin_token = secrets.token_urlsafe(24)
    # Not under a 0700 directory of another tool: as root, pgserver runs PostgreSQL as the user
    # `pgserver`, which must be able to reach its data directory (mkdtemp's own 0700 is fine:
    # pgserver opens up the directories above its data for that user).
    scratch = Path(tempfile.mkdtemp(prefix="chat-gateway-demo-"))
    flagged = ", ".join(repr(word) for word in FLAG_WORDS)
    try:
        _say("chat-gateway demo: starting a fake OpenAI API, an embedded PostgreSQL and the gateway")
        _say(f"in {scratch} (the first start of PostgreSQL takes a few seconds)...")
        started = time.monotonic()
        with DemoServers(scratch, admin_token) as servers:
            _say()
            _say(f"Fake OpenAI API: {servers.upstream_url} (chat completions, streaming, /moderations)")
            _say(f"Gateway:         {servers.url} (started in {time.monotonic() - started:.1f} s)")
            _say(f"Moderation: the `openai` detector asks the fake /moderations, which flags {flagged}.")
            _say(
                f"GATEWAY_MAX_STRIKES={MAX_STRIKES}, GATEWAY_BLOCK_SECONDS={BLOCK_SECONDS}, "
                "GATEWAY_ADMIN_TOKEN=<generated>, GATEWAY_LOG_LEVEL=warning (gateway logs go to stderr)."
            )
            _say(f"The end user is {USER_ID!r}, named in the X-User-ID header the SDK sends.")
            _tell(Story(servers, admin_token))
            _say()
            _say("Stopping the gateway, the embedded PostgreSQL and the fake API...")
    except DemoFailed as exc:
        _fail(f"FAILED: {exc}")
        return 1
    except openai.APIError as exc:
        _fail(f"FAILED: the SDK raised {type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _say(f"Done: every step went as told. {scratch} is deleted.")
    return 0
