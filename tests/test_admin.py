"""The admin API through its ASGI app, on a real PostgreSQL store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote, unquote

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from structlog.testing import capture_logs
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from gateway.admin import OPENAPI, AdminAPI, admin_app
from gateway.app import create_app
from gateway.database import Database
from gateway.operators import Operators
from gateway.settings import Settings, settings_from
from gateway.store import MAX_BLOCK_SECONDS, MAX_PAGE, Policy, Store, encode_cursor
from gateway.throttle import AuthThrottle
from middleware.asgi import ASGIApp, Message, Receive, Scope, Send
from middleware.protocols import Verdict, Violation
from middleware.users import MAX_USER_ID_LENGTH, user_id_problem
from tests.servers import run_app
from tests.test_throttle import RecordingSleep

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

SettingsFactory = Callable[..., Settings]
# A call of each user route, all answered by the store.
STORE_CALLS = [
    ("GET", "/admin/users/u"),
    ("PUT", "/admin/block/u"),
    ("PUT", "/admin/unblock/u"),
    ("GET", "/admin/users"),
    ("GET", "/admin/users/u/events"),
    ("GET", "/admin/stats"),
]


def client_for(
    api: AdminAPI, *, address: str = "10.0.0.1", auth: bool = True, mount: bool = True
) -> httpx2.AsyncClient:
    """A client of `api` mounted at /admin in a Starlette app, as gateway.app mounts it.

    `mount=False` serves the API itself at /admin (root_path), for paths that Starlette's Mount
    cannot match: its pattern stops at a newline, so `/admin/users/a%0Ab` never reaches the API.
    """
    app: Any = Starlette(routes=[Mount("/admin", app=api)]) if mount else api
    transport = httpx2.ASGITransport(app=app, client=(address, 4321), root_path="" if mount else "/admin")
    return httpx2.AsyncClient(transport=transport, base_url="http://gateway", headers=AUTH if auth else {})


def closed_store(settings: Settings) -> Store:
    # A Database that was never opened: every store call raises StoreUnavailable.
    return Store(Database(settings), Policy.from_settings(settings))


@pytest.fixture
def admin_settings() -> Settings:
    # Tests that never reach the database need none: no database per test keeps them fast.
    return settings_from(admin_token=TOKEN, database_url="postgresql://127.0.0.1:9/none")


@pytest.fixture
async def admin(store: Store, settings_factory: SettingsFactory) -> AsyncIterator[httpx2.AsyncClient]:
    async with client_for(admin_app(store, settings_factory(admin_token=TOKEN))) as client:
        yield client


@pytest.fixture
async def offline(admin_settings: Settings) -> AsyncIterator[httpx2.AsyncClient]:
    """An admin client whose store cannot answer: for everything refused before the store."""
    async with client_for(admin_app(closed_store(admin_settings), admin_settings)) as client:
        yield client


def path(user_id: str) -> str:
    # Dots too, or a client would remove the id "." or ".." as a dot segment.
    return quote(user_id, safe="").replace(".", "%2E")


def violation(category: str = "violence") -> Violation:
    verdict = Verdict(detector="rules", categories=(category,), text_sha256="ab" * 32, rule=f"{category} rule")
    return Violation(verdict=verdict, path="/v1/chat/completions")


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = OPENAPI
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def conforms(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """A small JSON Schema check: $ref, anyOf, type, enum, required, properties, items, additionalProperties."""
    schema = resolve(schema)
    if "anyOf" in schema:
        failures = []
        for branch in schema["anyOf"]:
            try:
                conforms(value, branch, where)
            except AssertionError as failure:
                failures.append(str(failure))
        assert len(failures) < len(schema["anyOf"]), f"{where}: matches no branch: {failures}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(_TYPES[t](value) for t in types), f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                conforms(item, properties[key], f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                conforms(item, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            conforms(item, schema["items"], f"{where}[{index}]")


def check(response: httpx2.Response, status: int, schema: str) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    conforms(body, {"$ref": f"#/components/schemas/{schema}"})
    return body


def check_error(response: httpx2.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = check(response, status, "Error")["error"]
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["message"]
    return error


def seconds_until(iso: str) -> float:
    return (datetime.fromisoformat(iso) - datetime.now(UTC)).total_seconds()


# --- auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
async def test_every_call_is_503_while_no_admin_token_is_set_and_no_operator_is_stored(
    token: str | None, store: Store, settings_factory: SettingsFactory
) -> None:
    settings = settings_factory(admin_token=token)
    calls = [*STORE_CALLS, ("GET", "/admin/openapi.json"), ("GET", "/admin/nothing-here")]
    # Whether an operator exists is remembered for a moment (calls without a token must not each
    # take a database connection): a short moment here, so the operator added below shows.
    operators = Operators(store.database, settings, enabled_ttl=0.2)
    async with client_for(admin_app(store, settings, operators=operators), auth=False) as client:
        for method, url in calls:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {TOKEN}"}):
                check_error(await client.request(method, url, headers=headers), 503, "admin_disabled")
        # Once an operator is stored the API serves: the schema to anyone, the rest to a token.
        _, operator_token = await Operators(store.database, settings).add("dana", "viewer", by="test")
        await asyncio.sleep(0.25)
        assert (await client.get("/admin/openapi.json")).json() == OPENAPI
        check_error(await client.get("/admin/stats"), 401, "invalid_admin_token")
        stats = await client.get("/admin/stats", headers={"Authorization": f"Bearer {operator_token}"})
        check(stats, 200, "Stats")


@pytest.mark.parametrize("value", ["off", "false", "OFF", "0"])
async def test_switched_off_every_call_is_503_whatever_the_token_and_the_operators(
    value: str, store: Store, settings_factory: SettingsFactory
) -> None:
    _, operator_token = await Operators(store.database, settings_factory()).add("dana", "admin", by="test")
    settings = settings_factory(admin=value, admin_token=TOKEN)
    assert settings.admin is False
    for api in (admin_app(store, settings), admin_app(closed_store(settings), settings)):
        async with client_for(api) as client:
            for token in (TOKEN, operator_token, "admin-secret"):
                for method, url in [
                    ("GET", "/admin/stats"),
                    ("GET", "/admin/openapi.json"),
                    ("POST", "/admin/operators"),
                ]:
                    response = await client.request(method, url, headers={"Authorization": f"Bearer {token}"})
                    error = check_error(response, 503, "admin_disabled")
                    assert "GATEWAY_ADMIN=off" in error["message"]


async def test_without_an_admin_token_a_database_that_cannot_answer_is_503_store_unavailable() -> None:
    # Whether an operator is stored cannot be known: the answer says why, not "disabled".
    settings = settings_from(database_url="postgresql://127.0.0.1:9/none")
    async with client_for(admin_app(closed_store(settings), settings)) as client:
        check_error(await client.get("/admin/stats"), 503, "store_unavailable")
        check_error(await client.get("/admin/openapi.json"), 503, "store_unavailable")


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN.upper()}", f"Bearer {TOKEN}x"],
)
async def test_a_missing_or_wrong_token_is_401(offline: httpx2.AsyncClient, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    offline.headers.pop("Authorization")
    for method, url in [("GET", "/admin/users/u"), ("PUT", "/admin/block/u"), ("GET", "/admin/stats")]:
        response = await offline.request(method, url, headers=headers)
        check_error(response, 401, "invalid_admin_token")
        assert response.headers["x-should-retry"] == "false"


async def test_the_scheme_is_case_insensitive(offline: httpx2.AsyncClient) -> None:
    # Past auth, the closed store answers: 503 store_unavailable proves the token was accepted.
    response = await offline.get("/admin/stats", headers={"Authorization": f"bearer {TOKEN}"})
    check_error(response, 503, "store_unavailable")


async def test_unknown_routes_need_the_token_then_answer_404_or_405(offline: httpx2.AsyncClient) -> None:
    check_error(await offline.get("/admin/nothing", headers={"Authorization": "Bearer no"}), 401, "invalid_admin_token")
    check_error(await offline.get("/admin/nothing"), 404, "not_found")
    check_error(await offline.get("/admin/users/"), 404, "not_found")
    check_error(await offline.get("/admin/users//events"), 404, "not_found")
    response = await offline.post("/admin/block/u")
    check_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "PUT"
    response = await offline.post("/admin/users/u")
    check_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET, HEAD"


async def test_repeated_auth_failures_from_one_address_are_slowed_down(admin_settings: Settings) -> None:
    sleep = RecordingSleep()
    throttle = AuthThrottle(free_failures=2, delay=0.5, max_delay=1.5, sleep=sleep)
    api = admin_app(closed_store(admin_settings), admin_settings, throttle=throttle)
    async with client_for(api, address="10.0.0.7", auth=False) as attacker:
        for _ in range(5):
            check_error(await attacker.get("/admin/stats"), 401, "invalid_admin_token")
    assert sleep.delays == [0.5, 1.0, 1.5]
    async with client_for(api, address="10.0.0.8", auth=False) as other:
        check_error(await other.get("/admin/stats"), 401, "invalid_admin_token")
    assert sleep.delays == [0.5, 1.0, 1.5], "another address is not slowed down"
    async with client_for(api, address="10.0.0.7") as operator:
        check_error(await operator.get("/admin/stats"), 503, "store_unavailable")
    async with client_for(api, address="10.0.0.7", auth=False) as attacker:
        check_error(await attacker.get("/admin/stats"), 401, "invalid_admin_token")
    assert len(sleep.delays) == 3, "a success clears the address"


def behind_a_proxy(api: AdminAPI) -> ASGIApp:
    """`api` as the gateway serves it behind a trusted proxy: the socket peer goes to
    state["peer"] before uvicorn's middleware puts the X-Forwarded-For address in `client`."""
    # uvicorn types its middleware with its own ASGI types: the app and it are plain ASGI here.
    forwarded = cast("ASGIApp", ProxyHeadersMiddleware(cast("Any", mounted(api)), trusted_hosts="*"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["peer"] = scope["client"][0]
        await forwarded(scope, receive, send)

    return app


async def test_the_throttle_keys_on_the_socket_peer_not_on_x_forwarded_for(admin_settings: Settings) -> None:
    sleep = RecordingSleep()
    throttle = AuthThrottle(free_failures=2, global_free_failures=1000, delay=0.5, max_delay=1.5, sleep=sleep)
    app = behind_a_proxy(admin_app(closed_store(admin_settings), admin_settings, throttle=throttle))
    transport = httpx2.ASGITransport(app=app, client=("10.0.0.7", 4321))
    async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as guesser:
        with capture_logs() as logs:
            for index in range(5):  # a made-up address on every guess
                answer = await guesser.get("/admin/stats", headers={"X-Forwarded-For": f"203.0.113.{index}"})
                check_error(answer, 401, "invalid_admin_token")
    assert sleep.delays == [0.5, 1.0, 1.5]
    # The log still shows the address the proxy reported, beside the peer.
    failures = [(line["client"], line["peer"]) for line in logs if line["event"] == "admin_auth_failed"]
    assert failures == [(f"203.0.113.{index}", "10.0.0.7") for index in range(5)]


def test_the_gateway_gives_the_admin_api_the_socket_peer(settings_factory: SettingsFactory) -> None:
    # The whole app on a real server: loopback is a trusted proxy, so X-Forwarded-For names the client.
    with run_app(create_app(settings_factory())) as url, capture_logs() as logs:
        for index in range(3):
            guess = {"Authorization": "Bearer guess", "X-Forwarded-For": f"203.0.113.{index}"}
            assert httpx2.get(f"{url}/admin/stats", headers=guess).status_code == 401
    failures = [(line["client"], line["peer"]) for line in logs if line["event"] == "admin_auth_failed"]
    assert failures == [(f"203.0.113.{index}", "127.0.0.1") for index in range(3)]


async def test_guesses_spread_over_many_addresses_are_slowed_overall(admin_settings: Settings) -> None:
    sleep = RecordingSleep()
    api = admin_app(closed_store(admin_settings), admin_settings, throttle=AuthThrottle(sleep=sleep))
    for index in range(25):  # each address stays within its own five free failures
        async with client_for(api, address=f"198.51.100.{index}", auth=False) as guesser:
            check_error(await guesser.get("/admin/stats"), 401, "invalid_admin_token")
    assert sleep.delays == [0.25, 0.5, 1.0, 2.0, 4.0]


# --- request validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{", "invalid_json", None),
        (b"[]", "invalid_json", None),
        (b'"seconds"', "invalid_json", None),
        (b'{"seconds": NaN}', "invalid_json", None),
        (b'{"seconds": 1e400}', "invalid_json", None),
        (b'{"seconds": 0}', "invalid_request", "seconds"),
        (b'{"seconds": -5}', "invalid_request", "seconds"),
        (b'{"seconds": "60"}', "invalid_request", "seconds"),
        (b'{"seconds": true}', "invalid_request", "seconds"),
        (b'{"seconds": null}', "invalid_request", "seconds"),
        (b'{"seconds": 1e12}', "invalid_request", "seconds"),
        (b'{"permanent": "yes"}', "invalid_request", "permanent"),
        (b'{"permanent": 1}', "invalid_request", "permanent"),
        (b'{"seconds": 60, "permanent": true}', "invalid_request", "permanent"),
        (b'{"reason": 5}', "invalid_request", "reason"),
        (b'{"reason": ["a"]}', "invalid_request", "reason"),
        (b'{"reason": "' + b"x" * 1001 + b'"}', "invalid_request", "reason"),
        (b'{"reason": "a\\u0000b"}', "invalid_request", "reason"),
        (b'{"until": "tomorrow"}', "invalid_request", "until"),
    ],
)
async def test_bad_block_bodies_are_400_naming_the_field(
    offline: httpx2.AsyncClient, body: bytes, code: str, param: str | None
) -> None:
    response = await offline.put("/admin/block/u", content=body, headers={"Content-Type": "application/json"})
    error = check_error(response, 400, code, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"nope", "invalid_json", None),
        (b"7", "invalid_json", None),
        (b'{"reason": false}', "invalid_request", "reason"),
        (b'{"seconds": 5}', "invalid_request", "seconds"),
    ],
)
async def test_bad_unblock_bodies_are_400_naming_the_field(
    offline: httpx2.AsyncClient, body: bytes, code: str, param: str | None
) -> None:
    check_error(await offline.put("/admin/unblock/u", content=body), 400, code, param)


