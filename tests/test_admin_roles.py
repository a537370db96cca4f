"""Roles on the admin API: every operation's boundary, the operator in the audit trail, removal at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.admin import OPENAPI, AdminAPI, admin_app, operations
from gateway.admin_openapi import Operation
from gateway.operators import ROLES, Operator, Operators, Role, allows
from gateway.settings import Settings
from gateway.store import Store
from middleware.asgi import Receive, Scope, Send
from tests.test_admin import check, check_error

SettingsFactory = Callable[..., Settings]


@pytest.fixture
async def tokens(store: Store, settings_factory: SettingsFactory) -> dict[Role, str]:
    """A token for an operator of each role: viewer `vic`, moderator `mo`, admin `ada`."""
    operators = Operators(store.database, settings_factory())
    found: dict[Role, str] = {}
    for name, role in zip(("vic", "mo", "ada"), ROLES, strict=True):
        _, found[role] = await operators.add(name, role, by="test")
    return found


@pytest.fixture
def api(store: Store, settings_factory: SettingsFactory) -> AdminAPI:
    return admin_app(store, settings_factory(admin_token="admin-secret"))


@pytest.fixture
async def client(api: AdminAPI) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=Starlette(routes=[Mount("/admin", app=api)]), client=("10.0.0.1", 4321))
    async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as opened:
        yield opened


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def url_of(operation: Operation) -> str:
    return "/admin" + operation.path.replace("{user_id}", "someone").replace("{name}", "nobody")


def test_every_operation_declares_a_role_and_the_document_states_it() -> None:
    declared = list(operations)
    assert declared
    for operation in declared:
        assert operation.role in ROLES
        described = OPENAPI["paths"][operation.path][operation.method.lower()]
        assert described["x-role"] == operation.role
        assert f"Role: `{operation.role}`" in described["description"]
        assert ("403" in described["responses"]) == (operation.role != "viewer")
    roles = {(operation.method, operation.path): operation.role for operation in declared}
    assert roles[("GET", "/users")] == roles[("GET", "/users/{user_id}")] == "viewer"
    assert roles[("GET", "/users/{user_id}/events")] == roles[("GET", "/stats")] == "viewer"
    assert roles[("PUT", "/block/{user_id}")] == roles[("PUT", "/unblock/{user_id}")] == "moderator"
    assert roles[("POST", "/users/{user_id}/notes")] == "moderator"
    assert roles[("GET", "/operators")] == roles[("POST", "/operators")] == roles[("DELETE", "/operators/{name}")]
    assert roles[("GET", "/operators")] == "admin"


@pytest.mark.parametrize("role", ROLES)
async def test_every_operation_refuses_a_role_below_its_own_and_serves_the_others(
    role: Role, tokens: dict[Role, str], client: httpx2.AsyncClient
) -> None:
    for operation in operations:
        # A body that is no JSON: an allowed role meets 400 at worst, a refused one 403 before it.
        answer = await client.request(
            operation.method, url_of(operation), headers=bearer(tokens[role]), content=b"{not json"
        )
        if allows(role, operation.role):
            assert answer.status_code != 403, (role, operation.operation_id, answer.text)
        else:
            error = check_error(answer, 403, "insufficient_role")
            assert f"has the role {role}; this needs {operation.role}" in error["message"]
            assert answer.headers["x-should-retry"] == "false"


async def test_a_viewer_reads_but_cannot_block_or_unblock(
    tokens: dict[Role, str], client: httpx2.AsyncClient, store: Store
) -> None:
    viewer = bearer(tokens["viewer"])
    check_error(await client.put("/admin/block/alice", headers=viewer, json={"seconds": 60}), 403, "insufficient_role")
    assert await store.status("alice") is None, "the refused block did nothing"
    await store.block("alice", seconds=60, operator="admin")
    check(await client.get("/admin/users/alice", headers=viewer), 200, "UserStatus")
    check(await client.get("/admin/users/alice/events", headers=viewer), 200, "EventList")
    check(await client.get("/admin/users", headers=viewer), 200, "UserList")
    check(await client.get("/admin/stats", headers=viewer), 200, "Stats")
    check_error(await client.put("/admin/unblock/alice", headers=viewer), 403, "insufficient_role")
    status = await store.status("alice")
    assert status is not None
    assert status.blocked


async def test_every_admin_action_names_its_operator_in_the_audit_trail(
    tokens: dict[Role, str], client: httpx2.AsyncClient
) -> None:
    moderator, admin = bearer(tokens["moderator"]), bearer(tokens["admin"])
    check(await client.put("/admin/block/bob", headers=moderator, json={"reason": "spam"}), 200, "UserStatus")
    check(await client.put("/admin/unblock/bob", headers=admin, json={"reason": "appeal"}), 200, "UserStatus")
    check(await client.put("/admin/block/bob", headers=bearer("admin-secret")), 200, "UserStatus")
    events = check(await client.get("/admin/users/bob/events", headers=moderator), 200, "EventList")["data"]
    assert [(e["type"], e["actor"], e["operator"], e["reason"]) for e in events] == [
        ("block", "admin", "admin", None),
        ("unblock", "admin", "ada", "appeal"),
        ("block", "admin", "mo", "spam"),
    ]


async def test_a_removed_operator_is_refused_on_the_next_call(
    tokens: dict[Role, str], client: httpx2.AsyncClient, store: Store, settings_factory: SettingsFactory
) -> None:
    moderator = bearer(tokens["moderator"])
    check(await client.get("/admin/stats", headers=moderator), 200, "Stats")
    await Operators(store.database, settings_factory()).remove("mo", by="test")
    check_error(await client.get("/admin/stats", headers=moderator), 401, "invalid_admin_token")
    check_error(await client.put("/admin/block/carol", headers=moderator), 401, "invalid_admin_token")
    assert await store.status("carol") is None


async def test_the_operator_is_left_in_the_scope_state_for_what_runs_below(
    api: AdminAPI, tokens: dict[Role, str]
) -> None:
    seen: list[Operator | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = {}
        await api(scope, receive, send)
        seen.append(scope["state"].get("operator"))

    transport = httpx2.ASGITransport(app=Starlette(routes=[Mount("/admin", app=app)]))
    async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as client:
        await client.get("/admin/stats", headers=bearer(tokens["moderator"]))
        await client.get("/admin/stats", headers=bearer("admin-secret"))
        await client.get("/admin/stats", headers=bearer("a guess"))
    assert [(o.name, o.role) if o else None for o in seen] == [("mo", "moderator"), ("admin", "admin"), None]
