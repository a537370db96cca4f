"""Helpers of the console's tests (tests/test_console*.py) and its screenshots: operators, a
signed-in HTTP client, the CSRF token of a page, and a gateway holding some history to show."""

from __future__ import annotations

import re
from typing import Any

import httpx2

from gateway.database import Database
from gateway.operators import Operators, Role
from gateway.settings import Settings
from tests.conftest import run_sync
from tests.test_standing import appeal, strike

ADMIN_TOKEN = "admin-secret"
CONSOLE = "/admin/console"
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


def add_operators(settings: Settings, roles: dict[str, Role]) -> dict[str, str]:
    """Store operators {name: role}; their tokens by name."""

    async def add() -> dict[str, str]:
        database = Database(settings)
        await database.open()
        try:
            operators = Operators(database, settings)
            return {name: (await operators.add(name, role, by="test"))[1] for name, role in roles.items()}
        finally:
            await database.close()

    return run_sync(add())


def sign_in(url: str, token: str = ADMIN_TOKEN, **headers: str) -> httpx2.Client:
    """A client holding a console session opened with `token` (the sign-in must succeed)."""
    client = httpx2.Client(base_url=url)
    answer = client.post(f"{CONSOLE}/signin", data={"token": token}, headers=headers)
    assert answer.status_code == 303, answer.text
    return client


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def admin(url: str, method: str, path: str, body: Any = None) -> httpx2.Response:
    """A REST admin call with the built-in token."""
    return httpx2.request(method, f"{url}/admin{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json=body)


def seed(url: str) -> dict[str, str]:
    """A little history on a gateway running the rules detector (max_strikes=3): `zoe` blocked by the
    policy with an open appeal of her block, `yan` with one strike, `xia` blocked by a moderator."""
    refusals = [strike(url, "zoe") for _ in range(3)]
    filed = appeal(url, "zoe", {"event_id": refusals[2], "message": "I was quoting a news story."})
    assert filed.status_code == 201, filed.text
    strike(url, "yan")
    assert admin(url, "PUT", "/block/xia", {"permanent": True, "reason": "spam"}).status_code == 200
    return {"block_event": refusals[2], "appeal": filed.json()["id"]}
