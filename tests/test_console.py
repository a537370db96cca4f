"""The moderator console over HTTP on a real server: sessions, CSRF, headers, roles, the switch
of /admin, escaping and the CSV export. The same flows in a real browser: test_console_browser.py."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway import app as gateway_app
from gateway.app import create_app
from gateway.console import console_app, pages, queries
from gateway.console.app import CSP
from gateway.console.pages import csv_cell
from gateway.operators import Operators
from gateway.settings import Settings
from gateway.store import Store
from gateway.throttle import AuthThrottle
from tests.conftest import run_sync
from tests.consoles import CONSOLE, add_operators, admin, csrf_of, seed, sign_in
from tests.servers import run_app
from tests.test_standing import cut_short, started, status_of
from tests.test_store import fetch
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def settings(settings_factory: SettingsFactory, upstream: MockUpstream) -> Settings:
    return settings_factory(upstream_url=upstream.url, moderation="rules")


@pytest.fixture
def gateway(settings: Settings) -> Iterator[str]:
    with run_app(create_app(settings)) as url:
        yield url


def user_page(client: httpx2.Client, user_id: str) -> str:
    answer = client.get(f"{CONSOLE}/user", params={"id": user_id})
    assert answer.status_code == 200, answer.text
    return answer.text


def test_sign_in_sets_a_strict_cookie_and_sign_out_ends_the_session_on_the_server(
    gateway: str, database_url: str
) -> None:
    assert httpx2.get(f"{gateway}{CONSOLE}").headers["location"] == f"{CONSOLE}/"
    first = httpx2.get(f"{gateway}{CONSOLE}/")
    assert (first.status_code, first.headers["location"]) == (303, f"{CONSOLE}/signin")
    wrong = httpx2.post(f"{gateway}{CONSOLE}/signin", data={"token": "cgw_" + "x" * 43})
    assert wrong.status_code == 401
    assert "not an operator" in wrong.text
    assert "set-cookie" not in wrong.headers

    client = sign_in(gateway)
    cookie = client.cookies.jar
    (stored,) = list(cookie)
    answer = httpx2.post(f"{gateway}{CONSOLE}/signin", data={"token": "admin-secret"})
    attributes = answer.headers["set-cookie"].lower()
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert f"path={CONSOLE}" in attributes
    assert "max-age=28800" in attributes  # GATEWAY_CONSOLE_SESSION_HOURS: 8 by default
    assert "secure" not in attributes  # plain http here; see the test behind https
    rows = run_sync(fetch(database_url, "SELECT operator, generation FROM console_sessions"))
    assert len(rows) == 2
    assert {row["operator"] for row in rows} == {"admin"}
    # Only the SHA-256 of the cookie is stored.
    raw = stored.value
    assert raw is not None
    stored_keys = {
        bytes(row["id_sha256"]) for row in run_sync(fetch(database_url, "SELECT id_sha256 FROM console_sessions"))
    }
    assert hashlib.sha256(raw.encode()).digest() in stored_keys
    assert raw.encode() not in stored_keys

    overview = client.get(f"{CONSOLE}/")
    assert overview.status_code == 200
    assert "<h1>Overview</h1>" in overview.text
    out = client.post(f"{CONSOLE}/signout", data={"csrf": csrf_of(overview.text)})
    assert (out.status_code, out.headers["location"]) == (303, f"{CONSOLE}/signin")
    # The cookie replayed after sign-out opens nothing: the server revoked it.
    replay = httpx2.get(f"{gateway}{CONSOLE}/", cookies={"cgw_console": raw})
    assert replay.status_code == 303
    revoked = run_sync(fetch(database_url, "SELECT count(*) AS n FROM console_sessions WHERE revoked_at IS NOT NULL"))
    assert revoked[0]["n"] == 1


def test_the_cookie_is_secure_behind_https_and_a_session_expires(gateway: str, database_url: str) -> None:
    # 127.0.0.1 is a trusted proxy (FORWARDED_ALLOW_IPS): its X-Forwarded-Proto is the scheme.
    answer = httpx2.post(
        f"{gateway}{CONSOLE}/signin", data={"token": "admin-secret"}, headers={"X-Forwarded-Proto": "https"}
    )
    assert answer.status_code == 303
    assert "secure" in answer.headers["set-cookie"].lower()
    raw = answer.cookies["cgw_console"]
    assert httpx2.get(f"{gateway}{CONSOLE}/", cookies={"cgw_console": raw}).status_code == 200
    run_sync(fetch(database_url, "UPDATE console_sessions SET expires_at = now() - interval '1 second' RETURNING 1"))
    assert httpx2.get(f"{gateway}{CONSOLE}/", cookies={"cgw_console": raw}).headers["location"].endswith("/signin")


def test_every_answer_carries_the_policy_and_pages_are_not_cached(gateway: str) -> None:
    client = sign_in(gateway)
    for path in ("/", "/users", "/appeals", "/export", "/signin", "/static/console.css", "/nowhere"):
        answer = client.get(CONSOLE + path)
        assert answer.headers["content-security-policy"] == CSP, path
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "same-origin"
    assert "frame-ancestors 'none'" in CSP
    assert "script-src 'self';" in CSP
    page = client.get(f"{CONSOLE}/")
    assert page.headers["cache-control"] == "no-store"
    # No inline script or style for the policy to block: scripts and sheets come from the gateway.
    assert "<script>" not in page.text
    assert "style=" not in page.text
    assert 'src="/admin/console/static/console.js"' in page.text
    css = client.get(f"{CONSOLE}/static/console.css")
    assert css.headers["content-type"].startswith("text/css")
    assert client.get(f"{CONSOLE}/static/pages.py").status_code == 404


def test_a_forged_form_is_refused_and_changes_nothing(gateway: str) -> None:
    assert admin(gateway, "PUT", "/block/bea", {"permanent": True}).status_code == 200
    client = sign_in(gateway)
    csrf = csrf_of(user_page(client, "bea"))
    form = {"user_id": "bea", "reason": "forged"}
    refusals = [
        client.post(f"{CONSOLE}/user/unblock", data=form),  # no token
        client.post(f"{CONSOLE}/user/unblock", data={**form, "csrf": "0" * 64}),  # a wrong one
        # the right token, from a page on another site
        client.post(f"{CONSOLE}/user/unblock", data={**form, "csrf": csrf}, headers={"Origin": "https://evil.test"}),
        # the token of another session
        client.post(f"{CONSOLE}/user/unblock", data={**form, "csrf": csrf_of(user_page(sign_in(gateway), "bea"))}),
    ]
    for answer in refusals:
        assert answer.status_code == 403
        assert "did not come from this console" in answer.text
    assert admin(gateway, "GET", "/users/bea").json()["blocked"] is True
    done = client.post(
        f"{CONSOLE}/user/unblock", data={**form, "csrf": csrf, "reason": "ok"}, headers={"Origin": gateway}
    )
    assert done.status_code == 303
    assert admin(gateway, "GET", "/users/bea").json()["blocked"] is False
    events = admin(gateway, "GET", "/users/bea/events").json()["data"]
    assert (events[0]["type"], events[0]["operator"], events[0]["reason"]) == ("unblock", "admin", "ok")


def test_a_viewer_reads_but_cannot_act_and_a_removed_operator_is_signed_out(
    gateway: str, settings: Settings, database_url: str
) -> None:
    tokens = add_operators(settings, {"vic": "viewer", "mo": "moderator"})
    assert admin(gateway, "PUT", "/block/bea", {"permanent": True}).status_code == 200
    viewer = sign_in(gateway, tokens["vic"])
    page = user_page(viewer, "bea")
    assert "unblock-form" not in page
    assert 'id="read-only"' in page
    refused = viewer.post(f"{CONSOLE}/user/unblock", data={"user_id": "bea", "reason": "x", "csrf": csrf_of(page)})
    assert refused.status_code == 403
    assert "has the role viewer; this needs moderator" in refused.text
    assert admin(gateway, "GET", "/users/bea").json()["blocked"] is True

    moderator = sign_in(gateway, tokens["mo"])
    assert "unblock-form" in user_page(moderator, "bea")
    assert admin(gateway, "DELETE", "/operators/mo").status_code == 200
    gone = moderator.get(f"{CONSOLE}/user", params={"id": "bea"})
    assert gone.headers["location"] == f"{CONSOLE}/signin"
    rows = run_sync(fetch(database_url, "SELECT revoked_at FROM console_sessions WHERE operator = 'mo'"))
    assert rows[0]["revoked_at"] is not None


def test_the_console_is_off_with_the_admin_api(settings_factory: SettingsFactory) -> None:
    for settings in (settings_factory(admin=False), settings_factory(admin_token=None)):
        with run_app(create_app(settings)) as url:
            for answer in (
                httpx2.get(f"{url}{CONSOLE}/"),
                httpx2.get(f"{url}{CONSOLE}/signin"),
                httpx2.post(f"{url}{CONSOLE}/signin", data={"token": "admin-secret"}),
            ):
                assert answer.status_code == 503
                assert answer.json()["error"]["code"] == "admin_disabled"


async def test_failed_sign_ins_are_throttled(store: Store, settings_factory: SettingsFactory) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    settings = settings_factory()
    throttle = AuthThrottle(free_failures=2, sleep=sleep)
    app = Starlette(
        routes=[Mount(CONSOLE, console_app(store, Operators(store.database, settings), settings, throttle=throttle))]
    )
    transport = httpx2.ASGITransport(app=app, client=("10.0.0.7", 1234))
    async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for _ in range(4):
            assert (await client.post(f"{CONSOLE}/signin", data={"token": "guess"})).status_code == 401
        assert waits == [0.25, 0.5]
        assert (await client.post(f"{CONSOLE}/signin", data={"token": "admin-secret"})).status_code == 303
        assert len(throttle) == 0


def test_guesses_at_the_sign_in_and_at_the_admin_api_share_one_throttle(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    def throttle() -> AuthThrottle:
        return AuthThrottle(free_failures=2, sleep=sleep)

    monkeypatch.setattr(gateway_app, "AuthThrottle", throttle, raising=False)
    with run_app(create_app(settings)) as url:
        for _ in range(2):
            assert httpx2.post(f"{url}{CONSOLE}/signin", data={"token": "guess"}).status_code == 401
        assert waits == []
        guess = {"Authorization": "Bearer guess"}
        assert httpx2.get(f"{url}/admin/stats", headers=guess).status_code == 401
        assert waits == [0.25]  # the API's first guess from this peer, the third in all
        assert httpx2.post(f"{url}{CONSOLE}/signin", data={"token": "guess"}).status_code == 401
        assert waits == [0.25, 0.5]
        # A success at either clears the peer for both.
        assert httpx2.get(f"{url}/admin/stats", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
        assert httpx2.post(f"{url}{CONSOLE}/signin", data={"token": "guess"}).status_code == 401
        assert waits == [0.25, 0.5]


def test_a_moderator_acts_from_the_user_page_and_the_timeline_shows_it(gateway: str) -> None:
    ids = seed(gateway)
    client = sign_in(gateway)
    page = user_page(client, "yan")
    csrf = csrf_of(page)
    assert "unblock-form" not in page  # yan is not blocked
    assert (
        client.post(
            f"{CONSOLE}/user/block", data={"user_id": "yan", "hours": "2", "reason": "", "csrf": csrf}
        ).status_code
        == 400
    )
    answer = client.post(
        f"{CONSOLE}/user/block", data={"user_id": "yan", "hours": "2", "reason": "abuse", "csrf": csrf}
    )
    assert answer.status_code == 303
    page = client.get(answer.headers["location"]).text
    assert "The user is blocked." in page
    assert "“abuse”" in page
    status = admin(gateway, "GET", "/users/yan").json()
    assert status["blocked"] is True
    assert status["permanent"] is False
    until = datetime.fromisoformat(status["blocked_until"])
    assert timedelta(hours=1.9) < until - datetime.now(UTC) <= timedelta(hours=2)

    note = client.post(f"{CONSOLE}/user/note", data={"user_id": "yan", "text": "Asked the app owner.", "csrf": csrf})
    assert note.status_code == 303
    strike_id = next(
        e["id"] for e in admin(gateway, "GET", "/users/yan/events").json()["data"] if e["type"] == "violation"
    )
    answer = client.post(
        f"{CONSOLE}/event/reverse", data={"event_id": str(strike_id), "reason": "a quote", "csrf": csrf}
    )
    assert answer.status_code == 303
    events = admin(gateway, "GET", "/users/yan/events").json()["data"]
    assert [(e["type"], e.get("operator")) for e in events[:2]] == [("reversed", "admin"), ("note", "admin")]

    # The appeals queue: accept zoe's appeal of her block, which lifts it.
    queue = client.get(f"{CONSOLE}/appeals")
    assert f'id="appeal-{ids["appeal"]}"' in queue.text
    assert "I was quoting a news story." in queue.text
    decided = client.post(
        f"{CONSOLE}/appeals/decide",
        data={"appeal_id": ids["appeal"], "decision": "accept", "reason": "News.", "csrf": csrf_of(queue.text)},
    )
    assert decided.status_code == 303
    assert admin(gateway, "GET", "/users/zoe").json()["blocked"] is False
    again = client.post(
        f"{CONSOLE}/appeals/decide",
        data={"appeal_id": ids["appeal"], "decision": "reject", "reason": "No.", "csrf": csrf_of(queue.text)},
    )
    assert again.status_code == 409
    assert "already" in again.text or "decided" in again.text


def test_users_search_filter_pages_and_escaping(gateway: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = '<script>alert("x")</script>'
    for user_id in ("ann-1", "ann-2", "bob", hostile):
        assert admin(gateway, "PUT", f"/block/{quote(user_id, safe='')}").status_code == 200
    assert admin(gateway, "PUT", "/unblock/ann-2").status_code == 200
    rest = httpx2.get(
        f"{gateway}/admin/users", params={"prefix": "ann"}, headers={"Authorization": "Bearer admin-secret"}
    )
    assert [user["user_id"] for user in rest.json()["data"]] == ["ann-1", "ann-2"]
    bad = httpx2.get(
        f"{gateway}/admin/users", params={"prefix": "a\x01"}, headers={"Authorization": "Bearer admin-secret"}
    )
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "prefix")
    client = sign_in(gateway)
    listing = client.get(f"{CONSOLE}/users", params={"q": "ann"}).text
    assert "ann-1" in listing
    assert "ann-2" in listing
    assert "bob" not in listing
    blocked = client.get(f"{CONSOLE}/users", params={"q": "ann", "blocked": "yes"}).text
    assert "ann-1" in blocked
    assert "ann-2" not in blocked
    everyone = client.get(f"{CONSOLE}/users").text
    assert hostile not in everyone
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in everyone
    assert hostile not in user_page(client, hostile)

    monkeypatch.setattr(pages, "PAGE_SIZE", 2)
    first = client.get(f"{CONSOLE}/users")
    assert "ann-1" in first.text
    assert "bob" not in first.text
    following = first.text.split('class="button" href="')[1].split('"')[0].replace("&amp;", "&")
    second = client.get(following)
    assert "bob" in second.text
    assert "ann-1" not in second.text
    assert client.get(f"{CONSOLE}/users", params={"after": "!!"}).status_code == 400


def test_the_overview_counts_and_charts(gateway: str) -> None:
    seed(gateway)
    page = sign_in(gateway).get(f"{CONSOLE}/").text
    assert '<span class="number" id="blocked-now">2</span>' in page
    assert '<span class="number" id="open-appeals">1</span>' in page
    assert page.count('<svg class="chart"') == 4
    assert "Violations, last 24 hours" in page
    assert "illicit/violent" in page  # the category the rules flagged, in the legend and the tables
    assert "explosives-instructions" in page  # the rule that fired most


def test_the_csv_export_is_bounded_and_defuses_formulas(gateway: str) -> None:
    assert admin(gateway, "PUT", "/block/eve", {"seconds": 60, "reason": '=HYPERLINK("http://x")'}).status_code == 200
    assert admin(gateway, "POST", "/users/eve/notes", {"text": "+1 and -1 and @me"}).status_code == 201
    client = sign_in(gateway)
    now = datetime.now(UTC)
    window = {
        "start": f"{now - timedelta(hours=1):%Y-%m-%dT%H:%M}",
        "end": f"{now + timedelta(minutes=2):%Y-%m-%dT%H:%M}",
    }
    answer = client.get(f"{CONSOLE}/export.csv", params=window)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.headers["content-disposition"].startswith('attachment; filename="events-')
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert [row["type"] for row in rows] == ["block", "note"]
    assert rows[0]["reason"] == '\'=HYPERLINK("http://x")'
    assert rows[1]["text"] == "'+1 and -1 and @me"
    assert rows[0]["user_id"] == "eve"
    assert rows[0]["operator"] == "admin"

    too_long = {"start": "2026-01-01T00:00", "end": "2026-03-01T00:00"}
    assert client.get(f"{CONSOLE}/export.csv", params=too_long).status_code == 400
    assert client.get(f"{CONSOLE}/export.csv", params={"start": "x", "end": "y"}).status_code == 400
    backwards = {"start": window["end"], "end": window["start"]}
    assert client.get(f"{CONSOLE}/export.csv", params=backwards).status_code == 400


def test_an_export_at_the_calendars_start_is_refused_or_empty_not_a_failure(gateway: str) -> None:
    client = sign_in(gateway)
    # UTC of 00:30+01:00 on the first day there is would be before it.
    before = client.get(f"{CONSOLE}/export.csv", params={"start": "0001-01-01T00:30+01:00", "end": "0001-01-02T00:00"})
    assert before.status_code == 400
    assert "start is a date and time" in before.text
    first_day = client.get(f"{CONSOLE}/export.csv", params={"start": "0001-01-01T00:00", "end": "0001-01-02T00:00"})
    assert first_day.status_code == 200
    assert first_day.text.splitlines() == [",".join(pages.CSV_COLUMNS)]


async def test_the_export_starts_with_an_event_at_its_very_start(store: Store) -> None:
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    async with store.database.connection() as conn:
        await conn.execute("INSERT INTO users (user_id) VALUES ('u')")
        await conn.execute(
            "INSERT INTO events (user_id, kind, operator, note, at) VALUES ('u', 'note', 'mo', 'at', $1),"
            " ('u', 'note', 'mo', 'before', $1 - interval '1 microsecond'),"
            " ('u', 'note', 'mo', 'end', $1 + interval '1 hour')",
            at,
        )
    found = [event async for event in queries.export_events(store.database, at, at + timedelta(hours=1))]
    assert [event["text"] for event in found] == ["at"]


def test_csv_cells_that_a_spreadsheet_would_run() -> None:
    for text in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(text) == "'" + text
    assert csv_cell("plain") == "plain"
    assert csv_cell(None) == ""
    assert csv_cell(["a", "b"]) == "a b"
    assert csv_cell(True) == "true"
    assert csv_cell(3) == "3"


async def test_the_export_reads_every_event_once_across_batches_of_equal_times(store: Store) -> None:
    async with store.database.connection() as conn:
        await conn.execute("INSERT INTO users (user_id) VALUES ('u')")
        # One statement: five events at one and the same time, which the (at, id) keyset must page through.
        await conn.execute(
            "INSERT INTO events (user_id, kind, operator, note)"
            " SELECT 'u', 'note', 'mo', 'n' || i FROM generate_series(1, 5) i"
        )
        await conn.execute(
            "INSERT INTO events (user_id, kind, operator, note, at)"
            " VALUES ('u', 'note', 'mo', 'old', now() - interval '2 days')"
        )
        ids = [row["id"] for row in await conn.fetch("SELECT id FROM events WHERE note <> 'old' ORDER BY id")]
    now = datetime.now(UTC)
    found = [
        event
        async for event in queries.export_events(
            store.database, now - timedelta(days=1), now + timedelta(minutes=1), batch=2
        )
    ]
    assert [event["id"] for event in found] == ids
    assert [event["text"] for event in found] == ["n1", "n2", "n3", "n4", "n5"]


def test_what_a_hostile_client_sends_gets_a_clear_refusal_and_changes_nothing(gateway: str) -> None:
    assert admin(gateway, "PUT", "/block/bea", {"permanent": True}).status_code == 200
    client = sign_in(gateway)
    csrf = csrf_of(user_page(client, "bea"))
    unblock = f"{CONSOLE}/user/unblock"
    form = {"user_id": "bea", "reason": "r", "csrf": csrf}
    refusals = {
        "as JSON": client.post(unblock, json=form),
        "too large": client.post(unblock, data={**form, "pad": "x" * 20_000}),
        "not UTF-8": client.post(
            unblock, content=b"user_id=%FF&reason=r&csrf=" + csrf.encode(), headers={"Content-Type": FORM}
        ),
        "a field twice": client.post(
            unblock, content=f"user_id=bea&user_id=bob&reason=r&csrf={csrf}".encode(), headers={"Content-Type": FORM}
        ),
        "a NUL": client.post(unblock, data={**form, "reason": "a\x00b"}),
        "an empty reason": client.post(unblock, data={**form, "reason": "  "}),
        "a control character in the id": client.post(unblock, data={**form, "user_id": "b\x01"}),
        "hours that are no number": client.post(f"{CONSOLE}/user/block", data={**form, "hours": "soon"}),
        "an event id that is no number": client.post(f"{CONSOLE}/event/reverse", data={**form, "event_id": "1 OR 1=1"}),
        "an appeal id that is no number": client.post(
            f"{CONSOLE}/appeals/decide", data={**form, "appeal_id": "-1", "decision": "accept"}
        ),
        "a decision that is neither": client.post(
            f"{CONSOLE}/appeals/decide", data={**form, "appeal_id": "1", "decision": "maybe"}
        ),
    }
    for what, answer in refusals.items():
        assert answer.status_code in (400, 413), what
        assert answer.headers["content-security-policy"] == CSP, what
    assert admin(gateway, "GET", "/users/bea").json()["blocked"] is True
    assert len(admin(gateway, "GET", "/users/bea/events").json()["data"]) == 1

    unknown = client.post(unblock, data={**form, "user_id": "nobody"})
    assert unknown.status_code == 404
    assert "never recorded" in unknown.text
    assert client.get(f"{CONSOLE}/user", params={"id": "nobody"}).status_code == 404
    assert client.get(f"{CONSOLE}/users", params={"blocked": "maybe"}).status_code == 400
    assert client.get(f"{CONSOLE}/appeals", params={"status": "all"}).status_code == 400
    assert client.get(f"{CONSOLE}/appeals", params={"after": "!!"}).status_code == 400
    # Cookies no sign-in made open nothing, and a POST without a session is told to sign in.
    for cookie in ("", "x" * 43, "!" * 43, "a" * 500):
        answer = httpx2.get(f"{gateway}{CONSOLE}/users", cookies={"cgw_console": cookie})
        assert answer.headers["location"] == f"{CONSOLE}/signin"
    signed_out = httpx2.post(f"{gateway}{unblock}", data=form)
    assert signed_out.status_code == 403
    assert "signed out" in signed_out.text


async def test_a_sign_in_whose_client_hangs_up_mid_form_ends_quietly(settings: Settings) -> None:
    app = create_app(settings)
    async with started(app):
        headers = {"content-type": FORM, "origin": "http://gateway"}
        sent, logs = await cut_short(app, f"{CONSOLE}/signin", b"token=admin-se", headers)
    assert status_of(sent) == 400
    assert [line for line in logs if line["log_level"] in ("error", "critical")] == []
    assert "unhandled_error" not in [line["event"] for line in logs]