async def test_a_body_of_optional_fields_may_be_left_out_and_the_refusal_says_so(offline: httpx2.AsyncClient) -> None:
    error = check_error(await offline.put("/admin/unblock/u", content=b'{"why": "x"}'), 400, "invalid_request", "why")
    assert error["message"] == "Unknown field 'why': expected a JSON object with reason, or no body."


async def test_a_huge_body_is_413(offline: httpx2.AsyncClient) -> None:
    body = b'{"reason": "' + b"x" * 70_000 + b'"}'
    check_error(await offline.put("/admin/block/u", content=body), 413, "request_too_large")


@pytest.mark.parametrize(
    ("url", "param"),
    [
        ("/admin/users?limit=0", "limit"),
        ("/admin/users?limit=1001", "limit"),
        ("/admin/users?limit=ten", "limit"),
        ("/admin/users?limit=-1", "limit"),
        ("/admin/users?limit=1.5", "limit"),
        ("/admin/users?limit=", "limit"),
        ("/admin/users?limit=1&limit=2", "limit"),
        ("/admin/users?blocked=yes", "blocked"),
        ("/admin/users?block=true", "block"),
        ("/admin/users/u/events?limit=0", "limit"),
        ("/admin/users/u/events?after=x", "after"),
        ("/admin/users/u?blocked=true", "blocked"),
        ("/admin/stats?window=1h", "window"),
    ],
)
async def test_bad_query_parameters_are_400_naming_them(offline: httpx2.AsyncClient, url: str, param: str) -> None:
    check_error(await offline.get(url), 400, "invalid_request", param)


