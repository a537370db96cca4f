"""Console sign-in sessions, kept in PostgreSQL (table `console_sessions`, schema version 5).

The cookie holds 32 random bytes (URL-safe base64); the table holds only their SHA-256, so
reading the table opens no session. Each session remembers the operator's name and generation:
every page asks `Operators.current`, so removing an operator ends its sessions on every replica
with its next request, and such a session is marked revoked when it is seen.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gateway.database import Connection, Database
from gateway.operators import Operator, Operators

COOKIE = "cgw_console"
_RAW_BYTES = 32
# How long after its expiry a session row is kept before a sign-in deletes it.
_KEEP_EXPIRED = "1 day"

_CREATE = """
INSERT INTO console_sessions (id_sha256, operator, generation, expires_at)
VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8))
RETURNING expires_at
"""
_FIND = """
SELECT operator, generation, expires_at FROM console_sessions
WHERE id_sha256 = $1 AND revoked_at IS NULL AND expires_at > now()
"""
_REVOKE = "UPDATE console_sessions SET revoked_at = now() WHERE id_sha256 = $1 AND revoked_at IS NULL"
# Bounded, so one sign-in never does much work however many sessions expired.
_PURGE = f"""
DELETE FROM console_sessions WHERE id_sha256 IN (
    SELECT id_sha256 FROM console_sessions WHERE expires_at < now() - interval '{_KEEP_EXPIRED}'
    ORDER BY expires_at LIMIT 100)
"""  # noqa: S608 (constant text, no input)


@dataclass(frozen=True, slots=True)
class Session:
    """A live session: its operator as they are now, the CSRF token of its forms, its end."""

    operator: Operator
    csrf: str
    expires_at: datetime


def csrf_token(raw: str) -> str:
    """The session's CSRF token: derived from the cookie's secret, so only its holder can know it,
    and unlike the stored hash (a different prefix) it tells nothing about the cookie."""
    return hashlib.sha256(b"chat-gateway console csrf\x00" + raw.encode()).hexdigest()


def _digest(raw: str) -> bytes | None:
    """The stored key of cookie value `raw`, or None for a value no sign-in ever made."""
    if len(raw) != 43:
        return None
    try:
        decoded = base64.urlsafe_b64decode(raw + "=")
    except ValueError:
        return None
    if len(decoded) != _RAW_BYTES:
        return None
    return hashlib.sha256(raw.encode()).digest()


class Sessions:
    """Opens, finds and revokes console sessions."""

    def __init__(self, database: Database, operators: Operators, *, hours: float) -> None:
        self._db = database
        self._operators = operators
        self._seconds = hours * 3600

    async def open(self, operator: Operator) -> tuple[str, Session]:
        """A new session for `operator`: the cookie's value (exists nowhere else) and the session."""
        raw = base64.urlsafe_b64encode(secrets.token_bytes(_RAW_BYTES)).rstrip(b"=").decode()
        digest = _digest(raw)
        assert digest is not None
        async with self._db.connection() as conn:
            await conn.execute(_PURGE)
            expires_at = await conn.fetchval(_CREATE, digest, operator.name, operator.generation, self._seconds)
        return raw, Session(operator, csrf_token(raw), expires_at)

    async def find(self, raw: str | None) -> Session | None:
        """The live session of cookie value `raw`, or None: unknown, expired, revoked, or its operator removed."""
        digest = _digest(raw) if raw else None
        if digest is None or raw is None:
            return None

        async def work(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_FIND, digest)

        row = await self._db.read(work)
        if row is None:
            return None
        operator = await self._operators.current(row["operator"], row["generation"])
        if operator is None:
            await self.revoke(raw)
            return None
        return Session(operator, csrf_token(raw), row["expires_at"])

    async def revoke(self, raw: str | None) -> None:
        """End the session of cookie value `raw` (sign-out); nothing for an unknown one."""
        digest = _digest(raw) if raw else None
        if digest is None:
            return
        async with self._db.connection() as conn:
            await conn.execute(_REVOKE, digest)
