"""Named operators of the admin API and their roles, kept in PostgreSQL (table `operators`).

Each operator has a name, a role and a bearer token of 32 random bytes. Only the token's SHA-256
is stored: a token that random needs no slow hash, as nothing about it can be guessed from its
hash. `GATEWAY_ADMIN_TOKEN` is the built-in operator `admin` with the role `admin`; it is never
stored, and no stored operator may take its name.

Nothing about an operator is cached: every check reads the table, so a removal takes effect on
every replica with the next call. (Only whether any operator exists at all, asked before a call
is authenticated, is remembered for a second.) The admin API checks one token per call and the
console one session per page; a read by the token's hash (a unique index) costs far less than
the call it guards.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import asyncpg
import structlog

from gateway.database import Connection, Database
from gateway.events import iso
from gateway.settings import Settings
from middleware.errors import GatewayError

log = structlog.get_logger(__name__)

Role = Literal["viewer", "moderator", "admin"]
# Lowest first: each role may do everything the roles before it may.
ROLES: tuple[Role, ...] = get_args(Role)
BUILTIN = "admin"
MAX_NAME = 32
NAME_RULE = f"1 to {MAX_NAME} lower-case letters, digits, - or _, starting with a letter or digit"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# Tokens carry a prefix so that secret scanners and people can tell what leaked.
TOKEN_PREFIX = "cgw_"  # noqa: S105 (a prefix, not a secret)
_TOKEN = re.compile(rb"cgw_[A-Za-z0-9_-]{43}")

_COLUMNS = "id, name, role, created_at, created_by, last_seen_at, removed_at, removed_by"
# The operator holding this token; last_seen_at is written at most once a minute.
_AUTHENTICATE = """
WITH found AS (
    SELECT id, name, role, token_sha256, last_seen_at FROM operators
    WHERE token_sha256 = $1 AND removed_at IS NULL
), seen AS (
    UPDATE operators SET last_seen_at = now() FROM found
    WHERE operators.id = found.id
        AND (found.last_seen_at IS NULL OR found.last_seen_at < now() - interval '1 minute')
)
SELECT id, name, role, token_sha256 FROM found
"""
_CURRENT = "SELECT id, name, role FROM operators WHERE id = $1 AND name = $2 AND removed_at IS NULL"
_ANY = "SELECT EXISTS (SELECT 1 FROM operators WHERE removed_at IS NULL)"
_LIST = f"SELECT {_COLUMNS} FROM operators WHERE removed_at IS NULL ORDER BY name"  # noqa: S608 (constant)
_ADD = f"""
INSERT INTO operators (name, role, token_sha256, created_by) VALUES ($1, $2, $3, $4)
RETURNING {_COLUMNS}
"""  # noqa: S608
_REMOVE = f"""
UPDATE operators SET removed_at = now(), removed_by = $2 WHERE name = $1 AND removed_at IS NULL
RETURNING {_COLUMNS}
"""  # noqa: S608


def allows(role: Role, needed: Role) -> bool:
    """Whether `role` may do what `needed` may (viewer < moderator < admin)."""
    return ROLES.index(role) >= ROLES.index(needed)


def name_problem(name: str) -> str | None:
    """What is wrong with `name` as a new operator's name, or None."""
    if name == BUILTIN:
        return f"{BUILTIN} is the built-in operator of GATEWAY_ADMIN_TOKEN"
    if not _NAME.fullmatch(name):
        return f"an operator name is {NAME_RULE}"
    return None


@dataclass(frozen=True, slots=True)
class Operator:
    """Who is calling, as far as the admin API and the console care.

    `generation` tells one operator of a name from a later one: it changes when the operator is
    removed and added again (and, for the built-in `admin`, when GATEWAY_ADMIN_TOKEN changes),
    so a console session that remembers it ends with the operator it was opened by.
    """

    name: str
    role: Role
    generation: int

    def may(self, role: Role) -> bool:
        return allows(self.role, role)


def require(operator: Operator, role: Role) -> None:
    """Refuse with 403 `insufficient_role` unless `operator` holds `role` or a higher one."""
    if not operator.may(role):
        raise GatewayError(
            403,
            "insufficient_role",
            f"Operator {operator.name} has the role {operator.role}; this needs {role} or higher.",
        )


@dataclass(frozen=True, slots=True)
class OperatorRecord:
    """An operator as listed: the stored row, or the built-in `admin` (no row, `builtin`)."""

    name: str
    role: Role
    generation: int
    builtin: bool = False
    created_at: datetime | None = None
    created_by: str | None = None
    last_seen_at: datetime | None = None
    removed_at: datetime | None = None
    removed_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "name": self.name,
            "role": self.role,
            "builtin": self.builtin,
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "last_seen_at": iso(self.last_seen_at),
        }
        if self.removed_at is not None:
            answer.update(removed_at=iso(self.removed_at), removed_by=self.removed_by)
        return answer


class OperatorExists(Exception):
    """An operator of that name is already stored."""


