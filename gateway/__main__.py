"""`python -m gateway [serve|migrate|demo|policy|operators]` (also the console script `chat-gateway`)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys

import uvicorn

from gateway.server import protocol_for
from gateway.settings import Settings, SettingsError, load_settings


def _serve(settings: Settings) -> int:
    problem = settings.open_relay_problem()
    if problem:
        print(f"chat-gateway: refusing to start: {problem}", file=sys.stderr)
        return 2
    if settings.workers == 1:
        return _run(settings)
    from gateway.exposition import group_directory, prepare_group_directory, remove_group_directory

    try:
        metrics = group_directory(os.getpid())
        prepare_group_directory(metrics)
    except OSError as exc:
        print(
            f"chat-gateway: refusing to start: GATEWAY_WORKERS={settings.workers} needs a private, writable "
            f"temporary directory (TMPDIR or /tmp) where the workers share their metrics: {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        return _run(settings)
    finally:
        remove_group_directory(metrics)


def _run(settings: Settings) -> int:
    from gateway.app import create_app

    # Build the app once here so a bad setting fails now, with one line, not in every worker.
    app = create_app(settings)
    config = uvicorn.Config(
        app if settings.workers == 1 else "gateway.app:create_app",
        factory=settings.workers > 1,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http=protocol_for(settings),
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
        # The upstream's own Date and Server headers pass through; don't add a second pair.
        server_header=False,
        date_header=False,
        # The app applies uvicorn's X-Forwarded-* middleware itself, to its own routes only: on /v1
        # nothing reads the client address or scheme, and it cost 12,800 instructions a call.
        proxy_headers=False,
    )
    # uvicorn re-raises the signal that stopped it once it has drained; SIGTERM then ends the
    # process with 143. A graceful stop is a success, so let that re-raised signal go by.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if settings.workers > 1:
        sock = config.bind_socket()
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
        return 0
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def _migrate(settings: Settings) -> int:
    from gateway.database import Database
    from middleware.protocols import StoreUnavailable

    async def run() -> None:
        database = Database(settings)
        await database.open()
        await database.close()

    try:
        asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"chat-gateway: cannot migrate: {exc}", file=sys.stderr)
        return 1
    print("chat-gateway: schema is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["policy"]:
        from gateway.replay import policy_command

        return policy_command(argv[1:])
    if argv[:1] == ["operators"]:
        from gateway.operators_cli import operators_command

        return operators_command(argv[1:])
    parser = argparse.ArgumentParser(prog="chat-gateway", description="Moderation gateway for the OpenAI API.")
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "demo", "policy", "operators"],
        help=(
            "serve (default): run the gateway; migrate: apply the database schema and exit; "
            "demo: run a fake upstream, an embedded PostgreSQL and the gateway, and show a user get blocked; "
            "policy check|replay FILE: validate an enforcement policy file, or replay recent violations under it; "
            "operators add|list|remove: manage who may use the admin API, and their roles"
        ),
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        # The demo builds its own settings: the environment and .env must not change its story.
        from gateway.demo import run

        return run()
    try:
        settings = load_settings()
        if args.command == "migrate":
            return _migrate(settings)
        return _serve(settings)
    except SettingsError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
