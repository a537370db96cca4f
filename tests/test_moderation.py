"""The moderation middleware in process, driven with raw ASGI messages, on a real Store."""

import hashlib
import hmac
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.database import Database
from gateway.store import Policy, Store
from middleware.asgi import Message, Receive, Scope, Send
from middleware.budgets import ByteBudget
from middleware.detectors import RulesDetector
from middleware.moderation import ModerationMiddleware
from middleware.protocols import Detector, DetectorFailed, InputRefused, StrikeStore, UserInput, Verdict
from tests.conftest import SettingsFactory

CHAT = "/v1/chat/completions"


@dataclass
class Inner:
    """The app behind the middleware: records what reached it and answers 200."""

    scopes: list[Scope] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    chunks: list[list[bytes]] = field(default_factory=list)
    after_body: list[Message] = field(default_factory=list)
    wait_for_disconnect: bool = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            self.scopes.append(scope)
            return
        self.scopes.append(scope)
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        self.chunks.append(chunks)
        self.bodies.append(b"".join(chunks))
        if self.wait_for_disconnect:
            self.after_body.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"inner"})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    state: dict[str, Any]

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = orjson.loads(self.body)["error"]
        return error


async def call(
    app: ModerationMiddleware,
    *,
    method: str = "POST",
    path: str = CHAT,
    user: bytes | None = b"alice",
    body: bytes | Sequence[bytes] = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    content_length: bool = True,
) -> Answer:
    chunks = [body] if isinstance(body, bytes) else list(body)
    raw_headers = [(b"host", b"gateway"), *headers]
    if user is not None:
        raw_headers.append((b"x-user-id", user))
    if content_length:
        raw_headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw_headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    assert start["type"] == "http.response.start"
    return Answer(
        status=start["status"],
        headers={key.decode(): value.decode() for key, value in start["headers"]},
        body=b"".join(message.get("body", b"") for message in sent[1:]),
        state=scope["state"],
    )


def chat(*texts: str, **extra: Any) -> bytes:
    return orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": t} for t in texts], **extra})


@pytest.fixture
def rules(tmp_path: Path) -> RulesDetector:
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\ncategory = "violence"\npattern = "forbidden"\nname = "no-forbidden"\n')
    return RulesDetector(path)


def middleware(
    inner: Inner,
    store: StrikeStore,
    detectors: Sequence[Detector],
    *,
    max_body_bytes: int = 10_000,
    moderation_failure: Literal["closed", "open"] = "closed",
    store_failure: Literal["closed", "open"] = "closed",
    enforcement: Literal["enforce", "shadow"] = "enforce",
    safety_salt: bytes | None = None,
) -> ModerationMiddleware:
    return ModerationMiddleware(
        inner,
        store=store,
        detectors=detectors,
        user_header="X-User-ID",
        max_body_bytes=max_body_bytes,
        max_strikes=3,
        moderation_failure=moderation_failure,
        store_failure=store_failure,
        enforcement=enforcement,
        safety_salt=safety_salt,
        path_prefix="/v1",
    )


class Failing:
    """A detector that cannot judge, like an unreachable moderation endpoint."""

    name = "failing"
    cost = -1

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        raise DetectorFailed("the moderation endpoint did not answer")


@dataclass
class Recording:
    """A detector that flags nothing and remembers what it was asked."""

    name: str = "recording"
    cost: int = 100
    seen: list[tuple[UserInput, str | None]] = field(default_factory=list)

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        self.seen.append((user_input, authorization))
        return None


@pytest.fixture
def unavailable_store(settings_factory: SettingsFactory) -> Store:
    """A Store whose database was never opened: every call raises StoreUnavailable."""
    settings = settings_factory()
    return Store(Database(settings), Policy.from_settings(settings))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- user header -------------------------------------------------------------------------------