@pytest.mark.parametrize("user_id", ["a%00b", "a%0Ab", "%7F", "%C2%85", "x" * 257, "%FF", "%C3"])
async def test_invalid_user_ids_in_paths_are_400(admin_settings: Settings, user_id: str) -> None:
    api = admin_app(closed_store(admin_settings), admin_settings)
    async with client_for(api, mount=False) as client:
        await assert_invalid_user_id(client, user_id)
    if "%0A" not in user_id:
        async with client_for(api) as client:
            await assert_invalid_user_id(client, user_id)


async def assert_invalid_user_id(client: httpx2.AsyncClient, user_id: str) -> None:
    for method, url in [
        ("GET", f"/admin/users/{user_id}"),
        ("GET", f"/admin/users/{user_id}/events"),
        ("PUT", f"/admin/block/{user_id}"),
        ("PUT", f"/admin/unblock/{user_id}"),
    ]:
        check_error(await client.request(method, url), 400, "invalid_user_id", "user_id")


def test_user_id_rules_match_the_user_header() -> None:
    assert user_id_problem("alice") is None
    assert user_id_problem("x" * 256) is None
    assert user_id_problem("ünï/cødé ☃") is None
    assert user_id_problem("") == "is empty"
    assert user_id_problem("x" * 257) == "is longer than 256 characters"
    assert user_id_problem("a\tb") == "holds control characters"


