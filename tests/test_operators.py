"""Operators and roles (gateway/operators.py) on a real PostgreSQL: tokens, removal, the built-in admin."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from gateway.database import Database
from gateway.operators import (
    ROLES,
    TOKEN_PREFIX,
    Operator,
    OperatorExists,
    Operators,
    Role,
    allows,
    require,
)
from gateway.settings import Settings
from middleware.errors import GatewayError
from middleware.protocols import StoreUnavailable

SettingsFactory = Callable[..., Settings]


@asynccontextmanager
async def open_operators(settings_factory: SettingsFactory, **overrides: Any) -> AsyncIterator[Operators]:
    settings = settings_factory(**{"admin_token": None, **overrides})
    database = Database(settings)
    await database.open()
    try:
        yield Operators(database, settings)
    finally:
        await database.close()


@pytest.fixture
async def operators(settings_factory: SettingsFactory) -> AsyncIterator[Operators]:
    """Stored operators only: no GATEWAY_ADMIN_TOKEN."""
    async with open_operators(settings_factory) as opened:
        yield opened


async def stored_rows(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM operators ORDER BY id")
    finally:
        await conn.close()


def test_roles_are_ordered_viewer_moderator_admin() -> None:
    assert ROLES == ("viewer", "moderator", "admin")
    allowed = {(role, needed) for role in ROLES for needed in ROLES if allows(role, needed)}
    assert allowed == {
        ("viewer", "viewer"),
        ("moderator", "viewer"),
        ("moderator", "moderator"),
        ("admin", "viewer"),
        ("admin", "moderator"),
        ("admin", "admin"),
    }


@pytest.mark.parametrize("role", ROLES)
def test_require_refuses_a_lower_role_with_403_insufficient_role(role: Role) -> None:
    operator = Operator("dana", role, 7)
    for needed in ROLES:
        if allows(role, needed):
            require(operator, needed)
            continue
        with pytest.raises(GatewayError) as refused:
            require(operator, needed)
        assert (refused.value.status, refused.value.code) == (403, "insufficient_role")
        assert f"dana has the role {role}; this needs {needed}" in refused.value.message


async def test_a_new_operator_gets_a_token_once_and_only_its_hash_is_stored(
    operators: Operators, database_url: str
) -> None:
    with capture_logs() as logs:
        record, token = await operators.add("dana", "moderator", by="test")
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) == len(TOKEN_PREFIX) + 43  # 32 random bytes, urlsafe base64
    assert (record.name, record.role, record.created_by, record.builtin) == ("dana", "moderator", "test", False)
    (row,) = await stored_rows(database_url)
    assert bytes(row["token_sha256"]) == hashlib.sha256(token.encode()).digest()
    secret = token.removeprefix(TOKEN_PREFIX)
    assert not any(secret in str(value) for value in row.values()), "the token itself is stored nowhere"
    assert not any(secret in str(line) for line in logs), "nor logged"
    assert [line["event"] for line in logs] == ["operator_added"]
    _, other = await operators.add("erin", "viewer", by="test")
    assert other != token


async def test_a_token_authenticates_its_operator_and_nothing_else_does(operators: Operators) -> None:
    record, token = await operators.add("dana", "moderator", by="test")
    assert await operators.authenticate(token) == Operator("dana", "moderator", record.generation)
    assert await operators.authenticate(token.encode()) == Operator("dana", "moderator", record.generation)
    assert await operators.authenticate(f"  {token} ") is not None, "surrounding spaces are not the token"
    assert await operators.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await operators.authenticate(token + "x") is None
    assert await operators.authenticate(token.upper()) is None
    assert await operators.authenticate("") is None
    assert await operators.authenticate(TOKEN_PREFIX) is None
    assert await operators.authenticate(hashlib.sha256(token.encode()).hexdigest()) is None, "the hash is no token"


async def test_removal_revokes_the_token_and_the_session_generation_at_once(operators: Operators) -> None:
    record, token = await operators.add("dana", "admin", by="test")
    operator = await operators.authenticate(token)
    assert operator is not None
    assert await operators.current("dana", operator.generation) == operator
    removed = await operators.remove("dana", by="boss")
    assert removed is not None
    assert (removed.removed_by, removed.removed_at is not None) == ("boss", True)
    assert await operators.authenticate(token) is None
    assert await operators.current("dana", operator.generation) is None
    assert await operators.remove("dana", by="boss") is None, "already gone"
    # Added again, dana is another operator: the old token and sessions stay dead.
    again, new_token = await operators.add("dana", "viewer", by="test")
    assert again.generation != record.generation
    assert await operators.authenticate(token) is None
    assert await operators.current("dana", operator.generation) is None
    assert await operators.current("dana", again.generation) == Operator("dana", "viewer", again.generation)
    assert await operators.authenticate(new_token) == Operator("dana", "viewer", again.generation)
    assert await operators.current("erin", again.generation) is None, "a generation belongs to one name"


async def test_a_removal_on_one_replica_holds_on_another_at_once(
    operators: Operators, settings_factory: SettingsFactory
) -> None:
    _, token = await operators.add("dana", "moderator", by="test")
    async with open_operators(settings_factory) as replica:
        operator = await replica.authenticate(token)
        assert operator is not None
        await operators.remove("dana", by="test")
        assert await replica.authenticate(token) is None
        assert await replica.current("dana", operator.generation) is None


async def test_names_are_short_slugs_and_admin_is_reserved(operators: Operators) -> None:
    for name in ["", "Dana", "da na", "-dana", "_x", "x" * 33, "dana\n", "dané", "a/b", "..", "admin"]:
        with pytest.raises(ValueError, match="cannot add"):
            await operators.add(name, "viewer", by="test")
    with pytest.raises(ValueError, match="role"):
        await operators.add("dana", "root", by="test")  # type: ignore[arg-type]
    for name in ["d", "dana-2", "on_call", "x" * 32, "007"]:
        await operators.add(name, "viewer", by="test")
    assert [record.name for record in await operators.list()] == sorted(["d", "dana-2", "on_call", "x" * 32, "007"])


async def test_a_name_is_taken_once_even_by_concurrent_adds(operators: Operators) -> None:
    results = await asyncio.gather(
        *(operators.add("dana", "viewer", by=f"admin-{index}") for index in range(5)), return_exceptions=True
    )
    added = [result for result in results if isinstance(result, tuple)]
    assert len(added) == 1
    assert all(isinstance(result, OperatorExists) for result in results if not isinstance(result, tuple))
    assert [record.name for record in await operators.list()] == ["dana"]


async def test_last_seen_is_recorded_on_authentication(operators: Operators) -> None:
    _, token = await operators.add("dana", "viewer", by="test")
    (listed,) = await operators.list()
    assert listed.last_seen_at is None
    await operators.authenticate(token)
    (listed,) = await operators.list()
    assert listed.last_seen_at is not None
    await operators.authenticate(token)
    (again,) = await operators.list()
    assert again.last_seen_at == listed.last_seen_at, "written at most once a minute"


async def test_the_admin_token_is_the_built_in_admin(settings_factory: SettingsFactory) -> None:
    async with open_operators(settings_factory, admin_token="admin-secret") as operators:
        builtin = await operators.authenticate("admin-secret")
        assert builtin is not None
        assert (builtin.name, builtin.role) == ("admin", "admin")
        assert builtin.generation < 0, "never a stored operator's generation"
        assert await operators.current("admin", builtin.generation) == builtin
        assert await operators.authenticate("admin-secreT") is None
        assert await operators.enabled() is True
        (listed,) = await operators.list()
        assert (listed.name, listed.builtin, listed.to_json()["builtin"]) == ("admin", True, True)
        with pytest.raises(ValueError, match="unset GATEWAY_ADMIN_TOKEN"):
            await operators.remove("admin", by="test")
    # Another token is another built-in admin: sessions opened with the old one end.
    async with open_operators(settings_factory, admin_token="rotated-secret") as operators:
        assert await operators.current("admin", builtin.generation) is None
        rotated = await operators.authenticate("rotated-secret")
        assert rotated is not None
        assert rotated.generation != builtin.generation
    async with open_operators(settings_factory) as operators:
        assert await operators.current("admin", builtin.generation) is None
        assert await operators.authenticate("admin-secret") is None


async def test_enabled_means_a_token_or_an_operator(operators: Operators) -> None:
    assert await operators.enabled() is False
    await operators.add("dana", "viewer", by="test")
    assert await operators.enabled() is True
    await operators.remove("dana", by="test")
    assert await operators.enabled() is False


async def test_whether_any_operator_exists_is_asked_of_the_database_once_a_second_at_most(
    operators: Operators, settings_factory: SettingsFactory
) -> None:
    # Asked before a call is authenticated: calls without a token must not each take a pool
    # connection. Another replica's change shows after the moment; this replica's own at once.
    await operators.add("dana", "viewer", by="test")
    async with open_operators(settings_factory) as replica:
        replica._enabled_ttl = 0.3
        assert await replica.enabled() is True
        await operators.remove("dana", by="test")
        assert await replica.enabled() is True  # remembered
        await asyncio.sleep(0.35)
        assert await replica.enabled() is False


async def test_switched_off_nobody_authenticates(settings_factory: SettingsFactory) -> None:
    async with open_operators(settings_factory) as on:
        record, token = await on.add("dana", "admin", by="test")
    async with open_operators(settings_factory, admin="off", admin_token="admin-secret") as off:
        assert await off.enabled() is False
        assert await off.authenticate(token) is None
        assert await off.authenticate("admin-secret") is None
        assert await off.current("dana", record.generation) is None
        assert off.builtin is None


async def test_the_built_in_token_works_while_the_database_is_down(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(admin_token="admin-secret", database_url="postgresql://127.0.0.1:9/none")
    operators = Operators(Database(settings), settings)
    assert await operators.authenticate("admin-secret") is not None
    assert await operators.authenticate("a guess") is None, "not an operator token: the database is not asked"
    with pytest.raises(StoreUnavailable):
        await operators.authenticate(TOKEN_PREFIX + "A" * 43)