async def test_non_http_scopes_and_other_paths_pass_straight_through(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [])
    await app({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    answer = await call(app, method="GET", path="/healthz", user=None)
    assert answer.status == 200
    assert "user_id" not in answer.state
    assert len(inner.scopes) == 2


async def test_missing_user_header_is_refused(store: Store) -> None:
    inner = Inner()
    answer = await call(middleware(inner, store, []), method="GET", path="/v1/models", user=None)
    assert answer.status == 400
    assert answer.error["code"] == "missing_user_id"
    assert "X-User-ID" in answer.error["message"]
    assert answer.headers["x-should-retry"] == "false"
    assert answer.state["decision"] == "invalid"
    assert inner.scopes == []


@pytest.mark.parametrize("user", [b"", b"   ", b"x" * 257, b"bad\x01id", b"tab\tid", b"\xff\xfe"])
async def test_invalid_user_ids_are_refused(store: Store, user: bytes) -> None:
    inner = Inner()
    answer = await call(middleware(inner, store, []), method="GET", path="/v1/models", user=user)
    assert answer.status == 400
    assert answer.error["code"] == "invalid_user_id"
    assert inner.scopes == []


async def test_unicode_and_longest_user_ids_are_accepted(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [])
    answer = await call(app, method="GET", path="/v1/models", user="jürgen-東京".encode())
    assert answer.status == 200
    assert answer.state == {"user_id": "jürgen-東京", "decision": "allow"}
    assert (await call(app, method="GET", path="/v1/models", user=b"u" * 256)).status == 200


async def test_a_user_header_sent_twice_is_refused_in_any_header_container(store: Store, rules: RulesDetector) -> None:
    # Which of two lines names the user is a guess the gateway and the upstream could make apart.
    inner = Inner()
    app = middleware(inner, store, [rules])
    answer = await call(app, method="GET", path="/v1/models", user=b"alice", headers=[(b"x-user-id", b"mallory")])
    assert answer.status == 400
    assert answer.error["code"] == "invalid_user_id"
    body = chat("forbidden")

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    # ASGI allows any iterable of two-item iterables: a generator of lists, a tuple of tuples.
    pairs = [[b"x-user-id", b"carol"], [b"x-user-id", b"dave"], [b"content-length", str(len(body)).encode()]]
    for headers in ((pair for pair in pairs), tuple(map(tuple, pairs))):
        state: dict[str, Any] = {}
        scope = {"type": "http", "method": "POST", "path": CHAT, "root_path": "", "headers": headers, "state": state}
        await app(scope, receive, send)
        assert state["decision"] == "invalid"
        assert sent[-2]["status"] == 400
        assert orjson.loads(sent[-1]["body"])["error"]["code"] == "invalid_user_id"
    assert inner.scopes == []
    # Other headers sent twice are not the gateway's to judge: the first one still names the user.
    pairs = [[b"x-user-id", b"carol"], [b"accept", b"a"], [b"accept", b"b"]]
    state = {}
    get: dict[str, Any] = {"type": "http", "method": "GET", "path": "/v1/models", "root_path": ""}
    await app({**get, "headers": pairs, "state": state}, receive, send)
    assert state == {"user_id": "carol", "decision": "allow"}


# --- body ----------------------------------------------------------------------------------------


async def test_unmoderated_calls_stream_their_body_through(store: Store) -> None:
    inner = Inner()
    detector = Recording()
    app = middleware(inner, store, [detector])
    answer = await call(app, path="/v1/embeddings", body=[b'{"input":', b' "forbidden"}'])
    assert answer.status == 200
    assert inner.chunks == [[b'{"input":', b' "forbidden"}']]  # not buffered: the chunks as sent
    get = await call(app, method="GET", path=CHAT)
    assert get.status == 200
    assert detector.seen == []


async def test_declared_body_over_the_limit_is_413(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [], max_body_bytes=100)
    answer = await call(app, body=b"x" * 101)
    assert answer.status == 413
    assert answer.error["code"] == "request_too_large"
    assert inner.scopes == []


async def test_streamed_body_over_the_limit_is_413(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [], max_body_bytes=100)
    answer = await call(app, body=[b"{" + b" " * 60, b" " * 60 + b"}"], content_length=False)
    assert answer.status == 413
    assert inner.scopes == []
    assert (await call(app, body=[b"{" + b" " * 49, b" " * 49 + b"}"], content_length=False)).status == 200


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"{", b"null"])
async def test_a_body_that_is_not_a_json_object_is_refused(store: Store, body: bytes) -> None:
    inner = Inner()
    answer = await call(middleware(inner, store, []), body=body)
    assert answer.status == 400
    assert answer.error["code"] == "invalid_json"
    assert answer.state["decision"] == "invalid"
    assert inner.scopes == []


