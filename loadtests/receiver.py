"""A webhook receiver for load runs: it checks each delivery's signature and records it (event id, sender, time)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.webhooks import sign


@dataclass(frozen=True)
class Delivery:
    event_id: str
    type: str
    sender: str  # the replica's address
    at: float  # time.time() when it arrived
    attempt: int


@dataclass
class Receiver:
    """Answers 200 to every well-signed POST and records it; a bad signature is answered 401 and counted."""

    secret: bytes
    deliveries: list[Delivery] = field(default_factory=list)
    bad_signatures: int = 0
    _runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> str:
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        return f"http://{host}:{port}/hooks"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not hmac.compare_digest(request.headers.get("X-Gateway-Signature", ""), sign(self.secret, body)):
            self.bad_signatures += 1
            return web.Response(status=401)
        try:
            attempt = int(request.headers.get("X-Gateway-Delivery-Attempt", "0"))
        except ValueError:
            attempt = 0
        self.deliveries.append(
            Delivery(
                event_id=request.headers.get("X-Gateway-Event-Id", ""),
                type=request.headers.get("X-Gateway-Event-Type", ""),
                sender=request.remote or "",
                at=time.time(),
                attempt=attempt,
            )
        )
        return web.Response(status=200)
