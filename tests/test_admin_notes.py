"""`POST /admin/users/{user_id}/notes`: a moderator's note on the user's timeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.admin import admin_app
from gateway.events import MAX_NOTE
from gateway.operators import Operators
from gateway.settings import Settings
from gateway.store import Store
from tests.test_admin import check, check_error, path, violation

SettingsFactory = Callable[..., Settings]


@pytest.fixture
async def tokens(store: Store, settings_factory: SettingsFactory) -> dict[str, str]:
    operators = Operators(store.database, settings_factory())
    _, moderator = await operators.add("mo", "moderator", by="test")
    _, viewer = await operators.add("vic", "viewer", by="test")
    return {"moderator": moderator, "viewer": viewer}


@pytest.fixture
async def client(store: Store, settings_factory: SettingsFactory) -> AsyncIterator[httpx2.AsyncClient]:
    api = admin_app(store, settings_factory(admin_token="admin-secret"))
    transport = httpx2.ASGITransport(app=Starlette(routes=[Mount("/admin", app=api)]), client=("10.0.0.1", 4321))
    async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as opened:
        yield opened


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_moderators_note_joins_the_timeline_with_its_operator_and_text(
    client: httpx2.AsyncClient, store: Store, tokens: dict[str, str]
) -> None:
    await store.record_violation("a/b", violation())
    text = 'Spoke with the team: <b>"false positive"</b> — ünïcode kept as written.\nSecond line.'
    answer = await client.post(
        f"/admin/users/{path('a/b')}/notes", headers=bearer(tokens["moderator"]), json={"text": text}
    )
    note = check(answer, 201, "Event")
    assert (note["type"], note["operator"], note["text"]) == ("note", "mo", text)
    assert "actor" not in note
    assert "reason" not in note
    events = check(
        await client.get(f"/admin/users/{path('a/b')}/events", headers=bearer(tokens["viewer"])), 200, "EventList"
    )
    assert [event["type"] for event in events["data"]] == ["note", "violation"]
    assert events["data"][0] == note


async def test_a_viewer_cannot_write_notes_and_nothing_is_recorded(
    client: httpx2.AsyncClient, store: Store, tokens: dict[str, str]
) -> None:
    await store.record_violation("u", violation())
    answer = await client.post("/admin/users/u/notes", headers=bearer(tokens["viewer"]), json={"text": "hi"})
    check_error(answer, 403, "insufficient_role")
    events = await store.events("u")
    assert events is not None
    assert [event["type"] for event in events] == ["violation"]


async def test_a_note_on_an_unknown_user_is_404(
    client: httpx2.AsyncClient, store: Store, tokens: dict[str, str]
) -> None:
    answer = await client.post("/admin/users/nobody/notes", headers=bearer(tokens["moderator"]), json={"text": "x"})
    check_error(answer, 404, "user_not_found")
    assert await store.status("nobody") is None, "a note creates no user"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b'{"text": ""}',
        b'{"text": "   \\n "}',
        b'{"text": null}',
        b'{"text": 5}',
        b'{"text": ["a"]}',
        b'{"text": "a\\u0000b"}',
        b'{"text": "' + b"x" * (MAX_NOTE + 1) + b'"}',
        b'{"text": "ok", "operator": "someone-else"}',
    ],
)
async def test_bad_notes_are_400_naming_the_field(
    client: httpx2.AsyncClient, store: Store, tokens: dict[str, str], body: bytes
) -> None:
    await store.record_violation("u", violation())
    error = check_error(
        await client.post("/admin/users/u/notes", headers=bearer(tokens["moderator"]), content=body),
        400,
        "invalid_request",
        "operator" if b"operator" in body else "text",
    )
    assert error["message"]
    events = await store.events("u")
    assert events is not None
    assert len(events) == 1, "nothing was recorded"


async def test_a_refused_note_names_its_own_field(
    client: httpx2.AsyncClient, store: Store, tokens: dict[str, str]
) -> None:
    await store.record_violation("u", violation())
    moderator = bearer(tokens["moderator"])
    with_nul = await client.post("/admin/users/u/notes", headers=moderator, json={"text": "a\x00b"})
    assert check_error(with_nul, 400, "invalid_request", "text")["message"] == ("text must not hold NUL characters.")
    # A note needs its text: no body is not among what the refusal offers.
    unknown = await client.post("/admin/users/u/notes", headers=moderator, json={"txt": "hi"})
    message = check_error(unknown, 400, "invalid_request", "txt")["message"]
    assert message == "Unknown field 'txt': expected a JSON object with text."


async def test_the_longest_note_is_kept_whole(client: httpx2.AsyncClient, store: Store, tokens: dict[str, str]) -> None:
    await store.record_violation("u", violation())
    text = "y" * MAX_NOTE
    note = check(
        await client.post("/admin/users/u/notes", headers=bearer(tokens["moderator"]), json={"text": text}),
        201,
        "Event",
    )
    assert note["text"] == text