class Operators:
    """The operators of one gateway: the stored ones and the built-in `admin`.

    With GATEWAY_ADMIN=off there are none: nobody authenticates and nobody is current.
    """

    def __init__(self, database: Database, settings: Settings, *, enabled_ttl: float = 1.0) -> None:
        self._db = database
        # Whether any operator is stored, asked before a call is authenticated: remembered for a
        # moment, so calls without a token cannot each take a pool connection the /v1 path needs.
        self._enabled_ttl = enabled_ttl
        self._enabled: tuple[float, bool] | None = None
        self.switched_on = settings.admin
        token = settings.admin_token.get_secret_value().encode() if settings.admin_token else b""
        # An empty token would match "Bearer " from anyone: it is no token.
        self._builtin_sha256 = hashlib.sha256(token).digest() if token else None
        self._builtin = Operator(BUILTIN, "admin", _builtin_generation(token)) if token else None

    @property
    def builtin(self) -> Operator | None:
        """The built-in `admin` (GATEWAY_ADMIN_TOKEN), None when the token is unset."""
        return self._builtin if self.switched_on else None

    async def enabled(self) -> bool:
        """Whether /admin serves: switched on, with the built-in token set or an operator stored."""
        if not self.switched_on:
            return False
        if self._builtin is not None:
            return True
        now = time.monotonic()
        if self._enabled is not None and now - self._enabled[0] < self._enabled_ttl:
            return self._enabled[1]

        async def work(conn: Connection) -> bool:
            return bool(await conn.fetchval(_ANY))

        enabled = await self._db.read(work)
        self._enabled = (now, enabled)
        return enabled

    async def authenticate(self, token: str | bytes) -> Operator | None:
        """The operator holding `token`, or None; no answer's timing depends on the token's bytes."""
        if not self.switched_on:
            return None
        raw = (token.encode() if isinstance(token, str) else token).strip()
        digest = hashlib.sha256(raw).digest()
        # Digests of equal length, compared in full whatever they hold.
        if self._builtin_sha256 is not None and hmac.compare_digest(digest, self._builtin_sha256):
            return self._builtin
        if not _TOKEN.fullmatch(raw):
            return None  # not an operator token: no need to ask the database

        async def work(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_AUTHENTICATE, digest)

        row = await self._db.read(work)
        # The index found the row by its digest; the comparison is there so no path skips one.
        if row is None or not hmac.compare_digest(bytes(row["token_sha256"]), digest):
            return None
        return Operator(row["name"], row["role"], row["id"])

    async def current(self, name: str, generation: int) -> Operator | None:
        """The operator `name` as it is now, if it is still the one of `generation`; None once removed."""
        if not self.switched_on:
            return None
        if name == BUILTIN:
            builtin = self._builtin
            return builtin if builtin is not None and builtin.generation == generation else None

        async def work(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_CURRENT, generation, name)

        row = await self._db.read(work)
        return None if row is None else Operator(row["name"], row["role"], row["id"])

    async def add(self, name: str, role: Role, *, by: str) -> tuple[OperatorRecord, str]:
        """Store a new operator; its record and its token, which exists nowhere else afterwards.

        Raises ValueError for a bad name or role, OperatorExists if the name is taken.
        """
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(f"cannot add {name!r}: {problem}")
        if role not in ROLES:
            raise ValueError(f"the role must be one of {', '.join(ROLES)}; got {role!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).digest()
        try:
            async with self._db.connection() as conn:
                row = await conn.fetchrow(_ADD, name, role, digest, by)
        except asyncpg.UniqueViolationError:
            raise OperatorExists(f"an operator named {name} already exists") from None
        assert row is not None
        self._enabled = None
        log.info("operator_added", operator=name, role=role, by=by)
        return _record(row), token

    async def list(self) -> builtins.list[OperatorRecord]:
        """The built-in `admin` (when its token is set), then the stored operators by name."""

        async def work(conn: Connection) -> builtins.list[asyncpg.Record]:
            return await conn.fetch(_LIST)

        stored = [_record(row) for row in await self._db.read(work)]
        builtin = self.builtin
        if builtin is None:
            return stored
        return [OperatorRecord(builtin.name, builtin.role, builtin.generation, builtin=True), *stored]

    async def remove(self, name: str, *, by: str) -> OperatorRecord | None:
        """Remove operator `name` at once (its token and sessions stop working); None if unknown.

        Raises ValueError for the built-in `admin`, which only unsetting GATEWAY_ADMIN_TOKEN removes.
        """
        if name == BUILTIN:
            raise ValueError(f"{BUILTIN} is the built-in operator: unset GATEWAY_ADMIN_TOKEN to remove it")
        async with self._db.connection() as conn:
            row = await conn.fetchrow(_REMOVE, name, by)
        if row is None:
            return None
        self._enabled = None
        log.info("operator_removed", operator=name, by=by)
        return _record(row)


def _record(row: asyncpg.Record) -> OperatorRecord:
    return OperatorRecord(
        name=row["name"],
        role=row["role"],
        generation=row["id"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        last_seen_at=row["last_seen_at"],
        removed_at=row["removed_at"],
        removed_by=row["removed_by"],
    )


@functools.lru_cache(maxsize=8)
def _builtin_generation(token: bytes) -> int:
    # Negative, so it never meets a stored operator's id; derived with a slow hash (once, at start)
    # and only 32 bits of it, so that where it is kept it tells nothing useful about a weak token.
    derived = hashlib.pbkdf2_hmac("sha256", token, b"chat-gateway built-in operator", 100_000)
    return -1 - int.from_bytes(derived[:4], "big")


# --- python -m gateway operators ----------------------------------------------------------------
