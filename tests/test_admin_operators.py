"""`/admin/operators`: the REST twins of `python -m gateway operators`, for the admin role only."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from structlog.testing import capture_logs

from gateway.admin import OPENAPI, admin_app
from gateway.operators import TOKEN_PREFIX, Operators
from gateway.settings import Settings
from gateway.store import Store
from tests.test_admin import check, check_error

SettingsFactory = Callable[..., Settings]
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
async def client(store: Store, settings_factory: SettingsFactory) -> AsyncIterator[httpx2.AsyncClient]:
    api = admin_app(store, settings_factory(admin_token="admin-secret"))
    transport = httpx2.ASGITransport(app=Starlette(routes=[Mount("/admin", app=api)]), client=("10.0.0.1", 4321))
    async with httpx2.AsyncClient(transport=transport, base_url="http://gateway", headers=ADMIN) as opened:
        yield opened


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_an_admin_adds_lists_and_removes_operators(client: httpx2.AsyncClient) -> None:
    answer = await client.post("/admin/operators", json={"name": "dana", "role": "moderator"})
    added = check(answer, 201, "AddedOperator")
    assert answer.headers["cache-control"] == "no-store"
    assert (added["name"], added["role"], added["created_by"], added["builtin"]) == (
        "dana",
        "moderator",
        "admin",
        False,
    )
    token = added["token"]
    assert token.startswith(TOKEN_PREFIX)
    # dana's token works at once, with dana's role
    check(await client.put("/admin/block/u", headers=bearer(token)), 200, "UserStatus")
    listed = check(await client.get("/admin/operators"), 200, "OperatorList")["data"]
    assert [(item["name"], item["role"], item["builtin"]) for item in listed] == [
        ("admin", "admin", True),
        ("dana", "moderator", False),
    ]
    assert listed[1]["last_seen_at"] is not None
    assert all("token" not in item for item in listed), "the token is shown once, at creation"
    # dana, a moderator, adds no one: that needs the admin role
    check_error(
        await client.post("/admin/operators", headers=bearer(token), json={"name": "eve", "role": "admin"}),
        403,
        "insufficient_role",
    )
    removed = check(await client.delete("/admin/operators/dana"), 200, "RemovedOperator")
    assert (removed["name"], removed["removed_by"]) == ("dana", "admin")
    check_error(await client.get("/admin/stats", headers=bearer(token)), 401, "invalid_admin_token")
    check_error(await client.delete("/admin/operators/dana"), 404, "operator_not_found")
    assert [item["name"] for item in check(await client.get("/admin/operators"), 200, "OperatorList")["data"]] == [
        "admin"
    ]


async def test_an_operator_made_admin_manages_operators_and_is_named_as_their_creator(
    client: httpx2.AsyncClient,
) -> None:
    ada = check(await client.post("/admin/operators", json={"name": "ada", "role": "admin"}), 201, "AddedOperator")
    made = await client.post("/admin/operators", headers=bearer(ada["token"]), json={"name": "vic", "role": "viewer"})
    assert check(made, 201, "AddedOperator")["created_by"] == "ada"
    removed = check(await client.delete("/admin/operators/vic", headers=bearer(ada["token"])), 200, "RemovedOperator")
    assert removed["removed_by"] == "ada"


async def test_a_name_is_taken_once(client: httpx2.AsyncClient) -> None:
    first = check(await client.post("/admin/operators", json={"name": "dana", "role": "viewer"}), 201, "AddedOperator")
    again = await client.post("/admin/operators", json={"name": "dana", "role": "admin"})
    check_error(again, 409, "operator_exists", "name")
    # the refused call changed nothing: dana is still a viewer, with the first token
    check_error(await client.put("/admin/block/u", headers=bearer(first["token"])), 403, "insufficient_role")


async def test_the_token_is_stored_only_hashed_and_never_logged(client: httpx2.AsyncClient, database_url: str) -> None:
    with capture_logs() as logs:
        added = check(
            await client.post("/admin/operators", json={"name": "dana", "role": "viewer"}), 201, "AddedOperator"
        )
    token = added["token"]
    assert not any(token in str(line) for line in logs)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM operators")
    finally:
        await conn.close()
    (row,) = rows
    assert bytes(row["token_sha256"]) == hashlib.sha256(token.encode()).digest()
    assert not any(token.removeprefix(TOKEN_PREFIX) in str(value) for value in row.values())


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"", "invalid_request", "name"),
        (b"{}", "invalid_request", "name"),
        (b'{"name": "dana"}', "invalid_request", "role"),
        (b'{"name": "dana", "role": "root"}', "invalid_request", "role"),
        (b'{"name": "dana", "role": "Admin"}', "invalid_request", "role"),
        (b'{"name": "dana", "role": null}', "invalid_request", "role"),
        (b'{"name": "admin", "role": "admin"}', "invalid_request", "name"),
        (b'{"name": "Dana", "role": "viewer"}', "invalid_request", "name"),
        (b'{"name": "../x", "role": "viewer"}', "invalid_request", "name"),
        (b'{"name": "a\\u0000b", "role": "viewer"}', "invalid_request", "name"),
        (b'{"name": "' + b"x" * 33 + b'", "role": "viewer"}', "invalid_request", "name"),
        (b'{"name": 5, "role": "viewer"}', "invalid_request", "name"),
        (b'{"name": "dana", "role": "viewer", "token": "mine"}', "invalid_request", "token"),
        (b'{"name": "dana", "role": "viewer", "generation": 1}', "invalid_request", "generation"),
        (b"[]", "invalid_json", None),
        (b"{", "invalid_json", None),
    ],
)
async def test_bad_new_operators_are_400_naming_the_field(
    client: httpx2.AsyncClient, body: bytes, code: str, param: str | None
) -> None:
    check_error(await client.post("/admin/operators", content=body), 400, code, param)
    assert [item["name"] for item in check(await client.get("/admin/operators"), 200, "OperatorList")["data"]] == [
        "admin"
    ], "nothing was added"


async def test_a_caller_cannot_choose_the_token(client: httpx2.AsyncClient) -> None:
    answer = await client.post("/admin/operators", json={"name": "dana", "role": "viewer", "token": "cgw_" + "a" * 43})
    check_error(answer, 400, "invalid_request", "token")


@pytest.mark.parametrize("name", ["admin", "Dana", "a%2Fb", "%2E%2E", "a%00b", "x" * 33, "caf%C3%A9"])
async def test_removing_a_bad_name_is_400(client: httpx2.AsyncClient, name: str) -> None:
    error = check_error(await client.delete(f"/admin/operators/{name}"), 400, "invalid_request", "name")
    if name == "admin":
        assert "built-in operator" in error["message"]


async def test_a_huge_body_is_413(client: httpx2.AsyncClient) -> None:
    body = b'{"name": "' + b"x" * 70_000 + b'", "role": "viewer"}'
    check_error(await client.post("/admin/operators", content=body), 413, "request_too_large")


async def test_the_operator_routes_need_the_admin_role_on_every_method(
    client: httpx2.AsyncClient, store: Store, settings_factory: SettingsFactory
) -> None:
    operators = Operators(store.database, settings_factory())
    _, moderator = await operators.add("mo", "moderator", by="test")
    _, viewer = await operators.add("vic", "viewer", by="test")
    for token in (moderator, viewer):
        for method, url in [
            ("GET", "/admin/operators"),
            ("POST", "/admin/operators"),
            ("DELETE", "/admin/operators/vic"),
        ]:
            check_error(await client.request(method, url, headers=bearer(token)), 403, "insufficient_role")
    assert [record.name for record in await operators.list()] == ["admin", "mo", "vic"], "nobody was removed"


def test_the_document_describes_the_operator_routes() -> None:
    paths = OPENAPI["paths"]
    assert {method: paths["/operators"][method]["x-role"] for method in ("get", "post")} == {
        "get": "admin",
        "post": "admin",
    }
    assert paths["/operators/{name}"]["delete"]["x-role"] == "admin"
    post = paths["/operators"]["post"]
    assert set(post["responses"]) == {"201", "400", "401", "403", "409", "413", "503"}
    assert post["requestBody"]["required"] is True
    assert set(paths["/operators/{name}"]["delete"]["responses"]) == {"200", "400", "401", "403", "404", "503"}
    name = OPENAPI["components"]["schemas"]["NewOperator"]["properties"]["name"]
    assert (name["maxLength"], name["not"]) == (32, {"const": "admin"})
    role = OPENAPI["components"]["schemas"]["NewOperator"]["properties"]["role"]
    assert role["enum"] == ["viewer", "moderator", "admin"]
    assert "token" in OPENAPI["components"]["schemas"]["AddedOperator"]["required"]
