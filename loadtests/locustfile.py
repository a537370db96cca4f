"""User journeys against a running gateway, in plain HTTP (see README.md for how to run).

- ChatUser (most traffic): clean chats as one of a pool of users, a fifth of them streamed;
  the whole SSE stream is read and must end with `data: [DONE]`.
- Violator (a few): keeps sending a message the moderation flags. Expected: 400
  `content_policy_violation` until the strike limit, then 403 `user_blocked`, and 403 for
  clean calls while blocked. The trigger is the mock upstream's moderation word ("forbidden"),
  so the gateway must run with `GATEWAY_MODERATION=openai` against `gateway.fake_upstream`;
  against other detectors set LOADTEST_VIOLATION to a text they flag.
- Operator (one): lists blocked users and unblocks this test's own (ids `loadtest-...`) with
  `GATEWAY_ADMIN_TOKEN`.

Expected answers are successes; any other status or error code is a failure, so
`locust --headless` exits non-zero when the gateway misbehaves.

Every call carries a fresh X-Request-ID. With LOADTEST_JOURNAL set to a file path, each answer
is also appended there as a JSON line (start and end time, journey step, user, request id,
status, error code, the `event_id` of a refusal), so a harness can hold the answers clients got
against the audit trail and a load balancer's log (loadtests/multihost.py does).

Environment: GATEWAY_ADMIN_TOKEN (operator; without it the operator idles), GATEWAY_USER_HEADER
(default X-User-ID), LOADTEST_API_KEY (sent as the client's bearer key), LOADTEST_MODEL,
LOADTEST_VIOLATION, LOADTEST_USERS (size of the clean user pool), LOADTEST_JOURNAL.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import IO, Any

from locust import FastHttpUser, between, events, task
from locust.contrib.fasthttp import ResponseContextManager

USER_HEADER = os.environ.get("GATEWAY_USER_HEADER", "X-User-ID")
ADMIN_TOKEN = os.environ.get("GATEWAY_ADMIN_TOKEN", "")
API_KEY = os.environ.get("LOADTEST_API_KEY", "sk-loadtest")
MODEL = os.environ.get("LOADTEST_MODEL", "gpt-4o-mini")
VIOLATION = os.environ.get("LOADTEST_VIOLATION", "Tell me something forbidden.")
USER_POOL = [f"loadtest-user-{n}" for n in range(int(os.environ.get("LOADTEST_USERS", "200")))]
CLEAN_PROMPTS = (
    "Summarise the plot of Hamlet in two sentences.",
    "What is the capital of Australia?",
    "Write a haiku about autumn rain.",
    "Explain what a hash map is to a new programmer.",
)
JOURNAL_PATH = os.environ.get("LOADTEST_JOURNAL", "")
_journal: IO[str] | None = None


def _error_code(response: ResponseContextManager) -> str | None:
    try:
        body: Any = json.loads(response.content or b"")
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _call_context(user_id: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The headers and locust context of one call: a fresh request id, and the user it speaks for."""
    request_id = uuid.uuid4().hex
    return {"X-Request-ID": request_id}, {"request_id": request_id, "user": user_id or ""}


def _journal_answer(
    name: str,
    start_time: float,
    response_time: float,
    context: dict[str, Any],
    response: Any = None,
    exception: BaseException | None = None,
    **kwargs: Any,
) -> None:
    global _journal
    if not JOURNAL_PATH:
        return
    if _journal is None:
        _journal = open(JOURNAL_PATH, "a", encoding="utf-8")  # noqa: SIM115 (closed when locust quits)
    status = getattr(response, "status_code", 0) or 0
    error: Any = None
    if status >= 400:
        try:
            body = json.loads(response.content or b"")
            error = body.get("error") if isinstance(body, dict) else None
        except (ValueError, TypeError):
            error = None
    error = error if isinstance(error, dict) else {}
    entry = {
        "t0": start_time,
        "t1": time.time(),
        "name": name,
        "user": context.get("user", ""),
        "request_id": context.get("request_id", ""),
        "status": status,
        "code": error.get("code"),
        "event_id": error.get("event_id"),
        "message": str(error.get("message", ""))[:60],
        "failure": None if exception is None else str(exception)[:200],
        # what a call without an answer met (geventhttpclient keeps it on the response)
        "transport": repr(getattr(response, "error", None))[:200] if status == 0 else None,
    }
    _journal.write(json.dumps(entry) + "\n")


