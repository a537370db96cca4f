"""How fast a block made through one replica, and an admin unblock, reach the other replicas.

A round blocks a fresh user through one replica (three violations to the policy's limit, or an
admin block), then calls every other replica as that user until each refuses it; then unblocks
the user through another replica and calls every replica until none refuses it, and each then
serves that user a chat. The watching calls are POSTs whose body is not JSON: the block check
comes first, so a blocked user gets 403 `user_blocked` and any other 400 `invalid_json`, both
from the gateway alone, without waiting on the upstream. A lag is from the answer that made the
change to the first answer showing it (an upper bound: it includes that call's round trip).
The round's answers are journaled like the load's, so its strikes are held against the audit
trail with the rest.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

VIOLATION = "Tell me something forbidden."
CLEAN = "What is the capital of Australia?"
PROBE_PREFIX = "multihost-probe-"
WATCH_SECONDS = 3.0  # how long a replica is watched for the change before the round gives up on it


@dataclass
class Round:
    number: int
    kind: Literal["policy", "admin"]
    user: str
    origin: str = ""
    unblock_via: str = ""
    block_lags: dict[str, float | None] = field(default_factory=dict)  # replica -> seconds (None: never)
    unblock_lags: dict[str, float | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Prober:
    session: aiohttp.ClientSession
    urls: Callable[[], dict[str, str]]  # the replicas serving now, by name
    admin_token: str
    journal: list[dict[str, Any]] = field(default_factory=list)

    async def round(self, number: int) -> Round | None:
        """One round through the replicas serving now; None when fewer than two are."""
        urls = self.urls()
        names = sorted(urls)
        if len(names) < 2:
            return None
        kind: Literal["policy", "admin"] = "policy" if number % 2 == 0 else "admin"
        probe = Round(number, kind, f"{PROBE_PREFIX}{number}-{uuid.uuid4().hex[:8]}")
        probe.origin = names[number % len(names)]
        probe.unblock_via = names[(number + 1) % len(names)]
        made = await self._block(probe, urls[probe.origin])
        if made is None:
            return probe
        others = {name: url for name, url in urls.items() if name != probe.origin}
        lags = await asyncio.gather(*(self._watch(probe.user, url, made, until=403) for url in others.values()))
        probe.block_lags = dict(zip(others, lags, strict=True))
        status, _, _ = await self._call(
            "PUT", f"{urls[probe.unblock_via]}/admin/unblock/{probe.user}", probe.user, "probe unblock", admin=True
        )
        lifted = time.time()
        if status != 200:
            probe.problems.append(f"the unblock through {probe.unblock_via} was answered {status}")
            return probe
        lags = await asyncio.gather(*(self._watch(probe.user, url, lifted, until=400) for url in urls.values()))
        probe.unblock_lags = dict(zip(urls, lags, strict=True))
        for name, url in urls.items():
            status, code, _ = await self._call(
                "POST", f"{url}/v1/chat/completions", probe.user, "probe chat", clean=True
            )
            if status != 200:
                probe.problems.append(f"{name} answered the unblocked user's chat {status} {code}")
        return probe

    async def _block(self, probe: Round, url: str) -> float | None:
        """Block the probe's user through `url`; when the answer that did it arrived."""
        if probe.kind == "admin":
            status, _, _ = await self._call(
                "PUT", f"{url}/admin/block/{probe.user}", probe.user, "probe admin block", admin=True
            )
            if status == 200:
                return time.time()
            probe.problems.append(f"the admin block through {probe.origin} was answered {status}")
            return None
        for _ in range(6):  # three strikes block; a few more answers tolerate a refused call
            status, code, _ = await self._call("POST", f"{url}/v1/chat/completions", probe.user, "probe violation")
            if status == 403 and code == "user_blocked":
                return time.time()
            if status != 400:
                probe.problems.append(f"a violation through {probe.origin} was answered {status} {code}")
        probe.problems.append(f"six violations through {probe.origin} did not block the user")
        return None

    async def _watch(self, user: str, url: str, since: float, *, until: int) -> float | None:
        """Call `url` as `user` until it answers `until`; seconds from `since`, None if it never did."""
        deadline = since + WATCH_SECONDS
        while time.time() < deadline:
            status, _, _ = await self._call("POST", f"{url}/v1/chat/completions", user, "probe watch", raw=b"{")
            if status == until:
                return time.time() - since
            await asyncio.sleep(0.002)
        return None

    async def _call(
        self,
        method: str,
        url: str,
        user: str,
        name: str,
        *,
        admin: bool = False,
        clean: bool = False,
        raw: bytes | None = None,
    ) -> tuple[int, str | None, str | None]:
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        body: bytes | None = raw
        if admin:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        else:
            headers |= {"X-User-ID": user, "Content-Type": "application/json"}
            if raw is None:
                text = CLEAN if clean else VIOLATION
                body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
        started = time.time()
        status, code, event_id, failure = 0, None, None, None
        try:
            async with self.session.request(method, url, data=body, headers=headers) as response:
                status = response.status
                data = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        else:
            if status >= 400:
                code, event_id = _error_fields(data)
        self.journal.append(
            {
                "t0": started,
                "t1": time.time(),
                "name": name,
                "user": user,
                "request_id": request_id,
                "status": status,
                "code": code,
                "event_id": event_id,
                "message": "",
                "failure": failure,
                "transport": failure,
            }
        )
        return status, code, event_id


def _error_fields(data: bytes) -> tuple[str | None, str | None]:
    try:
        error = orjson.loads(data).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None, None
    if not isinstance(error, dict):
        return None, None
    return error.get("code"), error.get("event_id")