async def test_every_store_call_is_503_when_the_database_cannot_answer(offline: httpx2.AsyncClient) -> None:
    for method, url in STORE_CALLS:
        response = await offline.request(method, url)
        check_error(response, 503, "store_unavailable")
        assert response.headers["content-type"] == "application/json"


async def test_the_refusal_names_the_first_fault_in_a_stable_order(offline: httpx2.AsyncClient) -> None:
    # the user id, then unknown names, then values; the message says what was expected
    check_error(await offline.get("/admin/users/a%00b/events?limit=0&x=1"), 400, "invalid_user_id", "user_id")
    check_error(await offline.get("/admin/users/u/events?limit=0&x=1"), 400, "invalid_request", "x")
    error = check_error(
        await offline.put("/admin/block/u", json={"seconds": 0, "until": 1}), 400, "invalid_request", "until"
    )
    assert "seconds, permanent, reason" in error["message"]
    error = check_error(await offline.get("/admin/users?limit=5000"), 400, "invalid_request", "limit")
    assert str(MAX_PAGE) in error["message"]


# --- the OpenAPI document ------------------------------------------------------------------


async def test_the_openapi_document_describes_exactly_the_routes(admin_settings: Settings) -> None:
    api = admin_app(closed_store(admin_settings), admin_settings)
    routed = {
        (route.path, method.lower()) for route in api.routes for method in route.methods or () if method != "HEAD"
    }
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    documented = {(p, m) for p, item in OPENAPI["paths"].items() for m in item if m in methods}
    assert routed == documented
    assert OPENAPI["openapi"].startswith("3.1")
    assert OPENAPI["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for item in OPENAPI["paths"].values():
        for operation in item.values():
            assert {"200", "201", "204"} & set(operation["responses"])
            for parameter in operation.get("parameters", []):
                resolve(parameter)  # every $ref resolves
            for response in operation["responses"].values():
                resolve(response)


def test_the_openapi_document_states_the_limits_the_api_enforces() -> None:
    schemas = OPENAPI["components"]["schemas"]
    seconds = schemas["BlockRequest"]["properties"]["seconds"]
    assert (seconds["type"], seconds["exclusiveMinimum"], seconds["maximum"]) == ("number", 0, MAX_BLOCK_SECONDS)
    reason = schemas["BlockRequest"]["properties"]["reason"]["anyOf"]
    assert {"type": "string", "maxLength": 1000} in reason
    users = {p["name"]: p for p in OPENAPI["paths"]["/users"]["get"]["parameters"]}
    assert users["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}
    assert users["blocked"]["schema"] == {"type": "boolean"}
    (user_id,) = OPENAPI["paths"]["/users/{user_id}"]["get"]["parameters"]
    assert (user_id["in"], user_id["required"]) == ("path", True)
    assert user_id["schema"] == {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID_LENGTH}


async def test_the_openapi_document_is_served_without_a_token(admin_settings: Settings) -> None:
    api = admin_app(closed_store(admin_settings), admin_settings)
    async with client_for(api, auth=False) as client:
        response = await client.get("/admin/openapi.json")
    assert response.status_code == 200
    assert response.json() == OPENAPI


# --- calls against the store ---------------------------------------------------------------


async def test_an_unknown_user_is_404(admin: httpx2.AsyncClient) -> None:
    check_error(await admin.get("/admin/users/nobody"), 404, "user_not_found")
    check_error(await admin.get("/admin/users/nobody/events"), 404, "user_not_found")
    check_error(await admin.put("/admin/unblock/nobody"), 404, "user_not_found")
    check_error(await admin.put("/admin/unblock/nobody", json={"reason": "x"}), 404, "user_not_found")


async def test_a_block_without_body_lasts_the_policys_first_block_and_creates_the_user(
    store: Store, settings_factory: SettingsFactory
) -> None:
    # The store's policy (GATEWAY_BLOCK_SECONDS=60 without a policy file) decides the span.
    settings = settings_factory(admin_token=TOKEN)
    async with client_for(admin_app(store, settings)) as client:
        status = check(await client.put("/admin/block/new-user"), 200, "UserStatus")
        assert status["user_id"] == "new-user"
        assert status["blocked"] is True
        assert status["permanent"] is False
        assert status["blocks"] == 0, "admin blocks do not count as policy blocks"
        assert 50 < seconds_until(status["blocked_until"]) <= 60
        assert check(await client.get("/admin/users/new-user"), 200, "UserStatus") == status
        events = check(await client.get("/admin/users/new-user/events"), 200, "EventList")["data"]
        assert [(e["type"], e["actor"], e["reason"]) for e in events] == [("block", "admin", None)]


async def test_a_block_for_seconds_or_for_good(admin: httpx2.AsyncClient) -> None:
    status = check(await admin.put("/admin/block/bob", json={"seconds": 90.5, "reason": "spam"}), 200, "UserStatus")
    assert status["blocked"] is True
    assert 80 < seconds_until(status["blocked_until"]) <= 90.5
    status = check(await admin.put("/admin/block/bob", json={"permanent": True}), 200, "UserStatus")
    assert (status["blocked"], status["permanent"], status["blocked_until"]) == (True, True, None)
    status = check(await admin.put("/admin/block/bob", json={"permanent": False, "seconds": 30}), 200, "UserStatus")
    assert (status["blocked"], status["permanent"]) == (True, False)
    assert 20 < seconds_until(status["blocked_until"]) <= 30
    events = check(await admin.get("/admin/users/bob/events"), 200, "EventList")["data"]
    blocks = [e for e in events if e["type"] == "block"]
    assert [(e["actor"], e["reason"], e["permanent"]) for e in blocks] == [
        ("admin", None, False),
        ("admin", None, True),
        ("admin", "spam", False),
    ]


async def test_unblock_is_idempotent_and_keeps_the_reason(admin: httpx2.AsyncClient, store: Store) -> None:
    for _ in range(2):
        await store.record_violation("carol", violation())
    check(await admin.put("/admin/block/carol", json={"reason": "abuse"}), 200, "UserStatus")
    status = check(await admin.put("/admin/unblock/carol", json={"reason": "appeal granted"}), 200, "UserStatus")
    assert (status["blocked"], status["blocked_until"], status["strikes"]) == (False, None, 0)
    again = check(await admin.put("/admin/unblock/carol"), 200, "UserStatus")
    assert again == status
    events = check(await admin.get("/admin/users/carol/events"), 200, "EventList")["data"]
    ids = [event["id"] for event in events]
    assert ids == sorted(ids, reverse=True), "newest first"
    unblocks = [e for e in events if e["type"] == "unblock"]
    assert unblocks[-1]["actor"] == "admin"
    assert unblocks[-1]["reason"] == "appeal granted"
    block = next(e for e in events if e["type"] == "block")
    assert (block["actor"], block["reason"]) == ("admin", "abuse")
    assert check(await admin.get("/admin/users/carol"), 200, "UserStatus")["blocked"] is False


async def test_list_users_pages_with_a_cursor_and_filters_blocked(admin: httpx2.AsyncClient, store: Store) -> None:
    users = [f"user-{index}" for index in range(7)]
    for user_id in users:
        await store.record_violation(user_id, violation())
    for user_id in users[2:5]:
        check(await admin.put(f"/admin/block/{user_id}"), 200, "UserStatus")

    seen: list[str] = []
    url = "/admin/users?limit=3"
    pages = 0
    while True:
        page = check(await admin.get(url), 200, "UserList")
        assert len(page["data"]) <= 3
        seen += [status["user_id"] for status in page["data"]]
        pages += 1
        if page["next"] is None:
            break
        url = f"/admin/users?limit=3&after={quote(page['next'], safe='')}"
    assert sorted(seen) == sorted(users)
    assert len(seen) == len(set(seen)), "no user twice across pages"
    assert pages >= 3

    blocked = check(await admin.get("/admin/users?blocked=true"), 200, "UserList")
    assert sorted(status["user_id"] for status in blocked["data"]) == users[2:5]
    assert all(status["blocked"] for status in blocked["data"])
    assert blocked["next"] is None
    unblocked = check(await admin.get("/admin/users?blocked=FALSE&limit=1000"), 200, "UserList")
    assert sorted(status["user_id"] for status in unblocked["data"]) == users[:2] + users[5:]

    default = check(await admin.get("/admin/users"), 200, "UserList")
    assert len(default["data"]) == 7


async def test_a_bad_cursor_is_400(admin: httpx2.AsyncClient) -> None:
    check_error(await admin.get("/admin/users?after=not-a-cursor!"), 400, "invalid_request", "after")


@pytest.mark.parametrize("user_id", ["a\x00b", "a\nb", "x" * 257])
async def test_a_cursor_holding_an_id_the_gateway_refuses_is_400(admin: httpx2.AsyncClient, user_id: str) -> None:
    cursor = encode_cursor(user_id)
    check_error(await admin.get(f"/admin/users?after={cursor}"), 400, "invalid_request", "after")
    # the empty cursor is the first page, as before
    assert check(await admin.get("/admin/users?after="), 200, "UserList") == {"data": [], "next": None}


async def test_the_longest_block_and_page_are_the_stores(admin: httpx2.AsyncClient) -> None:
    status = check(await admin.put("/admin/block/u", json={"seconds": MAX_BLOCK_SECONDS}), 200, "UserStatus")
    assert seconds_until(status["blocked_until"]) > MAX_BLOCK_SECONDS - 60
    too_long = await admin.put("/admin/block/u", json={"seconds": MAX_BLOCK_SECONDS + 1})
    check_error(too_long, 400, "invalid_request", "seconds")
    assert check(await admin.get(f"/admin/users?limit={MAX_PAGE}"), 200, "UserList")["data"][0]["user_id"] == "u"
    check_error(await admin.get(f"/admin/users?limit={MAX_PAGE + 1}"), 400, "invalid_request", "limit")


async def test_events_are_newest_first_and_limited(admin: httpx2.AsyncClient, store: Store) -> None:
    await store.record_violation("dave", violation("violence"))
    await store.record_violation("dave", violation("hate"))
    check(await admin.put("/admin/block/dave", json={"reason": "enough"}), 200, "UserStatus")
    events = check(await admin.get("/admin/users/dave/events"), 200, "EventList")["data"]
    assert [event["type"] for event in events] == ["block", "violation", "violation"]
    assert events[1]["categories"] == ["hate"]
    assert events[2]["categories"] == ["violence"]
    assert (events[2]["detector"], events[2]["path"]) == ("rules", "/v1/chat/completions")
    assert "text" not in events[2], "the audit trail keeps no prompt text"
    limited = check(await admin.get("/admin/users/dave/events?limit=2"), 200, "EventList")["data"]
    assert limited == events[:2]


async def test_stats_count_blocked_users_violations_and_blocks(admin: httpx2.AsyncClient, store: Store) -> None:
    empty = check(await admin.get("/admin/stats"), 200, "Stats")
    assert (empty["blocked_users"], empty["violations_24h"], empty["blocks_24h"]) == (0, 0, 0)
    assert empty["violations_by_category_24h"] == {}
    for category in ("violence", "violence", "hate"):
        await store.record_violation("erin", violation(category))  # the third strike blocks erin
    await store.record_violation("frank", violation("hate"))
    stats = check(await admin.get("/admin/stats"), 200, "Stats")
    assert stats["blocked_users"] == 1
    assert stats["violations_24h"] == 4
    assert stats["blocks_24h"] == 1
    assert stats["violations_by_category_24h"] == {"violence": 2, "hate": 2}
    status = check(await admin.get("/admin/users/erin"), 200, "UserStatus")
    assert (status["blocked"], status["blocks"]) == (True, 1)


@pytest.mark.parametrize(
    "user_id",
    ["a/b", "ünï/cødé ☃", "a?b#c&d=e", "100%", "%2F", "../stats", "..", ".", " spaced ", "x" * 256],
)
async def test_percent_encoded_and_unicode_ids_round_trip(admin: httpx2.AsyncClient, user_id: str) -> None:
    status = check(await admin.put(f"/admin/block/{path(user_id)}", json={"seconds": 60}), 200, "UserStatus")
    assert status["user_id"] == user_id
    assert check(await admin.get(f"/admin/users/{path(user_id)}"), 200, "UserStatus")["user_id"] == user_id
    events = check(await admin.get(f"/admin/users/{path(user_id)}/events"), 200, "EventList")["data"]
    assert [event["type"] for event in events] == ["block"]
    status = check(await admin.put(f"/admin/unblock/{path(user_id)}"), 200, "UserStatus")
    assert (status["user_id"], status["blocked"]) == (user_id, False)
    listed = check(await admin.get("/admin/users"), 200, "UserList")["data"]
    assert [status["user_id"] for status in listed] == [user_id]


async def test_dot_dot_tricks_never_reach_another_route(
    admin: httpx2.AsyncClient, store: Store, settings_factory: SettingsFactory
) -> None:
    # Encoded slashes stay inside the user id: these are user lookups, not stats or events.
    check_error(await admin.get("/admin/users/..%2fstats"), 404, "user_not_found")
    check_error(await admin.get("/admin/users/..%2F..%2Fstats"), 404, "user_not_found")
    check_error(await admin.get("/admin/users/x%2F..%2F..%2Fstats/events"), 404, "user_not_found")
    check_error(await admin.put("/admin/unblock/..%2F..%2Fblock%2Fvictim"), 404, "user_not_found")
    status = check(await admin.put("/admin/block/..%2f..%2funblock%2fvictim"), 200, "UserStatus")
    assert status["user_id"] == "../../unblock/victim"
    check_error(await admin.get("/admin/users/victim"), 404, "user_not_found")
    # An encoded slash in the mount prefix matches no admin route.
    check_error(await admin.get("/admin%2Fusers/victim"), 404, "not_found")
    check_error(await admin.get("/admin/users%2F..%2Fstats"), 404, "not_found")
    # Literal dot segments (a client that does not normalise them) match no route either.
    app = mounted(admin_app(store, settings_factory(admin_token=TOKEN)))
    check_error(await asgi_get(app, "/admin/users/../stats", b"/admin/users/../stats"), 404, "not_found")
    check_error(await asgi_get(app, "/admin/users/../users/x", b"/admin/users/../users/x"), 404, "not_found")
    assert await store.status("victim") is None


async def asgi_get(app: ASGIApp, path: str, raw_path: bytes | None) -> httpx2.Response:
    """GET through `app` with a request target no client library would send as is."""
    messages: list[Message] = []
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gateway"), (b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("10.0.0.1", 4321),
        "server": ("gateway", 80),
    }
    if raw_path is not None:
        scope["raw_path"] = raw_path

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = messages[0]
    body = b"".join(message.get("body", b"") for message in messages[1:])
    headers = [(k.decode(), v.decode()) for k, v in start["headers"]]
    return httpx2.Response(start["status"], headers=headers, content=body)


def mounted(api: AdminAPI) -> ASGIApp:
    return Starlette(routes=[Mount("/admin", app=api)])


async def test_a_server_without_raw_path_still_routes(admin_settings: Settings) -> None:
    app = mounted(admin_app(closed_store(admin_settings), admin_settings))
    # Without raw_path encoded slashes are gone; plain ids still route.
    check_error(await asgi_get(app, "/admin/users/x/events", None), 503, "store_unavailable")
    check_error(await asgi_get(app, "/admin/users/ü", None), 503, "store_unavailable")
    check_error(await asgi_get(app, "/admin/nope", None), 404, "not_found")


async def test_a_websocket_is_closed(admin_settings: Settings) -> None:
    api = admin_app(closed_store(admin_settings), admin_settings)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await api({"type": "websocket", "path": "/users/x", "headers": []}, receive, send)
    assert [message["type"] for message in sent] == ["websocket.close"]


async def test_routing_under_a_real_uvicorn_server(admin_settings: Settings) -> None:
    # uvicorn, not the test transport, builds path and raw_path here. The store cannot answer,
    # so 503 store_unavailable says which route (and which user id) a request reached.
    app = mounted(admin_app(closed_store(admin_settings), admin_settings))
    with run_app(app, lifespan="off") as base_url:
        async with httpx2.AsyncClient(base_url=base_url, headers=AUTH) as client:
            check_error(await client.get("/admin/users/a%2Fb/events?limit=0"), 400, "invalid_request", "limit")
            check_error(await client.get("/admin/users/a%2Fevents"), 503, "store_unavailable")
            check_error(await client.get("/admin/users/..%2Fstats"), 503, "store_unavailable")
            check_error(await client.put("/admin/block/%FF"), 400, "invalid_user_id", "user_id")
            assert (await client.get("/admin/openapi.json", headers={"Authorization": ""})).json() == OPENAPI


@pytest.mark.parametrize("path", ["/admin", "/admin/users/x/"])
def test_no_answer_redirects_to_the_host_the_client_named(settings_factory: SettingsFactory, path: str) -> None:
    with run_app(create_app(settings_factory())) as url:
        for token in ({}, {"Authorization": "Bearer admin-secret"}):
            answer = httpx2.get(f"{url}{path}", headers={"Host": "evil.example", **token})
            location = answer.headers.get("location", "")
            assert "evil.example" not in location, f"{path}: {answer.status_code} to {location}"


async def test_finding_the_route_path_costs_in_proportion_to_the_path(
    admin_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Routing runs before the token check: a path of many segments whose mount prefix holds an
    # encoded slash made it decode every suffix (a 60 KB path held the event loop for seconds).
    decoded: list[int] = []

    def counting_unquote(text: str) -> str:
        decoded.append(len(text))
        return unquote(text)

    monkeypatch.setattr("gateway.admin_http.unquote", counting_unquote)
    app = mounted(admin_app(closed_store(admin_settings), admin_settings))
    raw = b"/admin%2F" + b"x/" * 5000
    answer = await asgi_get(app, unquote(raw.decode()), raw)
    check_error(answer, 404, "not_found")
    assert sum(decoded) <= 3 * len(raw)
    # Paths that route still route, an encoded prefix and encoded slashes in ids included.
    check_error(await asgi_get(app, "/admin/users/a/b", b"/%61dmin/users/a%2Fb"), 503, "store_unavailable")
    check_error(await asgi_get(app, "/admin/users/a/b", b"/admin/users/a%2Fb?x=1"), 503, "store_unavailable")
    answer = await asgi_get(app, "/admin/users/\u00fc/events", b"/admin/users/%C3%BC/events")
    check_error(answer, 503, "store_unavailable")
