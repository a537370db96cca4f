"""The moderation middleware's reading of the judged routes' bodies, in process on a real Store:
where large bodies are parsed, what the audit records as the path, what the proxy gets."""

import threading
from pathlib import Path

import orjson
import pytest

from gateway.store import Store
from middleware import moderation
from middleware.asgi import Message
from middleware.detectors import RulesDetector
from middleware.forms import FormPart
from middleware.protocols import UserInput
from middleware.routes import Route
from tests.judging import PNG, form
from tests.test_moderation import Inner, call, middleware


class ThreadSpy:
    """Form and JSON extractors that remember the thread that ran them."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def form(self, parts: list[FormPart]) -> UserInput:
        self.threads.append(threading.get_ident())
        return UserInput()

    def json(self, body: object) -> UserInput:
        self.threads.append(threading.get_ident())
        return UserInput()


async def test_large_forms_and_batch_files_are_parsed_off_the_event_loops_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ThreadSpy()
    monkeypatch.setattr(moderation, "match", lambda method, path: Route("spied", json=spy.json, form=spy.form))
    app = middleware(Inner(), store, [], max_body_bytes=4 * 1024 * 1024)
    small, small_type = form({"prompt": "a hat"}, {"image": ("cat.png", PNG, "image/png")})
    large, large_type = form({"prompt": "a hat"}, {"image": ("cat.png", PNG + bytes(1024 * 1024), "image/png")})
    for body, content_type in ((small, small_type), (large, large_type)):
        assert (await call(app, body=body, headers=[(b"content-type", content_type.encode())])).status == 200
    assert (await call(app, body=orjson.dumps({"prompt": "x" * (1024 * 1024)}))).status == 200
    here = threading.get_ident()
    assert spy.threads[0] == here  # a small form: parsed in place
    assert spy.threads[1] != here  # a large one: in a worker thread
    assert spy.threads[2] != here  # as is a large JSON body


async def test_the_audit_names_the_path_the_client_called_in_one_spelling(store: Store, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\ncategory = "violence"\npattern = "forbidden"\n')
    app = middleware(Inner(), store, [RulesDetector(rules)])
    for path, body in (
        ("/v1//Threads/thread_AB1/messages/", {"role": "user", "content": "forbidden"}),
        ("/v1/videos/video_1/remix", {"prompt": "forbidden"}),
    ):
        assert (await call(app, path=path, body=orjson.dumps(body))).error["code"] == "content_policy_violation"
    events = await store.events("alice")
    assert events is not None
    paths = [event["path"] for event in events if event["type"] == "violation"]
    assert paths == ["/v1/videos/video_1/remix", "/v1/threads/thread_ab1/messages"]  # newest first


async def test_headers_in_any_container_reach_the_proxy_after_a_judged_body(store: Store) -> None:
    inner = Inner()
    app = middleware(inner, store, [])
    body = orjson.dumps({"prompt": "a cat"})
    pairs = [(b"x-user-id", b"carol"), (b"content-type", b"application/json"), (b"x-trace", b"t1")]
    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "root_path": "", "state": {}}

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        pass

    # ASGI allows any iterable: read once for the user header, it must not reach the proxy empty
    await app({**scope, "headers": (pair for pair in pairs)}, receive, send)
    assert list(inner.scopes[0]["headers"]) == pairs
    assert inner.bodies == [body]