async def test_compressed_bodies_are_refused_on_moderated_routes(store: Store, rules: RulesDetector) -> None:
    inner = Inner()
    answer = await call(
        middleware(inner, store, [rules]), body=b"\x1f\x8b...", headers=[(b"content-encoding", b"gzip")]
    )
    assert answer.status == 400
    assert answer.error["code"] == "invalid_json"
    assert inner.scopes == []


async def test_body_is_replayed_byte_exact_then_the_disconnect_arrives(store: Store, rules: RulesDetector) -> None:
    inner = Inner(wait_for_disconnect=True)
    detector = Recording()
    app = middleware(inner, store, [rules, detector])
    body = (
        b'{ "model":"m",  "n": 123456789012345678901234567890, "x": 1.50,\n'
        b' "messages": [{"role":"user","content":"hi"}]}'
    )
    answer = await call(app, body=[body[:20], body[20:]], headers=[(b"authorization", b"Bearer sk-client")])
    assert answer.status == 200
    assert answer.body == b"inner"
    assert inner.chunks == [[body]]
    assert inner.after_body == [{"type": "http.disconnect"}]
    assert detector.seen == [(UserInput(texts=("hi",)), "Bearer sk-client")]
    assert answer.state == {"user_id": "alice", "decision": "allow"}


async def test_a_client_gone_while_sending_the_body_is_not_answered(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [])
    incoming: list[Message] = [{"type": "http.request", "body": b'{"mo', "more_body": True}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "root_path": "",
        "headers": [(b"x-user-id", b"alice")],
        "state": {},
    }
    await app(scope, receive, send)
    assert sent == []
    assert inner.scopes == []
    assert scope["state"]["decision"] == "disconnected"


# --- safety identifier -------------------------------------------------------------------------


async def test_safety_identifier_is_added_with_a_correct_content_length(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [], safety_salt=b"pepper")
    body = b'{"model": "m", "big": 123456789012345678901234567890, "messages": []}'
    assert (await call(app, body=body, user="jürgen".encode())).status == 200
    forwarded = inner.bodies[0]
    expected = hmac.new(b"pepper", "jürgen".encode(), hashlib.sha256).hexdigest()[:64]
    assert orjson.loads(forwarded)["safety_identifier"] == expected
    assert forwarded.endswith(body[1:])  # the client's bytes survive, big integer included
    lengths = [value for key, value in inner.scopes[0]["headers"] if key == b"content-length"]
    assert lengths == [str(len(forwarded)).encode()]

    assert (await call(app, body=b" {} ")).status == 200
    assert orjson.loads(inner.bodies[1]) == {
        "safety_identifier": hmac.new(b"pepper", b"alice", hashlib.sha256).hexdigest()
    }


async def test_a_clients_own_safety_identifier_is_kept(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [], safety_salt=b"pepper")
    body = b'{"model": "m", "safety_identifier": "client-chosen", "messages": []}'
    assert (await call(app, body=body)).status == 200
    assert inner.bodies == [body]
    lengths = [value for key, value in inner.scopes[0]["headers"] if key == b"content-length"]
    assert lengths == [str(len(body)).encode()]


