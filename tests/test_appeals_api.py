"""Appeals end to end on real servers: the user's journey from three strikes to an accepted
appeal, the moderator's calls (decide, reverse, erase, the policy), two replicas, bad input,
and a database that drops mid-decision."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import pytest

from gateway.app import create_app
from gateway.database import Database
from gateway.operators import Operators, Role
from gateway.settings import Settings
from gateway.store import Policy
from tests.conftest import run_sync
from tests.servers import run_app
from tests.test_appeals import _terminate_inside
from tests.test_standing import FLAGGED, appeal, as_user, error, strike
from tests.test_store import fetch
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
def settings(settings_factory: SettingsFactory, upstream: MockUpstream) -> Settings:
    # Webhooks on, to a receiver that is not there: the outbox rows stay to be read.
    return settings_factory(
        upstream_url=upstream.url, moderation="rules", webhook_url="http://127.0.0.1:9/hook", webhook_secret="s"
    )


def admin(url: str, method: str, path: str, body: Any = None) -> httpx2.Response:
    return httpx2.request(method, f"{url}/admin{path}", headers=ADMIN, json=body)


def outbox_types(database_url: str) -> list[str]:
    rows = run_sync(fetch(database_url, "SELECT payload FROM webhook_outbox ORDER BY id"))
    return [orjson.loads(row["payload"])["type"] for row in rows]


def test_the_whole_journey(settings: Settings, upstream: MockUpstream, database_url: str) -> None:
    with run_app(create_app(settings)) as url:
        # Three strikes: 400, 400, then 403 naming the block.
        refusals = [httpx2.post(f"{url}/v1/chat/completions", headers=as_user("zoe"), json=FLAGGED) for _ in range(3)]
        assert [answer.status_code for answer in refusals] == [400, 400, 403]
        block_id = refusals[2].json()["error"]["event_id"]
        assert refusals[2].json()["error"]["appealable"] is True
        assert httpx2.get(f"{url}/v1/models", headers=as_user("zoe")).status_code == 403

        # Blocked, the user still sees their standing, and appeals the block.
        standing = httpx2.get(f"{url}/gateway/standing", headers=as_user("zoe")).json()
        assert (standing["blocked"], standing["block"]["event_id"], len(standing["active_strikes"])) == (
            True,
            block_id,
            3,
        )
        filed = appeal(url, "zoe", {"event_id": block_id, "message": "I was asking for my chemistry class."})
        assert filed.status_code == 201
        appeal_id = filed.json()["id"]

        # The moderator's queue, oldest first, with the event appealed.
        queue = admin(url, "GET", "/appeals").json()
        assert [item["id"] for item in queue["data"]] == [appeal_id]
        assert (queue["data"][0]["event"]["type"], queue["data"][0]["event"]["categories"], queue["next"]) == (
            "block",
            ["illicit/violent"],
            None,
        )
        decided = admin(url, "POST", f"/appeals/{appeal_id}/decision", {"decision": "accept", "reason": "Coursework."})
        assert decided.status_code == 200
        assert {key: decided.json()[key] for key in ("status", "decided_by", "decision_reason")} == {
            "status": "accepted",
            "decided_by": "admin",
            "decision_reason": "Coursework.",
        }

        # The user calls again, and is forwarded.
        upstream.requests.clear()
        assert httpx2.get(f"{url}/v1/models", headers=as_user("zoe")).status_code == 200
        assert len(upstream.requests) == 1
        after = httpx2.get(f"{url}/gateway/standing", headers=as_user("zoe")).json()
        assert (after["blocked"], after["strikes"], after["block"]) == (False, 0, None)
        assert (after["appeals"][0]["status"], after["appeals"][0]["decision_reason"]) == ("accepted", "Coursework.")
        assert "decided_by" not in after["appeals"][0]  # the moderator's name stays inside
        status = admin(url, "GET", "/users/zoe").json()
        assert (status["blocked"], status["blocks"]) == (False, 0)
        events = admin(url, "GET", "/users/zoe/events").json()["data"]
        assert [(event["type"], event.get("operator")) for event in events[:2]] == [
            ("appeal_accepted", "admin"),
            ("unblock", "admin"),
        ]
        assert admin(url, "GET", "/appeals?status=accepted").json()["data"][0]["id"] == appeal_id
    assert outbox_types(database_url) == ["user.blocked", "user.unblocked", "appeal.decided"]


def test_a_rejected_appeal_changes_nothing_else(settings: Settings) -> None:
    with run_app(create_app(settings)) as url:
        event_id = strike(url, "yan")
        appeal_id = appeal(url, "yan", {"event_id": event_id, "message": "Please."}).json()["id"]
        rejected = admin(url, "POST", f"/appeals/{appeal_id}/decision", {"decision": "reject", "reason": "Clear."})
        assert rejected.json()["status"] == "rejected"
        again = admin(url, "POST", f"/appeals/{appeal_id}/decision", {"decision": "accept", "reason": "Oops."})
        found = error(again, 409, "appeal_decided")
        assert found["appeal_status"] == "rejected"
        assert again.headers["x-should-retry"] == "false"
        standing = httpx2.get(f"{url}/gateway/standing", headers=as_user("yan")).json()
        assert (standing["strikes"], standing["appeals"][0]["status"]) == (1, "rejected")
        assert admin(url, "GET", f"/appeals/{appeal_id}").json()["status"] == "rejected"


def test_a_moderator_reverses_one_strike(settings: Settings) -> None:
    with run_app(create_app(settings)) as url:
        first, second = strike(url, "xia"), strike(url, "xia")
        reversed_status = admin(url, "POST", f"/events/{first}/reverse", {"reason": "A false positive."})
        assert reversed_status.status_code == 200
        assert (reversed_status.json()["user_id"], reversed_status.json()["strikes"]) == ("xia", 1)
        standing = httpx2.get(f"{url}/gateway/standing", headers=as_user("xia")).json()
        assert [item["event_id"] for item in standing["active_strikes"]] == [second]
        error(appeal(url, "xia", {"event_id": first, "message": "Thanks."}), 409, "event_reversed", "event_id")


def test_erasure_on_request(settings: Settings, database_url: str) -> None:
    with run_app(create_app(settings)) as url:
        for _ in range(3):
            strike(url, "wes")
        erased = admin(url, "DELETE", "/users/wes")
        assert (erased.status_code, erased.content) == (204, b"")
        error(admin(url, "GET", "/users/wes"), 404, "user_not_found")
        error(admin(url, "GET", "/users/wes/events"), 404, "user_not_found")
        error(admin(url, "DELETE", "/users/wes"), 404, "user_not_found")
        # No block is left behind: the id calls as a new user.
        assert httpx2.get(f"{url}/v1/models", headers=as_user("wes")).status_code == 200
        assert httpx2.get(f"{url}/gateway/standing", headers=as_user("wes")).json()["strikes"] == 0
    rows = run_sync(fetch(database_url, "SELECT operator FROM events WHERE kind = 'erased'"))
    assert [row["operator"] for row in rows] == ["admin"]
    assert outbox_types(database_url) == []  # the user's webhook rows went with them


def test_the_policy_in_force(settings: Settings) -> None:
    with run_app(create_app(settings)) as url:
        answer = admin(url, "GET", "/policy")
    assert answer.status_code == 200
    assert answer.json() == Policy.from_settings(settings).to_json()
    assert answer.json()["source"] == "environment"


def test_two_replicas_see_an_accepted_appeals_unblock_within_a_second(settings: Settings) -> None:
    with run_app(create_app(settings)) as one, run_app(create_app(settings)) as two:
        for _ in range(3):
            block_id = strike(one, "vic")
        assert httpx2.get(f"{two}/v1/models", headers=as_user("vic")).status_code == 403
        appeal_id = appeal(two, "vic", {"event_id": block_id, "message": "Please."}).json()["id"]
        assert (
            admin(one, "POST", f"/appeals/{appeal_id}/decision", {"decision": "accept", "reason": "Ok."}).status_code
            == 200
        )
        decided = time.monotonic()
        while httpx2.get(f"{two}/v1/models", headers=as_user("vic")).status_code == 403:
            assert time.monotonic() - decided < 1.0, "replica two still refuses a second after the appeal was accepted"
            time.sleep(0.02)


def test_nothing_is_half_applied_when_the_database_drops_mid_decision(settings: Settings, database_url: str) -> None:
    with run_app(create_app(settings)) as url:
        for _ in range(3):
            block_id = strike(url, "uli")
        appeal_id = appeal(url, "uli", {"event_id": block_id, "message": "Please."}).json()["id"]
        run_sync(_terminate_inside(database_url, "appeals"))
        dropped = admin(url, "POST", f"/appeals/{appeal_id}/decision", {"decision": "accept", "reason": "Ok."})
        run_sync(_terminate_inside(database_url, None))
        error(dropped, 503, "store_unavailable")
        assert admin(url, "GET", f"/appeals/{appeal_id}").json()["status"] == "open"
        assert admin(url, "GET", "/users/uli").json()["blocked"] is True
        assert httpx2.get(f"{url}/v1/models", headers=as_user("uli")).status_code == 403
        assert admin(url, "GET", "/users/uli/events").json()["data"][0]["type"] == "block"
        assert outbox_types(database_url) == ["user.blocked"]
        retried = admin(url, "POST", f"/appeals/{appeal_id}/decision", {"decision": "accept", "reason": "Ok."})
        assert retried.json()["status"] == "accepted"
        assert httpx2.get(f"{url}/v1/models", headers=as_user("uli")).status_code == 200


def test_what_a_hostile_moderator_tool_sends(settings: Settings) -> None:
    with run_app(create_app(settings)) as url:
        error(admin(url, "GET", "/appeals/1"), 404, "appeal_not_found", "appeal_id")
        error(
            admin(url, "POST", "/appeals/1/decision", {"decision": "accept", "reason": "x"}),
            404,
            "appeal_not_found",
            "appeal_id",
        )
        error(admin(url, "POST", "/events/1/reverse", {"reason": "x"}), 404, "event_not_found", "event_id")
        for path in ("/appeals/abc", "/appeals/-1", "/appeals/" + "9" * 19, "/appeals/1%2F2"):
            error(admin(url, "GET", path), 400, "invalid_request", "appeal_id")
        error(admin(url, "POST", "/events/1e3/reverse", {"reason": "x"}), 400, "invalid_request", "event_id")
        for body, param in (
            ({"decision": "maybe", "reason": "x"}, "decision"),
            ({"decision": "accept"}, "reason"),
            ({"decision": "accept", "reason": " "}, "reason"),
            ({"decision": "accept", "reason": "x" * 1001}, "reason"),
            ({"decision": "accept", "reason": "a\x00b"}, "reason"),
            ({"decision": "accept", "reason": "x", "operator": "someone"}, "operator"),
            (None, "decision"),
        ):
            error(admin(url, "POST", "/appeals/1/decision", body), 400, "invalid_request", param)
        error(admin(url, "POST", "/events/1/reverse", {}), 400, "invalid_request", "reason")
        error(admin(url, "GET", "/appeals?status=all"), 400, "invalid_request", "status")
        error(admin(url, "GET", "/appeals?after=bm9wZQ"), 400, "invalid_request", "after")
        error(admin(url, "GET", "/policy?verbose=1"), 400, "invalid_request", "verbose")
        for method, path in (
            ("GET", "/appeals"),
            ("GET", "/policy"),
            ("DELETE", "/users/x"),
            ("POST", "/events/1/reverse"),
        ):
            error(httpx2.request(method, f"{url}/admin{path}", json={"reason": "x"}), 401, "invalid_admin_token")
        document = httpx2.get(f"{url}/admin/openapi.json").json()
        assert set(document["paths"]["/appeals/{appeal_id}/decision"]["post"]["responses"]) >= {"200", "404", "409"}
        assert document["paths"]["/users/{user_id}"]["delete"]["responses"]["204"] == {"description": "Done; no body."}
        assert document["paths"]["/events/{event_id}/reverse"]["post"]["requestBody"]["required"] is True


def test_roles_and_the_operators_name(settings: Settings, database_url: str) -> None:
    """A viewer reads appeals, a moderator decides them (and is named for it), only an admin erases."""

    async def add_operators() -> dict[str, str]:
        database = Database(settings)
        await database.open()
        try:
            operators = Operators(database, settings)
            return {name: (await operators.add(name, role, by="test"))[1] for name, role in ROLES_BY_NAME.items()}
        finally:
            await database.close()

    tokens = run_sync(add_operators())

    with run_app(create_app(settings)) as url:

        def call(name: str, method: str, path: str, body: Any = None) -> httpx2.Response:
            headers = {"Authorization": f"Bearer {tokens[name]}"}
            return httpx2.request(method, f"{url}/admin{path}", headers=headers, json=body)

        event_id = strike(url, "tom")
        appeal_id = appeal(url, "tom", {"event_id": event_id, "message": "Please."}).json()["id"]
        decision = {"decision": "accept", "reason": "A quote."}
        assert call("vic", "GET", f"/appeals/{appeal_id}").status_code == 200
        error(call("vic", "POST", f"/appeals/{appeal_id}/decision", decision), 403, "insufficient_role")
        error(call("vic", "POST", f"/events/{event_id}/reverse", {"reason": "x"}), 403, "insufficient_role")
        assert call("mo", "POST", f"/appeals/{appeal_id}/decision", decision).json()["decided_by"] == "mo"
        events = call("mo", "GET", "/users/tom/events").json()["data"]
        assert (events[0]["type"], events[0]["operator"]) == ("appeal_accepted", "mo")
        error(call("mo", "DELETE", "/users/tom"), 403, "insufficient_role")
        assert call("ada", "DELETE", "/users/tom").status_code == 204
    rows = run_sync(fetch(database_url, "SELECT operator FROM events WHERE kind = 'erased'"))
    assert [row["operator"] for row in rows] == ["ada"]


ROLES_BY_NAME: dict[str, Role] = {"vic": "viewer", "mo": "moderator", "ada": "admin"}