def _close_journal(**kwargs: Any) -> None:
    if _journal is not None:
        _journal.close()


events.request.add_listener(_journal_answer)  # type: ignore[no-untyped-call]  # locust leaves it unannotated
events.quitting.add_listener(_close_journal)  # type: ignore[no-untyped-call]


def _expect(response: ResponseContextManager, allowed: dict[int, str | None]) -> bool:
    """Mark the response success if its status (and error code, when given) is one of `allowed`."""
    status = response.status_code
    if status in allowed and (allowed[status] is None or _error_code(response) == allowed[status]):
        response.success()  # type: ignore[no-untyped-call]  # locust leaves it unannotated
        return True
    detail = (response.content or b"")[:200].decode("utf-8", "replace")
    response.failure(f"unexpected {status}: {detail}")  # type: ignore[no-untyped-call]
    return False


class _GatewayUser(FastHttpUser):
    abstract = True
    user_id = ""

    def chat(self, text: str, *, stream: bool, name: str) -> ResponseContextManager:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream}
        headers, context = _call_context(self.user_id)
        headers |= {USER_HEADER: self.user_id, "Authorization": f"Bearer {API_KEY}"}
        # The caller's `with` block marks the outcome.
        return self.client.post(
            "/v1/chat/completions", json=body, headers=headers, name=name, context=context, catch_response=True
        )


class ChatUser(_GatewayUser):
    weight = 20
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.user_id = random.choice(USER_POOL)

    @task(4)
    def clean_chat(self) -> None:
        with self.chat(random.choice(CLEAN_PROMPTS), stream=False, name="chat") as response:
            if _expect(response, {200: None}) and not response.json().get("choices"):
                response.failure("200 without choices")

    @task(1)
    def streamed_chat(self) -> None:
        with self.chat(random.choice(CLEAN_PROMPTS), stream=True, name="chat (stream)") as response:
            if _expect(response, {200: None}) and not (response.content or b"").rstrip().endswith(b"data: [DONE]"):
                response.failure("stream did not end with data: [DONE]")


class Violator(_GatewayUser):
    weight = 2
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        # A fresh id per simulated user, so every run walks the whole strike-to-block path.
        self.user_id = f"loadtest-violator-{uuid.uuid4().hex[:12]}"

    @task(3)
    def violate(self) -> None:
        with self.chat(VIOLATION, stream=False, name="violation") as response:
            _expect(response, {400: "content_policy_violation", 403: "user_blocked"})

    @task(1)
    def clean_chat(self) -> None:
        # Clean calls go through unless the operator has not lifted the block yet.
        with self.chat(random.choice(CLEAN_PROMPTS), stream=False, name="violator clean chat") as response:
            _expect(response, {200: None, 403: "user_blocked"})


class Operator(FastHttpUser):
    fixed_count = 1
    wait_time = between(1.0, 2.0)

    @task
    def unblock_blocked_users(self) -> None:
        if not ADMIN_TOKEN:
            return
        call, context = _call_context()
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with self.client.get(
            "/admin/users?blocked=true&limit=100",
            headers=headers | call,
            name="admin list blocked",
            context=context,
            catch_response=True,
        ) as response:
            if not _expect(response, {200: None}):
                return
            # Only this load test's users: pointed at a shared deployment, it must not lift real blocks.
            listed = [user["user_id"] for user in response.json().get("data", [])]
            blocked = [user_id for user_id in listed if user_id.startswith("loadtest-")]
        for user_id in blocked:
            body = {"reason": "load test operator"}
            call, context = _call_context(user_id)
            with self.client.put(
                f"/admin/unblock/{user_id}",
                json=body,
                headers=headers | call,
                name="admin unblock",
                context=context,
                catch_response=True,
            ) as response:
                if _expect(response, {200: None}) and response.json().get("blocked") is not False:
                    response.failure("unblock answered a user still blocked")
