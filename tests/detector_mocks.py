"""Loopback mocks of the remote detectors' services, speaking their real wire formats.

- MockGuard: an OpenAI-compatible `POST /v1/chat/completions` serving a guard model, answering
  as Llama Guard 3/4 does (`safe`, or `unsafe` and `S1,S10`) or as Qwen3Guard-Gen does
  (`Safety: Unsafe` and `Categories: Violent`).
- MockAzure: Azure AI Content Safety's `POST /contentsafety/text:analyze?api-version=...`,
  with the `Ocp-Apim-Subscription-Key` header, its 10,000-character limit (400
  InvalidRequestBody), its 401 and its 429, and `categoriesAnalysis` severities.

Both flag on words: "violent" (violence), "hateful" (hate); a text holding "mild violence" has
Violence severity 2 at Azure. `delay` makes each answer wait that many seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Style = Literal["llama", "qwen", "nonsense"]


@dataclass
class MockGuard:
    style: Style = "llama"
    delay: float = 0.0
    status: int = 200
    base_url: str = ""
    calls: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    cancelled: int = 0  # calls whose client went away before the answer
    on_answer: Callable[[], None] | None = None  # called just before each answer is sent

    def answer(self, text: str) -> str:
        if self.style == "nonsense":
            return "I cannot help with that request."
        codes = [code for word, code in (("violent", "S1"), ("hateful", "S10")) if word in text]
        if self.style == "llama":
            return f"\n\nunsafe\n{','.join(codes)}" if codes else "\n\nsafe"
        names = {"S1": "Violent", "S10": "Politically Sensitive Topics"}
        if codes:
            return f"Safety: Unsafe\nCategories: {', '.join(names[code] for code in codes)}"
        return "Safety: Safe\nCategories: None"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.calls.append((dict(request.headers), payload))
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.on_answer is not None:
            self.on_answer()
        if self.status != 200:
            error = {"message": "The model is overloaded.", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=self.status)
        messages = payload["messages"]
        content = self.answer(messages[-1]["content"])
        return web.json_response(
            {
                "id": "chatcmpl-guard",
                "object": "chat.completion",
                "created": 1,
                "model": payload["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 200, "completion_tokens": 5, "total_tokens": 205},
            }
        )


@dataclass
class MockAzure:
    key: str = "azure-key"
    delay: float = 0.0
    rate_limited: bool = False
    base_url: str = ""
    calls: list[tuple[dict[str, str], str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.calls.append((dict(request.headers), request.query_string, payload))
        await asyncio.sleep(self.delay)
        if request.headers.get("Ocp-Apim-Subscription-Key") != self.key:
            return _azure_error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
                "valid key for an active subscription and use a correct regional API endpoint for your resource.",
            )
        if self.rate_limited:
            return _azure_error(429, "429", "Rate limit is exceeded. Try again in 1 seconds.")
        if request.query.get("api-version") not in ("2023-10-01", "2024-09-01"):
            return _azure_error(404, "404", "Resource not found")
        text = payload.get("text")
        if not isinstance(text, str) or not text:
            return _azure_error(400, "InvalidRequestBody", "The text field is required.")
        if len(text.encode("utf-16-le")) // 2 > 10_000:
            return _azure_error(
                400, "InvalidRequestBody", "The input text is too long. The maximum length is 10000 characters."
            )
        eight = payload.get("outputType") == "EightSeverityLevels"
        severities = {
            "Hate": 6 if "hateful" in text else 0,
            "SelfHarm": 0,
            "Sexual": 0,
            "Violence": 7 if "violent" in text else 2 if "mild violence" in text else 0,
        }
        analysis = [
            {"category": category, "severity": value if eight else value // 2 * 2}
            for category, value in severities.items()
            if category in payload.get("categories", severities)
        ]
        return web.json_response({"blocklistsMatch": [], "categoriesAnalysis": analysis})


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "target": None, "details": [], "innererror": None}},
        status=status,
    )


@asynccontextmanager
async def serving(mock: MockGuard | MockAzure) -> AsyncIterator[str]:
    """Serve `mock` on a loopback port; yields (and sets) its base URL."""
    app = web.Application()
    if isinstance(mock, MockGuard):
        app.router.add_post("/v1/chat/completions", mock.handle)
    else:
        app.router.add_post("/contentsafety/text:analyze", mock.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    mock.base_url = f"http://127.0.0.1:{port}" + ("/v1" if isinstance(mock, MockGuard) else "")
    try:
        yield mock.base_url
    finally:
        await runner.cleanup()
