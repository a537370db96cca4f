"""Schemathesis against `/admin/openapi.json`: generated calls, a real store, no 5xx, answers match the schema.

The admin API is served by the whole app on a real uvicorn server over a fresh PostgreSQL
database, so every generated call reaches real SQL. Bounded for CI: a few dozen examples per
operation, no shrinking.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import httpx2
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS
from schemathesis.core.result import Ok

from gateway.app import create_app
from gateway.server import GatewayHttpProtocol
from gateway.settings import Settings
from tests.servers import run_app

SettingsFactory = Callable[..., Settings]
ADMIN = {"Authorization": "Bearer admin-secret"}
EXAMPLES_PER_OPERATION = 30


def test_generated_admin_calls_never_fail_and_match_the_schema(settings_factory: SettingsFactory) -> None:
    # The server protocol `python -m gateway` runs: generated headers the HTTP parser refuses (a
    # Content-Length of letters) get its JSON 400, where uvicorn's own answers in plain text.
    with run_app(create_app(settings_factory()), http=GatewayHttpProtocol) as url:
        # Known users make the generated ids hit real rows as well as unknown ones.
        for user in ("alice", "bob"):
            assert httpx2.put(f"{url}/admin/block/{user}", headers=ADMIN, json={"seconds": 60}).status_code == 200
        schema = schemathesis.openapi.from_url(f"{url}/admin/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
        assert len(operations) == 10
        checks = [check for check in CHECKS.get_all() if check.__name__ in _CHECKS]
        assert len(checks) == len(_CHECKS)
        calls: list[int] = []
        for operation, mode in itertools.product(operations, GenerationMode):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call_and_validate(base_url=f"{url}/admin", headers=ADMIN, checks=checks)
                calls.append(response.status_code)

            run()
    assert len(calls) >= len(operations) * 5
    assert all(status < 500 for status in calls)
    # Both kinds of answer were exercised: accepted calls and refused ones.
    assert any(status == 200 for status in calls)
    assert any(400 <= status < 500 for status in calls)


# The checks that hold for this API: no 5xx, documented status codes, content types and
# bodies as described. (Schemathesis' positive/negative acceptance checks disagree with
# deliberate 404s for unknown users and with lenient parsing of optional bodies.)
_CHECKS = {
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
}


def test_a_newline_in_an_admin_user_id_is_400(settings_factory: SettingsFactory) -> None:
    with run_app(create_app(settings_factory())) as url:
        answer = httpx2.get(f"{url}/admin/users/a%0Ab", headers=ADMIN)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_user_id"