async def test_no_safety_identifier_on_unmoderated_routes_or_judged_ones_without_the_parameter(
    store: Store,
) -> None:
    inner = Inner()
    app = middleware(inner, store, [], safety_salt=b"pepper")
    body = b'{"input": "x"}'
    for path in ("/v1/embeddings", "/v1/audio/speech", "/v1/conversations", "/v1/images/generations"):
        assert (await call(app, path=path, body=body)).status == 200
    assert inner.bodies == [body] * 4  # OpenAI refuses a parameter its route does not know
    for path in ("/v1/responses", "/v1/completions"):
        assert (await call(app, path=path, body=body)).status == 200
        assert "safety_identifier" in orjson.loads(inner.bodies[-1])


# --- enforcement -------------------------------------------------------------------------------


async def test_violations_earn_strikes_then_a_block(store: Store, rules: RulesDetector) -> None:
    inner = Inner()
    app = middleware(inner, store, [rules])
    blocked_before = metric("gateway_blocked_requests_total")
    violations_before = metric("gateway_violations_total", category="violence", detector="rules", shadow="false")

    first = await call(app, body=chat("this is FORBIDDEN"))
    assert first.status == 400
    assert first.error["code"] == "content_policy_violation"
    assert (first.error["strikes"], first.error["max_strikes"]) == (1, 3)
    assert "2 more violations" in first.error["message"]
    assert "FORBIDDEN" not in first.error["message"]
    assert first.headers["x-should-retry"] == "false"
    assert first.state["decision"] == "violation"

    assert (await call(app, body=chat("forbidden"))).error["strikes"] == 2
    third = await call(app, body=chat("forbidden again"))
    assert third.status == 403
    assert third.error["code"] == "user_blocked"
    assert third.error["strikes"] == 3
    assert third.error["permanent"] is False
    assert third.error["blocked_until"].endswith("Z")
    assert 55 <= int(third.headers["retry-after"]) <= 60

    clean = await call(app, body=chat("a clean question"))
    assert clean.status == 403
    assert clean.error["code"] == "user_blocked"
    assert clean.state["decision"] == "blocked"
    assert inner.scopes == []
    assert metric("gateway_blocked_requests_total") == blocked_before + 1
    violations = metric("gateway_violations_total", category="violence", detector="rules", shadow="false")
    assert violations == violations_before + 3

    status = await store.status("alice")
    assert status is not None
    assert status.blocked
    events = await store.events("alice")
    assert events is not None
    violation = next(event for event in events if event["type"] == "violation")
    assert violation["rule"] == "no-forbidden"
    assert violation["path"] == CHAT
    assert violation["text_sha256"] == hashlib.sha256(b"forbidden again").hexdigest()


async def test_a_permanent_block_has_no_retry_after(store: Store) -> None:
    await store.block("bob", permanent=True, reason="test")
    answer = await call(middleware(Inner(), store, []), method="GET", path="/v1/models", user=b"bob")
    assert answer.status == 403
    assert answer.error["permanent"] is True
    assert answer.error["blocked_until"] is None
    assert "retry-after" not in answer.headers


async def test_a_trailing_slash_does_not_skip_moderation(store: Store, rules: RulesDetector) -> None:
    inner = Inner()
    app = middleware(inner, store, [rules])
    for path in ("/v1/chat/completions/", "/v1//chat/completions", "/v1/Chat/Completions"):
        assert (await call(app, path=path, body=chat("forbidden"))).status in (400, 403)
    assert inner.scopes == []


async def test_completions_and_responses_are_moderated(store: Store, rules: RulesDetector) -> None:
    inner = Inner()
    app = middleware(inner, store, [rules])
    completion = await call(app, path="/v1/completions", body=orjson.dumps({"prompt": ["ok", "forbidden"]}))
    assert completion.error["code"] == "content_policy_violation"
    response = await call(app, path="/v1/responses", user=b"carol", body=orjson.dumps({"input": "forbidden"}))
    assert response.error["code"] == "content_policy_violation"
    system_only = chat(messages=[{"role": "system", "content": "forbidden"}])
    assert (await call(app, user=b"dave", body=system_only)).status == 200


