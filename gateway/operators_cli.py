"""`python -m gateway operators add NAME --role ROLE | list [--json] | remove NAME`."""

from __future__ import annotations

import argparse
import asyncio
import builtins
import json
import os
import pwd
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway.database import Database
from gateway.logs import configure_logging
from gateway.operators import NAME_RULE, ROLES, OperatorExists, OperatorRecord, Operators, Role, name_problem
from gateway.settings import Settings, SettingsError, load_settings
from middleware.protocols import StoreUnavailable


def operators_command(argv: Sequence[str]) -> int:
    """`python -m gateway operators add NAME --role ROLE | list [--json] | remove NAME`."""
    parser = argparse.ArgumentParser(
        prog="chat-gateway operators", description="Manage the operators of the admin API and the console."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add operator NAME with ROLE and print its token, this once only")
    add.add_argument("name", help=NAME_RULE)
    add.add_argument(
        "--role",
        required=True,
        choices=ROLES,
        help="viewer reads; moderator also acts on users; admin also manages operators",
    )
    listing = commands.add_parser("list", help="the operators, their roles and when they were last seen")
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    remove = commands.add_parser("remove", help="remove operator NAME: its token and sessions stop working at once")
    remove.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "add" and (problem := name_problem(args.name)) is not None:
        print(f"chat-gateway: cannot add {args.name!r}: {problem}", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    # Only problems on stderr: stdout is the token (or the list), for a script to capture.
    configure_logging(settings.model_copy(update={"log_level": "warning"}))
    try:
        return asyncio.run(_command(settings, args))
    except StoreUnavailable as exc:
        print(f"chat-gateway: cannot reach the database: {exc}", file=sys.stderr)
        return 1


async def _command(settings: Settings, args: argparse.Namespace) -> int:
    database = Database(settings)
    await database.open()  # applies the schema, as start-up does: the table may be new
    try:
        operators = Operators(database, settings)
        if args.command == "add":
            return await _add(operators, args.name, args.role)
        if args.command == "remove":
            return await _remove(operators, args.name)
        _print_list(await operators.list(), as_json=args.json)
        return 0
    finally:
        await database.close()


async def _add(operators: Operators, name: str, role: Role) -> int:
    try:
        _, token = await operators.add(name, role, by=_shell_user())
    except OperatorExists as exc:
        print(f"chat-gateway: {exc}: remove it first to give the name a new token or role", file=sys.stderr)
        return 1
    print(token)
    print(
        f"chat-gateway: added operator {name} ({role}). The token above is shown this once and stored only as "
        "a hash: hand it to its owner privately.",
        file=sys.stderr,
    )
    return 0


async def _remove(operators: Operators, name: str) -> int:
    try:
        removed = await operators.remove(name, by=_shell_user())
    except ValueError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    if removed is None:
        print(f"chat-gateway: no operator named {name!r}", file=sys.stderr)
        return 1
    print(f"chat-gateway: removed operator {name}: its token and console sessions stopped working", file=sys.stderr)
    return 0


def _print_list(records: builtins.list[OperatorRecord], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([record.to_json() for record in records]))
        return
    rows = [("NAME", "ROLE", "ADDED", "BY", "LAST SEEN")]
    for record in records:
        if record.builtin:
            rows.append((record.name, record.role, "built in", "GATEWAY_ADMIN_TOKEN", ""))
        else:
            rows.append(
                (
                    record.name,
                    record.role,
                    _when(record.created_at),
                    record.created_by or "",
                    _when(record.last_seen_at),
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _when(moment: datetime | None) -> str:
    return "never" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _shell_user() -> str:
    """Who ran the command, for `created_by` / `removed_by`: `cli:` and the account's name."""
    try:
        return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:  # a container's user without a passwd entry
        return f"cli:{os.getuid()}"
