"""JSON POSTs for the detectors that call out (the `JsonPost` of middleware.protocols), on aiohttp."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import aiohttp
from multidict import CIMultiDict

from middleware.protocols import DetectorFailed


class JsonPoster:
    """A `JsonPost` on the session `session()` returns (the proxy's: the lifespan opens it later)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession]) -> None:
        self._session = session

    # `timeout` is part of the JsonPost protocol.
    async def __call__(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, bytes]:
        """POST `body` and read the answer within `timeout` seconds; raises DetectorFailed."""
        request_headers = CIMultiDict(headers)
        request_headers.setdefault("Content-Type", "application/json")
        # The proxy's session does not decompress (it passes bytes through), so ask for none.
        request_headers.setdefault("Accept-Encoding", "identity")
        try:
            async with self._session().post(
                url,
                data=body,
                headers=request_headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                data = await response.read()
                encoding = response.headers.get("Content-Encoding", "").lower()
                if encoding in ("gzip", "deflate"):
                    data = zlib.decompress(data, zlib.MAX_WBITS | 32)
                return response.status, data
        except (aiohttp.ClientError, TimeoutError, zlib.error) as exc:
            raise DetectorFailed(f"POST {url} failed: {exc!r}") from exc