async def test_detectors_run_cheapest_first_and_stop_at_a_flag(store: Store, rules: RulesDetector) -> None:
    expensive = Recording(cost=100)
    app = middleware(Inner(), store, [expensive, rules])
    assert (await call(app, body=chat("forbidden"))).status == 400
    assert expensive.seen == []


async def test_shadow_mode_forwards_marks_and_records_without_strikes(store: Store, rules: RulesDetector) -> None:
    inner = Inner()
    app = middleware(inner, store, [rules], enforcement="shadow")
    before = metric("gateway_violations_total", category="violence", detector="rules", shadow="true")
    answer = await call(app, body=chat("forbidden"))
    assert answer.status == 200
    assert answer.body == b"inner"
    assert answer.headers["x-gateway-shadow-violation"] == "violence"
    assert answer.state["decision"] == "shadow_violation"
    assert len(inner.bodies) == 1
    assert metric("gateway_violations_total", category="violence", detector="rules", shadow="true") == before + 1
    status = await store.status("alice")
    assert status is not None
    assert (status.strikes, status.blocked) == (0, False)
    events = await store.events("alice")
    assert events is not None
    assert [(event["type"], event["shadow"]) for event in events] == [("violation", True)]
    clean = await call(app, body=chat("fine"))
    assert "x-gateway-shadow-violation" not in clean.headers


async def test_shadow_mode_still_enforces_existing_blocks(store: Store, rules: RulesDetector) -> None:
    await store.block("alice", seconds=60)
    inner = Inner()
    answer = await call(middleware(inner, store, [rules], enforcement="shadow"), body=chat("fine"))
    assert answer.status == 403
    assert inner.scopes == []


# --- failure modes -----------------------------------------------------------------------------


async def test_failed_detector_closed_answers_503(store: Store) -> None:
    inner = Inner()
    before = metric("gateway_detector_failures_total", detector="failing")
    answer = await call(middleware(inner, store, [Failing()]), body=chat("hello"))
    assert answer.status == 503
    assert answer.error["code"] == "moderation_unavailable"
    assert answer.state["decision"] == "moderation_unavailable"
    assert inner.scopes == []
    assert metric("gateway_detector_failures_total", detector="failing") == before + 1


async def test_failed_detector_open_forwards_and_the_next_detector_still_runs(
    store: Store, rules: RulesDetector
) -> None:
    inner = Inner()
    app = middleware(inner, store, [rules, Failing()], moderation_failure="open")
    before = metric("gateway_fail_open_total", check="moderation")
    answer = await call(app, body=chat("hello"))
    assert answer.status == 200
    assert answer.state["decision"] == "fail_open"
    assert metric("gateway_fail_open_total", check="moderation") == before + 1
    assert (await call(app, body=chat("forbidden"))).status == 400
    assert len(inner.scopes) == 1


class FailingLocally:
    """An in-process detector (a LocalDetector) that cannot judge."""

    name = "failing_locally"
    cost = 0

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        raise AssertionError("the middleware awaited check() of a LocalDetector")

    def check_now(self, user_input: UserInput) -> Verdict | None:
        raise DetectorFailed("the rules could not be read")


@pytest.mark.parametrize("with_remote", [False, True], ids=["local only", "local and remote"])
async def test_a_failing_local_detector_follows_the_failure_mode(
    store: Store, rules: RulesDetector, with_remote: bool
) -> None:
    # A LocalDetector is judged by check_now, never awaited, alone or before a remote detector.
    inner = Inner()
    remote: list[Detector] = [Recording()] if with_remote else []
    closed = middleware(inner, store, [FailingLocally(), rules, *remote])
    answer = await call(closed, body=chat("hello"))
    assert answer.status == 503
    assert answer.error["code"] == "moderation_unavailable"
    opened = middleware(inner, store, [FailingLocally(), rules, *remote], moderation_failure="open")
    before = metric("gateway_detector_failures_total", detector="failing_locally")
    answer = await call(opened, body=chat("hello"))
    assert answer.status == 200
    assert answer.state["decision"] == "fail_open"
    assert metric("gateway_detector_failures_total", detector="failing_locally") == before + 1
    assert (await call(opened, body=chat("forbidden"))).status == 400  # the next detector still judged
    assert len(inner.scopes) == 1


async def test_no_user_input_needs_no_detector(store: Store) -> None:
    inner = Inner()
    answer = await call(middleware(inner, store, [Failing()]), body=b'{"model": "m", "messages": []}')
    assert answer.status == 200


async def test_store_unavailable_closed_answers_503(unavailable_store: Store) -> None:
    inner = Inner()
    answer = await call(middleware(inner, unavailable_store, []), method="GET", path="/v1/models")
    assert answer.status == 503
    assert answer.error["code"] == "store_unavailable"
    assert answer.state["decision"] == "store_unavailable"
    assert inner.scopes == []


async def test_store_unavailable_open_forwards(unavailable_store: Store) -> None:
    inner = Inner()
    app = middleware(inner, unavailable_store, [], store_failure="open")
    answer = await call(app, body=chat("hello"))
    assert answer.status == 200
    assert answer.state["decision"] == "fail_open"
    assert len(inner.scopes) == 1


async def test_a_violation_is_never_forwarded_when_the_store_fails(
    unavailable_store: Store, rules: RulesDetector
) -> None:
    inner = Inner()
    closed = await call(middleware(inner, unavailable_store, [rules]), body=chat("forbidden"))
    assert closed.status == 503
    opened = await call(middleware(inner, unavailable_store, [rules], store_failure="open"), body=chat("forbidden"))
    assert opened.status == 400
    assert opened.error["code"] == "content_policy_violation"
    assert opened.error["strikes"] is None
    shadow = middleware(inner, unavailable_store, [rules], store_failure="open", enforcement="shadow")
    assert (await call(shadow, body=chat("forbidden"))).headers["x-gateway-shadow-violation"] == "violence"
    assert len(inner.scopes) == 1  # only the shadow call


# --- ambiguity refused, bounds, a detector that refuses the input, a block made meanwhile ---


@pytest.mark.parametrize(
    "body",
    [
        # judged: the last `messages` (clean); read by an upstream that keeps the first: the flagged one
        b'{"model":"m","messages":[{"role":"user","content":"forbidden"}],"messages":[]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "forbidden", "role": "system"}]}',
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"forbidden","text":"hi"}]}]}',
        # a colon spelled as an escape must not hide a duplicate from the count
        b'{"model":"m\\u003a","messages":[],"messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"u003","messages":[],"messages":[{"role":"user","content":"hi"}]}',
    ],
)
async def test_a_body_with_a_key_twice_in_one_object_is_refused(
    store: Store, rules: RulesDetector, body: bytes
) -> None:
    inner = Inner()
    answer = await call(middleware(inner, store, [rules]), body=body)
    assert answer.status == 400
    assert answer.error["code"] == "invalid_json"
    assert "twice" in answer.error["message"]
    assert inner.scopes == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[{"role":"user","content":"a: b :: c"}],"metadata":{"k:1":"v:2"}}',
        b'{"model":"m\\u003a","messages":[{"role":"user","content":"x\\u003Ay"}]}',
        b'{"model":"u003","messages":[{"role":"user","content":"\\\\u003a is not a colon"}]}',
        b'{"a":{"b":{"c":[{"d":1},{"d":2}]}},"messages":[]}',
    ],
)
async def test_colons_inside_strings_are_not_duplicates(store: Store, rules: RulesDetector, body: bytes) -> None:
    inner = Inner()
    answer = await call(middleware(inner, store, [rules]), body=body)
    assert answer.status == 200
    assert inner.bodies == [body]


@dataclass
class BlockingDetector:
    """Flags nothing; while it judges, the user gets blocked (elsewhere, by another call)."""

    store: Store
    name: str = "slow"
    cost: int = 5

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        await self.store.block("alice", seconds=60)
        return None


async def test_a_block_made_while_the_call_was_judged_is_enforced(store: Store) -> None:
    inner = Inner()
    answer = await call(middleware(inner, store, [BlockingDetector(store)]), body=chat("hello"))
    assert answer.status == 403
    assert answer.error["code"] == "user_blocked"
    assert answer.state["decision"] == "blocked"
    assert inner.scopes == []


@dataclass
class StoreStoppingDetector:
    """Flags nothing; while it judges, the store's database goes away (a PostgreSQL restart)."""

    store: Store
    name: str = "stopping"
    cost: int = 5

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        await self.store.database.close()
        return None


async def test_a_store_gone_while_the_call_was_judged_is_logged_and_counted_as_fail_open(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [StoreStoppingDetector(store)], store_failure="open")
    before = metric("gateway_fail_open_total", check="store")
    answer = await call(app, body=chat("hello"))
    assert answer.status == 200
    assert answer.state["decision"] == "fail_open"  # the access line agrees with the metric
    assert metric("gateway_fail_open_total", check="store") == before + 1
    assert len(inner.scopes) == 1


@dataclass
class RefusingDetector:
    """The moderation endpoint cannot use part of the input (an image URL it cannot fetch)."""

    name: str = "refusing"
    cost: int = 5

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        raise InputRefused("the image URL could not be downloaded", "messages[0].content[1].image_url")


@pytest.mark.parametrize("failure", ["closed", "open"])
async def test_a_detector_refusing_the_input_refuses_the_call_in_both_failure_modes(
    store: Store, failure: Literal["closed", "open"]
) -> None:
    # Neither a bypass (open) nor an outage that lets flagged text be retried without a strike (closed).
    inner = Inner()
    app = middleware(inner, store, [RefusingDetector()], moderation_failure=failure)
    answer = await call(app, body=chat("look at this"))
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == "messages[0].content[1].image_url"
    assert answer.headers["x-should-retry"] == "false"
    assert inner.scopes == []
    assert await store.status("alice") is None  # no strike


@dataclass
class ThreadSpy:
    """A local detector that remembers which thread judged each input."""

    name: str = "spy"
    cost: int = 0
    threads: list[int] = field(default_factory=list)

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        return self.check_now(user_input)

    def check_now(self, user_input: UserInput) -> Verdict | None:
        self.threads.append(threading.get_ident())
        return None


async def test_large_inputs_are_judged_off_the_event_loops_thread(store: Store) -> None:
    spy = ThreadSpy()
    app = middleware(Inner(), store, [spy], max_body_bytes=4 * 1024 * 1024)
    assert (await call(app, body=chat("small"))).status == 200
    assert (await call(app, body=chat("x" * (1024 * 1024 + 1)))).status == 200
    assert spy.threads[0] == threading.get_ident()  # a small input: judged in place
    assert spy.threads[1] != threading.get_ident()  # a large one: in a worker thread


async def test_bodies_held_across_calls_are_a_budget(store: Store, rules: RulesDetector) -> None:
    budget = ByteBudget(1000)
    inner = Inner()
    app = ModerationMiddleware(
        inner,
        store=store,
        detectors=[rules],
        user_header="X-User-ID",
        max_body_bytes=800,
        max_strikes=3,
        moderation_failure="closed",
        store_failure="closed",
        enforcement="enforce",
        safety_salt=None,
        path_prefix="/v1",
        body_budget=budget,
    )
    budget.take(500)  # other calls hold half of it
    answer = await call(app, body=chat("x" * 600))  # announced: refused before a byte is read
    assert answer.status == 503
    assert answer.error["code"] == "server_busy"
    assert answer.headers["retry-after"] == "1"
    assert answer.state["decision"] == "server_busy"
    streamed = await call(app, body=[chat("y" * 600)[:300], chat("y" * 600)[300:]], content_length=False)
    assert streamed.status == 503  # no Content-Length: held as it arrives, refused when it would not fit
    assert budget.used == 500  # what the refused calls held was given back
    budget.give(500)
    assert (await call(app, body=chat("x" * 600))).status == 200
    assert budget.used == 0
    assert len(inner.scopes) == 1
